"""Markdown the app shows about its model: the status line and the model card with the thresholds in use."""
from __future__ import annotations

from pathlib import Path

from vlmdiff.model_folder import model_card as model_card_file
from vlmdiff.pipeline import VLMDiffPipeline


def status_markdown(model_id: str, pipeline: VLMDiffPipeline, classes: list[str], user_dir: Path | None,
                    notice: str | None = None) -> str:
    """One line: which model is active (the shipped one, or the user's copy with its changes) and its classes."""
    config = pipeline.config
    names = ", ".join(classes) or "none yet"
    changes = (f" with your changes (saved thresholds, fine-tuned classes) in `{user_dir}`; "
               "'Reset to the shipped model' drops them") if user_dir else ""
    text = f"Model `{model_id}`{changes} ({config.preset}, {config.resolution} px) - classes: {names}"
    return f"**Note:** {notice}\n\n{text}" if notice else text


def model_card(folder: Path, pipeline: VLMDiffPipeline, classes: list[str]) -> str:
    """The folder's model card (or a description from the config) plus the classes and thresholds in use."""
    path = model_card_file(folder)
    card = _strip_front_matter(path.read_text(encoding="utf-8", errors="replace")) if path else ""
    config = pipeline.config
    if not card:
        card = (
            f"# vlmdiff model `{folder.name}`\n\n"
            "A vision-language-guided latent diffusion anomaly detector "
            f"(preset `{config.preset}`, {config.resolution} px, captioner `{config.captioner}`, "
            f"text encoder `{config.text_encoder}`, {config.num_inference_steps} DDIM steps at strength "
            f"{config.strength}). This folder has no MODEL_CARD.md."
        )
    rows = []
    for name in classes:
        if name in pipeline.thresholds.classes:
            item = pipeline.thresholds.get(name)
            rows.append(f"| {name} | {item.value:.4g} | {item.method} |")
        else:
            rows.append(f"| {name} | - | - |")
    table = "\n".join(["| class | threshold | method |", "|---|---|---|", *rows]) if rows else "No classes yet."
    return f"{card}\n\n## Loaded now\n\nModel folder: `{folder}`\n\n{table}\n"


def _strip_front_matter(text: str) -> str:
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end != -1:
            return text[end + 4 :].lstrip("\n")
    return text

"""Markdown the app shows about its model: the status line and the model card with the thresholds in use."""
from __future__ import annotations

from pathlib import Path

from vlmdiff.config import PipelineConfig
from vlmdiff.model_folder import model_card as model_card_file
from vlmdiff.scoring import AnomalyScorer
from vlmdiff.thresholds import Thresholds


def status_markdown(model_name: str, config: PipelineConfig, classes: list[str], changes: str = "",
                    notice: str | None = None) -> str:
    """The active model, its classes, and `changes` (a sentence on whose changes are in use)."""
    names = ", ".join(classes) or "none yet"
    text = f"Model `{model_name}` ({config.preset}, {config.resolution} px) - classes: {names}. {changes}".rstrip()
    return f"**Note:** {notice}\n\n{text}" if notice else text


def changes_summary(thresholds: list[str], classes: list[str]) -> str:
    """What 'Reset' / 'Drop my changes' drops: the classes' saved `thresholds` and the fine-tuned `classes`."""
    parts = ([f"the thresholds you saved for {', '.join(thresholds)}"] if thresholds else []) + (
        [f"the classes you fine-tuned ({', '.join(classes)})"] if classes else [])
    what = " and ".join(parts) or "your copy of the model"
    return f"This drops {what}, for good; the shipped model is used again."


def shared_changes(user_dir: Path) -> str:
    """The status sentence of a private app whose shared model has saved changes."""
    return (f"In use with your changes (saved thresholds, fine-tuned classes) from `{user_dir}`; "
            "'Reset to the shipped model' drops them.")


def visitor_changes(has_changes: bool, notice: str | None) -> str:
    """The status sentence of a gated app, for a visitor with or without changes of their own."""
    mine = " You have some; 'Drop my changes' removes them." if has_changes else ""
    notice = f" **{notice}**" if notice else ""
    return ("**Your saved thresholds and fine-tuned classes stay in this browser session**; other visitors do "
            f"not see them.{mine}{notice}")


def model_card(folder: Path, config: PipelineConfig, thresholds: Thresholds, classes: list[str],
               show_folder: bool = True) -> str:
    """The folder's model card (or a description from the config) plus the classes and thresholds in use;
    the folder's path only with `show_folder` (never on a public app)."""
    path = model_card_file(folder)
    card = _strip_front_matter(path.read_text(encoding="utf-8", errors="replace")) if path else ""
    if not card:
        card = (
            f"# vlmdiff model `{folder.name}`\n\n"
            "A vision-language-guided latent diffusion anomaly detector "
            f"(preset `{config.preset}`, {config.resolution} px, captioner `{config.captioner}`, "
            f"text encoder `{config.text_encoder}`, {config.num_inference_steps} DDIM steps at strength "
            f"{config.strength}). This folder has no MODEL_CARD.md."
        )
    scorer = AnomalyScorer(config.anomaly)
    rows = []
    for name in classes:
        item = thresholds.get(name) if name in thresholds.classes else None
        threshold = f"{item.value:.4g} | {item.method}" if item is not None else "- | -"
        rows.append(f"| {name} | {threshold} | {scorer.describe(name)} |")
    table = "\n".join(["| class | threshold | method | score from |", "|---|---|---|---|", *rows]) if rows else "No classes yet."
    fused = [name for name in classes if scorer.uses_reconstruction(name)]
    if rows:
        table += ("\n\nThe denoising strength changes the score of " + ", ".join(fused) + " (their score uses the "
                  "reconstruction); for the other classes it changes only the reconstruction shown." if fused else
                  "\n\nNo class's score uses the reconstruction: the denoising strength changes only the "
                  "reconstruction shown.")
    where = f"Model folder: `{folder}`\n\n" if show_folder else ""
    return f"{card}\n\n## Loaded now\n\n{where}{table}\n"


def _strip_front_matter(text: str) -> str:
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end != -1:
            return text[end + 4 :].lstrip("\n")
    return text

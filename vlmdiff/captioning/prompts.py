"""The published VLMDiff captioning prompts, verbatim."""
from __future__ import annotations

# P_D, the default for industrial data: a detailed description of the main object.
PROMPT_DESCRIBE = (
    "Describe the visual features of image in detail with a focus on the main object, "
    "with around 60 words and maybe 4 or 5 sentences."
)
# P_A: the VLM is asked to act as a defect inspector.
PROMPT_INSPECT = (
    "Be a pixel level visual defect inspector, and describe whether there is a defect or not on the "
    "main object itself, with around 60 words and maybe 4 or 5 sentences."
)
# COCO-AD: scenes rather than one object.
PROMPT_COCO = (
    "Describe the visual features of image in detail, with around 60 words and maybe 4 or 5 sentences."
)

PROMPTS = {"pd": PROMPT_DESCRIBE, "pa": PROMPT_INSPECT, "coco": PROMPT_COCO}


def resolve_prompt(name_or_text: str) -> str:
    """A published prompt by short name (pd, pa, coco), or the given text itself."""
    return PROMPTS.get(name_or_text.lower(), name_or_text)

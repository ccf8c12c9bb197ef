"""About tab: the model card (MODEL_CARD.md of the model folder, or a description from its config)
and the classes and thresholds in use."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from vlmdiff.app.service import DetectorService

ABOUT_APP = (
    "**How it works.** The image is encoded to a latent, noised to a step set by the denoising strength, and "
    "denoised with DDIM by a UNet (guided by the clean image through a semantic guidance network, when the model "
    "has one) into a normal-looking reconstruction. Memory-guided (the Detect tab's box), only the regions the "
    "normal-feature memory flags are regenerated and the rest of the image is kept. The heatmap fuses the component "
    "maps the model card names: "
    "where the reconstruction differs from the input, and where the image is far from the normal patches of its "
    "class; the image score is compared with the class threshold. The caption is what the vision-language model "
    "says about the image."
)


@dataclass
class AboutTab:
    card: gr.Markdown


def build_about_tab(service: DetectorService) -> AboutTab:
    gr.Markdown(ABOUT_APP)
    card = gr.Markdown(service.model_card(), elem_id="model-card")
    return AboutTab(card)

"""DiAD's Semantic-Guided (SG) network: a ControlNet branch plus the SFF fusion block.

The branch is a copy of the UNet encoder and middle block (diffusers'
`ControlNetModel.from_unet`) fed the clean image through a hint encoder whose last
layer starts at zero. The Spatial-aware Feature Fusion (SFF) block adds zero-initialised
3x3 stride-2 convolutions that fuse each resolution's features into the next deeper one,
so the branch starts as an exact no-op on the UNet.
"""
from __future__ import annotations

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def residual_layout(block_out_channels: tuple[int, ...], layers_per_block: int) -> list[tuple[int, bool]]:
    """(channels, is_downsampled) of each residual the ControlNet encoder emits, in order."""
    layout = [(block_out_channels[0], False)]  # conv_in
    for index, channels in enumerate(block_out_channels):
        layout += [(channels, False)] * layers_per_block
        if index < len(block_out_channels) - 1:
            layout.append((channels, True))
    return layout


def zero_conv(in_channels: int, out_channels: int, stride: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class HintEncoder(ControlNetConditioningEmbedding):
    """ControlNet's hint encoder that also accepts its own output and passes it through.

    The encoded hint of the clean image is the same at every DDIM step, so inference encodes
    it once (`SemanticGuidanceNet.embed_hint`) instead of once per step. An encoded hint has
    the embedding's channel count, an image hint the image's, so the two cannot be mistaken.
    Same parameters as the parent: saved weights load unchanged.
    """

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        if conditioning.shape[1] != self.conv_in.in_channels and conditioning.shape[1] == self.conv_out.out_channels:
            return conditioning
        return super().forward(conditioning)


class SemanticGuidanceNet(ModelMixin, ConfigMixin):
    """ControlNet-style SG branch whose residuals are added to the UNet's skips and middle block."""

    @register_to_config
    def __init__(self, controlnet_config: dict) -> None:
        super().__init__()
        self.controlnet = ControlNetModel.from_config(controlnet_config)
        self.controlnet.controlnet_cond_embedding.__class__ = HintEncoder  # same module, accepts encoded hints
        layout = residual_layout(
            tuple(controlnet_config["block_out_channels"]), controlnet_config["layers_per_block"]
        )
        self.sff_indices = [i for i, (_, down) in enumerate(layout) if down]
        self.sff = nn.ModuleList(zero_conv(layout[i - 1][0], layout[i][0], stride=2) for i in self.sff_indices)

    @classmethod
    def from_unet(
        cls, unet: UNet2DConditionModel, hint_channels: tuple[int, ...] = (16, 32, 96, 256)
    ) -> "SemanticGuidanceNet":
        """Copy the UNet encoder (DiAD initialises the SG network from the UNet)."""
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_channels)
        network = cls(controlnet_config=dict(controlnet.config))
        network.controlnet.load_state_dict(controlnet.state_dict())
        return network

    def embed_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """The encoded hint (B, C0, h, w) for (B, 3, H, W) images in [-1, 1]; `forward` accepts it as `hint`."""
        if self.controlnet.config.controlnet_conditioning_channel_order == "bgr":
            raise ValueError("encoded hints need the rgb channel order")  # the ControlNet would flip them
        return self.controlnet.controlnet_cond_embedding(hint)

    def forward(
        self,
        latents: torch.Tensor,  # (B, C, h, w)
        timesteps: torch.Tensor,  # (B,)
        context: torch.Tensor,  # (B, 77, D)
        hint: torch.Tensor,  # (B, 3, H, W) in [-1, 1], or its `embed_hint` encoding
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        output = self.controlnet(
            latents, timesteps, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False
        )
        residuals, middle = list(output[0]), output[1]
        for conv, index in zip(self.sff, self.sff_indices):
            residuals[index] = residuals[index] + conv(residuals[index - 1])
        return residuals, middle

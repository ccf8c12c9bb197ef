"""The SG network (ControlNet branch + SFF) and the two autoencoders."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import AutoencoderKL

from conftest import PRESET_NAMES, RESOLUTION, perturb_
from vlmdiff.models import SG_RESIDUALS, FeatureAutoencoder, SemanticGuidanceNet, decode_latents, encode_latents
from vlmdiff.models.semantic_guidance import residual_layout


def sg_inputs(pipe, batch: int = 2, height: int = 64, width: int = 48, seed: int = 0):
    """Random latents, timesteps, context and hint for a (possibly non-square) image size."""
    generator = torch.Generator().manual_seed(seed)
    channels = pipe.unet.config.in_channels
    latents = torch.randn(batch, channels, height // 8, width // 8, generator=generator)
    timesteps = torch.tensor([999, 500][:batch])
    context = torch.randn(batch, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    hint = torch.rand(batch, 3, height, width, generator=generator) * 2 - 1
    return latents, timesteps, context, hint


def unet_skip_shapes(unet, latents, timesteps, context) -> tuple[list[torch.Size], torch.Size]:
    """Shapes of the skip connections and middle-block output the UNet itself produces."""
    shapes, hooks = [], []
    hooks.append(unet.conv_in.register_forward_hook(lambda m, i, out: shapes.append(out.shape)))
    for block in unet.down_blocks:
        hooks.append(block.register_forward_hook(lambda m, i, out: shapes.extend(r.shape for r in out[1])))
    middle = []
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i, out: middle.append(out.shape)))
    try:
        unet(latents, timesteps, encoder_hidden_states=context)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes, middle[0]


# ---------------------------------------------------------------- SG network
def test_residual_layout_of_tiny_and_sd15_unets():
    assert residual_layout((64, 128, 192), 1) == [(64, False), (64, False), (64, True), (128, False), (128, True), (192, False)]
    sd15 = residual_layout((320, 640, 1280, 1280), 2)
    assert len(sd15) == 12  # SD-1.5's twelve skip connections
    assert [i for i, (_, down) in enumerate(sd15) if down] == [3, 6, 9]


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("size", [(64, 64), (64, 48)])
def test_sg_residuals_match_the_unet_skips(preset, size, pipes):
    pipe = pipes[preset]
    latents, timesteps, context, hint = sg_inputs(pipe, height=size[0], width=size[1])
    with torch.no_grad():
        residuals, middle = pipe.guidance(latents, timesteps, context, hint)
        expected, expected_middle = unet_skip_shapes(pipe.unet, latents, timesteps, context)
        noise = pipe.predict(latents, 999, context, hint)  # the UNet accepts the residuals
    assert [r.shape for r in residuals] == expected
    assert middle.shape == expected_middle
    assert noise.shape == latents.shape


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_sg_network_starts_as_an_exact_no_op(preset, pipes):
    guidance = pipes[preset].guidance
    assert len(guidance.sff) == len(guidance.sff_indices) == len(pipes[preset].unet.config.block_out_channels) - 1
    for conv in guidance.sff:
        assert conv.stride == (2, 2)
        assert not conv.weight.any() and not conv.bias.any()
    latents, timesteps, context, hint = sg_inputs(pipes[preset])
    with torch.no_grad():
        residuals, middle = guidance(latents, timesteps, context, hint)
    assert all(not r.any() for r in residuals) and not middle.any()


def test_from_unet_copies_the_unet_encoder(tiny_kl_pipe):
    unet, controlnet = tiny_kl_pipe.unet, tiny_kl_pipe.guidance.controlnet
    assert torch.equal(controlnet.conv_in.weight, unet.conv_in.weight)
    for ours, theirs in zip(controlnet.down_blocks, unet.down_blocks):
        for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), name
    assert controlnet.config.conditioning_embedding_out_channels == (16, 32, 96, 256)


def test_sff_adds_the_previous_resolution_to_downsampled_residuals(tiny_kl_pipe):
    guidance = SemanticGuidanceNet.from_unet(tiny_kl_pipe.unet)
    perturb_(guidance.controlnet, seed=2)  # the branch is trained, SFF still zero
    inputs = sg_inputs(tiny_kl_pipe)
    with torch.no_grad():
        before, middle_before = guidance(*inputs)
        perturb_(guidance.sff, seed=3)
        after, middle_after = guidance(*inputs)
        for index, (a, b) in enumerate(zip(before, after)):
            if index in guidance.sff_indices:
                conv = guidance.sff[guidance.sff_indices.index(index)]
                torch.testing.assert_close(b, a + conv(before[index - 1]))
                assert not torch.equal(a, b)
            else:
                assert torch.equal(a, b)
    assert torch.equal(middle_before, middle_after)


def test_sg_network_save_and_load(tiny_kl_pipe, tmp_path):
    guidance = SemanticGuidanceNet.from_unet(tiny_kl_pipe.unet)
    perturb_(guidance, seed=4)
    guidance.save_pretrained(tmp_path / "guidance")
    assert (tmp_path / "guidance" / "config.json").is_file()
    loaded = SemanticGuidanceNet.from_pretrained(tmp_path / "guidance").eval()
    assert loaded.sff_indices == guidance.sff_indices
    state, loaded_state = guidance.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    inputs = sg_inputs(tiny_kl_pipe)
    with torch.no_grad():
        expected, expected_middle = guidance.eval()(*inputs)
        got, got_middle = loaded(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(expected, got)) and torch.equal(expected_middle, got_middle)


# ---------------------------------------------------------------- autoencoders
@pytest.mark.parametrize(("preset", "autoencoder_class", "channels"), [("tiny", FeatureAutoencoder, 32), ("tiny-kl", AutoencoderKL, 4)])
def test_encode_decode_shapes_and_range(preset, autoencoder_class, channels, pipes):
    autoencoder = pipes[preset].autoencoder
    assert isinstance(autoencoder, autoencoder_class)
    images = torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = encode_latents(autoencoder, images)
        decoded = decode_latents(autoencoder, latents)
    assert latents.shape == (2, channels, RESOLUTION // 8, RESOLUTION // 8)
    assert decoded.shape == images.shape
    assert 0.0 <= float(decoded.min()) and float(decoded.max()) <= 1.0
    assert pipes[preset].unet.config.in_channels == channels


def test_feature_autoencoder_latent_space_is_whitened_after_fitting():
    autoencoder = FeatureAutoencoder(latent_channels=8)
    images = torch.rand(4, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0))
    autoencoder.fit_latent_space(images)
    with torch.no_grad():
        latents = autoencoder.encode_latents(images).permute(0, 2, 3, 1).reshape(-1, 8)  # (N, 8)
        covariance = torch.cov(latents.T)
    torch.testing.assert_close(latents.mean(0), torch.zeros(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(covariance, torch.eye(8), atol=1e-3, rtol=0)  # unit variance, decorrelated


def test_feature_autoencoder_saves_its_latent_space_but_not_the_frozen_backbone(tmp_path):
    autoencoder = FeatureAutoencoder(latent_channels=8, decoder_channels=(32, 16, 8))
    images = torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(1))
    autoencoder.fit_latent_space(images)
    autoencoder.save_pretrained(tmp_path / "ae")
    loaded = FeatureAutoencoder.from_pretrained(tmp_path / "ae").eval()
    assert not any(key.startswith("_encoder") for key in loaded.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded.encode_latents(images), autoencoder.encode_latents(images))
        latents = autoencoder.encode_latents(images)
        assert torch.equal(loaded.decode_latents(latents), autoencoder.eval().decode_latents(latents))


def test_guided_unet_puts_residuals_where_told(tiny_kl_pipe):
    from vlmdiff.models import guided_unet

    pipe = tiny_kl_pipe
    guidance = copy.deepcopy(pipe.guidance)
    perturb_(guidance)  # trained-like: the zero convs are no longer zero
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    timesteps, context = torch.tensor([500]), pipe.caption_context(None, 1)
    hint = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    with torch.no_grad():
        plain = pipe.unet(latents, timesteps, encoder_hidden_states=context).sample
        outputs = {mode: guided_unet(pipe.unet, guidance, latents, timesteps, context, hint, mode) for mode in SG_RESIDUALS}
        residuals, middle = guidance(latents, timesteps, context, hint)
        mid_only = pipe.unet(
            latents, timesteps, encoder_hidden_states=context,
            down_block_additional_residuals=[torch.zeros_like(r) for r in residuals], mid_block_additional_residual=middle,
        ).sample
    assert torch.equal(outputs["none"], plain)
    assert torch.equal(outputs["mid"], mid_only) and not torch.equal(outputs["mid"], plain)
    assert not torch.equal(outputs["all"], outputs["mid"])
    with torch.no_grad():
        assert torch.equal(guided_unet(pipe.unet, None, latents, timesteps, context, None, "none"), plain)
    with pytest.raises(ValueError, match="needs the SG network"):
        guided_unet(pipe.unet, None, latents, timesteps, context, hint, "all")
    with pytest.raises(ValueError, match="sg_residuals"):
        guided_unet(pipe.unet, guidance, latents, timesteps, context, hint, "some")

"""Trainable components: the Semantic-Guided network, the guided UNet and the autoencoders."""
from vlmdiff.models.autoencoders import FeatureAutoencoder, decode_latents, encode_latents
from vlmdiff.models.guided_unet import SG_RESIDUALS, guided_unet
from vlmdiff.models.semantic_guidance import SemanticGuidanceNet

__all__ = ["FeatureAutoencoder", "SG_RESIDUALS", "SemanticGuidanceNet", "decode_latents", "encode_latents", "guided_unet"]

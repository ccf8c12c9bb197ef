"""Trainable components: the Semantic-Guided network and the autoencoders."""
from vlmdiff.models.autoencoders import FeatureAutoencoder, decode_latents, encode_latents
from vlmdiff.models.semantic_guidance import SemanticGuidanceNet

__all__ = ["FeatureAutoencoder", "SemanticGuidanceNet", "decode_latents", "encode_latents"]

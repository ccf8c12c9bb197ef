"""vlmdiff: multi-class visual anomaly detection with vision-language-guided latent diffusion."""
from vlmdiff.scoring import AnomalyMapConfig
from vlmdiff.config import PipelineConfig
from vlmdiff.images import ImageInputError, load_image
from vlmdiff.memory import NormalFeatureMemory
from vlmdiff.models import FeatureAutoencoder, SemanticGuidanceNet
from vlmdiff.pipeline import DetectionResult, DetectionSettings, VLMDiffPipeline
from vlmdiff.presets import PRESETS

__version__ = "0.1.0"
__all__ = [
    "AnomalyMapConfig", "DetectionResult", "DetectionSettings", "FeatureAutoencoder", "ImageInputError", "NormalFeatureMemory",
    "PRESETS", "PipelineConfig", "SemanticGuidanceNet", "VLMDiffPipeline", "load_image",
]

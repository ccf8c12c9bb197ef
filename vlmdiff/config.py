"""The pipeline's own settings, saved as `pipeline_config.json` in every model folder."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlmdiff.bounds import Bounds, check_bounds
from vlmdiff.scoring import AnomalyMapConfig

LATENT_FACTOR = 8  # every autoencoder's latent grid is 1/8 of the image
DEFAULT_BATCH_SIZE = 8  # images per forward pass, wherever a batch size is not given
# Sizes a model folder may ask for, checked when the config is built (before anything is allocated);
# shipped and trained models sit well inside them (resolution 256, 10 steps, max_train_timestep 600-1000).
PIPELINE_BOUNDS: Bounds = {
    "resolution": (32, 1024),
    "hint_downsample": (1, 64),
    "strength": (0.0, 1.0),
    "max_train_timestep": (1, 1000),
    "num_inference_steps": (1, 1000),
    "guidance_scale": (0.0, 100.0),
    "memory_guidance": (0.0, 100.0),
}
ANOMALY_BOUNDS: Bounds = {
    "match_window": (1, 15), "blur_sigma": (0.0, 32.0), "pool_size": (1, 64), "pool_repeats": (0, 8),
}


@dataclass
class PipelineConfig:
    """Everything about a model that is not a learned weight."""

    preset: str = "tiny"
    resolution: int = 256
    text_encoder: str = "minilm"  # "minilm" (offline) or a CLIP hub id / folder
    captioner: str = "offline-efficientnet"  # captioner id used for training captions and the app
    sg_residuals: str = "all"  # where the SG network's residuals go: "all", "mid" or "none" (models/guided_unet.py)
    hint_downsample: int = 1  # >1 weakens the SG hint (down- then up-sampled clean image)
    strength: float = 1.0  # default denoising strength: start step t0 = strength * 999
    max_train_timestep: int = 1000  # the denoiser was trained on t < this
    num_inference_steps: int = 10  # default DDIM steps (eta 0)
    guidance_scale: float = 1.0  # classifier-free guidance when captions are given (COCO: 9)
    memory_guidance: float = 0.0  # the model's memory guidance, 0: off (DetectionSettings.memory_guidance)
    anomaly: AnomalyMapConfig = field(default_factory=AnomalyMapConfig)
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_bounds(vars(self), PIPELINE_BOUNDS)
        if self.resolution % LATENT_FACTOR:
            raise ValueError(f"resolution must be a multiple of {LATENT_FACTOR}, got {self.resolution}")
        anomaly = self.anomaly if isinstance(self.anomaly, dict) else asdict(self.anomaly)
        check_bounds(anomaly, ANOMALY_BOUNDS, "anomaly.")
        # Always a copy: configs built from a preset must not share (and mutate) the preset's.
        self.anomaly = AnomalyMapConfig(**anomaly)
        self.classes = tuple(self.classes)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "PipelineConfig":
        """The saved config, checked; ValueError naming the file and the field that is out of bounds or unknown."""
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from error

"""The pipeline's own settings, saved as `pipeline_config.json` in every model folder."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlmdiff.scoring import AnomalyMapConfig


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
    memory_guidance: float = 0.0  # regenerate latent cells whose memory map exceeds this many memory scales; 0: off
    anomaly: AnomalyMapConfig = field(default_factory=AnomalyMapConfig)
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Always a copy: configs built from a preset must not share (and mutate) the preset's.
        self.anomaly = AnomalyMapConfig(**(self.anomaly if isinstance(self.anomaly, dict) else asdict(self.anomaly)))
        self.classes = tuple(self.classes)
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "PipelineConfig":
        return cls(**json.loads(Path(path).read_text()))

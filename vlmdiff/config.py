"""The pipeline's own settings, saved as `pipeline_config.json` in every model folder."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlmdiff.anomaly import AnomalyMapConfig


@dataclass
class PipelineConfig:
    """Everything about a model that is not a learned weight."""

    preset: str = "tiny"
    resolution: int = 256
    text_encoder: str = "minilm"  # "minilm" (offline) or a CLIP hub id / folder
    captioner: str = "offline-efficientnet"  # captioner id used for training captions and the app
    hint_downsample: int = 1  # >1 weakens the SG hint (down- then up-sampled clean image)
    strength: float = 1.0  # default denoising strength: start step t0 = strength * 999
    num_inference_steps: int = 10  # default DDIM steps (eta 0)
    guidance_scale: float = 1.0  # classifier-free guidance when captions are given (COCO: 9)
    anomaly: AnomalyMapConfig = field(default_factory=AnomalyMapConfig)
    # Each map is divided by its scale (the 99th percentile on normal training images) before fusion.
    map_scales: dict[str, float] = field(default_factory=lambda: {"reconstruction": 1.0, "memory": 1.0})
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Always a copy: configs built from a preset must not share (and mutate) the preset's.
        self.anomaly = AnomalyMapConfig(**(self.anomaly if isinstance(self.anomaly, dict) else asdict(self.anomaly)))
        self.map_scales = dict(self.map_scales)
        self.classes = tuple(self.classes)
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "PipelineConfig":
        return cls(**json.loads(Path(path).read_text()))

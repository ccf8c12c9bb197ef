"""The built-in multi-class benchmark: textures and objects with realistic defects and exact masks.

`make_demo_dataset(out, seed)` writes an MVTec AD layout; every image is a pure function of
(seed, class, split, defect type, index), so the same seed gives the same bytes.
"""
from __future__ import annotations

import shutil
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from PIL import Image

from vlmdiff.data import defects
from vlmdiff.data.defects import Scene, SceneDefect, painted, part_change
from vlmdiff.data.demo_bottle import remove_label, sample_bottle, swap_label, wrong_fill_level, wrong_liquid
from vlmdiff.data.demo_box import add_item, remove_item, sample_box, swap_items
from vlmdiff.data.demo_connector import sample_connector, swap_wires, wrong_wire
from vlmdiff.data.demo_objects import break_washer, circuit_scene, misplace_part, remove_part, washer_scene
from vlmdiff.data.demo_parts import bend_tip, break_coil, chip_thread, sample_screw, sample_spring, squeeze_coil
from vlmdiff.data.demo_pins import add_pin, remove_pin, sample_pins
from vlmdiff.data.demo_textures import STYLES, render_texture, skimage_texture, textile_sources
from vlmdiff.data.records import CLEAN_FOLDER, NORMAL_DEFECT, ImageRecord

SceneFn = Callable[[np.random.Generator, int], Scene]


@dataclass(frozen=True)
class DemoClass:
    """One benchmark class: how to draw a defect-free scene, its defect types, and where it comes from."""

    name: str
    scene: SceneFn
    defects: dict[str, SceneDefect]
    source: str  # for the README: the images behind it and their licence


def _texture(name: str, sources: Callable[[], tuple[np.ndarray, ...]]) -> SceneFn:
    return lambda rng, size: render_texture(sources(), STYLES[name], rng, size)


DRAWN = "drawn procedurally by vlmdiff (Apache-2.0)"
LOGICAL = DRAWN + ", with logical and global anomalies (a rule of the whole object is broken)"
SKIMAGE_SOURCE = "scikit-image `skimage.data.{}` photo (CC0), recoloured"
DEMO_CLASSES: dict[str, DemoClass] = {
    c.name: c
    for c in (
        DemoClass("brick", _texture("brick", partial(skimage_texture, "brick")),
                  {"crack": painted(defects.crack), "hole": painted(defects.hole), "stain": painted(defects.stain)},
                  SKIMAGE_SOURCE.format("brick")),
        DemoClass("gravel", _texture("gravel", partial(skimage_texture, "gravel")),
                  {"contamination": painted(defects.contamination), "hole": painted(defects.hole),
                   "stain": painted(defects.stain)},
                  SKIMAGE_SOURCE.format("gravel")),
        DemoClass("grass", _texture("grass", partial(skimage_texture, "grass")),
                  {"color": painted(defects.discoloration), "contamination": painted(defects.contamination),
                   "hole": painted(defects.hole)},
                  SKIMAGE_SOURCE.format("grass")),
        DemoClass("textile", _texture("textile", textile_sources),
                  {"hole": painted(defects.hole), "stain": painted(defects.stain), "thread": painted(defects.thread)},
                  "nominal textile photos of the `conformal-clip-data` package (MIT licence), recoloured"),
        DemoClass("washer", washer_scene,
                  {"broken": part_change(break_washer), "contamination": painted(defects.contamination),
                   "scratch": painted(defects.scratch)},
                  DRAWN),
        DemoClass("circuit", circuit_scene,
                  {"misplaced_part": part_change(misplace_part), "missing_part": part_change(remove_part),
                   "scratch": painted(defects.scratch)},
                  DRAWN),
        DemoClass("screw", sample_screw,
                  {"bent_tip": part_change(bend_tip), "chipped_thread": part_change(chip_thread),
                   "contamination": painted(defects.speck)},
                  DRAWN),
        DemoClass("spring", sample_spring,
                  {"broken_coil": part_change(break_coil), "contamination": painted(defects.speck),
                   "squeezed_coil": part_change(squeeze_coil)},
                  DRAWN),
        DemoClass("fabric", _texture("fabric", textile_sources),
                  {"nick": painted(defects.nick), "pinhole": painted(partial(defects.hole, radius_range=(1.5, 4))),
                   "speck": painted(defects.speck)},
                  "nominal textile photos of the `conformal-clip-data` package (MIT licence), recoloured, "
                  "with defects a few pixels wide"),
        DemoClass("bottle", sample_bottle,
                  {"fill_level": part_change(wrong_fill_level), "missing_label": part_change(remove_label),
                   "swapped_label": part_change(swap_label, solid=True), "wrong_liquid": part_change(wrong_liquid),
                   "scratch": painted(defects.scratch)},
                  LOGICAL),
        DemoClass("box", sample_box,
                  {"missing_item": part_change(remove_item), "extra_item": part_change(add_item),
                   "swapped_items": part_change(swap_items, solid=True), "crack": painted(defects.crack)},
                  LOGICAL),
        DemoClass("connector", sample_connector,
                  {"swapped_wires": part_change(swap_wires, solid=True), "wrong_wire": part_change(wrong_wire),
                   "scratch": painted(defects.scratch)},
                  LOGICAL),
        DemoClass("pins", sample_pins,
                  {"missing_pin": part_change(remove_pin), "extra_pin": part_change(add_pin),
                   "scratch": painted(defects.scratch)},
                  LOGICAL),
    )
}
# Classes with logical and global anomalies (what is wrong is the arrangement, not a local patch):
# generated on request only, so the default benchmark (the shipped model's) stays as it was.
LOGICAL_CLASSES = ("bottle", "box", "connector", "pins")
DEFAULT_CLASSES = tuple(name for name in DEMO_CLASSES if name not in LOGICAL_CLASSES)
# Classes choices are made on (the memory recipe on the first five), and classes kept apart to validate them.
TUNE_CLASSES = ("brick", "grass", "textile", "washer", "screw", "bottle", "box")
VALIDATION_CLASSES = ("gravel", "circuit", "spring", "fabric", "connector", "pins")


@dataclass(frozen=True)
class DemoSample:
    """One generated image, the defect-free image it came from, and its mask (None if normal)."""

    class_name: str
    split: str
    defect_type: str
    image: np.ndarray  # (H, W, 3) uint8
    clean: np.ndarray  # (H, W, 3) uint8, equal to image for normal samples
    mask: np.ndarray | None = None  # (H, W) bool


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the benchmark; the defaults give 100 images per class."""

    n_train: int = 60
    n_test_good: int = 15
    n_defective: int = 25
    size: int = 256
    classes: tuple[str, ...] = DEFAULT_CLASSES


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    words = [seed] + [zlib.crc32(k.encode()) if isinstance(k, str) else k for k in keys]
    return np.random.default_rng(np.random.SeedSequence(words))


def _mask(region: np.ndarray) -> np.ndarray:
    """The annotation of a defect region: closed over small gaps and grown by one pixel."""
    kernel = np.ones((3, 3), np.uint8)
    closed = cv2.morphologyEx(region.astype(np.uint8), cv2.MORPH_CLOSE, kernel)
    return cv2.dilate(closed, kernel).astype(bool) | region


def render_sample(class_name: str, seed: int, split: str, index: int,
                  defect_type: str = NORMAL_DEFECT, size: int = 256) -> DemoSample:
    """Image `index` of a class/split/defect type; a pure function of its arguments."""
    spec = DEMO_CLASSES[class_name]
    rng = _rng(seed, class_name, split, defect_type, index)
    scene = spec.scene(rng, size)
    if defect_type == NORMAL_DEFECT:
        return DemoSample(class_name, split, defect_type, scene.image, scene.image)
    if defect_type not in spec.defects:
        raise ValueError(f"class '{class_name}' has no defect '{defect_type}' (has: {', '.join(spec.defects)})")
    for _ in range(10):  # a defect that changed nothing (e.g. drawn off the object) is drawn again
        defect = spec.defects[defect_type](scene, rng)
        if defect.region.sum() >= 4:
            return DemoSample(class_name, split, defect_type, defect.image, scene.image, _mask(defect.region))
    raise RuntimeError(f"could not place a '{defect_type}' defect on {class_name} image {index}")


def plan(config: DemoConfig) -> list[tuple[str, str, str, int]]:
    """(class, split, defect type, index) of every image; defects take turns over a class's types."""
    items = []
    for name in config.classes:
        items += [(name, "train", NORMAL_DEFECT, i) for i in range(config.n_train)]
        items += [(name, "test", NORMAL_DEFECT, i) for i in range(config.n_test_good)]
        types = sorted(DEMO_CLASSES[name].defects)
        for i in range(config.n_defective):
            items.append((name, "test", types[i % len(types)], i // len(types)))
    return items


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def write_sample(sample: DemoSample, root: Path, index: int) -> ImageRecord:
    """Save one sample in MVTec layout under root/<class>/ and return its record."""
    base = root / sample.class_name
    image_path = base / sample.split / sample.defect_type / f"{index:03d}.png"
    _save_png(sample.image, image_path)
    if sample.mask is None:
        return ImageRecord(image_path, sample.class_name, sample.split)
    mask_path = base / "ground_truth" / sample.defect_type / f"{index:03d}_mask.png"
    _save_png(sample.mask.astype(np.uint8) * 255, mask_path)
    clean_path = base / CLEAN_FOLDER / sample.defect_type / f"{index:03d}.png"
    _save_png(sample.clean, clean_path)
    return ImageRecord(image_path, sample.class_name, sample.split, 1, sample.defect_type, mask_path, clean_path)


README = """vlmdiff built-in multi-class anomaly-detection benchmark
=========================================================

Made by `vlmdiff make-demo-data` (seed {seed}), fully offline and deterministic: the same seed
gives the same bytes. Layout: MVTec AD (<class>/train/good, <class>/test/<defect>,
<class>/ground_truth/<defect>/<name>_mask.png), {size}x{size} PNG images, plus
<class>/test_clean/<defect>/<name>.png: each defective image before its defect was drawn
(ground truth for reconstructions).

Per class: {n_train} train/good, {n_test_good} test/good and {n_defective} defective test images.
Normal images vary: textures are random crops, rotations, scales, flips and brightness/contrast/
colour changes of the source photos plus sensor noise; objects vary in position, size, rotation,
colour and lighting. Defects are synthesised (scratches, cracks, holes, stains, discolouration,
contamination, stray threads, broken edges, missing or misplaced parts) in sizes from a few pixels
to about a sixth of the image. Masks are exact: every pixel that differs from the defect-free
version of an image lies inside its mask (closed and grown by one pixel, as annotators do).

Classes and sources:
{classes}
The generated images are derived from the sources above and keep their licences (CC0 and MIT
allow any use). The procedural drawings are part of vlmdiff (Apache-2.0).
"""


def _readme(config: DemoConfig, seed: int) -> str:
    lines = "".join(f"- {name}: defects {', '.join(sorted(DEMO_CLASSES[name].defects))}; "
                    f"{DEMO_CLASSES[name].source}\n" for name in config.classes)
    return README.format(seed=seed, size=config.size, n_train=config.n_train, n_test_good=config.n_test_good,
                         n_defective=config.n_defective, classes=lines)


def make_demo_dataset(out: str | Path, seed: int = 0, config: DemoConfig = DemoConfig(),
                      overwrite: bool = False, progress: Callable[[Sequence], Sequence] = lambda items: items,
                      ) -> list[ImageRecord]:
    """Write the benchmark to `out` (MVTec layout + README.txt) and return its records."""
    unknown = sorted(set(config.classes) - set(DEMO_CLASSES))
    if unknown:
        raise ValueError(f"unknown demo classes {unknown} (known: {', '.join(DEMO_CLASSES)})")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
        for name in config.classes:
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    records = [write_sample(render_sample(name, seed, split, index, defect, config.size), out, index)
               for name, split, defect, index in progress(plan(config))]
    (out / "README.txt").write_text(_readme(config, seed))
    return records

"""evaluate / predict end to end on a tiny random model and a tiny MVTec-layout dataset written here."""
from __future__ import annotations

import csv
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import brick_texture, fit_memory
from vlmdiff import cli, evaluation
from vlmdiff.config import PipelineConfig
from vlmdiff.data import ImageRecord, read_mvtec
from vlmdiff.evaluation import PREDICTION_COLUMNS, PREDICTIONS_CSV, evaluate, predict
from vlmdiff.images import WORK_SIDE
from vlmdiff.metrics import ClassMetrics, image_auroc
from vlmdiff.pipeline import DetectionResult, VLMDiffPipeline
from vlmdiff.scoring import AnomalyScorer
from vlmdiff.thresholds import Thresholds
from vlmdiff.visualize import heatmap, normalize_map, overlay_heatmap

METRIC_NAMES = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")
WIDTH, HEIGHT = 64, 48  # not square and not the model resolution: outputs must come back at this size
BOTTLE_THRESHOLD = 1.0
QUICK = ["--strength", "0", "--steps", "1"]  # the CLI tests skip denoising; the library tests run one DDIM step


def _texture(rng: np.random.Generator, defect: bool) -> tuple[Image.Image, Image.Image]:
    pixels = rng.integers(80, 120, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    if defect:
        top, left = rng.integers(4, HEIGHT - 20), rng.integers(4, WIDTH - 20)
        mask[top : top + 14, left : left + 14] = 255
        pixels[mask > 0] = (250, 30, 30)
    return Image.fromarray(pixels), Image.fromarray(mask)


def _write_mvtec(root: Path) -> Path:
    """2 classes; per class train/good 1, test/good 1, test/crack 2 with masks in ground_truth/crack."""
    rng = np.random.default_rng(0)
    for name in ("bottle", "wood"):
        base = root / name
        for folder, count, defect in (("train/good", 1, False), ("test/good", 1, False), ("test/crack", 2, True)):
            (base / folder).mkdir(parents=True)
            for i in range(count):
                image, mask = _texture(rng, defect)
                image.save(base / folder / f"{i:03d}.png")
                if defect:
                    (base / "ground_truth" / "crack").mkdir(parents=True, exist_ok=True)
                    mask.save(base / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_mvtec(tmp_path_factory.mktemp("mvtec"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny-kl model with a threshold for 'bottle' only."""
    torch.manual_seed(0)
    pipeline = VLMDiffPipeline.from_preset("tiny-kl", resolution=64)
    pipeline.thresholds.set_manual("bottle", BOTTLE_THRESHOLD)
    directory = tmp_path_factory.mktemp("model")
    pipeline.save_pretrained(directory)
    return directory


def _csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), list(reader)


# --------------------------------------------------------------------------- visualize


def test_overlay_opacity_and_value_range() -> None:
    image = Image.fromarray(np.full((HEIGHT, WIDTH, 3), 100, dtype=np.uint8))
    anomaly_map = np.linspace(0, 1, HEIGHT * WIDTH, dtype=np.float32).reshape(HEIGHT, WIDTH)
    assert np.array_equal(np.asarray(overlay_heatmap(image, anomaly_map, alpha=0.0)), np.asarray(image))
    assert np.array_equal(np.asarray(overlay_heatmap(image, anomaly_map, alpha=1.0)), heatmap(anomaly_map))
    half = np.asarray(overlay_heatmap(image, anomaly_map, alpha=0.5), dtype=int)
    assert np.abs(half - (100 + heatmap(anomaly_map).astype(int)) / 2).max() <= 1
    # values are clipped to the given range: everything >= hi gets the top colour of 'jet' (dark red)
    assert np.array_equal(heatmap(np.full((4, 4), 5.0), value_range=(0, 2))[0, 0], [128, 0, 0])
    assert np.array_equal(normalize_map(np.array([[1.0, 2.0], [3.0, 5.0]]), (1, 3)), [[0, 0.5], [1, 1]])
    assert not normalize_map(np.full((3, 3), 7.0)).any()  # a flat map does not divide by zero
    small_map = np.zeros((8, 8), dtype=np.float32)  # other size than the image: resized to it
    assert overlay_heatmap(image, small_map).size == (WIDTH, HEIGHT)
    with pytest.raises(ValueError, match="alpha"):
        overlay_heatmap(image, anomaly_map, alpha=1.5)


# --------------------------------------------------------------------------- evaluate


def test_evaluate_writes_report(model_dir: Path, dataset: Path, tmp_path: Path, monkeypatch) -> None:
    import vlmdiff.evaluation as evaluation

    thresholds_drawn = {}
    original_histogram = evaluation.plot_score_histogram

    def record_histogram(path, scores, labels, threshold=None, **kwargs):
        thresholds_drawn[Path(path).name] = threshold
        return original_histogram(path, scores, labels, threshold, **kwargs)

    monkeypatch.setattr(evaluation, "plot_score_histogram", record_histogram)
    pipeline = VLMDiffPipeline.from_pretrained(model_dir)
    records = read_mvtec(dataset)  # train records are ignored by evaluate
    out = tmp_path / "report"
    per_class = evaluate(pipeline, records, out, strength=1.0, steps=1, batch_size=4, progress=False)

    assert list(per_class) == ["bottle", "wood"] and all(isinstance(m, ClassMetrics) for m in per_class.values())
    for name in ("bottle", "wood"):
        for kind in ("roc", "pro", "hist"):
            assert (out / "plots" / f"{name}_{kind}.png").stat().st_size > 0
    assert (out / "qualitative.png").stat().st_size > 0
    assert thresholds_drawn == {"bottle_hist.png": BOTTLE_THRESHOLD, "wood_hist.png": None}

    document = json.loads((out / "metrics.json").read_text())
    assert set(document["classes"]) == {"bottle", "wood"}
    for metrics in [*document["classes"].values(), document["mean"]]:
        assert tuple(metrics) == METRIC_NAMES
        assert all(0.0 <= value <= 1.0 for value in metrics.values())  # masks given: every metric defined
    assert document["images"]["wood"] == {"normal": 1, "anomalous": 2, "with_mask": 2}
    assert document["settings"]["num_inference_steps"] == 1

    table = (out / "metrics.md").read_text()
    assert "| bottle |" in table and "| wood |" in table and "| mean |" in table and "AUPRO" in table
    columns, rows = _csv_rows(out / "scores.csv")
    assert columns == ["image", "class", "defect_type", "label", "score"] and len(rows) == 6
    wood = [row for row in rows if row["class"] == "wood"]
    expected = image_auroc([float(r["score"]) for r in wood], [int(r["label"]) for r in wood])
    assert document["classes"]["wood"]["image_auroc"] == pytest.approx(expected)


def test_evaluate_command(model_dir: Path, dataset: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    argv = ["evaluate", str(model_dir), str(dataset), "--out", str(out), *QUICK, "--classes", "wood"]
    argv += ["--max-images", "2"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| wood |" in printed and "| mean |" in printed and "| bottle |" not in printed
    document = json.loads((out / "metrics.json").read_text())
    assert set(document["classes"]) == {"wood"}
    _, rows = _csv_rows(out / "scores.csv")
    assert len(rows) == 2 and {row["label"] for row in rows} == {"0", "1"}  # the subset keeps both kinds


def test_evaluate_command_with_reconstruction_metrics(model_dir: Path, dataset: Path, tmp_path: Path, capsys) -> None:
    """With a clean source beside a defective image the report says how much of the defect the reconstruction removed."""
    root = tmp_path / "data"
    shutil.copytree(dataset / "wood", root / "wood")
    (root / "wood" / "test_clean" / "crack").mkdir(parents=True)
    for image in (root / "wood" / "test" / "crack").iterdir():
        shutil.copy(root / "wood" / "test" / "good" / "000.png", root / "wood" / "test_clean" / "crack" / image.name)
    out = tmp_path / "report"
    assert cli.main(["evaluate", str(model_dir), str(root), "--out", str(out), *QUICK, "--reconstruction-metrics"]) == 0
    assert "wood reconstructions: normal_psnr" in capsys.readouterr().out
    quality = json.loads((out / "metrics.json").read_text())["reconstruction"]["wood"]
    assert set(quality) == {"normal_psnr", "normal_ssim", "normal_feature_cosine", "defect_removal", "psnr_outside_defect"}
    assert 0 < quality["normal_psnr"] < 100 and -1 <= quality["normal_ssim"] <= 1
    assert quality["defect_removal"] is not None and quality["defect_removal"] > 0


def test_predict_without_reconstruction_writes_overlays_only(model_dir: Path, dataset: Path, tmp_path: Path) -> None:
    image = dataset / "wood" / "test" / "crack" / "000.png"
    out = tmp_path / "out"
    assert cli.main(["predict", str(model_dir), str(image), "--out", str(out), "--no-reconstruction"]) == 0
    assert (out / "000_overlay.png").is_file() and not (out / "000_reconstruction.png").exists()


class _BrightnessPipeline:
    """Stands in for VLMDiffPipeline: the map is the red channel / 255 at the image's size, the score its max."""

    def __init__(self) -> None:
        self.config = PipelineConfig(preset="tiny-kl", resolution=64)
        self.thresholds = Thresholds()
        self.scorer = AnomalyScorer(self.config.anomaly)

    def __call__(self, images, class_names, **options) -> list[DetectionResult]:
        results = []
        for image, name in zip(images, class_names):
            image = image.convert("RGB")
            anomaly_map = np.asarray(image, dtype=np.float32)[..., 0] / 255  # (H, W)
            results.append(DetectionResult(image, anomaly_map, float(anomaly_map.max()), name))
        return results


def test_evaluate_class_kinds_with_exact_maps(tmp_path: Path) -> None:
    """Maps that equal the defects score perfectly; classes without masks or anomalies get n/a where due."""
    rng = np.random.default_rng(1)
    records = []
    classes = {"masked": ("good", "crack", "crack"), "unmasked": ("good", "crack"), "normal": ("good", "good")}
    for name, kinds in classes.items():
        for i, kind in enumerate(kinds):
            image, mask = _texture(rng, kind != "good")
            if name == "masked" and i == 2:  # another size in the class: resized to the class's common size
                image, mask = (p.resize((WIDTH * 2, HEIGHT * 2), Image.Resampling.NEAREST) for p in (image, mask))
            image_path, mask_path = tmp_path / f"{name}_{i}.png", tmp_path / f"{name}_{i}_mask.png"
            image.save(image_path)
            mask.save(mask_path)
            label = int(kind != "good")
            keep_mask = mask_path if name == "masked" and label else None
            records.append(ImageRecord(image_path, name, "test", label, kind, keep_mask))
    records.append(ImageRecord(tmp_path / "masked_0.png", "masked", "train"))  # not evaluated

    out = tmp_path / "report"
    per_class = evaluate(_BrightnessPipeline(), records, out, progress=False)
    assert asdict(per_class["masked"]) == pytest.approx(dict.fromkeys(METRIC_NAMES, 1.0))
    unmasked = json.loads((out / "metrics.json").read_text())["classes"]["unmasked"]
    assert unmasked["image_auroc"] == 1.0 and unmasked["pixel_auroc"] is None and unmasked["aupro"] is None
    normal = json.loads((out / "metrics.json").read_text())["classes"]["normal"]
    assert all(value is None for value in normal.values())  # nothing is defined without anomalies
    assert (out / "plots" / "masked_pro.png").is_file() and not (out / "plots" / "unmasked_pro.png").exists()
    assert (out / "plots" / "normal_roc.png").is_file() and (out / "plots" / "normal_hist.png").is_file()
    assert "| unmasked | 100.0 | 100.0 | 100.0 | n/a | n/a | n/a | n/a |" in (out / "metrics.md").read_text()


# --------------------------------------------------------------------------- predict


def test_predict_command(model_dir: Path, dataset: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "predictions"
    crack_folder, good_image = dataset / "bottle" / "test" / "crack", dataset / "wood" / "test" / "good" / "000.png"
    argv = ["predict", str(model_dir), str(crack_folder), str(good_image), "--out", str(out), "--class", "bottle"]
    argv += QUICK
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "001.png" in printed and "predictions.csv" in printed
    columns, rows = _csv_rows(out / "predictions.csv")
    assert tuple(columns) == PREDICTION_COLUMNS == ("image", "class", "score", "threshold", "verdict", "class_match",
                                                   "score_from")
    assert [Path(row["image"]) for row in rows] == [crack_folder / "000.png", crack_folder / "001.png", good_image]
    for row in rows:
        assert row["class"] == "bottle" and float(row["threshold"]) == BOTTLE_THRESHOLD and row["class_match"] == ""
        assert row["score_from"] == VLMDiffPipeline.from_pretrained(model_dir).scorer.describe("bottle")
        assert row["verdict"] == ("anomalous" if float(row["score"]) >= BOTTLE_THRESHOLD else "normal")
    for name in ("000", "001", "000_2"):  # the two 000.png files get distinct output names
        for kind in ("overlay", "reconstruction"):
            with Image.open(out / f"{name}_{kind}.png") as picture:
                assert picture.size == (WIDTH, HEIGHT)


def test_predict_without_threshold_gives_no_verdict(model_dir: Path, dataset: Path, tmp_path: Path) -> None:
    pipeline = VLMDiffPipeline.from_pretrained(model_dir)
    image = dataset / "wood" / "test" / "crack" / "000.png"
    predictions = predict(pipeline, [image], tmp_path, class_name="wood", strength=1.0, steps=1, progress=False)
    assert len(predictions) == 1 and predictions[0].verdict == "n/a" and predictions[0].threshold is None
    _, rows = _csv_rows(tmp_path / "predictions.csv")
    expected = {"image": str(image), "class": "wood", "score": rows[0]["score"], "threshold": "", "verdict": "n/a",
                "class_match": "", "score_from": pipeline.scorer.describe("wood")}
    assert rows == [expected]
    assert float(rows[0]["score"]) == pytest.approx(predictions[0].score)


def test_predict_says_unknown_class_for_an_image_of_no_known_class(model_dir: Path, tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(1)
    pipeline = VLMDiffPipeline.from_pretrained(model_dir)
    normal = [_texture(rng, False)[0] for _ in range(4)] + [brick_texture(i, (WIDTH, HEIGHT)) for i in range(4)]
    pipeline.memory = fit_memory(normal, ["bottle"] * 4 + ["wood"] * 4, 100)
    pipeline.save_pretrained(tmp_path / "model")
    gradient = np.tile(np.linspace(0, 255, WIDTH).astype(np.uint8), (HEIGHT, 1))
    Image.fromarray(gradient).convert("RGB").save(tmp_path / "gradient.png")
    _texture(rng, False)[0].save(tmp_path / "bottle.png")
    out = tmp_path / "out"
    argv = ["predict", str(tmp_path / "model"), str(tmp_path / "gradient.png"), str(tmp_path / "bottle.png"),
            "--out", str(out), *QUICK]
    assert cli.main(argv) == 0
    unknown, bottle = _csv_rows(out / "predictions.csv")[1]
    assert unknown["verdict"] == "unknown class" and unknown["threshold"] == ""
    assert unknown["class_match"].startswith("unknown class: the image matches no known class; nearest ")
    assert "x its normal spread), then " in unknown["class_match"]
    assert bottle["class"] == "bottle" and bottle["verdict"] in ("normal", "anomalous")
    assert bottle["class_match"].startswith("class bottle: nearest bottle (")
    assert f"unknown class  ({unknown['class_match']})" in capsys.readouterr().out


# --------------------------------------------------------------------------- errors


def test_missing_model_folder_exits_2(dataset: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no_such_model"
    assert cli.main(["evaluate", str(missing), str(dataset), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "vlmdiff evaluate: error:" in error and str(missing) in error and "Traceback" not in error
    image = dataset / "wood" / "test" / "good" / "000.png"
    assert cli.main(["predict", str(missing), str(image), "--out", str(tmp_path / "out")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_predict_missing_image_exits_2(model_dir: Path, tmp_path: Path, capsys) -> None:
    assert cli.main(["predict", str(model_dir), str(tmp_path / "nope.png"), "--out", str(tmp_path / "out")]) == 2
    assert "image not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- batch jobs that finish


def _damage(dataset: Path, root: Path) -> dict[Path, str]:
    """A copy of the dataset with four bad test images: {path: what the skip reason says}."""
    shutil.copytree(dataset, root)
    bad = {
        root / "wood" / "test" / "good" / "000.png": "not a readable image",  # garbage bytes
        root / "wood" / "test" / "crack" / "001.png": "not a readable image",  # garbage header, has a mask
        root / "bottle" / "test" / "crack" / "000.png": "not a readable image",  # truncated
        root / "bottle" / "test" / "good" / "000.png": "1x1",  # too small
    }
    paths = list(bad)
    paths[0].write_bytes(b"\x00\x01 garbage bytes")
    paths[1].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    paths[2].write_bytes(paths[2].read_bytes()[:120])
    Image.new("RGB", (1, 1)).save(paths[3])
    return bad


def test_evaluate_skips_unreadable_images_and_lists_them(model_dir, dataset, tmp_path, capsys, caplog) -> None:
    bad = _damage(dataset, tmp_path / "data")
    out = tmp_path / "report"
    assert cli.main(["evaluate", str(model_dir), str(tmp_path / "data"), "--out", str(out), *QUICK]) == 0
    warning = caplog.text
    assert "skipped 4 of 6 images that could not be read" in warning
    document = json.loads((out / "metrics.json").read_text())
    assert document["skipped"]["count"] == 4
    reasons = {Path(item["image"]): item["reason"] for item in document["skipped"]["images"]}
    assert set(reasons) == set(bad)
    for path, words in bad.items():
        assert f"{path}: " in warning and words in reasons[path], reasons[path]
    assert "Error" not in warning  # plain words, no exception class names
    _, rows = _csv_rows(out / "scores.csv")
    data = tmp_path / "data"
    expected = [data / "bottle" / "test" / "crack" / "001.png", data / "wood" / "test" / "crack" / "000.png"]
    assert sorted(Path(row["image"]) for row in rows) == expected
    assert document["images"]["wood"] == {"normal": 0, "anomalous": 1, "with_mask": 1}


def test_evaluate_strict_stops_at_the_first_unreadable_file_naming_it(model_dir, dataset, tmp_path, capsys) -> None:
    bad = _damage(dataset, tmp_path / "data")
    out = tmp_path / "report"
    assert cli.main(["evaluate", str(model_dir), str(tmp_path / "data"), "--out", str(out), *QUICK, "--strict"]) == 2
    error = capsys.readouterr().err
    first = tmp_path / "data" / "bottle" / "test" / "crack" / "000.png"  # classes in order, then records
    assert f"vlmdiff evaluate: error: {first}: {bad[first]}" in error and "Traceback" not in error
    assert not (out / "metrics.json").exists()


def test_a_crash_keeps_the_scores_written_so_far(model_dir, dataset, tmp_path) -> None:
    pipeline = VLMDiffPipeline.from_pretrained(model_dir)
    crashing = _CrashOnSecondCall(pipeline)
    records = read_mvtec(dataset, class_names=["wood"])  # 3 test images: 2 in the first chunk
    with pytest.raises(RuntimeError, match="power cut"):
        evaluate(crashing, records, tmp_path / "report", strength=0.0, steps=1, batch_size=2, grid_examples=0,
                 progress=False)
    _, rows = _csv_rows(tmp_path / "report" / "scores.csv")
    assert len(rows) == 2 and all(float(row["score"]) >= 0 for row in rows)

    crashing.calls = 0
    images = sorted((dataset / "wood" / "test").rglob("*.png"))
    with pytest.raises(RuntimeError, match="power cut"):
        predict(crashing, images, tmp_path / "out", batch_size=2, strength=0.0, steps=1, progress=False)
    _, rows = _csv_rows(tmp_path / "out" / PREDICTIONS_CSV)
    assert [Path(row["image"]) for row in rows] == images[:2]


class _CrashOnSecondCall:
    """The pipeline, except that its second call fails (a crash in the middle of a run)."""

    def __init__(self, pipeline: VLMDiffPipeline) -> None:
        self.pipeline, self.config, self.thresholds, self.calls = pipeline, pipeline.config, pipeline.thresholds, 0
        self.scorer = pipeline.scorer

    def __call__(self, images, **options):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("power cut")
        return self.pipeline(images, **options)


def test_predict_skips_unreadable_images_and_strict_stops(model_dir, dataset, tmp_path, capsys, caplog) -> None:
    good = dataset / "wood" / "test" / "good" / "000.png"
    garbage, tiny = tmp_path / "garbage.png", tmp_path / "tiny.png"
    garbage.write_bytes(b"definitely not a png")
    Image.new("RGB", (1, 1)).save(tiny)
    out = tmp_path / "out"
    argv = ["predict", str(model_dir), str(garbage), str(good), str(tiny), "--out", str(out), *QUICK]
    assert cli.main(argv + ["--batch-size", "1"]) == 0
    assert "2 skipped" in capsys.readouterr().out
    assert f"{garbage}: not a readable image" in caplog.text and f"{tiny}: image is 1x1" in caplog.text
    _, rows = _csv_rows(out / PREDICTIONS_CSV)
    assert [Path(row["image"]) for row in rows] == [good]

    strict = ["predict", str(model_dir), str(good), str(tiny), "--out", str(tmp_path / "strict"), *QUICK]
    assert cli.main(strict + ["--batch-size", "1", "--strict"]) == 2
    error = capsys.readouterr().err
    assert f"vlmdiff predict: error: {tiny}: image is 1x1" in error and "Traceback" not in error
    _, rows = _csv_rows(tmp_path / "strict" / PREDICTIONS_CSV)
    assert [Path(row["image"]) for row in rows] == [good]  # the row written before the bad file is kept


def test_an_empty_unrelated_class_does_not_block_the_requested_one(model_dir, dataset, tmp_path) -> None:
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    (root / "empty" / "train" / "good").mkdir(parents=True)
    out = tmp_path / "report"
    assert cli.main(["evaluate", str(model_dir), str(root), "--out", str(out), *QUICK, "--classes", "wood"]) == 0
    assert set(json.loads((out / "metrics.json").read_text())["classes"]) == {"wood"}


def test_model_files_are_named_when_missing_or_invalid(model_dir, dataset, tmp_path, capsys, caplog) -> None:
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    (model / "thresholds.json").unlink()
    image = dataset / "wood" / "test" / "good" / "000.png"
    assert cli.main(["predict", str(model), str(image), "--out", str(tmp_path / "out"), *QUICK]) == 0
    assert f"{model} has no thresholds.json, so no class has a threshold: scores only" in caplog.text
    (model / "thresholds.json").write_text("{not json")
    assert cli.main(["predict", str(model), str(image), "--out", str(tmp_path / "out"), *QUICK]) == 2
    error = capsys.readouterr().err
    assert f"vlmdiff predict: error: {model / 'thresholds.json'} is not valid JSON" in error


# --------------------------------------------------------------------------- working size, masks, names


class _SizeRecordingPipeline(_BrightnessPipeline):
    """A _BrightnessPipeline that records the size of every image it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def __call__(self, images, class_names, **options) -> list[DetectionResult]:
        self.sizes += [image.size for image in images]
        return super().__call__(images, [class_names] * len(images) if isinstance(class_names, str) else class_names)


def _stripes(size: tuple[int, int]) -> Image.Image:
    """Red stripes of rising brightness across the image: a map that varies everywhere."""
    red = np.linspace(0, 255, size[0])[None, :].repeat(size[1], 0)
    red[:, (np.arange(size[0]) // 97) % 2 == 1] *= 0.3
    pixels = np.stack([red, np.full_like(red, 60), np.full_like(red, 120)], -1)
    return Image.fromarray(pixels.round().astype(np.uint8))


def test_predict_runs_at_the_working_size_and_writes_original_size_pictures(tmp_path, monkeypatch) -> None:
    image = _stripes((2100, 300))  # long side over WORK_SIDE: reduced to 1024 x 146 for the model
    image.save(tmp_path / "large.png")
    monkeypatch.setattr(evaluation, "BAND_PIXELS", 2100 * 32)  # 10 bands
    pipeline = _SizeRecordingPipeline()
    [prediction] = predict(pipeline, [tmp_path / "large.png"], tmp_path / "out", progress=False)
    assert pipeline.sizes == [(WORK_SIDE, 146)]
    with Image.open(prediction.overlay_path) as overlay, Image.open(prediction.reconstruction_path) as reconstruction:
        assert overlay.size == reconstruction.size == (2100, 300)
        overlay = np.asarray(overlay, dtype=np.int16)
    working_map = np.asarray(image.resize((WORK_SIDE, 146), Image.Resampling.BICUBIC), np.float32)[..., 0] / 255
    whole = overlay_heatmap(image, working_map, 0.5, (float(working_map.min()), float(working_map.max())))
    assert np.abs(overlay - np.asarray(whole, dtype=np.int16)).max() <= 3  # the bands join into the whole overlay


def test_output_names_are_unique_for_any_combination(tmp_path) -> None:
    (tmp_path / "x").mkdir()
    paths = [tmp_path / "a.png", tmp_path / "x" / "a.png", tmp_path / "a_2.png", tmp_path / "x" / "A.png"]
    for i, path in enumerate(paths):
        _stripes((40 + i, 40)).save(path)
    predictions = predict(_SizeRecordingPipeline(), paths, tmp_path / "out", progress=False)
    overlays = [p.overlay_path.name for p in predictions]
    assert overlays == ["a_overlay.png", "a_2_overlay.png", "a_2_2_overlay.png", "A_3_overlay.png"]
    for prediction, path in zip(predictions, paths):  # each overlay is its own image's (widths differ)
        with Image.open(prediction.overlay_path) as overlay:
            assert overlay.size == Image.open(path).size


def test_evaluate_reads_at_the_working_size_and_skips_masks_of_another_size(tmp_path, caplog) -> None:
    records = []
    for i, (size, mask_size) in enumerate([((2100, 300), (2100, 300)), ((64, 48), (64, 48)), ((64, 48), (32, 24))]):
        image = _stripes(size)
        mask = Image.fromarray(((np.asarray(image)[..., 0] > 128) * 255).astype(np.uint8)).resize(mask_size)
        image.save(tmp_path / f"{i}.png")
        mask.save(tmp_path / f"{i}_mask.png")
        records.append(ImageRecord(tmp_path / f"{i}.png", "stripes", "test", 1, "crack", tmp_path / f"{i}_mask.png"))
    records.append(ImageRecord(tmp_path / "1.png", "stripes", "test", 0, "good"))
    pipeline = _SizeRecordingPipeline()
    per_class = evaluate(pipeline, records, tmp_path / "report", progress=False)
    assert pipeline.sizes[0] == (WORK_SIDE, 146)  # the large image at the working size, its mask with it
    assert per_class["stripes"].pixel_auroc > 0.5
    document = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert document["images"]["stripes"] == {"normal": 1, "anomalous": 2, "with_mask": 2}
    [skipped] = document["skipped"]["images"]
    assert skipped == {"image": str(tmp_path / "2.png"), "reason": f"mask {tmp_path / '2_mask.png'} is 32x24 "
                       "but its image is 64x48"}
    assert "skipped 1 of 4 images" in caplog.text and f"{tmp_path / '2.png'}: mask" in caplog.text

"""`accelerate launch -m vlmdiff predict|evaluate` with 2 CPU processes writes what one process writes.

`--multi_gpu` is the launcher that starts several processes (torchrun); with `--cpu` accelerate starts one.
The processes run the model on the CPU and meet over gloo, so this runs on a machine without GPUs.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmdiff import cli
from app_harness import build_tiny_model, free_port
from vlmdiff.evaluation import SHARDS

CLASSES = ("bottle", "wood")
RUN = ["--strength", "0.5", "--steps", "1", "--batch-size", "2"]  # one DDIM step: the seeded noise is used
LAUNCH_FAILURES = ("DistNetworkError", "init_process_group", "Connection refused", "rendezvous")


def _write_mvtec(root: Path) -> Path:
    """bottle: test/crack 3 (one unreadable), test/good 2; wood: test/crack 2, test/good 1; every image named
    000.png, 001.png, ... so predict has to make names unique. In batches of 2, bottle has 3 and wood 2:
    the first process takes bottle's first 2 batches, the second the last one and wood."""
    rng = np.random.default_rng(0)
    for name, goods, cracks in zip(CLASSES, (2, 1), (3, 2)):
        for folder, count in (("train/good", 1), ("test/good", goods), ("test/crack", cracks)):
            (root / name / folder).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(60, 160, (40, 56, 3), dtype=np.uint8)
                mask = np.zeros((40, 56), dtype=np.uint8)
                if "crack" in folder:
                    mask[10:22, 20:34] = 255
                    pixels[mask > 0] = (240, 30, 30)
                    (root / name / "ground_truth/crack").mkdir(parents=True, exist_ok=True)
                    Image.fromarray(mask).save(root / name / "ground_truth/crack" / f"{i:03d}_mask.png")
                Image.fromarray(pixels).save(root / name / folder / f"{i:03d}.png")
    (root / "bottle/test/crack/001.png").write_bytes(b"\x00 not an image")
    return root


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_tiny_model(tmp_path_factory.mktemp("model"), CLASSES), _write_mvtec(tmp_path_factory.mktemp("data"))


def _launch(argv: list[str], cwd: Path) -> str:
    """`accelerate launch --multi_gpu --num_processes 2 -m vlmdiff ARGV`'s stdout; skips when the launcher
    cannot start the processes."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "vlmdiff", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    if done.returncode != 0 and any(words in output for words in LAUNCH_FAILURES):
        pytest.skip(f"accelerate launch cannot start 2 processes here:\n{output[-2000:]}")
    assert done.returncode == 0, output[-4000:]
    assert "by 2 processes" in done.stdout  # the work was shared, not done twice or by one
    return done.stdout


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _same_rows(one: Path, two: Path, numbers: tuple[str, ...]) -> None:
    """The same rows in the same order; the columns `numbers` within 1e-6."""
    rows_one, rows_two = _rows(one), _rows(two)
    assert [row.keys() for row in rows_one] == [row.keys() for row in rows_two]
    for a, b in zip(rows_one, rows_two, strict=True):
        assert {k: v for k, v in a.items() if k not in numbers} == {k: v for k, v in b.items() if k not in numbers}
        for key in numbers:
            assert (a[key] == b[key] == "") or abs(float(a[key]) - float(b[key])) <= 1e-6, (key, a, b)


def _files(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}


def test_predict_over_two_processes_writes_what_one_writes(model_and_data, tmp_path: Path) -> None:
    model, data = model_and_data
    folders = [str(data / name / "test" / kind) for name in CLASSES for kind in ("good", "crack")]
    argv = ["predict", str(model), *folders, "--class", "bottle", *RUN]  # bottle has a threshold: verdicts
    assert cli.main([*argv, "--out", str(tmp_path / "one")]) == 0
    stdout = _launch([*argv, "--out", str(tmp_path / "two")], tmp_path)

    one, two = tmp_path / "one", tmp_path / "two"
    assert _files(one) == _files(two) and not (two / SHARDS).exists()
    assert len(_rows(two / "predictions.csv")) == 7  # 8 files, one unreadable
    _same_rows(one / "predictions.csv", two / "predictions.csv", ("score", "threshold"))
    for name in _files(one):  # overlays and reconstructions under the same names, and the same pixels
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert stdout.count("score ") == 7  # the main process reports, once


def test_evaluate_over_two_processes_writes_what_one_writes(model_and_data, tmp_path: Path) -> None:
    model, data = model_and_data
    argv = ["evaluate", str(model), str(data), *RUN]
    assert cli.main([*argv, "--out", str(tmp_path / "one")]) == 0
    stdout = _launch([*argv, "--out", str(tmp_path / "two")], tmp_path)

    one, two = tmp_path / "one", tmp_path / "two"
    assert _files(one) == _files(two) and not (two / SHARDS).exists()
    _same_rows(one / "scores.csv", two / "scores.csv", ("score",))
    metrics_one, metrics_two = (json.loads((folder / "metrics.json").read_text()) for folder in (one, two))
    assert metrics_two["skipped"]["count"] == 1
    assert metrics_two["images"]["bottle"] == {"normal": 2, "anomalous": 2, "with_mask": 2}
    assert metrics_one == metrics_two  # every image scored in the same batch as by one process: the same maps
    for name in _files(one):  # plots and the qualitative grid too
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert stdout.count("| bottle") == 1  # the main process prints the table, once

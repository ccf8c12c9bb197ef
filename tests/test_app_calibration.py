"""Calibration images in the Thresholds tab: uploads (files or a zip with normal/ and defective/),
zips unpacked safely, and server folders only inside --data-root, where a missing folder and one
outside give the same answer."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from PIL import Image

from vlmdiff.app import DetectorService, thresholds_tab
from vlmdiff.app.calibration import NO_FOLDER
from vlmdiff.app.errors import ServiceError
from vlmdiff.app.limits import MAX_ZIP_MB
from conftest import NORMAL_EXAMPLE as NORMAL
from app_harness import payload
from vlmdiff.app.uploads import Upload, unpack_zip

ROOT = Path(__file__).resolve().parents[1]
DEFECTIVE = ROOT / "assets" / "examples" / "brick_crack.png"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a request


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A data root holding brick/test/good and brick/test/crack (with masks), two images each."""
    root = tmp_path_factory.mktemp("data")
    brick = root / "brick"
    for defect, source in (("good", NORMAL), ("crack", DEFECTIVE)):
        (brick / "test" / defect).mkdir(parents=True)
        (brick / "ground_truth" / defect).mkdir(parents=True)
        for i in range(2):
            Image.open(source).rotate(90 * i).resize((64, 64)).save(brick / "test" / defect / f"{i:03d}.png")
            Image.new("L", (64, 64)).save(brick / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


@pytest.fixture(scope="module")
def service(model_dir, data_root, tmp_path_factory) -> DetectorService:
    return DetectorService(model_dir, user_models_dir=tmp_path_factory.mktemp("user-models"), data_root=data_root)


def png_bytes(source: Path, angle: int = 0) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    Image.open(source).rotate(angle).save(buffer, "PNG")
    return buffer.getvalue()


def calibration_zip(path: Path, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(2):
            archive.writestr(f"set/normal/n{i}.png", png_bytes(NORMAL, 90 * i))
            archive.writestr(f"set/defective/d{i}.png", png_bytes(DEFECTIVE, 90 * i))
        archive.writestr("README.txt", "calibration images")
        archive.writestr("__MACOSX/set/normal/._n0.png", b"resource fork")
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return path


def test_a_zip_with_normal_and_defective_folders_is_scored(service, tmp_path):
    archive = calibration_zip(tmp_path / "brick.zip")
    plot, slider, info, calibration, _ = thresholds_tab.score_calibration(service, "brick", [payload(archive)])
    assert "2 normal and 2 anomalous images (uploaded images)" in info, info
    assert isinstance(plot, Image.Image) and list(calibration.labels).count(1) == 2


def test_zip_entries_never_leave_the_scratch_folder(tmp_path):
    scratch, outside = tmp_path / "scratch", tmp_path / "outside"
    scratch.mkdir()
    outside.mkdir()
    evil = {"../outside/normal/escape.png": png_bytes(NORMAL), f"{outside}/normal/absolute.png": png_bytes(NORMAL),
            "normal/..\\..\\outside\\windows.png": png_bytes(NORMAL)}
    images = unpack_zip(Upload(calibration_zip(tmp_path / "evil.zip", evil), "evil.zip"), scratch)
    assert list(outside.iterdir()) == []
    assert all(image.path.parent == scratch for image, _ in images)
    names = sorted(image.name for image, _ in images)  # named as in the zip; entries with '..' are skipped
    assert len(names) == 5 and not any(".." in name for name in names)
    assert any(name.endswith("outside/normal/absolute.png") for name in names)


def test_bad_zips_get_a_message(service, tmp_path, monkeypatch):
    not_zip = tmp_path / "broken.zip"
    not_zip.write_bytes(b"PK\x03\x04 not really")
    no_folders = tmp_path / "flat.zip"
    with zipfile.ZipFile(no_folders, "w") as archive:
        archive.writestr("a.png", png_bytes(NORMAL))
    cases = [(not_zip, "broken.zip is not a readable zip file"),
             (no_folders, "flat.zip has no images in normal/ or defective/ folders")]
    for path, expected in cases:
        assert expected in thresholds_tab.score_calibration(service, "brick", [payload(path)])[2]
    monkeypatch.setattr("vlmdiff.app.uploads.MAX_ZIP_MB", 0)  # the declared sizes are checked before unpacking
    info = thresholds_tab.score_calibration(service, "brick", [payload(calibration_zip(tmp_path / "big.zip"))])[2]
    assert "big.zip unpacks to" in info and "at most 0 MB" in info
    assert MAX_ZIP_MB > 0


def test_a_folder_inside_the_data_root_is_scored(service):
    info = thresholds_tab.score_calibration(service, "brick", None, None, "brick")[2]
    assert "2 normal and 2 anomalous images (folder brick)" in info, info


def test_a_missing_folder_and_one_outside_the_root_get_the_same_answer(service, data_root, tmp_path):
    outside = tmp_path / "elsewhere"
    (outside / "test" / "good").mkdir(parents=True)
    (data_root / "link").symlink_to(outside, target_is_directory=True)
    answers = {name: thresholds_tab.score_calibration(service, "brick", None, None, name)[2]
               for name in ("missing", "brick/missing", str(outside), "../" + outside.name, "link", "/etc",
                            "brick/test/good/000.png", "x" * 300, "brick\0")}
    assert len(set(answers.values())) == 1, answers
    assert NO_FOLDER in answers["missing"] and str(tmp_path) not in answers["missing"]


def test_without_a_data_root_no_server_folder_is_read(model_dir, data_root, tmp_path):
    service = DetectorService(model_dir, user_models_dir=tmp_path / "user-models")
    for name in ("brick", str(data_root / "brick"), "/root", "/"):
        info = thresholds_tab.score_calibration(service, "brick", None, None, name)[2]
        assert "reads no folders on its server: upload the calibration images instead" in info
    with pytest.raises(ServiceError, match="reads no folders"):
        service.thresholds.calibrate("brick", folder=str(data_root / "brick"))

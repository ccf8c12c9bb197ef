"""Per-class thresholds on small hand-computed cases."""

import json

import numpy as np
import pytest

from vlmdiff.thresholds import ClassThreshold, Thresholds, expected_false_positive_rate, quantile_threshold


def test_quantile_of_0_to_100_at_099_is_99_with_its_median_and_expected_fpr():
    thresholds = Thresholds()
    fitted = thresholds.fit_quantile("bottle", np.arange(101), q=0.99)
    # one of the 101 held-out scores lies above 99: (1 + 1) / (101 + 1) new normals are expected above it
    assert fitted == ClassThreshold(99.0, "quantile", 50.0, 2 / 102)
    assert thresholds.verdict("bottle", 99.0)
    assert not thresholds.verdict("bottle", 98.9)


def test_expected_fpr_matches_new_normal_scores_of_the_same_distribution():
    rng = np.random.default_rng(0)
    fitted = quantile_threshold(rng.normal(size=200), q=0.95)
    observed = float(np.mean(rng.normal(size=200_000) > fitted.value))
    assert abs(fitted.expected_fpr - observed) < 0.02
    assert abs(expected_false_positive_rate(rng.normal(size=50), 10.0) - 1 / 51) < 1e-12


def test_f1_threshold_of_separable_set_is_lowest_anomalous_score():
    thresholds = Thresholds()
    fitted = thresholds.fit_f1("cable", [0.1, 0.2, 0.3, 0.7, 0.8], [0, 0, 0, 1, 1])
    assert fitted == ClassThreshold(0.7, "f1", 0.2, 1 / 4)
    assert [thresholds.verdict("cable", s) for s in (0.3, 0.69, 0.7, 0.9)] == [False, False, True, True]


def test_normalized_is_half_at_threshold_monotone_and_never_clips():
    thresholds = Thresholds()
    thresholds.fit_f1("cable", [0.1, 0.2, 0.3, 0.7, 0.8], [0, 0, 0, 1, 1])  # median normal 0.2, threshold 0.7
    assert thresholds.normalized("cable", 0.7) == 0.5
    assert thresholds.normalized("cable", 0.2) == pytest.approx(0.05)
    assert thresholds.normalized("cable", 1.2) == pytest.approx(1 - 0.5 / (1 + np.log(2)))  # one spread above: 0.70
    # clear defects stay apart: ten and a hundred spreads above show different values below 0.95
    assert 0.84 < thresholds.normalized("cable", 5.7) < thresholds.normalized("cable", 50.7) < 0.95
    grid = np.linspace(-1.0, 2.0, 301)
    values = [thresholds.normalized("cable", s) for s in grid]
    assert np.all(np.diff(values) > 0)  # strictly increasing: distinct scores stay distinct
    assert 0.0 < min(values) and max(values) < 1.0
    assert all((v >= 0.5) == thresholds.verdict("cable", s) for s, v in zip(grid, values))
    assert thresholds.normalized("cable", np.nextafter(0.7, 0.0)) < 0.5 <= thresholds.normalized("cable", 0.7)


def test_manual_threshold_keeps_the_median_and_stays_at_half():
    thresholds = Thresholds()
    thresholds.fit_quantile("bottle", np.arange(101), q=0.5)
    manual = thresholds.set_manual("bottle", 120.0)
    assert manual == ClassThreshold(120.0, "manual", 50.0)
    assert thresholds.normalized("bottle", 120.0) == 0.5
    fresh = thresholds.set_manual("screw", 3.0)
    assert fresh.normal_median == 3.0
    levels = [thresholds.normalized("screw", s) for s in (2.0, 3.0, 4.0)]
    assert levels[0] < 0.5 == levels[1] < levels[2] < 1.0
    with_scores = thresholds.set_manual("washer", 2.0, [0.0, 1.0, 2.0, 3.0])
    assert with_scores.normal_median == 1.5 and with_scores.expected_fpr == pytest.approx(2 / 5)


def test_version_1_files_still_load(tmp_path):
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"version": 1, "classes": {
        "bottle": {"value": 0.7, "method": "quantile", "normal_scale": [0.2, 0.9]}}}))
    assert Thresholds.load(path).get("bottle") == ClassThreshold(0.7, "quantile", 0.2)


def test_save_load_round_trip(tmp_path):
    thresholds = Thresholds()
    thresholds.fit_quantile("bottle", np.linspace(0.0, 1.0, 37), q=0.9)
    thresholds.fit_f1("cable", [0.1, 0.2, 0.3, 0.7, 0.8], [0, 0, 0, 1, 1])
    thresholds.set_manual("screw", 1 / 3)
    path = tmp_path / "thresholds.json"
    thresholds.save(path)
    loaded = Thresholds.load(path)
    assert loaded.classes == ["bottle", "cable", "screw"]
    assert all(loaded.get(name) == thresholds.get(name) for name in thresholds.classes)
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    assert json.loads(path.read_text())["classes"]["cable"]["method"] == "f1"


def test_load_rejects_foreign_json(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"bottle": 0.5}))
    with pytest.raises(ValueError, match="not a thresholds file"):
        Thresholds.load(path)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda t: t.verdict("missing", 0.5), "unknown class 'missing'"),
        (lambda t: t.normalized("missing", 0.5), "unknown class 'missing'"),
        (lambda t: t.fit_quantile("c", []), "normal_scores is empty"),
        (lambda t: t.fit_f1("c", [], []), "scores is empty"),
        (lambda t: t.fit_f1("c", [0.1, 0.2], [1, 1]), "single class"),
        (lambda t: t.fit_f1("c", [0.1, 0.2], [0, 0]), "single class"),
        (lambda t: t.fit_f1("c", [0.1, 0.2], [0, 2]), "only 0"),
        (lambda t: t.fit_f1("c", [0.1, 0.2, 0.3], [0, 1]), "differ in length"),
        (lambda t: t.fit_quantile("c", [0.1, 0.2], q=1.0), "q must be strictly between 0 and 1"),
        (lambda t: t.fit_quantile("c", [0.1, 0.2], q=0.0), "q must be strictly between 0 and 1"),
        (lambda t: t.fit_quantile("c", [0.1, np.nan]), "NaN or infinite"),
        (lambda t: t.fit_f1("c", [0.1, np.inf], [0, 1]), "NaN or infinite"),
        (lambda t: t.set_manual("c", np.nan), "finite"),
        (lambda t: t.verdict("known", np.nan), "finite"),
    ],
)
def test_errors_name_the_problem(call, message):
    thresholds = Thresholds()
    thresholds.set_manual("known", 0.5)
    with pytest.raises(ValueError, match=message):
        call(thresholds)

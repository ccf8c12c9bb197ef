"""Progress reports: each phase's units, time taken and time left at its pace; the command-line display."""
import io

import pytest

from vlmdiff import progress as progress_module
from vlmdiff.progress import ConsoleProgress, Phase, duration, within


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    now = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    return now


def test_time_left_follows_the_pace_after_the_first_unit(clock):
    reports = []
    phase = Phase(lambda f, m: reports.append((f, m)), "embedding")
    clock[0] += 30.0  # the first unit carries the start-up (a model load, a coreset): no estimate from it
    phase(1, 11, "images")
    clock[0] += 4.0
    phase(3, 11, "images")  # 2 images in 4 s: 8 left take 16 s
    clock[0] += 16.0
    phase(11, 11, "images")
    assert reports == [
        (1 / 11, "embedding: 1 of 11 images (30 s)"),
        (3 / 11, "embedding: 3 of 11 images (34 s, about 16 s left)"),
        (1.0, "embedding: 11 of 11 images (50 s)"),
    ]


def test_a_phase_within_a_job_spans_its_share():
    reports = []
    Phase(within(lambda f, m: reports.append(f), 0.2, 0.6), "coreset")(1, 4)
    assert reports == [pytest.approx(0.3)]


@pytest.mark.parametrize(("seconds", "text"), [(8.4, "8 s"), (125, "2 min 05 s"), (3840, "1 h 04 min")])
def test_durations_read_as_people_write_them(seconds, text):
    assert duration(seconds) == text


def test_a_log_gets_the_first_and_last_report_of_each_phase(clock):
    stream = io.StringIO()
    console = ConsoleProgress(stream)
    for done in range(1, 6):
        console(done / 10, f"embedding: {done} of 5 images")
    console(0.8, "coreset: 1 of 1 classes")
    console.close()
    assert stream.getvalue().splitlines() == [
        "[ 10%] embedding: 1 of 5 images", "[ 50%] embedding: 5 of 5 images", "[ 80%] coreset: 1 of 1 classes",
    ]

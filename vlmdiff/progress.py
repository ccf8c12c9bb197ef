"""Progress of long work in phases, each with its own elapsed time and estimated time left.

Library functions report through a `Progress` callback (overall fraction, message), the form
`gr.Progress` takes; `Phase` turns a phase's (done, total) counts into such reports, with the
time the phase has taken and, from its pace so far, the time it still needs; `within` places a
phase in its share of the whole job.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

Progress = Callable[[float, str], None]


def no_progress(fraction: float, message: str) -> None:
    """The callback of work nobody watches."""


def duration(seconds: float) -> str:
    """'8 s', '2 min 05 s', '1 h 04 min'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def within(report: Progress, start: float, end: float) -> Progress:
    """`report` for a part of a job that spans [start, end] of the job's overall fraction."""
    return lambda fraction, message: report(start + (end - start) * fraction, message)


class Phase:
    """One phase of a job: its reports name it and give the time taken and the time left at its pace so far."""

    def __init__(self, report: Progress, name: str) -> None:
        self.report, self.name = report, name
        self.began = time.monotonic()
        self.first: tuple[float, int] | None = None  # the pace is measured from the first report on

    def __call__(self, done: int, total: int, unit: str = "") -> None:
        """Report `done` of `total` units (images, folds, steps) finished."""
        now = time.monotonic()
        elapsed = now - self.began
        self.first = self.first or (now, done)
        counts = f"{done} of {total}{' ' + unit if unit else ''}"
        paced = done - self.first[1]
        left = f", about {duration((now - self.first[0]) * (total - done) / paced)} left" if paced and done < total else ""
        self.report(done / total if total else 1.0, f"{self.name}: {counts} ({duration(elapsed)}{left})")


class ConsoleProgress:
    """A `Progress` callback for the command line: one line per phase. On a terminal the line is rewritten
    in place at most every `interval` seconds; in a log, only each phase's first and last report."""

    def __init__(self, stream: TextIO | None = None, interval: float = 0.5) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self.live = self.stream.isatty()
        self.phase: str | None = None
        self.shown = self.pending = ""
        self.last = 0.0

    def __call__(self, fraction: float, message: str) -> None:
        line = f"[{fraction:4.0%}] {message}"
        phase = message.split(":", 1)[0]
        if phase != self.phase:
            self.close()
            self.phase = phase
            self._write(line)
        elif self.live and time.monotonic() - self.last >= self.interval:
            self._write(line)
        else:
            self.pending = line

    def close(self) -> None:
        """Show the current phase's last report and end its line."""
        if self.pending:
            self._write(self.pending)
        if self.live and self.shown:
            self.stream.write("\n")
            self.stream.flush()
        self.shown = ""

    def _write(self, line: str) -> None:
        self.stream.write("\r\033[K" + line if self.live else line + "\n")
        self.stream.flush()
        self.shown, self.pending, self.last = line, "", time.monotonic()

"""glibc's trim and heap cap, and their no-op elsewhere (what they return to the system: benchmarks/bench_app.py)."""
from __future__ import annotations

import platform

import pytest

from vlmdiff import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_without_glibc_both_do_nothing_and_say_so(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc_function", lambda name: None)
    assert allocator.release_freed_memory() is False
    assert allocator.limit_heaps() is False


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_on_glibc_both_take_effect():
    assert allocator.release_freed_memory() is True
    assert allocator.limit_heaps(8) is True  # mallopt accepts it (8: its default on 1 core)

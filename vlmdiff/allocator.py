"""Memory freed by the app and by long library jobs goes back to the operating system.

glibc keeps freed memory in its heaps for reuse: image buffers and tensors of a few MB freed after a
large upload stay with the process (small allocations made meanwhile pin them), so an app that
decoded one large upload kept ~0.8 GB for good and the next one added to it. `release_freed_memory`
hands every free page back; it runs after each large decode (a few ms, nothing like the decode).

glibc also gives each thread that allocates its own heap (up to 8 per core), and the pages a heap
keeps for its thread stay when the thread has gone: six concurrent detections on Gradio's worker
threads left ~100 MB that no trim returned. `limit_heaps` caps the heaps a process makes from then
on; the app's requests take turns on the model anyway.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)


@cache
def _glibc_function(name: str):
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, AttributeError, TypeError):  # musl, macOS, Windows: their allocators behave otherwise
        return None


def release_freed_memory() -> bool:
    """Return the free pages of every glibc heap to the system; False where libc is not glibc."""
    trim = _glibc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


def limit_heaps(count: int = 2) -> bool:
    """Let threads that start allocating from now on share at most `count` glibc heaps; False where
    libc is not glibc."""
    mallopt = _glibc_function("mallopt")
    return mallopt is not None and bool(mallopt(M_ARENA_MAX, count))

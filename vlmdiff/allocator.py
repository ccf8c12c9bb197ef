"""Memory freed by the app and by long library jobs goes back to the operating system.

glibc keeps freed memory in its heaps for reuse: image buffers and tensors of a few MB freed after a
large upload stay with the process (small allocations made meanwhile pin them), so an app that
decoded one large upload kept ~0.8 GB for good and the next one added to it. `release_freed_memory`
hands every free page back; it runs after each large decode (a few ms, nothing like the decode).
"""
from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


@cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):  # musl, macOS, Windows: their allocators behave otherwise
        return None


def release_freed_memory() -> bool:
    """Return the free pages of every glibc heap to the system; False where libc is not glibc."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True

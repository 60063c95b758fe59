"""Handing freed memory back to the operating system between the engine's large steps.

The engine allocates and frees tensors of tens to hundreds of MiB many times (one layer's edge
problem per example, its bounds in blocks), from several threads. glibc's allocator keeps
memory freed inside its heaps (and raises its mmap threshold after large frees, so later
blocks of up to 32 MiB come from those heaps too), so the process's resident memory can stay
gigabytes above what is live. :func:`release_free_memory` asks glibc to return the free pages
(``malloc_trim(0)``); it frees nothing that is in use and changes no value. On other C
libraries and systems it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__: list[str] = []


def _load_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _load_trim()


def release_free_memory() -> bool:
    """Return the allocator's free memory to the system (glibc ``malloc_trim(0)``); ``True``
    if any was returned, ``False`` otherwise or where unsupported."""
    return bool(_TRIM(0)) if _TRIM is not None else False

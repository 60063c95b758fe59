"""Freed memory goes back to the system between the engine's large steps
(``curvprune/_memory.py``); the peak it saves on VGG-9 is measured in docs/benchmarks.md."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from curvprune import _memory
from curvprune._memory import release_free_memory


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(_memory._TRIM is None, reason="needs glibc's malloc_trim (Linux)")
def test_freed_holes_in_the_heap_are_returned():
    """Blocks below glibc's mmap threshold, freed between blocks still in use, stay resident
    after ``del`` (the heap cannot shrink past the live blocks) until the trim returns their
    pages; the blocks still in use keep their values."""
    release_free_memory()
    big, kept = [], []
    for k in range(2000):
        big.append(torch.full((8000,), float(k), dtype=torch.float64))  # 62.5 KiB each
        kept.append(torch.full((16,), float(k), dtype=torch.float64))
    del big
    freed = _rss()
    assert release_free_memory() is True
    assert freed - _rss() > 64 << 20  # of the 122 MiB freed
    assert all(bool((t == k).all()) for k, t in enumerate(kept))


def test_release_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(_memory, "_TRIM", None)
    assert release_free_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_glibc_trim_is_found_on_linux():
    names = getattr(os, "confstr_names", {})
    libc = os.confstr("CS_GNU_LIBC_VERSION") if "CS_GNU_LIBC_VERSION" in names else None
    if not libc:
        pytest.skip("not glibc")
    assert _memory._TRIM is not None

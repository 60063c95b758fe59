"""Freed memory goes back to the system between the engine's large steps
(``curvprune/_memory.py``); the peak it saves on VGG-9 is measured in docs/benchmarks.md."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from curvprune import _memory
from curvprune._memory import release_free_memory

_HOLES = """
import os, torch
from curvprune._memory import release_free_memory

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

release_free_memory()
big, kept = [], []
for k in range(2000):
    big.append(torch.full((8000,), float(k), dtype=torch.float64))  # 62.5 KiB each
    kept.append(torch.full((16,), float(k), dtype=torch.float64))
live = rss()
del big
before = live - rss()
trimmed = release_free_memory()
print(before, live - rss(), trimmed, all(bool((t == k).all()) for k, t in enumerate(kept)))
"""


@pytest.mark.skipif(_memory._TRIM is None, reason="needs glibc's malloc_trim (Linux)")
def test_freed_holes_in_the_heap_are_returned():
    """Blocks below glibc's mmap threshold, freed between blocks still in use, stay resident
    after ``del`` (the heap cannot shrink past the live blocks) until the trim returns their
    pages; the blocks still in use keep their values. Run in a fresh process: where blocks
    land depends on the heap's history (after a long test run the small blocks can fill old
    holes, and ``free`` then returns part of the large ones itself, so the trim alone
    returned 59 MiB in one CI run)."""
    out = subprocess.run([sys.executable, "-c", _HOLES], capture_output=True, text=True,
                         check=True).stdout.split()
    before, after, trimmed, intact = int(out[0]), int(out[1]), out[2], out[3]
    assert before < 16 << 20  # del alone returns (almost) nothing of the 122 MiB
    assert trimmed == "True" and after - before > 64 << 20  # the trim returns most of it
    assert intact == "True"


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

r"""The dense min-plus product behind the distance tables of both graphs.

.. math::
    \mathrm{out}[i, m, n] = \min_k \operatorname{fl}(a[m, k] + b[i, k, n])

(``a`` may also hold one matrix per batch item, ``[i, m, k]``). Every candidate is one IEEE
addition of the same two operands, and ``min`` is exact (no NaN: the operands are lengths or
``+inf``), so the result is the same bit for bit whatever order or grouping the minima are
taken in; the two ways below differ in speed only.

* **On the CPU, by tiles** (:func:`_by_tiles`): output tiles of ``_TILE`` entries (1 MiB of
  float64), one inner index at a time: one addition into a scratch tile and one minimum into
  the output, so no temporary larger than a tile. A tile is large enough for torch to share
  each operation among its threads (above its grain of 32k entries) and few enough calls to
  keep Python's overhead small. (VGG-9's conv-chain products, 2 threads: about half the time
  of the earlier 32k-entry tiles.)
* **Elsewhere, by spans** (:func:`_by_spans`): the whole output at once, a span of the inner
  index per broadcast addition of at most ``_DEVICE_SPAN`` entries, reduced with ``amin``:
  few, large kernels.
"""

from __future__ import annotations

import math

import torch

__all__: list[str] = []  # private to the graphs

#: Output entries per tile on the CPU (``2**17`` float64 = 1 MiB).
_TILE = 1 << 17
#: Entries of one broadcast addition on other devices.
_DEVICE_SPAN = 1 << 22


def min_plus(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out[i, m, n] = min_k a[m, k] + b[i, k, n]`` for ``a`` ``[m, k]`` (or ``[i, m, k]``)
    and ``b`` ``[i, k, n]`` (module docstring); ``+inf`` where ``k == 0``."""
    batch, k, n = b.shape
    out = torch.empty((batch, a.shape[-2], n), dtype=b.dtype, device=b.device)
    if out.numel() == 0:
        return out
    if k == 0:
        return out.fill_(math.inf)
    # Inner index first: its slices are leading slices of both operands.
    a_k = a.permute(1, 0)[:, None] if a.dim() == 2 else a.permute(2, 0, 1)  # [k, 1 or i, m]
    b_k = b.transpose(0, 1)  # [k, i, n]
    if b.device.type == "cpu":
        _by_tiles(a_k.contiguous(), b_k, out)
    else:
        _by_spans(a_k, b_k, out)
    return out


def _by_tiles(a_k: torch.Tensor, b_k: torch.Tensor, out: torch.Tensor) -> None:
    """Fill ``out`` (``[i, m, n]``) from ``a_k`` (``[k, 1 or i, m]``) and ``b_k``
    (``[k, i, n]``), tile by tile, one inner index at a time."""
    batch, m, n = out.shape
    rows = max(1, min(m, _TILE // n))
    items = max(1, min(batch, _TILE // (rows * n)))
    scratch = torch.empty((items, rows, n), dtype=out.dtype, device=out.device)
    for i0 in range(0, batch, items):
        i1 = min(batch, i0 + items)
        left = a_k if a_k.shape[1] == 1 else a_k[:, i0:i1]
        for m0 in range(0, m, rows):
            m1 = min(m, m0 + rows)
            acc, sums = out[i0:i1, m0:m1], scratch[:i1 - i0, :m1 - m0]
            torch.add(left[0, :, m0:m1, None], b_k[0, i0:i1, None, :], out=acc)
            for p in range(1, a_k.shape[0]):
                torch.add(left[p, :, m0:m1, None], b_k[p, i0:i1, None, :], out=sums)
                torch.minimum(acc, sums, out=acc)


def _by_spans(a_k: torch.Tensor, b_k: torch.Tensor, out: torch.Tensor) -> None:
    """Fill ``out`` as :func:`_by_tiles` does, the whole output at once, a span of the inner
    index per broadcast addition."""
    k = a_k.shape[0]
    step = max(1, _DEVICE_SPAN // out.numel())
    for p in range(0, k, step):
        part = (a_k[p:p + step, :, :, None] + b_k[p:p + step, :, None, :]).amin(0)
        if p == 0:
            out.copy_(part)
        else:
            torch.minimum(out, part, out=out)

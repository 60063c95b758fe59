"""The dense min-plus kernel (``curvprune.graphs._min_plus``) against its definition, the
minimum of one broadcast addition, bit for bit: both ways (by tiles, the CPU's; by spans, other
devices'), any tile and span, shared and per-item left operands, ``+inf`` entries, an empty
inner index."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvprune.graphs import _min_plus


def _operands(seed: int, batch: int, m: int, k: int, n: int, shared: bool, inf: float):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand((m, k) if shared else (batch, m, k), generator=gen, dtype=torch.float64)
    b = torch.rand(batch, k, n, generator=gen, dtype=torch.float64) * 3.0
    a[torch.rand(a.shape, generator=gen) < inf] = math.inf
    b[torch.rand(b.shape, generator=gen) < inf] = math.inf
    return a, b


def _definition(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    left = a[None] if a.dim() == 2 else a
    return (left[:, :, :, None] + b[:, None, :, :]).amin(2)


def _by_spans(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``min_plus`` the other devices' way, run on the CPU."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_min_plus, "_by_tiles", _min_plus._by_spans)
        return _min_plus.min_plus(a, b)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 4), m=st.integers(1, 9),
       k=st.integers(1, 12), n=st.integers(1, 9), shared=st.booleans(),
       inf=st.sampled_from([0.0, 0.3, 1.0]), tile=st.integers(1, 40), span=st.integers(1, 200))
def test_min_plus_equals_the_broadcast_minimum(seed, batch, m, k, n, shared, inf, tile, span):
    a, b = _operands(seed, batch, m, k, n, shared, inf)
    want = _definition(a, b)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_min_plus, "_TILE", tile)
        mp.setattr(_min_plus, "_DEVICE_SPAN", span)
        assert torch.equal(_min_plus.min_plus(a, b), want)
        assert torch.equal(_by_spans(a, b), want)


@pytest.mark.parametrize("shared", [True, False])
def test_min_plus_default_tiles_and_spans_split(shared):
    # Larger than one tile (2**17 entries): rows and items split, with a partial last tile;
    # spans of the inner index split with a partial last span.
    a, b = _operands(3, 5, 70, 37, 509, shared, 0.4)
    want = _definition(a, b)
    assert torch.equal(_min_plus.min_plus(a, b), want)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_min_plus, "_DEVICE_SPAN", 5 * 70 * 509 * 3)
        assert torch.equal(_by_spans(a, b), want)


def test_min_plus_of_an_empty_inner_index_is_infinite():
    out = _min_plus.min_plus(torch.empty(3, 0, dtype=torch.float64),
                             torch.empty(2, 0, 4, dtype=torch.float64))
    assert out.shape == (2, 3, 4) and bool(torch.isinf(out).all())
    assert _min_plus.min_plus(torch.empty(0, 2), torch.empty(1, 2, 3)).shape == (1, 0, 3)

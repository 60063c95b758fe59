r"""Ground distances of the neural graph: directed shortest paths between node layers.

Edge lengths are :math:`d(u, v) = 1 / |w_{uv}|` and do not depend on the calibration example, so
all distances are computed once per scoring call. In a layered graph the shortest path from layer
``L`` to layer ``L + h`` is a min-plus product of ``h`` consecutive length matrices:

.. math::

    D_{L \to L+2}(a, c) = \min_b \; d(a, b) + d(b, c), \qquad
    D_{L \to L+3}(a, c) = \min_b \; d(a, b) + D_{L+1 \to L+3}(b, c).

The products run over the sparse edge list of the first hop, in chunks, so peak memory is the
result plus one ``[chunk, n_target]`` block.
"""

from __future__ import annotations

import torch

__all__ = ["length_matrix", "min_plus"]


def length_matrix(
    src: torch.Tensor, dst: torch.Tensor, length: torch.Tensor, n_src: int, n_dst: int
) -> torch.Tensor:
    """Dense ``[n_src, n_dst]`` matrix of edge lengths, ``inf`` where there is no edge."""
    out = torch.full((n_src, n_dst), float("inf"), dtype=length.dtype, device=length.device)
    out[src, dst] = length
    return out


def min_plus(
    src: torch.Tensor,
    dst: torch.Tensor,
    length: torch.Tensor,
    n_src: int,
    rest: torch.Tensor,
    *,
    max_block: int = 1 << 22,
) -> torch.Tensor:
    """Min-plus product of a sparse first hop with a dense remainder.

    Returns ``D[a, c] = min over edges (a -> b) of length(a, b) + rest[b, c]`` as a dense
    ``[n_src, rest.shape[1]]`` tensor (``inf`` where unreachable).
    """
    n_target = rest.shape[1]
    out = torch.full((n_src, n_target), float("inf"), dtype=rest.dtype, device=rest.device)
    if src.numel() == 0 or n_target == 0:
        return out
    chunk = max(1, max_block // max(n_target, 1))
    for start in range(0, src.numel(), chunk):
        s, d, w = src[start:start + chunk], dst[start:start + chunk], length[start:start + chunk]
        candidate = rest[d] + w[:, None]
        out.scatter_reduce_(0, s[:, None].expand_as(candidate), candidate, reduce="amin")
    return out

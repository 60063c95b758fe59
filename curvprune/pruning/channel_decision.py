r"""Decision-exact channel pruning: the channels that exact curvature removes, from intervals.

Torch-Pruning's ``MetaPruner`` ranks the channels of each *scope* (one group for local pruning,
every group together for ``global_pruning=True``) by the importance of :class:`CurvatureImportance
<curvprune.importance.CurvatureImportance>` and removes the :math:`n` lowest: locally the
``topk`` of the :math:`n` smallest scores, globally every score :math:`\le t`, the
:math:`n`-th smallest of the scope (``n`` depends on the channel counts only).

Scored at a tolerance, each channel edge's curvature lies in a certified interval, and
:meth:`CurvatureImportance.score_bounds
<curvprune.importance.CurvatureImportance.score_bounds>` bounds every channel score
:math:`s_i \in [a_i, b_i]`, both for the scores this run computes and for those a
``tolerance=0`` run computes (the edge intervals of edges not solved exactly are widened by
:data:`~curvprune.decision.ROUNDING`, as the values the scoring found exactly may differ from
an exact run's in the last ulps; edges solved by :meth:`CurvatureResult.refine
<curvprune.result.CurvatureResult.refine>` are exactly the exact run's). Where
:math:`a_i = b_i` the two runs' scores are equal to the last bit.

Let :math:`P` be the channels the pruner removes with this run's scores and :math:`K` the others
of the scope, :math:`B = \max_P b` and :math:`A = \min_K a`. **Certificate.**

* If :math:`B < A`, every score vector within the bounds has its :math:`|P|` smallest entries
  exactly on :math:`P`, strictly below the others: ``topk`` selects :math:`P` whatever its
  tie-breaking, and a threshold rule with :math:`|P| = n` does too.
* Global scope with :math:`|P| > n` (ties at :math:`t = \max_P s`): if also every :math:`i \in P`
  with :math:`s_i = t` is exact and every other :math:`i \in P` has :math:`b_i < t`, the exact
  scores have fewer than :math:`n` entries below :math:`t` and :math:`|P| \ge n` entries
  :math:`\le t`, so the exact threshold is :math:`t` and the exact selection is :math:`P`.
* Local scope where :math:`B \ge A` only through exact entries (ties or near-ties of exact
  scores, which ``topk`` breaks by an order it does not document): when every entry of the
  scope is exact, the scope's score vector is the exact run's bit for bit, so ``topk`` returns
  what it returns there.

(In a global scope two exact entries :math:`i \in P, j \in K` cannot collide:
:math:`s_i \le t < s_j`.) Entries that block the certificate are *straddling*: the inexact
:math:`i \in P` with :math:`b_i \ge A` and :math:`j \in K` with :math:`a_j \le B`, the inexact
ties of the second case, every inexact entry of a scope in the third. :func:`certified_step`
solves exactly the channel edges that feed a straddling entry (the edges of the channel nodes
its score reads), or, when those are all exact already and the entry is still inexact (a
normaliser spreads every edge of the group over each score), every edge of its group, then
scores and decides again. An inexact entry has an inexact input, so every round solves at least
one more edge: it ends, at the latest with every edge exact, and the pruned set is then the one
that ``tolerance=0`` scores give.

The pruner's own selection is read from a dry run of ``pruner.step(interactive=True)`` (the
groups it would prune, none pruned) and checked against the rules above; a configuration whose
selection follows other rules (``round_to``, isomorphic or per-layer ratio scopes, attention
head pruning) or a selection that does not match them is made exact by solving every edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..decision import ROUNDING

__all__ = ["certified_step", "ChannelRefinement"]


@dataclass
class ChannelRefinement:
    """What :func:`certified_step` solved exactly.

    Attributes:
        weights: weights solved exactly (:meth:`CurvatureResult.refine
            <curvprune.result.CurvatureResult.refine>` counts).
        edges: channel edges solved exactly.
        rounds: refinement rounds.
        everything: whether the pruner's configuration (or a selection that did not follow the
            documented rules) made every edge be solved.
    """

    weights: int = 0
    edges: int = 0
    rounds: int = 0
    everything: bool = False

    def add(self, other: ChannelRefinement) -> None:
        """Add the counts of ``other`` (another step) to these."""
        self.weights += other.weights
        self.edges += other.edges
        self.rounds += other.rounds
        self.everything |= other.everything


def _dry_run(pruner) -> dict[tuple[int, object], set[int]]:
    """``{(id(root module), handler): root indices}`` that ``pruner.step()`` would prune now,
    without pruning (the step counter is restored)."""
    step = pruner.current_step
    try:
        groups = list(pruner.step(interactive=True))
    finally:
        pruner.current_step = step
    out: dict[tuple[int, object], set[int]] = {}
    for g in groups:
        key = (id(g[0].dep.target.module), g[0].dep.handler)
        out.setdefault(key, set()).update(int(i) for i in g[0].root_idxs)
    return out


def _simple_selection(pruner) -> bool:
    """Whether ``pruner`` selects channels by the rules of the module docstring only."""
    return (not getattr(pruner, "round_to", None) and not getattr(pruner, "isomorphic", False)
            and not getattr(pruner, "prune_num_heads", False)
            and not any(len(scope) for _, scope in
                        getattr(pruner, "_layer_to_scope", {}).values()))


def _scope_count(pruner, scope: str, total: int) -> int | None:
    """The ``n`` of a scope of ``total`` channels at the coming step (Torch-Pruning's formula,
    after the dry run has recorded the scope's initial size), or ``None`` if the pruner does
    not expose it."""
    try:
        initial = pruner._scope_initial_channels.get(scope, total)
        ratio = pruner.per_step_pruning_ratio[pruner.current_step + 1]
    except (AttributeError, IndexError, TypeError, KeyError):
        return None
    return total - int(initial * (1 - ratio))


def _local_scope(pruner, group) -> str | None:
    """The name of a group's scope for local pruning, as Torch-Pruning names it."""
    try:
        return pruner.DG._module2name[group[0][0].source.module]
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


def _widened(result, exact_edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge bounds that also hold for a ``tolerance=0`` run: edges not solved exactly here are
    widened by :data:`~curvprune.decision.ROUNDING` (relative)."""
    lo, hi = result.edge_kappa_lo, result.edge_kappa_hi
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    scale = torch.maximum(torch.maximum(lo.abs(), hi.abs()), torch.ones_like(lo))
    pad = torch.where(finite & ~exact_edges.to(lo.device), ROUNDING * scale,
                      torch.zeros_like(lo))
    return lo - pad, hi + pad


def _straddling(a, b, v, pruned, local: bool, n: int | None) -> tuple[torch.Tensor, bool]:
    """``(straddling entries, consistent)`` of one scope (module docstring); ``consistent``
    is False when the selection ``pruned`` does not follow the scope's rule on ``v``."""
    kept = ~pruned
    inexact = a < b
    if pruned.any() and kept.any() and float(v[pruned].max()) > float(v[kept].min()):
        return inexact, False
    if not local and pruned.any() and kept.any() and float(v[pruned].max()) >= float(
            v[kept].min()):
        return inexact, False  # a threshold rule prunes every tie
    first_kept = float(a[kept].min()) if kept.any() else math.inf
    last_pruned = float(b[pruned].max()) if pruned.any() else -math.inf
    out = inexact & ((pruned & (b >= first_kept)) | (kept & (a <= last_pruned)))
    if not local and pruned.any() and (n is None or int(pruned.sum()) > n):
        t = v[pruned].max()
        out |= inexact & pruned & ((v == t) | (b >= t))
    if local and not out.any() and last_pruned >= first_kept:
        out = inexact  # exact near-ties: the whole scope must be exact
    return out, True


def certified_step(pruner) -> ChannelRefinement:
    """Run ``pruner.step()`` so that it removes the channels ``tolerance=0`` scores would.

    ``pruner`` is a Torch-Pruning ``MetaPruner`` (or subclass) whose importance is a
    :class:`~curvprune.CurvatureImportance`. Before pruning, the channel scores whose certified
    bounds let exact curvature change the pruner's selection are refined (module docstring)
    until none can; then the step prunes. With scores computed at ``tolerance=0``, after the
    magnitude fallback, or with another importance, this is ``pruner.step()``.

    Returns:
        A :class:`ChannelRefinement`: what was solved exactly.
    """
    from ..importance import CurvatureImportance

    imp = pruner.importance
    done = ChannelRefinement()
    if not isinstance(imp, CurvatureImportance):
        pruner.step()
        return done
    exact_edges = None
    while True:
        record: dict = {}
        imp._record = record
        try:
            selected = _dry_run(pruner)
        finally:
            imp._record = None
        result = imp.result
        if imp.fell_back or result is None or not record:
            break
        graph = result.channel_graph
        layer = (graph.module >= 0).cpu()
        if exact_edges is None:
            if result.tolerance == 0 and result.max_width == 0:
                break  # exact scores (an exact-width result scored at a tolerance is not:
                # its values may differ from a tolerance=0 run's in the last ulps)
            exact_edges = torch.zeros_like(layer)
        need = torch.zeros_like(layer)
        if not _simple_selection(pruner):
            need = layer.clone()
            done.everything = True
        else:
            need, consistent = _needed_edges(pruner, imp, record, selected, exact_edges,
                                             layer)
            if not consistent:
                need = layer.clone()
                done.everything = True
        need &= layer & ~exact_edges
        if not need.any():
            break
        done.weights += _refine_edges(result, need)
        done.edges += int(need.sum())
        done.rounds += 1
        exact_edges |= need
        imp.refresh_scores()
    pruner.step()
    return done


def _needed_edges(pruner, imp, record, selected, exact_edges, layer):
    """The channel edges to solve exactly this round, and whether the pruner's selection
    followed the documented rules."""
    result = imp.result
    graph = result.channel_graph
    src, dst = graph.src.cpu(), graph.dst.cpu()
    edge_lo, edge_hi = _widened(result, exact_edges)
    if set(selected) - set(record):  # a pruned group that was not scored as recorded
        return layer.clone(), False
    entries = []  # per group: (group, a, b, v, pruned, ch_groups, size)
    for key, (group, v) in record.items():
        bounds = imp.score_bounds(group, edge_lo, edge_hi)
        if bounds is None:
            return layer.clone(), False
        lo, hi = (t.detach().float().cpu() for t in bounds)
        v = v.detach().cpu()
        ch_groups = pruner._get_channel_groups(group)
        size = v.numel() // ch_groups
        if ch_groups > 1:  # Torch-Pruning averages the channel groups, as here
            lo, hi = (t.view(ch_groups, -1).mean(dim=0) for t in (lo, hi))
            v = v.view(ch_groups, -1).mean(dim=0)
        pruned = torch.zeros(size, dtype=torch.bool)
        idx = [i % size for i in selected.get(key, ())]
        pruned[idx] = True
        entries.append((group, lo, hi, v, pruned, ch_groups, size))
    scopes = ([list(range(len(entries)))] if pruner.global_pruning
              else [[i] for i in range(len(entries))])
    need = torch.zeros_like(layer)
    for scope in scopes:
        a = torch.cat([entries[i][1] for i in scope])
        b = torch.cat([entries[i][2] for i in scope])
        v = torch.cat([entries[i][3] for i in scope])
        pruned = torch.cat([entries[i][4] for i in scope])
        if pruner.global_pruning:
            n = _scope_count(pruner, "DEFAULT_SCOPE", v.numel())
        else:  # the topk count must be the one the rule gives (a rejected group is not)
            name = _local_scope(pruner, entries[scope[0]][0])
            n = None if name is None else _scope_count(pruner, name, v.numel())
            if n is None or int(pruned.sum()) != max(n, 0):
                return layer.clone(), False
        straddle, consistent = _straddling(a, b, v, pruned, not pruner.global_pruning, n)
        if not consistent:
            return layer.clone(), False
        start = 0
        for i in scope:
            group, _, _, _, _, ch_groups, size = entries[i]
            mine = torch.nonzero(straddle[start:start + size]).squeeze(1)
            start += size
            if mine.numel() == 0:
                continue
            pairs = imp.group_nodes(group)
            positions = (mine.unsqueeze(0) + size * torch.arange(ch_groups).unsqueeze(1))
            wanted = set(positions.reshape(-1).tolist())
            own = torch.zeros(graph.num_nodes, dtype=torch.bool)
            every = torch.zeros(graph.num_nodes, dtype=torch.bool)
            for pos, nodes in pairs:
                every[nodes] = True
                hit = torch.tensor([int(p) in wanted for p in pos.tolist()], dtype=torch.bool)
                own[nodes[hit]] = True
            edges = layer & (own[src] | own[dst])
            if not (edges & ~exact_edges).any():  # its own inputs are exact: the normaliser's
                edges = layer & (every[src] | every[dst])
            need |= edges
    return need, True


def _refine_edges(result, need: torch.Tensor) -> int:
    """Solve the channel edges ``need`` exactly through :meth:`CurvatureResult.refine`: every
    nonzero weight element of those edges is chosen (an element may belong to several edges;
    all of them are solved)."""
    graph = result.channel_graph
    masks = {}
    for k, (name, _) in enumerate(graph.modules):
        if name not in result.kappa:
            continue
        widx, eidx = (t.cpu() for t in graph.weight_edges[k])
        chosen = need[eidx]
        if not chosen.any():
            continue
        shape = result.kappa[name].shape
        mask = torch.zeros(shape.numel(), dtype=torch.bool)
        mask[widx[chosen]] = True
        masks[name] = mask.view(shape).to(result.kappa[name].device)
    return result.refine(masks, force=True)

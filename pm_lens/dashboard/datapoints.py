"""The study's view of a feature: the pairs where removing it changes the margin most, with both
sides' rewards before and after (exact ablation), and its mean exact effect over all pairs.

Where they come from, per feature, first found first:

1. ``given``: rows of a run's ``top_datapoints.csv`` (its confirmation ablated them), with the
   mean effect from ``exact`` (``features.csv``);
2. ``ablation``: an :class:`~pm_lens.attribution.Ablation` of the same pairs that removed the
   feature (e.g. the fidelity card's): every pair, so the mean follows too;
3. otherwise one :func:`~pm_lens.attribution.ablate` of all the remaining features together, on
   the pairs each fires in (at most ``cap`` per feature, its largest estimated effects, or
   activations, first), from the clean run when one is given. With features removed to 0 and
   every pair it fires in ablated, its mean over all pairs follows (where it never fires, removal
   changes nothing); else the mean is unknown (None).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from pm_lens.attribution.ablate import Ablation, ablate
from pm_lens.attribution.clean import CleanRun
from pm_lens.dashboard.data import Datapoint
from pm_lens.dashboard.reading import Reading
from pm_lens.model import RewardModel
from pm_lens.saes.node import Node

Found = tuple[list[Datapoint], float | None]  # the datapoints, largest |margin effect| first; the mean effect


def find_datapoints(rm: RewardModel, saes: dict[str, Any], pairs: Sequence[Any], ids: list[int], nodes: list[Node],
                    reading: Reading, baselines: dict[str, Tensor], *, given: pd.DataFrame | None,
                    exact: Mapping[str, float] | None, ablation: Ablation | None, clean: CleanRun | None,
                    per_pair: Mapping[str, Any] | None, cap: int, skip_first: bool, batch_tokens: int) -> dict[Node, Found]:
    """Per node, its datapoints and mean exact margin effect (see the module docstring)."""
    found: dict[Node, Found] = {}
    rows = _given(given)
    for node in nodes:
        mean = None if exact is None or str(node) not in exact else float(exact[str(node)])
        if rows.get(str(node)):
            found[node] = (rows[str(node)], mean)
        elif ablation is not None and node in ablation.nodes:
            points, total = _from_ablation(ablation, ablation.nodes.index(node), list(range(len(pairs))), ids)
            found[node] = (points, mean if mean is not None else total)
    rest = [node for node in nodes if node not in found]
    if rest:
        for node, (points, total) in _ablate_rest(rm, saes, pairs, ids, rest, reading, baselines, clean, per_pair, cap,
                                                  skip_first, batch_tokens).items():
            mean = None if exact is None or str(node) not in exact else float(exact[str(node)])
            found[node] = (points, mean if mean is not None else total)
    return found


def _given(table: pd.DataFrame | None) -> dict[str, list[Datapoint]]:
    if table is None or table.empty:
        return {}
    out: dict[str, list[Datapoint]] = {}
    for row in table.itertuples():
        out.setdefault(str(row.node), []).append(Datapoint(
            pair=int(row.pair), chosen_before=float(row.chosen_before), chosen_after=float(row.chosen_after),
            rejected_before=float(row.rejected_before), rejected_after=float(row.rejected_after),
            margin_effect=float(row.margin_effect), preference_flips=bool(row.preference_flips)))
    return out


def _from_ablation(ablation: Ablation, column: int, rows: list[int], ids: list[int]) -> Found:
    """The datapoints of one column of ``ablation`` over its pairs ``rows`` (indices into ``ids``),
    and its mean margin change over them."""
    margin = ablation.margin[:, column]
    points = []
    for k in margin.abs().argsort(descending=True, stable=True).tolist():
        cb, rb = float(ablation.clean_chosen[k]), float(ablation.clean_rejected[k])
        ca, ra = cb + float(ablation.chosen[k, column]), rb + float(ablation.rejected[k, column])
        points.append(Datapoint(pair=ids[rows[k]], chosen_before=cb, chosen_after=ca, rejected_before=rb,
                                rejected_after=ra, margin_effect=float(margin[k]),
                                preference_flips=bool((cb - rb > 0) != (ca - ra > 0))))
    return points, float(margin.mean())


def _ablate_rest(rm: RewardModel, saes: dict[str, Any], pairs: Sequence[Any], ids: list[int], nodes: list[Node],
                 reading: Reading, baselines: dict[str, Tensor], clean: CleanRun | None,
                 per_pair: Mapping[str, Any] | None, cap: int, skip_first: bool, batch_tokens: int) -> dict[Node, Found]:
    """One ablation of ``nodes`` on the union of their candidate pairs (see the module docstring)."""
    candidates = {node: _candidates(node, reading, per_pair, cap) for node in nodes}
    union = sorted(set().union(*candidates.values()))
    if not union:
        return {node: ([], _mean_if_covered(node, [], [], reading, baselines, len(pairs))) for node in nodes}
    subset = None if clean is None else clean.subset(union)
    with rm.counting("dashboard"):
        # At the clean run's positions (an attribution's), so the effects are the ones it estimated.
        positions = "all" if clean is None else clean.settings.positions
        exact = ablate(rm, [pairs[i] for i in union], saes=list(saes.values()), features=nodes, baselines=baselines,
                       skip_first=skip_first, positions=positions, batch_tokens=batch_tokens, clean=subset,
                       progress=False)
    found, row_of = {}, {pair: row for row, pair in enumerate(union)}
    for column, node in enumerate(nodes):
        points, _ = _from_ablation(exact, column, union, ids)
        mine = {ids[i] for i in candidates[node]}
        margin = [exact.margin[row_of[i], column] for i in candidates[node]]
        found[node] = ([p for p in points if p.pair in mine],
                       _mean_if_covered(node, candidates[node], margin, reading, baselines, len(pairs)))
    return found


def _candidates(node: Node, reading: Reading, per_pair: Mapping[str, Any] | None, cap: int) -> list[int]:
    """The pairs ``node`` fires in, its largest estimated effects (or activations) first, at most ``cap``."""
    fires = reading.any_firing[node].numpy()
    if per_pair is not None and str(node) in per_pair:
        score = np.abs(np.asarray(per_pair[str(node)], dtype=float))
    else:
        score = reading.peaks[node].sum(1).numpy()
    order = np.lexsort((-score, ~fires))  # firing pairs first, then by score
    return sorted(int(i) for i in order[:cap] if fires[i])


def _mean_if_covered(node: Node, ablated: list[int], margin: list[Tensor], reading: Reading,
                     baselines: dict[str, Tensor], n_pairs: int) -> float | None:
    firing = set(np.flatnonzero(reading.any_firing[node].numpy()).tolist())
    if bool(baselines[node.hook_name][node.feature]) or not firing <= set(ablated):
        return None
    return float(torch.stack(margin).sum()) / n_pairs if margin else 0.0

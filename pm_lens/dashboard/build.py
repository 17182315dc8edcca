"""Feature dashboards in reward terms: what a feature fires on, and what it does to the reward.

SAE dashboards (SAELens's sae-dashboard, Neuronpedia; Bricken et al. 2023, "Towards
Monosemanticity") show a feature's activations and the tokens it promotes through the unembedding;
a PM has no vocabulary-sized unembedding, so here the reward takes that place (the study's own
viewer did the same by hand). Steps of :func:`build_dashboards`:

1. one clean forward of both sides of every pair (:mod:`pm_lens.dashboard.reading`): each
   feature's activations, histogram and density, co-firing counts, completion peaks, and its
   direct path to the reward at the pooled token;
2. examples: the texts it fires hardest on (one window per text, no two alike), and a few texts
   drawn (seeded) from each of ``n_intervals`` equal bands of its peak activation;
3. per-token contributions to the reward on those texts: one forward and backward per batch of
   them, ``-grad . d_f * scale * (baseline - act)`` at every token (attribution patching, the
   formula of :func:`pm_lens.attribution.formulas.node_effects`);
4. the datapoints where removing it changes the margin most: given (a run's ``top_datapoints``),
   or found by exact ablation of the pairs its estimated effect (or activation) is largest on;
5. direct effect beside the total (exact) effect; the labels the pairs carry (their ``meta``:
   values with few distinct levels, and per-side attributes such as the demo's planted ones)
   against where it fires.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from pm_lens.attribution.ablate import Ablation
from pm_lens.attribution.batching import pair_batches
from pm_lens.attribution.clean import CleanRun
from pm_lens.attribution.formulas import node_effects
from pm_lens.attribution.nodes import plain_model, resolve_saes
from pm_lens.dashboard.data import (
    CoFiring,
    DirectEffect,
    Example,
    ExampleGroup,
    FeatureDashboard,
    Histogram,
)
from pm_lens.dashboard.datapoints import find_datapoints
from pm_lens.dashboard.labels import label_rows
from pm_lens.dashboard.reading import SIDES, Reading, read_texts
from pm_lens.data import SKIP_FIRST, PairsLike, TokenBatch, as_pairs
from pm_lens.model import RewardModel
from pm_lens.saes.labels import characteristic_ngrams
from pm_lens.saes.node import Node, as_nodes
from pm_lens.saes.split import directions, flat, split


def build_dashboards(
    rm: RewardModel,
    saes: Any,
    pairs: PairsLike,
    features: Any,
    *,
    baselines: Mapping[str, Tensor] | None = None,
    estimated: Mapping[str, float] | None = None,
    per_pair_estimates: Mapping[str, Any] | None = None,
    exact: Mapping[str, float] | None = None,
    datapoints: pd.DataFrame | None = None,
    clean: CleanRun | None = None,
    ablation: Ablation | None = None,
    pair_ids: Sequence[int] | None = None,
    n_top: int = 5,
    n_intervals: int = 4,
    per_interval: int = 2,
    before: int = 12,
    after: int = 4,
    n_bins: int = 30,
    n_cofiring: int = 10,
    n_datapoints: int = 5,
    max_ablation_pairs: int = 256,
    skip_first: bool = SKIP_FIRST,
    batch_tokens: int = 4096,
    seed: int = 0,
    progress: bool = True,
) -> list[FeatureDashboard]:
    """The dashboards of ``features`` over ``pairs`` (see the module docstring).

    Args:
        saes: the SAEs the features belong to (one per hook).
        features: nodes (``Node``, ``"hook:index"``, ``(hook, index)``); error nodes are refused.
        baselines: per hook, the ``[d_sae]`` values features are removed to (default zeros), as
            the attribution used.
        estimated, exact: per node string, its mean estimated and exact margin effect (a run's
            ranking and ``features.csv``), shown in the header and beside the direct effect.
        per_pair_estimates: per node string, ``[n_pairs]`` estimated margin effects (array-like): the pairs
            where it is largest are ablated for the datapoints (default: where it fires most).
        datapoints: rows of a run's ``top_datapoints.csv`` (``node``, ``pair``, rewards before and
            after); for the nodes they cover no ablation is run.
        clean: the attribution's clean run of ``pairs`` (``attribution.clean_run``): features are
            read from it and only the blocks after the last SAE hook rerun (for the direct effect);
            the ablations start from it.
        ablation: an exact ablation of ``pairs`` (e.g. the fidelity card's): the features it
            removed take their datapoints and mean effect from it, without another ablation.
        pair_ids: the id shown for each pair (default its index; a run shows its index in the
            pairs file) and used by ``datapoints``.
        n_top, n_intervals, per_interval: examples in the top group, bands of the peak activation,
            and examples drawn from each band.
        before, after: tokens of each example window around its peak.
        n_bins, n_cofiring, n_datapoints: histogram bins, co-firing features and datapoints shown.
        max_ablation_pairs: for a feature without given datapoints, the most pairs it is ablated
            on exactly (those where its estimated effect, or activation, is largest). When that
            covers every pair it fires in and features are removed to 0, the mean exact effect over
            all pairs follows (removing a feature where it never fires changes nothing) and is
            shown when ``exact`` does not give it.
    """
    pairs = as_pairs(pairs)
    by_hook = resolve_saes(rm, saes)
    nodes = as_nodes(features, {hook: sae.cfg.d_sae for hook, sae in by_hook.items()})
    errors = [str(node) for node in nodes if node.is_error]
    if errors:
        raise ValueError(f"error nodes have no dashboard (they are not SAE features): {errors}")
    ids = list(range(len(pairs))) if pair_ids is None else [int(i) for i in pair_ids]
    if len(ids) != len(pairs):
        raise ValueError(f"pair_ids has {len(ids)} ids for {len(pairs)} pairs")
    baselines = {hook: (torch.zeros(sae.cfg.d_sae) if baselines is None else torch.as_tensor(baselines[hook]))
                 .to(sae.W_dec.device, sae.W_dec.dtype) for hook, sae in by_hook.items()}
    if clean is not None and (clean.n_pairs != len(pairs) or not set(by_hook) <= set(clean.saes)):
        raise ValueError(f"the clean run is of {clean.n_pairs} pairs with SAEs at {sorted(clean.saes)}; the dashboards "
                         f"need {len(pairs)} pairs with SAEs at {sorted(by_hook)}")
    with plain_model(rm, by_hook):
        reading = read_texts(rm, by_hook, pairs, nodes, skip_first=skip_first, batch_tokens=batch_tokens, clean=clean)
        chosen = {node: _examples(reading, node, n_top=n_top, n_intervals=n_intervals, per_interval=per_interval,
                                  before=before, after=after, seed=seed) for node in nodes}
        texts = sorted({(e[0], e[1]) for groups in chosen.values() for _, _, group in groups for e in group})
        contributions = _kept_contributions(clean, by_hook, texts, nodes, baselines, skip_first=skip_first)
        contributions |= _contributions(rm, by_hook, pairs, [t for t in texts if t not in contributions], nodes,
                                        baselines, skip_first=skip_first, batch_tokens=batch_tokens)
    found = find_datapoints(rm, by_hook, pairs, ids, nodes, reading, baselines, given=datapoints, exact=exact,
                            ablation=ablation, clean=clean, per_pair=per_pair_estimates, cap=max_ablation_pairs,
                            skip_first=skip_first, batch_tokens=batch_tokens)
    labels = characteristic_ngrams(rm.tokenizer, {node: _firings(reading, node) for node in nodes},
                                   [ids for _, _, ids, _ in reading.texts])
    dashboards = []
    for node in tqdm(nodes, desc="dashboards", disable=not progress or len(nodes) < 2):
        points, total = found[node]
        groups = [_group(rm, reading, node, contributions, title, bounds, picks, ids, before, after)
                  for title, bounds, picks in chosen[node]]
        dashboards.append(FeatureDashboard(
            node=str(node), hook_name=node.hook_name, feature=int(node.feature), fires_on=_fires_on(rm, reading, node),
            estimated_margin_effect=_get(estimated, node), exact_margin_effect=total,
            histogram=_histogram(reading, node, n_bins), groups=groups, datapoints=points[:n_datapoints],
            direct=_direct(reading, node, baselines[node.hook_name][node.feature], total, len(pairs)),
            cofiring=_cofiring(reading, node, n_cofiring), labels=label_rows(pairs, reading.peaks[node]),
            settings=dict(skip_first=skip_first, n_pairs=len(pairs), seed=seed), label=labels[node]))
    return dashboards


def _firings(reading: Reading, node: Node) -> list[tuple[float, int, int]]:
    """``(activation, text, position)`` of every firing of ``node``."""
    return [(float(acts[pos]), t, pos) for t, acts in enumerate(reading.acts[node])
            for pos in torch.nonzero(acts).flatten().tolist()]


def _get(values: Mapping[str, float] | None, node: Node) -> float | None:
    return None if values is None or str(node) not in values else float(values[str(node)])


def _histogram(reading: Reading, node: Node, n_bins: int) -> Histogram:
    values = torch.cat(reading.nonzero[node]).numpy() if reading.nonzero[node] else np.zeros(0)
    top = float(values.max()) if len(values) else 1.0
    counts, edges = np.histogram(values, bins=n_bins, range=(0.0, top))
    return Histogram([float(e) for e in edges], [int(c) for c in counts], reading.n_tokens, len(values))


def _examples(reading: Reading, node: Node, *, n_top: int, n_intervals: int, per_interval: int, before: int, after: int,
              seed: int) -> list[tuple[str, tuple[float, float, float], list[tuple[int, str, int]]]]:
    """Per group: title, (bin_min, bin_max, bin_contains) and the texts ``(pair, side, position)``:
    the top group by each text's strongest firing; a band's texts are drawn among those with a
    firing in it (not shown above), each centred on its strongest firing in the band."""
    peaks = [(float(a.max()) if len(a) else 0.0, int(a.argmax()) if len(a) else 0, t)
             for t, a in enumerate(reading.acts[node])]
    firing = sorted([p for p in peaks if p[0] > 0], key=lambda p: -p[0])
    top, seen = [], set()
    for value, pos, t in firing:
        pair, side, ids, _ = reading.texts[t]
        window = tuple(ids[max(0, pos - before) : pos + after + 1])
        if window not in seen and len(top) < n_top:
            seen.add(window)
            top.append((pair, side, pos))
    groups = [("Top activations", (-1.0, firing[0][0] if firing else 0.0, -1.0), top)]
    if not firing:
        return groups
    values = torch.cat(reading.nonzero[node]).numpy()
    edges = np.linspace(0.0, firing[0][0], n_intervals + 1)
    used = {(p, s) for p, s, _ in top}
    rng = np.random.default_rng(seed + (node.feature or 0))
    for k in range(n_intervals - 1, -1, -1):
        lo, hi = float(edges[k]), float(edges[k + 1])
        inside = []  # texts with a firing in the band, each centred on its strongest one there
        for t, acts in enumerate(reading.acts[node]):
            pair, side = reading.texts[t][:2]
            band = torch.where((acts > lo) & (acts <= hi), acts, torch.zeros_like(acts))
            if (pair, side) not in used and bool(band.any()):
                inside.append((pair, side, int(band.argmax())))
        picks = [inside[i] for i in sorted(rng.choice(len(inside), size=min(per_interval, len(inside)), replace=False))]
        used |= {(p, s) for p, s, _ in picks}
        share = float(((values > lo) & (values <= hi)).mean())
        groups.append((f"Interval {lo:.3g} - {hi:.3g}", (lo, hi, share), picks))
    return groups


def _group(rm: RewardModel, reading: Reading, node: Node, contributions: dict, title: str,
           bounds: tuple[float, float, float], picks: list[tuple[int, str, int]], ids: list[int], before: int,
           after: int) -> ExampleGroup:
    index = {(p, s): t for t, (p, s, _, _) in enumerate(reading.texts)}
    examples = []
    for pair, side, pos in picks:
        t = index[(pair, side)]
        _, _, token_ids, completion_start = reading.texts[t]
        lo, hi = max(0, pos - before), min(len(token_ids), pos + after + 1)
        acts = reading.acts[node][t][lo:hi].tolist()
        contrib = contributions[(pair, side)][node][lo:hi].tolist()
        tokens = [rm.tokenizer.decode([i]) for i in token_ids[lo:hi]]
        examples.append(Example(pair=ids[pair], side=side, tokens=tokens, acts=acts, contributions=contrib,
                                peak=pos - lo, completion_start=completion_start - lo))
    return ExampleGroup(title, *bounds, examples)


def _contributions(rm: RewardModel, saes: dict, pairs: list, texts: list[tuple[int, str]], nodes: list[Node],
                   baselines: dict[str, Tensor], *, skip_first: bool, batch_tokens: int) -> dict:
    """Per example text ``(pair, side)``, per node, ``[n_tokens]`` the feature's estimated
    contribution to the text's reward at each token (one forward and backward per batch)."""
    wanted = sorted({pair for pair, _ in texts})
    out: dict[tuple[int, str], dict[Node, Tensor]] = {}
    if not wanted:
        return out
    start = 0
    for batch in pair_batches(rm, [pairs[i] for i in wanted], batch_tokens=batch_tokens):
        for side_name, side in zip(SIDES, (batch.chosen, batch.rejected)):
            rows = [r for r in range(side.tokens.shape[0]) if (wanted[start + r], side_name) in texts]
            if not rows:
                continue  # only the sides examples show are run
            index = torch.tensor(rows, device=side.tokens.device)
            side = TokenBatch(side.tokens[index], side.attention_mask[index], side.completion_start[index])
            with rm.counting("dashboard"):
                run = rm.run_with_deltas(side.tokens, side.attention_mask, read=list(saes), grad_at=list(saes))
            keep = side.kept(skip_first=skip_first)
            with torch.no_grad():
                split_nodes = {hook: split(sae, run.acts[hook]) for hook, sae in saes.items()}
                grads = {hook: flat(sae, run.grads[hook]) for hook, sae in saes.items()}
                for i, row in enumerate(rows):
                    out[(wanted[start + row], side_name)] = _row_contributions(saes, split_nodes, grads, i, nodes,
                                                                               baselines, keep, side)
        start += batch.chosen.tokens.shape[0]
    return out


def _kept_contributions(clean: CleanRun | None, saes: dict, texts: list[tuple[int, str]], nodes: list[Node],
                        baselines: dict[str, Tensor], *, skip_first: bool) -> dict:
    """As :func:`_contributions`, for the texts whose clean run (with the attribution's gradients)
    was kept: no forward at all; zero outside the positions the attribution acted on."""
    out: dict = {}
    if clean is None:
        return out
    for b, start in enumerate(clean.starts):
        for side_index, side_name in enumerate(SIDES):
            run = clean.kept[b][side_index]
            if run is None or run.grads is None or not set(saes) <= set(run.grads):
                continue
            rows = [row for row in range(run.batch.tokens.shape[0]) if (start + row, side_name) in texts]
            if not rows:
                continue
            # The attribution's positions (its mask, first token included as it chose): the
            # contributions of a text add up to the side effect it estimated.
            keep = run.mask & run.batch.kept(skip_first=skip_first).to(run.mask.device)
            dense = {hook: replace(run.nodes[hook], acts=run.dense_acts(hook)) for hook in saes}
            for row in rows:
                out[(start + row, side_name)] = _row_contributions(saes, dense, run.grads, row, nodes, baselines, keep,
                                                                   run.batch)
    return out


def _row_contributions(saes: dict, split_nodes: dict, grads: dict, row: int, nodes: list[Node],
                       baselines: dict[str, Tensor], keep: Tensor, side: Any) -> dict[Node, Tensor]:
    """Per node, ``[n_tokens]`` the contributions in row ``row``, from each hook's nodes and
    (flat) gradient of the batch."""
    length = int(side.attention_mask[row].sum())
    found = {}
    for node in nodes:
        sae, hook, f = saes[node.hook_name], node.hook_name, node.feature
        at = split_nodes[hook]
        pick = slice(row, row + 1)
        effect, _ = node_effects(grads[hook][pick], at.acts[pick][..., f : f + 1], baselines[hook][f : f + 1],
                                 directions(sae)[f : f + 1], at.error[pick], at.scale[pick])
        contribution = -effect[0, :, 0] * keep[row].to(effect.device)
        found[node] = contribution[:length].float().cpu()
    return found


def _direct(reading: Reading, node: Node, baseline: Tensor, total: float | None, n_pairs: int) -> DirectEffect | None:
    units = reading.direct_unit.get(node)
    if not units:
        return None
    unit, last = torch.tensor(units), torch.tensor(reading.last_acts[node])
    effect = (float(baseline) - last) * unit  # removing the feature at the pooled token, per text
    sides = torch.zeros(n_pairs, 2)
    for t, (pair, side, _, _) in enumerate(reading.texts):
        sides[pair, SIDES.index(side)] = effect[t]
    chosen, rejected = float(sides[:, 0].mean()), float(sides[:, 1].mean())
    return DirectEffect(per_unit=float(unit.mean()), chosen=chosen, rejected=rejected, margin=chosen - rejected,
                        total_margin=total)


def _cofiring(reading: Reading, node: Node, n: int) -> list[CoFiring]:
    mine = int(reading.fires[node.hook_name][node.feature])
    rows = []
    for hook, both in reading.both[node].items():
        union = mine + reading.fires[hook] - both
        for index in torch.nonzero(both).flatten().tolist():
            if hook == node.hook_name and index == node.feature:
                continue
            rows.append(CoFiring(str(Node(hook, index)), int(both[index]), float(both[index] / union[index]),
                                 float(both[index]) / mine))
    return sorted(rows, key=lambda r: (-r.jaccard, r.node))[:n]


def _fires_on(rm: RewardModel, reading: Reading, node: Node, n: int = 3) -> str:
    """The token types it fires on most (by their strongest firing), as ``"'tok' 'tok'"``."""
    best: dict[int, float] = {}
    for (_, _, ids, _), acts in zip(reading.texts, reading.acts[node]):
        for i in torch.nonzero(acts).flatten().tolist():
            best[ids[i]] = max(best.get(ids[i], 0.0), float(acts[i]))
    top = sorted(best, key=lambda token: -best[token])[:n]
    return " ".join(repr(rm.tokenizer.decode([token])) for token in top) or "(never fires)"

"""Merging a ``pm-lens run``'s shard files: the ranking, the confirmed features, their top
datapoints and the fidelity card, read from disk so memory is bounded by a shard."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from pm_lens.saes.node import Node
from pm_lens.study.config import RunConfig


def merge_attributions(paths: list[Path], saes: dict[str, Any]) -> tuple[pd.DataFrame, torch.Tensor]:
    """The ranking of every active feature over all shards (``estimated_margin_effect``: the mean
    estimated change of the margin when the feature is removed; negative: the feature raises the
    margin; ``outlier_share``: the part of it from positions of massive activation, see
    :mod:`pm_lens.attribution.outliers`), and ``[n_pairs]`` the sum of all attributions of each
    pair (features and errors)."""
    sums = {hook: _Sums(sae.cfg.d_sae) for hook, sae in saes.items()}
    n_pairs, totals = 0, []
    for path in paths:
        shard = load_file(str(path))
        n = shard["chosen_rewards"].shape[0]
        n_pairs += n
        total = torch.zeros(n, dtype=torch.float64)
        for hook, acc in sums.items():
            chosen, rejected = (dense_effects(shard, f"{side}.{hook}", (n, acc.width)) for side in ("chosen", "rejected"))
            outlier = [dense_effects(shard, f"{side}.{hook}.outlier", (n, acc.width)) for side in ("chosen", "rejected")]
            acc.add(chosen - rejected, outlier[0] - outlier[1])
            total += (chosen - rejected).double().sum(1) + (shard[f"chosen.{hook}.error"] - shard[f"rejected.{hook}.error"]).double()
        totals.append(total)
    rows = []
    for hook, acc in sums.items():
        table = acc.table(n_pairs)
        table.insert(0, "hook_name", hook)
        rows.append(table)
    ranking = pd.concat(rows, ignore_index=True)
    ranking.insert(0, "node", [str(Node(h, int(f))) for h, f in zip(ranking.hook_name, ranking.feature)])
    ranking = ranking[ranking.n_pairs_active > 0]
    order = ranking.estimated_margin_effect.abs().sort_values(ascending=False, kind="stable").index
    return ranking.reindex(order).reset_index(drop=True), torch.cat(totals)


def dense_effects(shard: dict[str, torch.Tensor], name: str, shape: tuple[int, int]) -> torch.Tensor:
    """A shard's sparse effects (indices and values) as a dense ``shape`` tensor."""
    dense = torch.zeros(shape)
    indices = shard[f"{name}.indices"]
    dense.index_put_((indices[0], indices[1]), shard[f"{name}.values"], accumulate=True)
    return dense


class _Sums:
    """Running sums of one hook's per-pair margin effects (memory: a few ``[d_sae]`` vectors)."""

    def __init__(self, width: int):
        self.width = width
        self.total, self.absolute = torch.zeros(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64)
        self.outlier = torch.zeros(width, dtype=torch.float64)
        self.active, self.positive, self.negative = (torch.zeros(width, dtype=torch.long) for _ in range(3))

    def add(self, effects: torch.Tensor, outlier: torch.Tensor) -> None:
        self.total += effects.double().sum(0)
        self.outlier += outlier.double().sum(0)
        self.absolute += effects.double().abs().sum(0)
        self.active += (effects != 0).sum(0)
        self.positive += (effects > 0).sum(0)
        self.negative += (effects < 0).sum(0)

    def table(self, n_pairs: int) -> pd.DataFrame:
        mean = (self.total / n_pairs).float()
        agree = torch.where(mean > 0, self.positive, self.negative).double() / self.active.clamp(min=1)
        share = torch.where(self.total != 0, self.outlier / self.total.where(self.total != 0, torch.ones_like(self.total)),
                            torch.zeros_like(self.total))
        return pd.DataFrame({"feature": np.arange(self.width), "estimated_margin_effect": mean.numpy(),
                             "mean_abs_effect": (self.absolute / n_pairs).float().numpy(),
                             "sign_agreement": agree.float().numpy(), "n_pairs_active": self.active.numpy(),
                             "outlier_share": share.float().numpy()})


def confirmed_nodes(ranking: pd.DataFrame, top: int) -> list[Node]:
    """The ``top`` features that raise the margin most (most negative removal effect) and the
    ``top`` that lower it most, in that order."""
    raising = ranking[ranking.estimated_margin_effect < 0].head(top)
    lowering = ranking[ranking.estimated_margin_effect > 0].head(top)
    return [Node.parse(name) for name in [*raising.node, *lowering.node]]


def load_ablations(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The confirmation shards, each tensor concatenated over the pairs of all of them
    (``chosen``/``rejected`` ``[n_pairs, n_nodes]``, clean rewards, ``all_margin``,
    ``spliced_margin`` ``[n_pairs]``): small, read once."""
    shards = [load_file(str(path)) for path in paths]
    return {name: torch.cat([s[name] for s in shards]) for name in shards[0]}


def merge_ablations(ablations: dict[str, torch.Tensor], ranking: pd.DataFrame, nodes: list[Node], selection: pd.DataFrame,
                    *, shown: int, per_feature: int = 5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``features.csv`` (one row per confirmed feature: the first ``shown`` of ``nodes``) and
    ``top_datapoints.csv`` from the confirmation shards (:func:`load_ablations`)."""
    chosen, rejected = ablations["chosen"], ablations["rejected"]
    clean_chosen, clean_rejected = ablations["clean_chosen"], ablations["clean_rejected"]
    margin = chosen - rejected
    estimated = ranking.set_index("node")
    rows, points = [], []
    for column, node in enumerate(nodes[:shown]):
        est = estimated.loc[str(node)]
        rows.append(dict(
            rank=column + 1, node=str(node), hook_name=node.hook_name, feature=node.feature,
            role="raises the margin" if est.estimated_margin_effect < 0 else "lowers the margin",
            estimated_margin_effect=float(est.estimated_margin_effect),
            exact_margin_effect=float(margin[:, column].mean()), exact_chosen_effect=float(chosen[:, column].mean()),
            exact_rejected_effect=float(rejected[:, column].mean()), sign_agreement=float(est.sign_agreement),
            n_pairs_active=int(est.n_pairs_active), outlier_share=float(est.outlier_share)))
        for row in margin[:, column].abs().argsort(descending=True)[:per_feature].tolist():
            before = float(clean_chosen[row] - clean_rejected[row])
            after = before + float(margin[row, column])
            points.append(dict(
                node=str(node), pair=int(selection.pair.iloc[row]), margin_effect=float(margin[row, column]),
                chosen_before=float(clean_chosen[row]), chosen_after=float(clean_chosen[row] + chosen[row, column]),
                rejected_before=float(clean_rejected[row]),
                rejected_after=float(clean_rejected[row] + rejected[row, column]),
                preference_flips=bool((before > 0) != (after > 0))))
    features = pd.DataFrame(rows)
    features["feature"] = features["feature"].astype("Int64")
    return features, pd.DataFrame(points)


def fidelity_nodes(ranking: pd.DataFrame, top: int, n_random: int, seed: int) -> list[Node]:
    """The fidelity card's features: the ``top`` of the ranking by |estimated effect|, then
    ``n_random`` of the other active ones drawn with ``seed``."""
    rest = ranking.node.iloc[top:].tolist()
    drawn = np.random.default_rng(seed).choice(len(rest), size=min(n_random, len(rest)), replace=False) if rest else []
    return [Node.parse(name) for name in [*ranking.node.iloc[:top], *(rest[i] for i in sorted(drawn))]]


def run_fidelity(ablations: dict[str, torch.Tensor], ranking: pd.DataFrame, nodes: list[Node], sample: list[Node],
                 totals: torch.Tensor, config: RunConfig, dtype: str) -> Any:
    """The fidelity card of the run: estimated against exact mean margin effects of ``sample``,
    and the sum of all attributions against removing every node (completeness)."""
    from pm_lens.attribution.fidelity import card_from_effects, completeness_summary

    margin = (ablations["chosen"] - ablations["rejected"]).double().mean(0)
    estimated = ranking.set_index("node").estimated_margin_effect
    columns = [nodes.index(node) for node in sample]
    top = np.array([i < config["attribution.fidelity_top"] for i in range(len(sample))])
    everything = ablations["all_margin"].numpy()
    settings = {**config.values["attribution"], "target": "margin", "dtype": dtype}
    return card_from_effects(estimated.loc[[str(n) for n in sample]].to_numpy(dtype=np.float64),
                             margin[columns].numpy(), top, n_ranked=len(ranking), top_k=config["attribution.fidelity_top"],
                             k=min(10, config["attribution.fidelity_top"]), settings=settings,
                             completeness=completeness_summary(totals.numpy(), everything))


def worries(card: Any, ablations: dict[str, torch.Tensor], *, features: pd.DataFrame | None = None,
            kept_below: float = 0.5, spearman_below: float = 0.5) -> list[str]:
    """What in a run should worry the reader, in plain words with what to do: SAEs that carry
    little of the margin when spliced in without their error terms, a completeness check whose
    sum of attributions and exact removal disagree in sign or by more than half, a ranking whose
    top features' order the exact effects do not confirm, and confirmed ``features`` whose
    estimated effect comes mostly from positions of massive activation."""
    clean = (ablations["clean_chosen"] - ablations["clean_rejected"]).double().mean()
    spliced = clean + ablations["spliced_margin"].double().mean()
    found = []
    if float(clean) != 0 and float(spliced / clean) < kept_below:
        found.append(f"with the SAEs spliced in (error terms removed) the mean margin is {float(spliced):.3g} of the clean "
                     f"{float(clean):.3g} ({float(spliced / clean):.0%}): the SAEs miss much of what the PM uses, so features "
                     "explain at most that part; use better or wider SAEs, or SAEs trained on this PM's activations")
    done = card.completeness
    if done is not None:
        attributed, exact = done["attributed_mean"], done["exact_mean"]
        if attributed * exact < 0 or abs(attributed - exact) > 0.5 * abs(exact):
            found.append(f"completeness: the sum of all attributions ({attributed:.3g}) and the exact removal of every node "
                         f"({exact:.3g}) disagree{' in sign' if attributed * exact < 0 else ''}: the effects are far from "
                         "linear; trust the exact (confirmed) effects, or use method = 'ig' with more steps")
    if card.n_top >= 3 and np.isfinite(card.spearman_top) and card.spearman_top < spearman_below:
        found.append(f"the exact effects reorder the estimated top features (Spearman {card.spearman_top:.2f}): rank by "
                     "the exact effects in features.csv, or use method = 'ig'")
    if features is not None and "outlier_share" in features:
        from pm_lens.attribution.outliers import OUTLIER_RATIO, OUTLIER_SHARE

        flagged = features[features.outlier_share.abs() >= OUTLIER_SHARE]
        if len(flagged):
            named = ", ".join(f"{row.node} ({row.outlier_share:.0%})" for row in flagged.head(5).itertuples())
            found.append(f"{len(flagged)} confirmed feature(s) take most of their estimated effect from positions whose "
                         f"activation norm is over {OUTLIER_RATIO:.0f}x the median (attention sinks, start tokens): "
                         f"{named}; their effect is an artifact of those positions: leave them out with "
                         "attribution.positions = 'completion' or 'diverge'")
    return found


def contexts_record(found: dict[Node, Any], first_row: int) -> list[dict[str, Any]]:
    """A shard's :func:`pm_lens.saes.contexts.top_contexts` as JSON-ready records (pairs numbered
    by their row in the selection: ``first_row`` + the index in the shard)."""
    return [{"node": str(node), "firing_rate": fc.firing_rate, "last_token_mean": fc.last_token_mean,
             "top_tokens": [[token, value] for token, value in fc.top_tokens],
             "contexts": [{**asdict(c), "pair": first_row + c.pair} for c in fc.contexts]}
            for node, fc in found.items()]


def merge_contexts(paths: list[Path], confirmed: list[Node], selection: pd.DataFrame, *,
                   n_contexts: int) -> dict[Node, Any]:
    """Each confirmed feature's strongest ``n_contexts`` firings over all shards (each shard kept
    its own strongest, at most one per text), its top tokens by their strongest firing, and its
    firing rate and mean last-token activation averaged over the shards weighted by their pairs.
    Pairs are renumbered to their line in the pairs file (``selection.pair``)."""
    from safetensors import safe_open

    from pm_lens.saes.contexts import Context, FeatureContexts

    gathered: dict[str, dict[str, Any]] = {str(n): {"contexts": [], "tokens": {}, "rate": 0.0, "last": 0.0, "pairs": 0}
                                           for n in confirmed if not n.is_error}
    for path in paths:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        n_pairs = int(json.loads(metadata.get("n_pairs", "0")))
        for record in json.loads(metadata.get("contexts", "[]")):
            into = gathered.get(record["node"])
            if into is None:
                continue
            into["contexts"] += record["contexts"]
            for token, value in record["top_tokens"]:
                into["tokens"][token] = max(into["tokens"].get(token, 0.0), value)
            into["rate"] += record["firing_rate"] * n_pairs
            into["last"] += record["last_token_mean"] * n_pairs
            into["pairs"] += n_pairs
    found = {}
    for name, into in gathered.items():
        best, texts, windows = [], set(), set()
        for c in sorted(into["contexts"], key=lambda c: -c["acts"][c["peak"]]):
            # As top_contexts does over one set of texts: one context per text, no window twice
            # (pairs that share a prompt would otherwise repeat it from shard to shard).
            if len(best) == n_contexts or (c["pair"], c["side"]) in texts or tuple(c["tokens"]) in windows:
                continue
            texts.add((c["pair"], c["side"]))
            windows.add(tuple(c["tokens"]))
            best.append(c)
        contexts = [Context(**{**c, "pair": int(selection.pair.iloc[c["pair"]])}) for c in best]
        tokens = sorted(into["tokens"].items(), key=lambda item: -item[1])[:5]
        weight = max(into["pairs"], 1)
        node = Node.parse(name)
        found[node] = FeatureContexts(node=node, contexts=contexts, top_tokens=tokens, firing_rate=into["rate"] / weight,
                                      completion_max=torch.zeros(0, 2), last_token_mean=into["last"] / weight)
    return found


def contexts_table(found: dict[Node, Any]) -> pd.DataFrame:
    """``top_contexts.csv``: one row per context: the feature, its rank among them, the pair (line
    in the pairs file), side, peak activation, the peak token, and the window with the peak token
    in [[ ]]."""
    rows = []
    for node, fc in found.items():
        for rank, c in enumerate(fc.contexts, start=1):
            text = "".join(f"[[{t}]]" if i == c.peak else t for i, t in enumerate(c.tokens))
            rows.append(dict(node=str(node), rank=rank, pair=c.pair, side=c.side, activation=c.max_act,
                             token=c.tokens[c.peak], context=text))
    return pd.DataFrame(rows, columns=["node", "rank", "pair", "side", "activation", "token", "context"])

"""How far an attribution's ranking can be trusted: a fidelity card from exact ablations.

Attribution patching is a first-order estimate; ablation is the truth it estimates. A card
compares the two on the features that matter and on a random sample of the rest, the way AtP*
(Kramár et al. 2024, "AtP*: An efficient and scalable method for localizing LLM behaviour to
components") checks for false negatives:

1. the top ``top_k`` features by estimated |effect| and ``n_random`` other active features (seeded)
   are ablated one by one, exactly;
2. on all of them, and on the top set alone: Pearson and Spearman correlation of the estimated and
   exact mean effects, sign agreement, median relative error;
3. recall of the true top-``k`` among the estimated top-``k`` (within the top set);
4. missed effects: how many random features outside the top set have an exact |effect| at least
   the ``k``-th largest in the top set, and that rate extrapolated to every active feature outside it;
5. completeness: the sum of all feature and error attributions against the exact change when every
   node of every SAE is removed at once, per pair.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from pm_lens.attribution.ablate import ALL, Ablation, ablate
from pm_lens.attribution.result import Attribution
from pm_lens.io import write_atomic
from pm_lens.model import RewardModel
from pm_lens.saes.node import Node


@dataclass(frozen=True)
class FidelityCard:
    """Agreement between an attribution and exact ablation (see the module docstring)."""

    settings: dict[str, Any]
    n_top: int
    n_random: int
    k: int
    pearson: float
    spearman: float
    pearson_top: float
    spearman_top: float
    sign_agreement: float
    topk_recall: float
    median_relative_error: float
    missed_threshold: float
    missed_in_sample: int
    missed_estimated: float
    n_outside_top: int
    completeness: dict[str, float] | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the card as JSON (atomically)."""
        write_atomic(path, json.dumps(self.as_dict(), indent=2, default=float))

    def __str__(self) -> str:
        s = self.settings
        lines = [
            f"fidelity of {s['method']}" + (f" ({s['ig_steps']} steps)" if s.get("ig_steps") else "")
            + f", target {s['target']}, baseline {s['baseline']}, positions {s['positions']}",
            f"  features compared: {self.n_top} top + {self.n_random} random",
            f"  Spearman {self.spearman:.3f} (top {self.spearman_top:.3f}), Pearson {self.pearson:.3f} (top {self.pearson_top:.3f})",
            f"  sign agreement {self.sign_agreement:.3f}, top-{self.k} recall {self.topk_recall:.3f}, "
            f"median relative error {self.median_relative_error:.3f}",
            f"  missed: {self.missed_in_sample}/{self.n_random} random features with |effect| >= {self.missed_threshold:.4g}"
            f" (~{self.missed_estimated:.1f} of {self.n_outside_top} outside the top set)",
        ]
        if self.completeness:
            c = self.completeness
            lines.append(f"  completeness: sum of attributions {c['attributed_mean']:.4g} vs exact {c['exact_mean']:.4g}"
                         f" (mean |diff| {c['mean_abs_diff']:.4g})")
        return "\n".join(lines)


def fidelity(
    attribution: Attribution,
    ablation: Ablation,
    *,
    top_k: int = 50,
    k: int = 10,
    completeness: Ablation | None = None,
) -> FidelityCard:
    """Compare ``attribution``'s estimates with ``ablation``'s exact effects of the same target.

    The ablated features among the attribution's ``top_k`` form the top set; the others are
    taken as the random sample. ``completeness``, if given, is an ``ablate(..., features="all")``
    run with the same settings.
    """
    check_counts(top_k=top_k, k=k)
    ranking = attribution.ranking()
    ranking = ranking[ranking.kind == "feature"].reset_index(drop=True)
    rank = {node: i for i, node in enumerate(ranking.node)}
    if ablation.joint:
        raise ValueError("the ablation has no features to compare: it is a joint ablation")
    nodes = [node for node in ablation.nodes if node.hook_name in attribution.effects and not node.is_error]
    if not nodes:
        raise ValueError("the ablation has no features to compare (only error nodes)")
    missing = [str(node) for node in nodes if str(node) not in rank]
    if missing:
        raise ValueError(f"ablated features {missing[:5]} are not active in the attribution")
    target = attribution.settings.target
    exact_all = ablation.effects(target).mean(0).numpy()
    estimated = np.array([attribution.mean_effect(node) for node in nodes])
    exact = np.array([exact_all[ablation.column(node)] for node in nodes])
    top = np.array([rank[str(node)] < top_k for node in nodes])
    completeness_dict = None
    if completeness is not None:
        completeness_dict = completeness_summary(attribution.total.numpy(), completeness.effects(target)[:, 0].numpy())
    return card_from_effects(estimated, exact, top, n_ranked=len(rank), top_k=top_k, k=k,
                             settings=attribution.settings.as_dict(), completeness=completeness_dict)


def card_from_effects(estimated: np.ndarray, exact: np.ndarray, top: np.ndarray, *, n_ranked: int, top_k: int, k: int,
                      settings: dict[str, Any], completeness: dict[str, float] | None = None) -> FidelityCard:
    """The card from per-node mean effects (``[n_nodes]`` estimated and exact), which of them are
    in the top ``top_k`` of a ranking of ``n_ranked`` features (the rest are the random sample)."""
    k = max(1, min(k, int(top.sum())))
    true_top = set(np.argsort(-np.abs(np.where(top, exact, 0)))[:k])
    est_top = set(np.argsort(-np.abs(np.where(top, estimated, 0)))[:k])
    threshold = float(np.sort(np.abs(exact[top]))[::-1][k - 1]) if top.any() else float("inf")
    missed = int((np.abs(exact[~top]) >= threshold).sum())
    n_outside = n_ranked - min(top_k, n_ranked)
    return FidelityCard(
        settings=settings,
        n_top=int(top.sum()),
        n_random=int((~top).sum()),
        k=k,
        pearson=_corr(stats.pearsonr, estimated, exact),
        spearman=_corr(stats.spearmanr, estimated, exact),
        pearson_top=_corr(stats.pearsonr, estimated[top], exact[top]),
        spearman_top=_corr(stats.spearmanr, estimated[top], exact[top]),
        sign_agreement=float((np.sign(estimated) == np.sign(exact)).mean()),
        topk_recall=len(true_top & est_top) / k,
        median_relative_error=float(np.median(np.abs(estimated - exact) / np.maximum(np.abs(exact), 1e-12))),
        missed_threshold=threshold,
        missed_in_sample=missed,
        missed_estimated=missed / max(1, int((~top).sum())) * n_outside,
        n_outside_top=n_outside,
        completeness=completeness,
    )


def check_fidelity(
    rm: RewardModel,
    attribution: Attribution,
    *,
    saes: Any = None,
    top_k: int = 50,
    n_random: int = 50,
    k: int = 10,
    seed: int = 0,
    batch_tokens: int = 4096,
    progress: bool = True,
) -> FidelityCard:
    """Ablate ``attribution``'s top ``top_k`` features and ``n_random`` other active ones (drawn
    with ``seed``), and every node at once for completeness; return the :class:`FidelityCard`."""
    check_counts(top_k=top_k, n_random=n_random, k=k)
    common = dict(saes=saes or list(attribution.saes.values()), batch_tokens=batch_tokens, progress=progress)
    exact = ablate_like(rm, attribution, fidelity_sample(attribution, top_k=top_k, n_random=n_random, seed=seed), **common)
    everything = ablate_like(rm, attribution, ALL, **common)
    return fidelity(attribution, exact, top_k=top_k, k=k, completeness=everything)


def fidelity_sample(attribution: Attribution, *, top_k: int = 50, n_random: int = 50, seed: int = 0) -> list[Node]:
    """The features a fidelity check ablates: the top ``top_k`` by estimated |effect|, then
    ``n_random`` of the other active features drawn with ``seed``."""
    check_counts(top_k=top_k, n_random=n_random)
    ranking = attribution.ranking()
    features = [Node.parse(name) for name in ranking[ranking.kind == "feature"].node]
    top, rest = features[:top_k], features[top_k:]
    generator = torch.Generator().manual_seed(seed)
    return top + [rest[i] for i in torch.randperm(len(rest), generator=generator)[:n_random].tolist()]


def check_counts(**counts: Any) -> None:
    """Raise a ValueError for a count that is not an integer in its range: ``n_random`` >= 0,
    every other (``top_k``, ``k``) >= 1."""
    for name, value in counts.items():
        low = 0 if name == "n_random" else 1
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def ablate_like(rm: RewardModel, attribution: Attribution, features: Any, **kwargs: Any) -> Ablation:
    """Exact ablation of ``features`` on the attribution's pairs with its settings (baselines,
    positions, first token), reusing its clean run, so its effects are what the attribution estimated."""
    s = attribution.settings
    kwargs.setdefault("saes", list(attribution.saes.values()))
    kwargs.setdefault("clean", attribution.clean_run)
    return ablate(rm, attribution.pairs, features=features, baseline=s.baseline, positions=s.positions,
                  skip_first=s.skip_first, baselines=attribution.baselines, **kwargs)


def _corr(fn: Any, a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(fn(a, b).statistic)


def completeness_summary(attributed: np.ndarray, exact: np.ndarray) -> dict[str, float]:
    """Per-pair sums of all attributions (``[n_pairs]``) against the exact removal of every node."""
    return {
        "attributed_mean": float(attributed.mean()),
        "exact_mean": float(exact.mean()),
        "mean_abs_diff": float(np.abs(attributed - exact).mean()),
        "pearson_over_pairs": _corr(stats.pearsonr, attributed, exact),
    }

"""What :func:`pm_lens.attribute` returns: estimated effects of every node, kept per side.

An :class:`Attribution` holds, for each side of each pair, the estimated change of that side's
reward when each feature or error node is removed (:class:`SideEffects`), combined into the
chosen target (:meth:`Attribution.retarget` recombines without running the model); its settings
(:class:`AttributionSettings`); the positions with massive activations; and, when kept, the
clean run (:class:`pm_lens.attribution.clean.CleanRun`) later stages reuse. Rankings name nodes
with :class:`pm_lens.saes.node.Node`'s one spelling.

Sign convention: an *effect* is the change of the target when the node is *removed*. A negative
effect means the node raises the target (removing it lowers the target).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor

from pm_lens.attribution.clean import CleanRun
from pm_lens.attribution.formulas import TARGETS, target_of
from pm_lens.data import PreferencePair
from pm_lens.saes.node import Node
from pm_lens.tables import feature_table

OUTLIER_COLUMNS = ["hook_name", "pair", "side", "pos", "norm_ratio"]
DIRECTIONS = ("raising", "lowering", "both")


@dataclass(frozen=True)
class AttributionSettings:
    """How an :class:`Attribution` was computed."""

    method: str
    target: str
    baseline: str
    positions: str
    ig_steps: int | None
    skip_first: bool
    hook_names: tuple[str, ...]
    text_format: str

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hook_names": list(self.hook_names)}


@dataclass(frozen=True)
class SideEffects:
    """Estimated effects on one side's reward, per hook.

    Attributes:
        features: ``[n_pairs, d_sae]`` per hook (sparse for the zero baseline).
        errors: ``[n_pairs]`` per hook: removing the error node.
        outlier_features: ``[n_pairs, d_sae]`` per hook (sparse): the part of ``features`` from
            massive-activation positions.
        rewards: ``[n_pairs]`` the clean reward of this side.
    """

    features: dict[str, Tensor]
    errors: dict[str, Tensor]
    outlier_features: dict[str, Tensor]
    rewards: Float[Tensor, " n_pairs"]

    def rows(self, index: Tensor) -> SideEffects:
        return SideEffects({n: _rows(t, index) for n, t in self.features.items()},
                           {n: t[index] for n, t in self.errors.items()},
                           {n: _rows(t, index) for n, t in self.outlier_features.items()}, self.rewards[index])


@dataclass(frozen=True)
class Attribution:
    """Estimated effects of removing each SAE feature (and each error node) on the target.

    Attributes:
        effects: per hook, ``[n_pairs, d_sae]`` estimated change of the target when the feature
            is removed at the selected positions (sparse for the zero baseline).
        error_effects: per hook, ``[n_pairs]`` estimated effect of removing the error node.
        active: per hook, ``[n_pairs, d_sae]`` sparse bool: the feature fires at a selected
            position of the pair (either side).
        total: ``[n_pairs]`` sum of all feature and error effects of every hook.
        baselines: per hook, ``[d_sae]`` the value each feature is removed to.
        settings: see :class:`AttributionSettings`.
        pairs, saes: what was attributed (so the result can be checked by ablation).
        chosen, rejected: the effects on each side's reward (:class:`SideEffects`).
        outlier_effects: per hook, ``[n_pairs, d_sae]`` the part of ``effects`` from positions
            whose activation norm is over ``OUTLIER_RATIO`` times the median.
        outliers: those positions: ``hook_name``, ``pair``, ``side``, ``pos``, ``norm_ratio``.
        clean_run: the clean pass, for later stages to reuse (None when not kept).
    """

    effects: dict[str, Tensor]
    error_effects: dict[str, Tensor]
    active: dict[str, Tensor]
    total: Float[Tensor, " n_pairs"]
    baselines: dict[str, Tensor]
    settings: AttributionSettings
    pairs: Sequence[PreferencePair] = field(repr=False)
    saes: dict[str, SAE] = field(repr=False)
    chosen: SideEffects = field(repr=False)
    rejected: SideEffects = field(repr=False)
    outlier_effects: dict[str, Tensor] = field(repr=False, default_factory=dict)
    outliers: pd.DataFrame = field(repr=False, default_factory=lambda: pd.DataFrame(columns=OUTLIER_COLUMNS))
    clean_run: CleanRun | None = field(repr=False, default=None)

    @property
    def n_pairs(self) -> int:
        return len(self.total)

    @property
    def clean_margin(self) -> Tensor:
        """``[n_pairs]`` r(chosen) - r(rejected) with nothing removed."""
        return self.chosen.rewards - self.rejected.rewards

    def retarget(self, target: str) -> Attribution:
        """The same attribution for another target ("chosen", "rejected", "margin" or "sum"),
        combined from the per-side effects (no model run)."""
        if target not in TARGETS:
            raise ValueError(f"target must be one of {tuple(TARGETS)}, got {target!r}")
        names = list(self.chosen.features)

        def combine(part: str) -> dict[str, Tensor]:
            return {n: target_of(getattr(self.chosen, part)[n], getattr(self.rejected, part)[n], target) for n in names}

        effects, errors = combine("features"), combine("errors")
        total = sum(_dense(effects[n]).sum(-1) + errors[n] for n in names)
        return replace(self, effects=effects, error_effects=errors, total=total, outlier_effects=combine("outlier_features"),
                       settings=replace(self.settings, target=target))

    def subset(self, indices: Sequence[int]) -> Attribution:
        """The attribution of the pairs at ``indices`` only (e.g. one group of pairs); its clean
        run is the matching part of this one's when the indices are increasing."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        if len(index) == 0 or int(index.min()) < 0 or int(index.max()) >= self.n_pairs:
            raise ValueError(f"indices must be a non-empty list in 0..{self.n_pairs - 1}, got {list(indices)[:10]}")
        increasing = index.tolist() == sorted(set(index.tolist()))
        return replace(
            self, effects={n: _rows(t, index) for n, t in self.effects.items()},
            error_effects={n: t[index] for n, t in self.error_effects.items()},
            active={n: _rows(t, index) for n, t in self.active.items()}, total=self.total[index],
            pairs=[self.pairs[i] for i in index.tolist()], chosen=self.chosen.rows(index), rejected=self.rejected.rows(index),
            outlier_effects={n: _rows(t, index) for n, t in self.outlier_effects.items()},
            outliers=_reindex_outliers(self.outliers, index),
            clean_run=self.clean_run.subset(index.tolist()) if self.clean_run is not None and increasing else None,
        )

    def dense_effects(self, hook_name: str) -> Tensor:
        return _dense(self.effects[hook_name])

    def mean_effect(self, node: Node) -> float:
        """The node's effect averaged over the pairs."""
        if node.is_error:
            return float(self.error_effects[node.hook_name].mean())
        return float(self.dense_effects(node.hook_name)[:, node.feature].mean())

    def ranking(self) -> pd.DataFrame:
        """One row per feature that fires on some pair, and one per error node, sorted by
        ``|effect|``: ``node`` (its name), ``hook_name``, ``feature`` (empty for an error node),
        ``kind`` ("feature" or "error"), ``effect`` (mean over pairs; negative: the node raises the
        target), ``mean_abs_effect``, ``sign_agreement`` (fraction of the pairs it fires on whose
        effect has the sign of ``effect``), ``n_pairs_active``, ``outlier_share`` (the share of
        ``effect`` from massive-activation positions; 0 for error nodes)."""
        frames = [frame for name in self.effects for frame in self._ranking_rows(name)]
        table = pd.concat(frames, ignore_index=True)
        table["feature"] = table["feature"].astype("Int64")
        order = np.argsort(-table["effect"].abs().to_numpy(), kind="stable")
        return feature_table(table.iloc[order].reset_index(drop=True), self._caption())

    def _caption(self) -> str:
        return (f"effect: the mean change of the {self.settings.target} when the node is removed (estimated by "
                f"{self.settings.method}); negative = the node raises the {self.settings.target}")

    def _ranking_rows(self, name: str) -> list[pd.DataFrame]:
        effects = self.dense_effects(name)
        active = self.active[name].to_dense()
        n_active = active.sum(0)
        keep = (n_active > 0).nonzero().flatten()
        mean = effects.mean(0)
        agree = ((torch.sign(effects) == torch.sign(mean)) & active).sum(0) / n_active.clamp(min=1)
        outlier = _dense(self.outlier_effects[name]).mean(0) if name in self.outlier_effects else torch.zeros_like(mean)
        share = torch.where(mean != 0, outlier / mean.where(mean != 0, torch.ones_like(mean)), torch.zeros_like(mean))
        features = pd.DataFrame({
            "node": [str(Node(name, int(i))) for i in keep], "hook_name": name, "feature": keep.numpy(), "kind": "feature",
            "effect": mean[keep].numpy(), "mean_abs_effect": effects.abs().mean(0)[keep].numpy(),
            "sign_agreement": agree[keep].numpy(), "n_pairs_active": n_active[keep].numpy(), "outlier_share": share[keep].numpy(),
        })
        error = self.error_effects[name]
        error_row = pd.DataFrame([{
            "node": str(Node.error(name)), "hook_name": name, "feature": None, "kind": "error",
            "effect": float(error.mean()), "mean_abs_effect": float(error.abs().mean()),
            "sign_agreement": float((torch.sign(error) == torch.sign(error.mean())).float().mean()),
            "n_pairs_active": self.n_pairs, "outlier_share": 0.0,
        }])
        return [features, error_row]

    def top_features(self, n: int = 10, *, direction: str = "both") -> pd.DataFrame:
        """The ``n`` features (not error nodes) whose removal moves the target most:
        ``direction="raising"``: features that raise the target (removing them lowers it, so
        their removal effect is negative); ``"lowering"``: the opposite; ``"both"``: by |effect|."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'raising', 'lowering' or 'both', got {direction!r}")
        table = self.ranking()
        table = table[table.kind == "feature"]
        if direction == "raising":
            table = table[table.effect < 0].sort_values("effect", kind="stable")
        elif direction == "lowering":
            table = table[table.effect > 0].sort_values("effect", ascending=False, kind="stable")
        return feature_table(table.head(n).reset_index(drop=True), self._caption())

    def top_nodes(self, n: int = 10, *, direction: str = "both") -> list[Node]:
        """The nodes of :meth:`top_features`, best first."""
        return [Node.parse(name) for name in self.top_features(n, direction=direction).node]


def _dense(effects: Tensor) -> Tensor:
    return effects.to_dense() if effects.is_sparse else effects


def _rows(tensor: Tensor, index: Tensor) -> Tensor:
    picked = _dense(tensor)[index]
    return picked.to_sparse() if tensor.is_sparse else picked


def _reindex_outliers(outliers: pd.DataFrame, index: Tensor) -> pd.DataFrame:
    """The outlier records of the pairs at ``index``, renumbered to their place in it."""
    new_place: dict[int, list[int]] = {}
    for place, old in enumerate(index.tolist()):
        new_place.setdefault(old, []).append(place)
    rows = [{**row, "pair": place} for row in outliers.to_dict("records") for place in new_place.get(row["pair"], [])]
    return pd.DataFrame(rows, columns=OUTLIER_COLUMNS)

"""Attribution patching: the effect of removing every SAE feature on the reward, from gradients.

For a batch of preference pairs, each side (chosen, rejected) is run on its own, since their
lengths differ, and the effects are combined per pair (margin = chosen - rejected).

Algorithm (per batch, per side):
1. Clean run: one forward with a zero "probe" added at every SAE hook; the activation ``x`` at
   each hook is read, and (AtP) the gradient of the summed reward with respect to each probe is
   taken in the same pass: d(reward)/d(hook output).
2. Nodes: each SAE encodes ``x`` into features ``acts``; the error node is ``x - decode(acts)``.
3. (IG only) ``ig_steps`` more passes with every hook moved a fraction ``1 - alpha`` of the way to
   its fully removed value (all attached SAEs interpolated together; alpha at the midpoints of
   ``ig_steps`` equal intervals); the gradients are averaged.
4. Effects: ``grad @ directions[i] * scale * (baseline[i] - acts[i])`` per feature (the SAE's own
   decoder map, :mod:`pm_lens.saes.split`) and ``grad . (-error)`` for the error node
   (:func:`pm_lens.attribution.formulas.node_effects`), summed over the selected positions, so a
   feature's effect is that of removing it at every selected position.
5. Outliers: the part of each effect from positions with massive activations is kept apart
   (:mod:`pm_lens.attribution.outliers`); top features that owe most of their effect to one are
   named in a warning.

Sums over all nodes of all hooks are kept per pair for the completeness check of
:mod:`pm_lens.attribution.fidelity`. The model's parameters get no gradient.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from sae_lens import SAE
from torch import Tensor
from tqdm.auto import tqdm

from pm_lens.attribution.batching import pair_batches
from pm_lens.attribution.formulas import TARGETS, node_effects, removal_delta, target_of
from pm_lens.attribution.nodes import plain_model, read_nodes, resolve_saes, run_with_deltas
from pm_lens.attribution.outliers import outlier_positions, outlier_rows, warn_outlier_features
from pm_lens.attribution.positions import check_positions, pair_masks
from pm_lens.data import SKIP_FIRST, PairsLike, PreferencePair, TokenBatch, as_pairs, describe_text_format
from pm_lens.model import RewardModel
from pm_lens.saes.split import directions, flat

METHODS = ("atp", "ig")
BASELINES = ("zero", "mean")
OUTLIER_COLUMNS = ["hook_name", "pair", "side", "pos", "norm_ratio"]


@dataclass(frozen=True)
class Attribution:
    """Estimated effects of removing each SAE feature (and each error node) on the target.

    Attributes:
        effects: per hook, ``[n_pairs, d_sae]`` estimated change of the target when the feature
            is removed at the selected positions (a sparse COO tensor for the zero baseline, where
            a feature that does not fire has exactly zero effect; dense for the mean baseline).
        error_effects: per hook, ``[n_pairs]`` estimated effect of removing the error node.
        active: per hook, ``[n_pairs, d_sae]`` sparse bool: the feature fires at a selected
            position of the pair (either side).
        total: ``[n_pairs]`` sum of all feature and error effects of every hook.
        baselines: per hook, ``[d_sae]`` the value each feature is removed to.
        settings: method, target, baseline, positions, ig_steps, skip_first, hook names.
        pairs, saes: what was attributed (so the result can be checked by ablation).
        sides: ``{"chosen": ..., "rejected": ...}``, each ``{"features": {hook: [n_pairs, d_sae]},
            "errors": {hook: [n_pairs]}}``: the effects on each side's reward, from which
            :meth:`retarget` recombines any target without running the model again.
        clean: ``{"chosen": [n_pairs], "rejected": [n_pairs]}`` the rewards with nothing removed
            (read from the attribution's own clean run).
        outlier_effects: per hook, ``[n_pairs, d_sae]`` the part of ``effects`` from positions
            whose activation norm is over ``OUTLIER_RATIO`` times the median (see
            :mod:`pm_lens.attribution.outliers`).
        outliers: those positions: ``hook_name``, ``pair``, ``side``, ``pos``, ``norm_ratio``.
    """

    effects: dict[str, Tensor]
    error_effects: dict[str, Tensor]
    active: dict[str, Tensor]
    total: Tensor
    baselines: dict[str, Tensor]
    settings: dict[str, Any]
    pairs: Sequence[PreferencePair] = field(repr=False)
    saes: dict[str, SAE] = field(repr=False, default_factory=dict)
    sides: dict[str, dict[str, dict[str, Tensor]]] = field(repr=False, default_factory=dict)
    clean: dict[str, Tensor] = field(repr=False, default_factory=dict)
    outlier_effects: dict[str, Tensor] = field(repr=False, default_factory=dict)
    outliers: pd.DataFrame = field(repr=False, default_factory=lambda: pd.DataFrame(columns=OUTLIER_COLUMNS))

    @property
    def clean_margin(self) -> Tensor:
        """``[n_pairs]`` r(chosen) - r(rejected) with nothing removed."""
        return self.clean["chosen"] - self.clean["rejected"]

    def retarget(self, target: str) -> Attribution:
        """The same attribution for another target ("chosen", "rejected", "margin" or "sum"),
        combined from the per-side effects (no model run)."""
        if target not in TARGETS:
            raise ValueError(f"target must be one of {tuple(TARGETS)}, got {target!r}")
        chosen, rejected = self.sides["chosen"], self.sides["rejected"]
        effects = {n: target_of(chosen["features"][n], rejected["features"][n], target) for n in self.effects}
        errors = {n: target_of(chosen["errors"][n], rejected["errors"][n], target) for n in self.effects}
        outlier = {n: target_of(chosen["outlier_features"][n], rejected["outlier_features"][n], target) for n in self.effects}
        total = sum(_dense(effects[n]).sum(-1) + errors[n] for n in self.effects)
        return replace(self, effects=effects, error_effects=errors, total=total, outlier_effects=outlier,
                       settings={**self.settings, "target": target})

    def subset(self, indices: Sequence[int]) -> Attribution:
        """The attribution of the pairs at ``indices`` only (e.g. one group of pairs)."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        if len(index) == 0 or int(index.min()) < -self.n_pairs or int(index.max()) >= self.n_pairs:
            raise ValueError(f"indices must be a non-empty list in 0..{self.n_pairs - 1}, got {list(indices)[:10]}")

        def rows(tensor: Tensor) -> Tensor:
            picked = _dense(tensor)[index]
            return picked.to_sparse() if tensor.is_sparse else picked

        sides = {side: {key: {n: rows(t) for n, t in values.items()} for key, values in parts.items()}
                 for side, parts in self.sides.items()}
        return replace(
            self, effects={n: rows(t) for n, t in self.effects.items()},
            error_effects={n: t[index] for n, t in self.error_effects.items()},
            active={n: rows(t) for n, t in self.active.items()}, total=self.total[index],
            pairs=[self.pairs[i] for i in index.tolist()], sides=sides,
            clean={side: rewards[index] for side, rewards in self.clean.items()},
            outlier_effects={n: rows(t) for n, t in self.outlier_effects.items()},
            outliers=_reindex_outliers(self.outliers, index % self.n_pairs),
        )

    @property
    def n_pairs(self) -> int:
        return len(self.total)

    def dense_effects(self, hook_name: str) -> Tensor:
        return _dense(self.effects[hook_name])

    def ranking(self) -> pd.DataFrame:
        """One row per feature that fires on some pair, and one per error node, sorted by
        ``|effect|``: ``hook_name``, ``node`` ("feature" or "error"), ``feature`` (-1 for the error),
        ``effect`` (mean over pairs), ``mean_abs_effect``, ``sign_agreement`` (fraction of the
        pairs it fires on whose effect has the sign of ``effect``), ``n_pairs_active``,
        ``outlier_share`` (the share of ``effect`` from massive-activation positions; 0 for
        error nodes)."""
        frames = []
        for name in self.effects:
            effects = self.dense_effects(name)
            active = self.active[name].to_dense()
            n_active = active.sum(0)
            keep = (n_active > 0).nonzero().flatten()
            mean = effects.mean(0)
            agree = ((torch.sign(effects) == torch.sign(mean)) & active).sum(0) / n_active.clamp(min=1)
            outlier = _dense(self.outlier_effects[name]).mean(0) if name in self.outlier_effects else torch.zeros_like(mean)
            share = torch.where(mean != 0, outlier / mean.where(mean != 0, torch.ones_like(mean)), torch.zeros_like(mean))
            frames.append(pd.DataFrame({
                "hook_name": name, "node": "feature", "feature": keep.numpy(),
                "effect": mean[keep].numpy(), "mean_abs_effect": effects.abs().mean(0)[keep].numpy(),
                "sign_agreement": agree[keep].numpy(), "n_pairs_active": n_active[keep].numpy(),
                "outlier_share": share[keep].numpy(),
            }))
            error = self.error_effects[name]
            frames.append(pd.DataFrame([{
                "hook_name": name, "node": "error", "feature": -1, "effect": float(error.mean()),
                "mean_abs_effect": float(error.abs().mean()),
                "sign_agreement": float((torch.sign(error) == torch.sign(error.mean())).float().mean()),
                "n_pairs_active": self.n_pairs, "outlier_share": 0.0,
            }]))
        table = pd.concat(frames, ignore_index=True)
        order = np.argsort(-table["effect"].abs().to_numpy(), kind="stable")
        return table.iloc[order].reset_index(drop=True)

    def top_features(self, n: int = 10, *, direction: str = "both") -> pd.DataFrame:
        """The ``n`` features (not error nodes) whose removal moves the target most:
        ``direction="raising"``: features that raise the target (removing them lowers it, so
        their removal effect is negative); ``"lowering"``: the opposite; ``"both"``: by |effect|."""
        table = self.ranking()
        table = table[table.node == "feature"]
        if direction == "raising":
            return table[table.effect < 0].sort_values("effect").head(n).reset_index(drop=True)
        if direction == "lowering":
            return table[table.effect > 0].sort_values("effect", ascending=False).head(n).reset_index(drop=True)
        if direction != "both":
            raise ValueError(f"direction must be 'raising', 'lowering' or 'both', got {direction!r}")
        return table.head(n).reset_index(drop=True)


def attribute(
    rm: RewardModel,
    pairs: PairsLike,
    *,
    saes: SAE | Iterable[Any] | Mapping[str, Any] | None = None,
    target: str = "margin",
    method: str = "atp",
    baseline: str = "zero",
    positions: str = "all",
    ig_steps: int = 8,
    reference_pairs: PairsLike | None = None,
    skip_first: bool = SKIP_FIRST,
    batch_tokens: int = 4096,
    truncate: bool = False,
    progress: bool = True,
) -> Attribution:
    """Estimate the effect of removing every feature of every SAE on ``target``, for each pair.

    Args:
        pairs: ``PreferencePair`` objects (one pair, ``(prompt, chosen, rejected)`` tuples and
            records are accepted too); formatted with ``rm.text_format``.
        saes: the SAEs, one per hook (default: those attached to ``rm``).
        target: ``"chosen"``, ``"rejected"``, ``"margin"`` (r(chosen) - r(rejected)) or ``"sum"``
            (r(chosen) + r(rejected): a feature's effect on reward wherever it fires). The
            result keeps both sides; ``Attribution.retarget`` switches target for free.
        method: ``"atp"`` (gradient x (baseline - activation), one forward and backward per
            batch and side) or ``"ig"`` (integrated gradients with ``ig_steps`` steps).
        baseline: ``"zero"`` or ``"mean"`` (each feature's mean activation over the selected
            positions of ``reference_pairs``, default ``pairs``).
        positions: ``"all"``, ``"completion"`` or ``"diverge"`` (see ``pm_lens.attribution.positions``).
        skip_first: leave each sequence's first token out (default ``pm_lens.data.SKIP_FIRST``:
            it is a massive-activation attention sink in most PMs).
        batch_tokens: token budget of one batch (batch size x padded length).

    Returns:
        An :class:`Attribution`; its ``settings`` record every choice, including the text format.
        Warns when top features owe most of their effect to massive-activation positions.
    """
    _check_args(target, method, baseline, positions, ig_steps, batch_tokens)
    pairs = as_pairs(pairs)
    reference_pairs = as_pairs(reference_pairs, name="reference_pairs") if reference_pairs is not None else pairs
    by_hook = resolve_saes(rm, saes)
    settings = dict(method=method, target=target, baseline=baseline, positions=positions,
                    ig_steps=ig_steps if method == "ig" else None, skip_first=skip_first, hook_names=list(by_hook),
                    text_format=describe_text_format(rm.tokenizer, [p.prompt for p in pairs], rm.text_format))
    with plain_model(rm, by_hook):
        baselines = feature_baselines(rm, by_hook, reference_pairs, baseline=baseline, positions=positions,
                                      skip_first=skip_first, batch_tokens=batch_tokens, truncate=truncate)
        parts: list[dict[str, Any]] = []
        batches = pair_batches(rm, pairs, batch_tokens=batch_tokens, truncate=truncate)
        for batch in tqdm(batches, desc=f"attributing ({method})", disable=not progress or len(batches) < 2):
            masks = pair_masks(batch, positions, skip_first=skip_first)
            sides = [_side_effects(rm, side, mask, by_hook, baselines, method, ig_steps)
                     for side, mask in zip((batch.chosen, batch.rejected), masks)]
            parts.append(sides)
    attribution = _assemble(parts, baselines, settings, pairs, by_hook, sparse=baseline == "zero")
    warn_outlier_features(attribution.ranking(), attribution.outliers)
    return attribution


def _check_args(target: str, method: str, baseline: str, positions: str, ig_steps: int, batch_tokens: int) -> None:
    for name, value, allowed in (("target", target, tuple(TARGETS)), ("method", method, METHODS), ("baseline", baseline, BASELINES)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    check_positions(positions)
    if method == "ig" and (not isinstance(ig_steps, int) or ig_steps < 1):
        raise ValueError(f"ig_steps must be an integer >= 1, got {ig_steps!r}")
    if not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ValueError(f"batch_tokens must be an integer >= 1, got {batch_tokens!r}")


def feature_baselines(
    rm: RewardModel,
    saes: dict[str, SAE],
    pairs: Sequence[PreferencePair],
    *,
    baseline: str,
    positions: str = "all",
    skip_first: bool = SKIP_FIRST,
    batch_tokens: int = 4096,
    truncate: bool = False,
) -> dict[str, Tensor]:
    """Per hook, ``[d_sae]`` values features are removed to: zeros, or the mean activation over
    the selected positions of both sides of ``pairs``."""
    if baseline == "zero":
        return {name: torch.zeros(sae.cfg.d_sae, dtype=sae.W_dec.dtype, device=sae.W_dec.device) for name, sae in saes.items()}
    sums = {name: torch.zeros(sae.cfg.d_sae, dtype=torch.float64, device=sae.W_dec.device) for name, sae in saes.items()}
    count = 0
    for batch in pair_batches(rm, pairs, batch_tokens=batch_tokens, truncate=truncate):
        for side, mask in zip((batch.chosen, batch.rejected), pair_masks(batch, positions, skip_first=skip_first)):
            _, xs, _ = run_with_deltas(rm, side, list(saes))
            for name, nodes in read_nodes(saes, xs).items():
                sums[name] += nodes.acts[mask].double().sum(0)
            count += int(mask.sum())
    if count == 0:
        raise ValueError("the reference pairs have no tokens at the selected positions")
    return {name: (total / count).to(saes[name].W_dec.dtype) for name, total in sums.items()}


def _side_effects(
    rm: RewardModel,
    side: TokenBatch,
    mask: Tensor,
    saes: dict[str, SAE],
    baselines: dict[str, Tensor],
    method: str,
    ig_steps: int,
) -> dict[str, Any]:
    """Per-sequence effects of one side: features ``[batch, d_sae]`` and error ``[batch]`` per hook,
    the features' effects from outlier positions, and those positions."""
    names = list(saes)
    rewards, xs, grads = run_with_deltas(rm, side, names, with_grad=method == "atp")
    nodes = read_nodes(saes, xs)
    if method == "ig":
        with torch.no_grad():
            full = {n: removal_delta(nodes[n].acts, baselines[n], directions(saes[n]), nodes[n].error, nodes[n].scale, mask)
                    for n in names}
        grads = {n: torch.zeros_like(xs[n]) for n in names}
        for step in range(ig_steps):
            alpha = (step + 0.5) / ig_steps
            _, _, step_grads = run_with_deltas(rm, side, names, deltas={n: (1 - alpha) * d for n, d in full.items()},
                                               with_grad=True)
            for n in names:
                grads[n] += step_grads[n] / ig_steps
    out: dict[str, Any] = {"features": {}, "errors": {}, "active": {}, "outlier_features": {}, "outliers": {},
                           "reward": rewards}
    with torch.no_grad():
        for n in names:
            node = nodes[n]
            features, errors = node_effects(flat(saes[n], grads[n]), node.acts, baselines[n], directions(saes[n]),
                                            node.error, node.scale)
            out["features"][n] = (features * mask[..., None]).sum(1)
            out["errors"][n] = (errors * mask).sum(1)
            out["active"][n] = ((node.acts != 0) & mask[..., None]).any(1)
            outliers, relative = outlier_positions(node.x, mask)
            out["outlier_features"][n] = (features * outliers[..., None]).sum(1)
            out["outliers"][n] = (outliers, relative)
    return out


def _assemble(parts: list[list[dict[str, Any]]], baselines: dict[str, Tensor], settings: dict[str, Any],
              pairs: Sequence[PreferencePair], saes: dict[str, SAE], *, sparse: bool) -> Attribution:
    """Concatenate the batches' per-side effects and combine them into the target."""
    names = list(baselines)

    def gather(side: int, key: str) -> dict[str, Tensor]:
        return {n: torch.cat([p[side][key][n] for p in parts]).float().cpu() for n in names}

    sides = {}
    for side, side_name in enumerate(("chosen", "rejected")):
        features, outlier = gather(side, "features"), gather(side, "outlier_features")
        sides[side_name] = {"features": {n: f.to_sparse() if sparse else f for n, f in features.items()},
                            "errors": gather(side, "errors"),
                            "outlier_features": {n: f.to_sparse() for n, f in outlier.items()}}
    active = {n: (torch.cat([p[0]["active"][n] for p in parts]) | torch.cat([p[1]["active"][n] for p in parts])).cpu()
              for n in names}
    clean = {side_name: torch.cat([p[side]["reward"] for p in parts]).float().cpu()
             for side, side_name in enumerate(("chosen", "rejected"))}
    rows, offset = [], 0
    for part in parts:
        for side, side_name in enumerate(("chosen", "rejected")):
            for n in names:
                rows += outlier_rows(n, side_name, *part[side]["outliers"][n], offset=offset)
        offset += len(part[0]["reward"])
    empty = {n: torch.zeros(0) for n in names}
    attribution = Attribution(
        effects=empty, error_effects=empty, active={n: a.to_sparse() for n, a in active.items()}, total=torch.zeros(0),
        baselines={n: b.float().cpu() for n, b in baselines.items()}, settings=settings, pairs=list(pairs),
        saes=dict(saes), sides=sides, clean=clean, outliers=pd.DataFrame(rows, columns=OUTLIER_COLUMNS),
    )
    return attribution.retarget(settings["target"])


def _reindex_outliers(outliers: pd.DataFrame, index: Tensor) -> pd.DataFrame:
    """The outlier records of the pairs at ``index``, renumbered to their place in it."""
    new_place: dict[int, list[int]] = {}
    for place, old in enumerate(index.tolist()):
        new_place.setdefault(old, []).append(place)
    rows = [{**row, "pair": place} for row in outliers.to_dict("records") for place in new_place.get(row["pair"], [])]
    return pd.DataFrame(rows, columns=OUTLIER_COLUMNS)


def _dense(effects: Tensor) -> Tensor:
    return effects.to_dense() if effects.is_sparse else effects

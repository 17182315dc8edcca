"""Attribution patching: the effect of removing every SAE feature on the reward, from gradients.

For a batch of preference pairs, each side (chosen, rejected) is run on its own, since their
lengths differ, and the effects are combined per pair (margin = chosen - rejected).

Algorithm (per batch, per side):
1. Clean run: one forward with a zero "probe" added at every SAE hook; the activation ``x`` at
   each hook is read, and (AtP) the gradient of the summed reward with respect to each probe is
   taken in the same pass: d(reward)/d(hook output). This is the clean pass later stages reuse
   (kept in ``Attribution.clean_run`` within ``clean_budget_bytes``).
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
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float
from sae_lens import SAE
from torch import Tensor
from tqdm.auto import tqdm

from pm_lens.attribution.batching import pair_batches
from pm_lens.attribution.clean import (
    SIDES,
    CleanRunBuilder,
    CleanSettings,
    SideRun,
    clean_side,
    pair_grad_start,
)
from pm_lens.attribution.formulas import TARGETS, node_effects, removal_delta
from pm_lens.attribution.nodes import plain_model, read_nodes, resolve_saes
from pm_lens.attribution.outliers import outlier_positions, outlier_rows, warn_outlier_features
from pm_lens.attribution.positions import check_positions, pair_masks
from pm_lens.attribution.result import OUTLIER_COLUMNS, Attribution, AttributionSettings, SideEffects
from pm_lens.data import SKIP_FIRST, PairsLike, PreferencePair, as_pairs, describe_text_format
from pm_lens.model import RewardModel
from pm_lens.model.runs import SharedPrefix
from pm_lens.saes.split import directions, flat

METHODS = ("atp", "ig")
BASELINES = ("zero", "mean")


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
    baselines: Mapping[str, Tensor] | None = None,
    skip_first: bool = SKIP_FIRST,
    batch_tokens: int = 4096,
    truncate: bool = False,
    clean_budget_bytes: int | None = None,
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
        baselines: per hook, ``[d_sae]`` values computed beforehand (e.g. the mean over a larger
            set of pairs, attributed in parts): used as they are, with ``baseline`` naming what
            they are; ``reference_pairs`` is then unused.
        positions: ``"all"``, ``"completion"`` or ``"diverge"`` (see ``pm_lens.attribution.positions``).
        skip_first: leave each sequence's first token out (default ``pm_lens.data.SKIP_FIRST``:
            it is a massive-activation attention sink in most PMs).
        batch_tokens: token budget of one batch (batch size x padded length).
        clean_budget_bytes: how much of the clean pass to keep in ``Attribution.clean_run`` for
            later stages (default 2 GiB; what does not fit is recomputed when needed; 0 keeps
            only tokens and rewards).

    Returns:
        An :class:`Attribution`; its ``settings`` record every choice, including the text format.
        Warns when top features owe most of their effect to massive-activation positions.
    """
    _check_args(target, method, baseline, positions, ig_steps, batch_tokens)
    pairs = as_pairs(pairs)
    reference_pairs = as_pairs(reference_pairs, name="reference_pairs") if reference_pairs is not None else pairs
    by_hook = resolve_saes(rm, saes)
    settings = AttributionSettings(
        method=method, target=target, baseline=baseline, positions=positions, ig_steps=ig_steps if method == "ig" else None,
        skip_first=skip_first, hook_names=tuple(by_hook),
        text_format=describe_text_format(rm.tokenizer, [p.prompt for p in pairs], rm.text_format))
    clean_settings = CleanSettings(positions, skip_first, rm.text_format, truncate)
    builder = CleanRunBuilder(pairs, by_hook, clean_settings, clean_budget_bytes)
    with plain_model(rm, by_hook):
        if baselines is None:
            baselines = feature_baselines(rm, by_hook, reference_pairs, baseline=baseline, positions=positions,
                                          skip_first=skip_first, batch_tokens=batch_tokens, truncate=truncate)
        else:
            baselines = _given_baselines(baselines, by_hook)
        parts: list[tuple[_SideResult, _SideResult]] = []
        batches = pair_batches(rm, pairs, batch_tokens=batch_tokens, truncate=truncate)
        for batch in tqdm(batches, desc=f"attributing ({method})", disable=not progress or len(batches) < 2, unit="batch"):
            masks = pair_masks(batch, positions, skip_first=skip_first)
            # The backward starts at the first attributed position; the rejected side continues from
            # the chosen side's run of the tokens they share before it.
            start = pair_grad_start(batch, masks)
            runs = [_side_effects(rm, batch.chosen, masks[0], by_hook, baselines, method, ig_steps, start)]
            runs.append(_side_effects(rm, batch.rejected, masks[1], by_hook, baselines, method, ig_steps, start,
                                      runs[0].shared))
            builder.add(batch, runs[0].run, runs[1].run)
            parts.append((runs[0], runs[1]))
    attribution = _assemble(parts, baselines, settings, pairs, by_hook, sparse=baseline == "zero",
                            clean_run=builder.build())
    warn_outlier_features(attribution.ranking(), attribution.outliers)
    return attribution


def _check_args(target: str, method: str, baseline: str, positions: str, ig_steps: int, batch_tokens: int) -> None:
    for name, value, allowed in (("target", target, tuple(TARGETS)), ("method", method, METHODS), ("baseline", baseline, BASELINES)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    check_positions(positions)
    if method == "ig" and (isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1):
        raise ValueError(f"ig_steps must be an integer >= 1, got {ig_steps!r}")
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ValueError(f"batch_tokens must be an integer >= 1, got {batch_tokens!r}")


def _given_baselines(baselines: Mapping[str, Tensor], saes: dict[str, SAE]) -> dict[str, Tensor]:
    """``baselines`` checked against the SAEs (one ``[d_sae]`` vector per hook), on their device
    and in their dtype."""
    missing = sorted(set(saes) - set(baselines))
    if missing:
        raise ValueError(f"baselines has no values for {missing}; give one [d_sae] tensor per SAE hook")
    out = {}
    for name, sae in saes.items():
        value = torch.as_tensor(baselines[name])
        if tuple(value.shape) != (sae.cfg.d_sae,):
            raise ValueError(f"baselines[{name!r}] has shape {tuple(value.shape)}; the SAE there needs ({sae.cfg.d_sae},)")
        out[name] = value.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)
    return out


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
    the selected positions of both sides of ``pairs`` (one forward per batch and side, counted
    as ``"baseline"``)."""
    if baseline == "zero":
        return {name: torch.zeros(sae.cfg.d_sae, dtype=sae.W_dec.dtype, device=sae.W_dec.device) for name, sae in saes.items()}
    sums = {name: torch.zeros(sae.cfg.d_sae, dtype=torch.float64, device=sae.W_dec.device) for name, sae in saes.items()}
    count = 0
    for batch in pair_batches(rm, pairs, batch_tokens=batch_tokens, truncate=truncate):
        for side, mask in zip((batch.chosen, batch.rejected), pair_masks(batch, positions, skip_first=skip_first)):
            with rm.counting("baseline"), torch.no_grad():
                run = rm.run_with_deltas(side.tokens, side.attention_mask, read=list(saes))
            for name, nodes in read_nodes(saes, run.acts).items():
                sums[name] += nodes.acts[mask.to(nodes.acts.device)].double().sum(0)
            count += int(mask.sum())
    if count == 0:
        raise ValueError("the reference pairs have no tokens at the selected positions")
    return {name: (total / count).to(saes[name].W_dec.dtype) for name, total in sums.items()}


@dataclass(frozen=True)
class _SideResult:
    """One side of one batch: its clean run and, per hook, the per-sequence effects."""

    run: SideRun
    features: dict[str, Float[Tensor, "batch d_sae"]]
    errors: dict[str, Float[Tensor, " batch"]]
    active: dict[str, Bool[Tensor, "batch d_sae"]]
    outlier_features: dict[str, Float[Tensor, "batch d_sae"]]
    outliers: dict[str, tuple[Tensor, Tensor]]
    shared: SharedPrefix | None = None


def _side_effects(
    rm: RewardModel,
    side: Any,
    mask: Tensor,
    saes: dict[str, SAE],
    baselines: dict[str, Tensor],
    method: str,
    ig_steps: int,
    start: int = 0,
    shared: SharedPrefix | None = None,
) -> _SideResult:
    """The clean pass of one side (with the AtP gradient) and its per-sequence effects; the
    backward from position ``start`` on, continuing from ``shared`` where it fits."""
    run, grads, prefix = clean_side(rm, side, mask, saes, with_grad=method == "atp", start=start, shared=shared)
    names = list(saes)
    if method == "ig":
        grads, prefix = _integrated_gradients(rm, run, saes, baselines, ig_steps, start, shared)
    with torch.no_grad():
        run = replace(run, grads={n: flat(saes[n], grads[n]).detach() for n in names})  # kept for dashboards
    result = _SideResult(run, {}, {}, {}, {}, {}, prefix)
    with torch.no_grad():
        for n in names:
            node = run.nodes[n]
            mask = run.mask.to(node.x.device)  # the hook's device when the layers are split
            features, errors = node_effects(flat(saes[n], grads[n]), node.acts, baselines[n], directions(saes[n]),
                                            node.error, node.scale)
            result.features[n] = (features * mask[..., None]).sum(1)
            result.errors[n] = (errors * mask).sum(1)
            result.active[n] = ((node.acts != 0) & mask[..., None]).any(1)
            outliers, relative = outlier_positions(node.x, mask)
            result.outlier_features[n] = (features * outliers[..., None]).sum(1)
            result.outliers[n] = (outliers, relative)
    return result


def _integrated_gradients(rm: RewardModel, run: SideRun, saes: dict[str, SAE], baselines: dict[str, Tensor],
                          ig_steps: int, start: int = 0,
                          shared: SharedPrefix | None = None) -> tuple[dict[str, Tensor], SharedPrefix | None]:
    """The reward's gradients at every hook averaged over ``ig_steps`` points of the straight path
    from the clean activations to every node removed (all hooks together), and the clean part
    before ``start`` the steps shared. The removal is zero before the first masked position, so
    with ``start`` there the steps run only the positions from it on, each continuing from one
    clean run of the ones before (``shared``, or the first step's)."""
    names = list(saes)
    with torch.no_grad():
        full = {n: removal_delta(run.nodes[n].acts, baselines[n], directions(saes[n]), run.nodes[n].error,
                                 run.nodes[n].scale, run.mask.to(run.nodes[n].x.device)) for n in names}
    grads = {n: torch.zeros_like(run.nodes[n].x) for n in names}
    if start and any(bool(d[:, :start].any()) for d in full.values()):
        start = 0  # a removal before start (not from this module's masks): run every position
    for step in range(ig_steps):
        alpha = (step + 0.5) / ig_steps
        if shared is not None and not shared.fits(run.batch.tokens, run.batch.attention_mask, start, names):
            shared = None
        with rm.counting("ig"):
            step_run = rm.run_with_deltas(run.batch.tokens, run.batch.attention_mask,
                                          deltas={n: (1 - alpha) * d for n, d in full.items()}, grad_at=names,
                                          grad_from=start, shared=shared if start else None)
        shared = step_run.shared if start else None
        for n in names:
            grads[n] += flat(saes[n], step_run.grads[n]) / ig_steps
    return grads, shared


def _assemble(parts: list[tuple[_SideResult, _SideResult]], baselines: dict[str, Tensor], settings: AttributionSettings,
              pairs: Sequence[PreferencePair], saes: dict[str, SAE], *, sparse: bool, clean_run: Any) -> Attribution:
    """Concatenate the batches' per-side effects and combine them into the target."""
    names = list(baselines)

    def gather(side: int, key: str) -> dict[str, Tensor]:
        return {n: torch.cat([getattr(p[side], key)[n] for p in parts]).float().cpu() for n in names}

    sides = []
    for side in range(2):
        features, outlier = gather(side, "features"), gather(side, "outlier_features")
        sides.append(SideEffects(
            features={n: f.to_sparse() if sparse else f for n, f in features.items()}, errors=gather(side, "errors"),
            outlier_features={n: f.to_sparse() for n, f in outlier.items()},
            rewards=torch.cat([p[side].run.rewards for p in parts]).float().cpu()))
    active = {n: torch.cat([p[0].active[n] | p[1].active[n] for p in parts]).cpu().to_sparse() for n in names}
    rows, offset = [], 0
    for part in parts:
        for side, side_name in enumerate(SIDES):
            for n in names:
                rows += outlier_rows(n, side_name, *part[side].outliers[n], offset=offset)
        offset += len(part[0].run.rewards)
    empty = {n: torch.zeros(0) for n in names}
    attribution = Attribution(
        effects=empty, error_effects=empty, active=active, total=torch.zeros(0),
        baselines={n: b.float().cpu() for n, b in baselines.items()}, settings=settings, pairs=list(pairs), saes=dict(saes),
        chosen=sides[0], rejected=sides[1], outliers=pd.DataFrame(rows, columns=OUTLIER_COLUMNS), clean_run=clean_run,
    )
    return attribution.retarget(settings.target)

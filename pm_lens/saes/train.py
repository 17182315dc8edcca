"""Training SAEs on a reward model's own activations, one per hook point, with SAELens's trainer.

An SAE meant to explain a preference model should be trained on that model's activations over
the text it will explain (chosen and rejected completions). Preference data sets are small
(~10^5 tokens), so the activations are collected once, kept in memory and replayed for several
epochs; every hook point is filled from the same forward passes.

Steps of :func:`train_saes` (the module that does each is named at its end):
1. check every argument (architecture, ``d_sae``, hook names, budget) before any work
   (:mod:`pm_lens.saes.training_plan`);
2. collect the activations at all hooks with ONE forward per batch (``run_with_cache``, stopped
   after the last block needed), keeping real tokens only: no padding and, by default, not the
   first token of each sequence, whose norm in real models (SmolLM2: ~25,000 against ~300)
   would dominate every statistic; ``max_tokens`` caps the collection
   (:mod:`pm_lens.saes.activations`);
3. per hook, normalise: scale so that the *centred* tokens have mean norm ``sqrt(d_in)``
   (SAELens's ``expected_average_only_in``, measured after removing the mean because the mean
   can be most of a token's norm), or whiten; the statistics are exact (all tokens) and SAELens
   folds them into the weights when training ends, so the SAE works on raw activations
   (:mod:`pm_lens.saes.fit`);
4. per hook, build the training SAE from the seed, put the decoder bias at the activation mean,
   and fit it with SAELens's ``SAETrainer`` on shuffled batches drawn from the seed; learning
   rate warm-up (5% of steps) and linear decay to zero over the last 20%, sparsity penalty
   warm-up over the first 5% (Anthropic, "Circuits Updates - April 2024") (:mod:`pm_lens.saes.fit`);
5. measure MSE, FVU, L0 and dead features of the initial and the trained SAE on the training
   activations; save each inference SAE in SAELens format (``out_dir/<hook_name>/``, loads with
   ``sae_lens.SAE.load_from_disk``) and the run in ``out_dir/training_config.json`` (here).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME
from torch import Tensor

from pm_lens.data import SKIP_FIRST, PreferencePair, TokenBatch
from pm_lens.io import versions, write_atomic
from pm_lens.model import RewardModel
from pm_lens.saes.activations import collect_activations as collect_activations
from pm_lens.saes.activations import check_collect_positions, n_sequences
from pm_lens.saes.fit import fit_sae
from pm_lens.saes.training_plan import ARCHITECTURES as ARCHITECTURES
from pm_lens.saes.training_plan import NORMALIZATIONS as NORMALIZATIONS
from pm_lens.saes.training_plan import Architecture, Plan, check_architecture, check_arguments, resolve_plan

CONFIG_FILENAME = "training_config.json"


@dataclass(frozen=True)
class TrainedSAEs:
    """What :func:`train_saes` returns.

    Attributes:
        saes: the inference SAEs by hook name (``cfg.metadata.hook_name`` set), on the model's
            device and in its dtype, ready for ``attach_saes``.
        stats: one row per hook name: ``d_in``, ``d_sae``, ``sparsity_coefficient`` (None for
            TopK), ``n_tokens``, ``n_steps``, then on the training activations ``mse`` (squared
            error summed over ``d_in``, mean over tokens), ``fvu``, ``l0``, ``dead_fraction``, and
            ``fvu_init`` / ``l0_init`` of the SAE before training.
        config: what ``training_config.json`` holds: arguments, derived budget, stats, versions.
        out_dir: where everything was saved, or None.
    """

    saes: dict[str, SAE]
    stats: pd.DataFrame
    config: dict[str, Any]
    out_dir: Path | None


def train_saes(
    rm: RewardModel,
    data: Sequence[str] | Sequence[PreferencePair] | TokenBatch,
    *,
    hook_names: Sequence[str],
    d_sae: int,
    architecture: str = "standard",
    out_dir: str | Path | None = None,
    seed: int = 0,
    k: int | None = None,
    sparsity_coefficient: float | int | None = None,
    normalize_activations: str = "expected_average_only_in",
    n_epochs: float | int | None = None,
    training_tokens: int | None = None,
    batch_size: int = 1024,
    lr: float | int | None = None,
    max_tokens: int | None = None,
    skip_first: bool = SKIP_FIRST,
    exclude_token_ids: Sequence[int] = (),
    forward_batch_size: int = 8,
    truncate: bool = False,
    positions: str = "all",
    sae_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> TrainedSAEs:
    """Train one SAE per hook point on ``rm``'s activations over ``data`` (see the module docstring).

    Args:
        data: full model-input texts, preference pairs (both sides, formatted as
            ``pm_lens.data.encode_pairs`` does) or an encoded ``TokenBatch``.
        hook_names: hook points of ``rm`` with ``[batch, pos, d]`` activations, or ``attn.hook_z``.
        d_sae: features per SAE.
        architecture: ``standard``, ``topk``, ``jumprelu`` or ``gated`` (see :data:`ARCHITECTURES`).
        out_dir: save each SAE to ``out_dir/<hook_name>/`` and the run to ``training_config.json``.
        seed: drives the initialisation, the shuffling and the batches. The same seed and data give
            identical weights, and each hook's SAE does not depend on the other hooks.
        k: active features per token of a TopK SAE (default ``min(32, d_sae // 4)``).
        sparsity_coefficient: the L1 (standard, gated) or L0 (jumprelu) penalty; the default,
            from ``d_in``, suits the default normalisation.
        normalize_activations: one of :data:`NORMALIZATIONS`; always folded back into the weights.
        n_epochs, training_tokens: the budget, at most one of them. Default: the larger of 10
            epochs and 1,000 steps (small data sets need several passes; Adam needs ~10^3 steps).
        batch_size: tokens per step, capped at the number of tokens collected.
        lr: Adam's learning rate; default ``2e-4 * sqrt(16384 / d_sae)`` (EleutherAI ``sparsify``).
        max_tokens: stop collecting after this many tokens.
        skip_first: leave out the first real token of every sequence (an attention sink with a huge
            norm in most PMs; the default everywhere, ``pm_lens.data.SKIP_FIRST``).
        exclude_token_ids: leave out tokens with these ids too.
        forward_batch_size: sequences per forward pass while collecting.
        truncate: cut sequences longer than the context instead of raising (texts keep their
            start, pairs the end of the prompt).
        positions: ``"all"`` real tokens, or ``"completion"``: only the completions' tokens (of
            pairs or of a ``TokenBatch``), where the attribution of ``positions="diverge"`` or
            ``"completion"`` reads the SAEs.
        sae_kwargs: further SAELens training-config fields, e.g. ``{"jumprelu_bandwidth": 0.1}``.
        progress: show progress bars (collection, then one per SAE).
    """
    spec = check_architecture(architecture, k=k, sparsity_coefficient=sparsity_coefficient, sae_kwargs=sae_kwargs)
    check_arguments(rm, hook_names, d_sae=d_sae, k=k, normalize_activations=normalize_activations,
                    n_epochs=n_epochs, training_tokens=training_tokens, batch_size=batch_size,
                    max_tokens=max_tokens, lr=lr)
    check_collect_positions(positions)
    acts = collect_activations(rm, data, hook_names=hook_names, max_tokens=max_tokens, skip_first=skip_first,
                               exclude_token_ids=exclude_token_ids, batch_size=forward_batch_size,
                               truncate=truncate, positions=positions, progress=progress)
    n_tokens = next(iter(acts.values())).shape[0]
    plan = resolve_plan(architecture, n_tokens, d_sae=d_sae, k=k, sparsity_coefficient=sparsity_coefficient,
                        normalize_activations=normalize_activations, n_epochs=n_epochs,
                        training_tokens=training_tokens, batch_size=batch_size, lr=lr, sae_kwargs=sae_kwargs,
                        seed=seed)
    saes, stats = _fit_each(spec, plan, acts, hook_names=hook_names, dtype=next(rm.parameters()).dtype,
                            progress=progress)
    arguments = dict(hook_names=list(hook_names), n_epochs=n_epochs, training_tokens=training_tokens,
                     max_tokens=max_tokens, skip_first=skip_first, exclude_token_ids=list(exclude_token_ids),
                     forward_batch_size=forward_batch_size, truncate=truncate, positions=positions)
    config = _run_config(rm, data, plan, arguments, stats)
    if out_dir is not None:
        out_dir = Path(out_dir)
        save_saes(saes, config, out_dir)
    return TrainedSAEs(saes=saes, stats=stats, config=config, out_dir=out_dir)


def _fit_each(
    spec: Architecture,
    plan: Plan,
    acts: dict[str, Tensor],
    *,
    hook_names: Sequence[str],
    dtype: torch.dtype,
    progress: bool,
) -> tuple[dict[str, SAE], pd.DataFrame]:
    """Fit and measure one SAE per hook: the SAEs (in ``dtype``) and the ``stats`` table of
    :class:`TrainedSAEs`. Each hook's activations leave ``acts`` once its SAE is trained."""
    saes, rows, n_tokens = {}, [], next(iter(acts.values())).shape[0]
    for name in hook_names:
        x = acts.pop(name)
        fitted = fit_sae(spec, plan, x, hook_name=name, progress=progress)
        trained, before = reconstruction_stats(fitted.sae, x), reconstruction_stats(fitted.initial, x)
        rows.append({"hook_name": name, "d_in": x.shape[1], "d_sae": plan.d_sae,
                     "sparsity_coefficient": fitted.sparsity_coefficient, "n_tokens": n_tokens,
                     "n_steps": plan.n_steps, **trained, "fvu_init": before["fvu"], "l0_init": before["l0"]})
        saes[name] = fitted.sae.to(dtype)
    return saes, pd.DataFrame(rows).set_index("hook_name")


@torch.no_grad()
def reconstruction_stats(sae: SAE, x: Float[Tensor, "n_tokens d_in"], *, chunk: int = 4096) -> dict[str, float]:
    """``mse`` (per token, summed over ``d_in``), ``fvu``, ``l0`` and ``dead_fraction`` of ``sae`` on ``x``.

    FVU is ``sum ||x - sae(x)||^2 / sum ||x - mean(x)||^2`` (sums in float64). ``x`` is flat also
    for an ``attn.hook_z`` SAE.
    """
    sq_error, active = 0.0, 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=x.device)
    reshaping = sae.hook_z_reshaping_mode
    sae.turn_off_forward_pass_hook_z_reshaping()
    try:
        for start in range(0, x.shape[0], chunk):
            part = x[start : start + chunk]
            feature_acts = sae.encode(part.to(sae.dtype))
            feature_acts = feature_acts.to_dense() if feature_acts.is_sparse else feature_acts
            sq_error += float(((part.double() - sae.decode(feature_acts).double()) ** 2).sum())
            active += float((feature_acts != 0).sum())
            fired |= (feature_acts != 0).any(0)
    finally:
        if reshaping:
            sae.turn_on_forward_pass_hook_z_reshaping()
    variance = float(((x.double() - x.double().mean(0)) ** 2).sum())
    return {"mse": sq_error / x.shape[0], "fvu": sq_error / max(variance, 1e-30), "l0": active / x.shape[0],
            "dead_fraction": 1.0 - float(fired.float().mean())}


def _run_config(
    rm: RewardModel, data: Any, plan: Plan, arguments: dict[str, Any], stats: pd.DataFrame
) -> dict[str, Any]:
    kind = "TokenBatch" if isinstance(data, TokenBatch) else type(data[0]).__name__
    return {
        **plan.__dict__,
        **arguments,
        "data": {"kind": kind, "n_sequences": n_sequences(data)},
        "n_tokens": int(stats["n_tokens"].iloc[0]),
        "model": {"hf_architecture": getattr(rm, "hf_architecture", None), "d_model": rm.cfg.d_model,
                  "n_layers": rm.cfg.n_layers, "n_ctx": rm.cfg.n_ctx, "dtype": str(rm.cfg.dtype)},
        "stats": json.loads(stats.to_json(orient="index")),
        "versions": versions(("pm-lens", "sae-lens", "transformer-lens", "torch")),
    }


def _usual_permissions(folder: Path) -> None:
    """Give ``folder`` and its files the permissions of any new file (``mkdtemp`` makes them private)."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for path in folder.iterdir():
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def save_saes(saes: dict[str, SAE], config: dict[str, Any], out_dir: str | Path) -> None:
    """Save each SAE (by hook name) as a SAELens folder ``out_dir/<hook_name>/`` (each written
    beside its target and renamed) and ``config`` as ``out_dir/training_config.json``."""
    out_dir = Path(out_dir)
    taken = [str(out_dir / name) for name in saes if (out_dir / name).exists()
             and not (out_dir / name / SAE_CFG_FILENAME).exists()]
    if taken:
        raise ValueError(f"{taken} exist and are not saved SAEs; choose another out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, sae in saes.items():
        target = out_dir / name
        # Saved beside the target and renamed: a crash never leaves a half-written SAE.
        tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{name}."))
        try:
            sae.save_model(tmp)
            _usual_permissions(tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    write_atomic(out_dir / CONFIG_FILENAME, json.dumps(config, indent=2) + "\n")

"""Training SAEs on a reward model's own activations, one per hook point, with SAELens's trainer.

An SAE meant to explain a preference model should be trained on that model's activations over
the text it will explain (chosen and rejected completions). Preference data sets are small
(~10^5 tokens), so the activations are collected once, kept in memory and replayed for several
epochs; every hook point is filled from the same forward passes.

Steps of :func:`train_saes`:
1. check every argument (architecture, ``d_sae``, hook names, budget) before any work;
2. collect the activations at all hooks with ONE forward per batch (``run_with_cache``, stopped
   after the last block needed), keeping real tokens only: no padding and, by default, not the
   first token of each sequence, whose norm in real models (SmolLM2: ~25,000 against ~300)
   would dominate every statistic; ``max_tokens`` caps the collection;
3. per hook, normalise: scale so that the *centred* tokens have mean norm ``sqrt(d_in)``
   (SAELens's ``expected_average_only_in``, measured after removing the mean because the mean
   can be most of a token's norm), or whiten; the statistics are exact (all tokens) and SAELens
   folds them into the weights when training ends, so the SAE works on raw activations;
4. per hook, build the training SAE from the seed, put the decoder bias at the activation mean,
   and fit it with SAELens's ``SAETrainer`` on shuffled batches drawn from the seed; learning
   rate warm-up (5% of steps) and linear decay to zero over the last 20%, sparsity penalty
   warm-up over the first 5% (Anthropic, "Circuits Updates - April 2024");
5. measure MSE, FVU, L0 and dead features of the initial and the trained SAE on the training
   activations; save each inference SAE in SAELens format (``out_dir/<hook_name>/``, loads with
   ``sae_lens.SAE.load_from_disk``) and the run in ``out_dir/training_config.json``.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from sae_lens import SAE, SAETrainer
from sae_lens.config import SAETrainerConfig
from sae_lens.constants import SAE_CFG_FILENAME
from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.sae import SAEMetadata, TrainingSAE, TrainingSAEConfig
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.activation_scaler import ActivationWhitening
from torch import Tensor
from tqdm.auto import tqdm

from pm_lens.data import SKIP_FIRST, PreferencePair, TokenBatch, encode_pairs, encode_texts
from pm_lens.io import write_atomic
from pm_lens.saes.attach import example_hooks, stop_layer
from pm_lens.model import RewardModel

CONFIG_FILENAME = "training_config.json"
NORMALIZATIONS = ("expected_average_only_in", "covariance_whitening", "none")


@dataclass(frozen=True)
class _Architecture:
    """How one SAELens architecture is trained.

    ``coefficient`` / ``warm_up`` name the config fields of the sparsity penalty and its warm-up
    (None for TopK, whose sparsity is ``k``); ``default_coefficient`` maps ``d_in`` to the
    penalty; ``defaults`` are further config fields, which ``sae_kwargs`` override.
    """

    training_sae: type[TrainingSAE]
    config: type[TrainingSAEConfig]
    coefficient: str | None = None
    warm_up: str | None = None
    default_coefficient: Callable[[int], float] | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)


# Penalties assume activations normalised to centred mean norm sqrt(d_in): the MSE (summed over
# d_in) then grows like d_in and an L1 term like sqrt(d_in), so l1 = 0.2 sqrt(d_in) keeps their
# balance across widths (~5 at d_in 576, Anthropic's April 2024 value). A smooth L0 penalty counts
# features, so it grows like d_in. JumpReLU uses Anthropic's tanh penalty: with SAELens's default
# (DeepMind's step penalty) the thresholds barely move in a few hundred steps and L0 stays near
# d_sae / 4 whatever the coefficient (measured on tiny models).
ARCHITECTURES: dict[str, _Architecture] = {
    "standard": _Architecture(StandardTrainingSAE, StandardTrainingSAEConfig, "l1_coefficient", "l1_warm_up_steps",
                              lambda d_in: 0.2 * math.sqrt(d_in)),
    "topk": _Architecture(TopKTrainingSAE, TopKTrainingSAEConfig),
    "jumprelu": _Architecture(JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, "l0_coefficient", "l0_warm_up_steps",
                              lambda d_in: 0.005 * d_in, {"jumprelu_sparsity_loss_mode": "tanh"}),
    "gated": _Architecture(GatedTrainingSAE, GatedTrainingSAEConfig, "l1_coefficient", "l1_warm_up_steps",
                           lambda d_in: 0.2 * math.sqrt(d_in)),
}


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


@dataclass(frozen=True)
class _Plan:
    """The resolved settings every SAE of one run is trained with."""

    architecture: str
    d_sae: int
    k: int | None
    sparsity_coefficient: float | None
    normalize_activations: str
    batch_size: int
    n_steps: int
    lr: float
    sae_kwargs: dict[str, Any]
    seed: int


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
        sae_kwargs: further SAELens training-config fields, e.g. ``{"jumprelu_bandwidth": 0.1}``.
        progress: show progress bars (collection, then one per SAE).
    """
    spec = _check_architecture(architecture, k=k, sparsity_coefficient=sparsity_coefficient, sae_kwargs=sae_kwargs)
    _check_arguments(rm, hook_names, d_sae=d_sae, k=k, normalize_activations=normalize_activations,
                     n_epochs=n_epochs, training_tokens=training_tokens, batch_size=batch_size,
                     max_tokens=max_tokens, lr=lr)
    acts = collect_activations(rm, data, hook_names=hook_names, max_tokens=max_tokens, skip_first=skip_first,
                               exclude_token_ids=exclude_token_ids, batch_size=forward_batch_size,
                               truncate=truncate, progress=progress)
    n_tokens = next(iter(acts.values())).shape[0]
    plan = _plan(architecture, n_tokens, d_sae=d_sae, k=k, sparsity_coefficient=sparsity_coefficient,
                 normalize_activations=normalize_activations, n_epochs=n_epochs, training_tokens=training_tokens,
                 batch_size=batch_size, lr=lr, sae_kwargs=sae_kwargs, seed=seed)
    saes, rows, dtype = {}, [], next(rm.parameters()).dtype
    for name in hook_names:
        x = acts.pop(name)  # each hook's activations are freed once its SAE is trained
        sae, initial, coefficient = _train_one(spec, plan, x, hook_name=name, progress=progress)
        trained, before = reconstruction_stats(sae, x), reconstruction_stats(initial, x)
        rows.append({"hook_name": name, "d_in": x.shape[1], "d_sae": d_sae, "sparsity_coefficient": coefficient,
                     "n_tokens": n_tokens, "n_steps": plan.n_steps, **trained,
                     "fvu_init": before["fvu"], "l0_init": before["l0"]})
        saes[name] = sae.to(dtype)
    stats = pd.DataFrame(rows).set_index("hook_name")
    arguments = dict(hook_names=list(hook_names), n_epochs=n_epochs, training_tokens=training_tokens,
                     max_tokens=max_tokens, skip_first=skip_first, exclude_token_ids=list(exclude_token_ids),
                     forward_batch_size=forward_batch_size, truncate=truncate)
    config = _run_config(rm, data, plan, arguments, stats)
    if out_dir is not None:
        out_dir = Path(out_dir)
        _save(saes, config, out_dir)
    return TrainedSAEs(saes=saes, stats=stats, config=config, out_dir=out_dir)


# --- 1. checks --------------------------------------------------------------------------------


def _check_architecture(architecture: str, *, k: int | None, sparsity_coefficient: float | int | None,
                        sae_kwargs: Mapping[str, Any] | None) -> _Architecture:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown SAE architecture {architecture!r}; choose from {', '.join(ARCHITECTURES)}")
    spec = ARCHITECTURES[architecture]
    if k is not None and architecture != "topk":
        raise ValueError(f"k={k} is for architecture='topk'; {architecture!r} takes sparsity_coefficient")
    if sparsity_coefficient is not None and spec.coefficient is None:
        raise ValueError(f"architecture {architecture!r} has no sparsity coefficient; set its sparsity with k")
    if sparsity_coefficient is not None and not sparsity_coefficient >= 0:
        raise ValueError(f"sparsity_coefficient must be >= 0, got {sparsity_coefficient}")
    allowed = {f.name for f in fields(spec.config)} - {f.name for f in fields(TrainingSAEConfig)}
    unknown = sorted(set(sae_kwargs or {}) - allowed)
    if unknown:
        raise ValueError(f"unknown sae_kwargs {unknown} for architecture {architecture!r}; "
                         f"allowed: {sorted(allowed)}")
    return spec


def _check_arguments(rm: RewardModel, hook_names: Sequence[str], *, d_sae: int, k: int | None,
                     normalize_activations: str, n_epochs: float | int | None, training_tokens: int | None,
                     batch_size: int, max_tokens: int | None, lr: float | int | None) -> None:
    if isinstance(hook_names, str) or not hook_names:
        raise ValueError(f"hook_names must be a non-empty list of hook names, got {hook_names!r}")
    duplicates = sorted({name for name in hook_names if list(hook_names).count(name) > 1})
    if duplicates:
        raise ValueError(f"hook name(s) {duplicates} given more than once")
    unknown = [name for name in hook_names if name not in rm.hook_dict]
    if unknown:
        raise ValueError(f"unknown hook name(s) {unknown}; valid ones look like {example_hooks(rm)}")
    if rm.acts_to_saes:
        raise ValueError(f"SAEs are attached at {list(rm.acts_to_saes)}; detach them to train on the model's own "
                         "activations (pm_lens.saes.detach_saes)")
    if d_sae <= 0:
        raise ValueError(f"d_sae must be a positive number of features, got {d_sae}")
    if k is not None and not 0 < k <= d_sae:
        raise ValueError(f"k must be between 1 and d_sae={d_sae}, got {k}")
    if normalize_activations not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize_activations {normalize_activations!r}; "
                         f"choose from {', '.join(NORMALIZATIONS)}")
    if n_epochs is not None and training_tokens is not None:
        raise ValueError(f"give n_epochs or training_tokens, not both (got {n_epochs} and {training_tokens})")
    for label, value in (("n_epochs", n_epochs), ("training_tokens", training_tokens), ("batch_size", batch_size),
                         ("max_tokens", max_tokens), ("lr", lr)):
        if value is not None and not value > 0:
            raise ValueError(f"{label} must be > 0, got {value}")


# --- 2. collecting activations ----------------------------------------------------------------


@torch.no_grad()
def collect_activations(
    rm: RewardModel,
    data: Sequence[str] | Sequence[PreferencePair] | TokenBatch,
    *,
    hook_names: Sequence[str],
    max_tokens: int | None = None,
    skip_first: bool = SKIP_FIRST,
    exclude_token_ids: Sequence[int] = (),
    batch_size: int = 8,
    truncate: bool = False,
    progress: bool = True,
) -> dict[str, Float[Tensor, "n_tokens _d_in"]]:
    """``rm``'s activations at every hook over ``data``: one float32 row per kept token, in order.

    One forward per ``batch_size`` sequences fills every hook, stopped after the last block
    needed. Kept are real tokens (attention mask), less the first of each sequence if
    ``skip_first`` and ``exclude_token_ids``, at most ``max_tokens``. ``attn.hook_z`` is
    flattened to ``n_heads * d_head``.
    """
    chunks: dict[str, list[Tensor]] = {name: [] for name in hook_names}
    stop, n_kept = stop_layer(rm, hook_names), 0
    bar = tqdm(total=_n_sequences(data), desc="collecting activations", unit="seq", disable=not progress)
    for batch in _token_batches(rm, data, batch_size=batch_size, truncate=truncate):
        batch = batch.to(rm.cfg.device)
        _, cache = rm.run_with_cache(batch.tokens, attention_mask=batch.attention_mask,
                                     names_filter=list(hook_names), stop_at_layer=stop)
        keep = batch.kept(skip_first=skip_first, exclude_token_ids=exclude_token_ids)
        room = None if max_tokens is None else max_tokens - n_kept
        for name in hook_names:
            chunks[name].append(_flat(name, cache[name])[keep][:room].float())
        n_kept += chunks[hook_names[0]][-1].shape[0]
        bar.update(batch.tokens.shape[0])
        if max_tokens is not None and n_kept >= max_tokens:
            break
    bar.close()
    if n_kept == 0:
        raise ValueError("no tokens to train on: the data is empty or every token was excluded")
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def _flat(hook_name: str, act: Tensor) -> Tensor:
    if hook_name.endswith("hook_z") and act.ndim == 4:
        return act.flatten(-2)
    if act.ndim != 3:
        raise ValueError(f"cannot train an SAE at {hook_name}: its activation has shape {tuple(act.shape)}, "
                         "not [batch, pos, d] (nor attn.hook_z)")
    return act


def _n_sequences(data: Sequence[str] | Sequence[PreferencePair] | TokenBatch) -> int:
    if isinstance(data, TokenBatch):
        return data.tokens.shape[0]
    return 2 * len(data) if data and isinstance(data[0], PreferencePair) else len(data)


def _token_batches(rm: RewardModel, data: Any, *, batch_size: int, truncate: bool) -> Iterator[TokenBatch]:
    if isinstance(data, TokenBatch):
        for start in range(0, data.tokens.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            yield TokenBatch(data.tokens[rows], data.attention_mask[rows], data.completion_start[rows])
        return
    if not data:
        raise ValueError("no data to collect activations from")
    kinds = {type(item) for item in data}
    if kinds not in ({str}, {PreferencePair}):
        names = sorted(kind.__name__ for kind in kinds)
        raise ValueError(f"data must be all texts (str) or all PreferencePair, got a mix of {names}")
    if rm.tokenizer is None:
        raise ValueError("the reward model has no tokenizer; pass one to RewardModel.from_hf(hf_model, tokenizer)")
    for start in range(0, len(data), batch_size):
        part = data[start : start + batch_size]
        if isinstance(part[0], str):
            yield encode_texts(rm.tokenizer, part, max_len=rm.cfg.n_ctx, truncate=truncate)
        else:
            pairs = encode_pairs(rm.tokenizer, part, max_len=rm.cfg.n_ctx, truncate=truncate, text_format=rm.text_format)
            yield from (pairs.chosen, pairs.rejected)


# --- 3-4. normalising and training one SAE ----------------------------------------------------


def _plan(architecture: str, n_tokens: int, *, d_sae: int, k: int | None, sparsity_coefficient: float | int | None,
          normalize_activations: str, n_epochs: float | int | None, training_tokens: int | None, batch_size: int,
          lr: float | int | None, sae_kwargs: Mapping[str, Any] | None, seed: int) -> _Plan:
    """Resolve the defaults: batch size, number of steps, ``k``, learning rate."""
    batch_size = min(batch_size, n_tokens)
    if training_tokens is None:
        training_tokens = round((10 if n_epochs is None else n_epochs) * n_tokens)
        if n_epochs is None:
            training_tokens = max(training_tokens, 1000 * batch_size)
    if architecture == "topk" and k is None:
        k = max(1, min(32, d_sae // 4))
    return _Plan(
        architecture=architecture, d_sae=d_sae, k=k,
        sparsity_coefficient=None if sparsity_coefficient is None else float(sparsity_coefficient),
        normalize_activations=normalize_activations, batch_size=batch_size,
        n_steps=max(1, training_tokens // batch_size),
        lr=2e-4 * math.sqrt(16384 / d_sae) if lr is None else float(lr),
        sae_kwargs=dict(sae_kwargs or {}), seed=seed,
    )


def _train_one(
    spec: _Architecture, plan: _Plan, x: Float[Tensor, "n_tokens d_in"], *, hook_name: str, progress: bool
) -> tuple[SAE, SAE, float | None]:
    """Fit one SAE on ``x``: the trained and the initial SAE (inference SAEs, on raw activations)
    and the sparsity coefficient used."""
    d_in, warm_up = x.shape[1], plan.n_steps // 20
    settings: dict[str, Any] = dict(
        d_in=d_in, d_sae=plan.d_sae, device="cpu", normalize_activations=plan.normalize_activations,
        reshape_activations="hook_z" if hook_name.endswith("hook_z") else "none",
        metadata=SAEMetadata(hook_name=hook_name),
    )
    coefficient = None
    if spec.coefficient is not None:
        coefficient = plan.sparsity_coefficient
        coefficient = spec.default_coefficient(d_in) if coefficient is None else coefficient
        settings |= {spec.coefficient: coefficient, spec.warm_up: warm_up}
    else:
        settings["k"] = plan.k
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.seed)  # built on the CPU, so this generator draws every weight
        sae = spec.training_sae(spec.config(**(settings | dict(spec.defaults) | plan.sae_kwargs))).to(x.device)

    trainer_cfg = SAETrainerConfig(
        total_training_samples=plan.n_steps * plan.batch_size, train_batch_size_samples=plan.batch_size,
        # SAETrainer asserts lr_end is set; the constant schedule ignores it and decays to zero
        lr=plan.lr, lr_end=plan.lr / 10, lr_warm_up_steps=warm_up, lr_decay_steps=plan.n_steps // 5,
        device=str(x.device),
        # "dead" = silent for a whole pass over the data (SAELens's 1,000 steps, if that is shorter)
        dead_feature_window=min(1000, max(1, x.shape[0] // plan.batch_size)),
        feature_sampling_window=plan.n_steps,
    )
    generator = torch.Generator(device="cpu").manual_seed(plan.seed)
    bar = tqdm(total=plan.n_steps, desc=f"training SAE {hook_name}", unit="step", disable=not progress)
    batches = _counted(_shuffled(x, plan.batch_size, generator), bar)
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches)
    with torch.no_grad():
        sae.b_dec.copy_(_preset_normalisation(trainer, x, plan.normalize_activations).to(sae.b_dec))
    initial = _inference_sae(sae, trainer)
    with _without_sae_lens_bar():
        trainer.fit()
    bar.close()
    return _inference_sae(sae), initial, coefficient


def _preset_normalisation(trainer: SAETrainer, x: Tensor, how: str) -> Tensor:
    """Give the trainer's scaler exact statistics of ``x`` (``fit`` then skips its estimate and
    folds them in at the end); return the decoder bias at the mean, in the normalised space."""
    mean = x.double().mean(0)
    centred = x.double() - mean
    if how == "expected_average_only_in":
        scale = math.sqrt(x.shape[1]) / max(float(centred.norm(dim=-1).mean()), 1e-12)
        trainer.activation_scaler.scaling_factor = scale
        return mean * scale
    if how == "covariance_whitening":
        eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / max(1, x.shape[0] - 1))
        # relative floor: directions without variance must not blow up
        eigenvalues = eigenvalues.clamp(min=0) + 1e-3 * max(float(eigenvalues.max()), 1e-12)
        trainer.activation_scaler.whitening = ActivationWhitening(
            mean=mean, matrix=eigenvectors * eigenvalues.rsqrt(),
            inverse_matrix=eigenvalues.sqrt()[:, None] * eigenvectors.T,
        )
        return torch.zeros_like(mean)  # whitened activations have mean zero
    return mean


def _shuffled(x: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless epochs of ``x`` in seeded random order; each epoch drops its ragged tail."""
    while True:
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        for start in range(0, x.shape[0] - batch_size + 1, batch_size):
            yield x[order[start : start + batch_size]]


def _counted(batches: Iterator[Tensor], bar: tqdm) -> Iterator[Tensor]:
    for batch in batches:
        bar.update(1)
        yield batch


@contextmanager
def _without_sae_lens_bar() -> Iterator[None]:
    """Silence the bar ``SAETrainer.fit`` opens: it has no switch, moves every 100 steps only and
    does not name the hook; :func:`_train_one` shows its own."""
    module = sys.modules[SAETrainer.__module__]
    original = module.tqdm
    module.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        module.tqdm = original


@torch.no_grad()
def _inference_sae(sae: TrainingSAE, trainer: SAETrainer | None = None) -> SAE:
    """In memory, the inference SAE that ``sae.save_inference_model`` writes.

    Before ``fit`` (with its ``trainer``), a copy is first folded with the trainer's
    normalisation, so that this SAE too works on raw activations.
    """
    if trainer is not None:
        sae, scaler = copy.deepcopy(sae), trainer.activation_scaler
        if scaler.scaling_factor is not None:
            sae.fold_activation_norm_scaling_factor(scaler.scaling_factor)
        if scaler.whitening is not None:
            white = scaler.whitening
            sae.fold_activation_whitening(mean=white.mean, whitening_matrix=white.matrix,
                                          unwhitening_matrix=white.inverse_matrix)
    state = {name: tensor.clone() for name, tensor in sae.state_dict().items()}
    sae.process_state_dict_for_saving_inference(state)  # e.g. TopK folds its decoder norms here
    inference = SAE.from_dict(sae.cfg.get_inference_sae_cfg_dict())
    inference.load_state_dict(state)
    return inference.to(sae.device).eval()


# --- 5. measuring and saving ------------------------------------------------------------------


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
    rm: RewardModel, data: Any, plan: _Plan, arguments: dict[str, Any], stats: pd.DataFrame
) -> dict[str, Any]:
    kind = "TokenBatch" if isinstance(data, TokenBatch) else type(data[0]).__name__
    return {
        **plan.__dict__,
        **arguments,
        "data": {"kind": kind, "n_sequences": _n_sequences(data)},
        "n_tokens": int(stats["n_tokens"].iloc[0]),
        "model": {"hf_architecture": getattr(rm, "hf_architecture", None), "d_model": rm.cfg.d_model,
                  "n_layers": rm.cfg.n_layers, "n_ctx": rm.cfg.n_ctx, "dtype": str(rm.cfg.dtype)},
        "stats": json.loads(stats.to_json(orient="index")),
        "versions": {name: _version(name) for name in ("pm-lens", "sae-lens", "transformer-lens", "torch")},
    }


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _save(saes: dict[str, SAE], config: dict[str, Any], out_dir: Path) -> None:
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
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    write_atomic(out_dir / CONFIG_FILENAME, json.dumps(config, indent=2) + "\n")

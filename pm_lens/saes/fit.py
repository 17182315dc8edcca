"""Fitting one SAE on activations held in memory, with SAELens's ``SAETrainer``.

Steps of :func:`fit_sae` (steps 3-4 of :mod:`pm_lens.saes.train`):
1. build the training SAE from the plan's seed (every weight drawn on the CPU from that seed);
2. give the trainer's activation scaler exact statistics of all the activations (scale so that
   the *centred* tokens have mean norm ``sqrt(d_in)``, or whiten), which ``fit`` folds into the
   weights when it ends, and put the decoder bias at the activation mean;
3. fit on shuffled batches drawn from the seed: learning rate warm-up (5% of steps) and linear
   decay to zero over the last 20%, sparsity penalty warm-up over the first 5% (Anthropic,
   "Circuits Updates - April 2024");
4. return the inference SAEs before and after training, both working on raw activations.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from jaxtyping import Float
from sae_lens import SAE, SAETrainer
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import SAEMetadata, TrainingSAE
from sae_lens.training.activation_scaler import ActivationWhitening
from torch import Tensor
from tqdm.auto import tqdm

from pm_lens.saes.training_plan import Architecture, Plan


@dataclass(frozen=True)
class FittedSAE:
    """What :func:`fit_sae` returns: the trained and the initial SAE (inference SAEs, on raw
    activations) and the sparsity coefficient used (None for TopK)."""

    sae: SAE
    initial: SAE
    sparsity_coefficient: float | None


def fit_sae(
    spec: Architecture, plan: Plan, x: Float[Tensor, "n_tokens d_in"], *, hook_name: str, progress: bool
) -> FittedSAE:
    """Fit one SAE on ``x`` (see the module docstring)."""
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
    return FittedSAE(sae=_inference_sae(sae), initial=initial, sparsity_coefficient=coefficient)


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
    does not name the hook; :func:`fit_sae` shows its own."""
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

"""The settings every SAE of one :func:`pm_lens.saes.train.train_saes` run is trained with.

:data:`ARCHITECTURES` says how each SAELens architecture is trained (its sparsity penalty, the
penalty's warm-up and default coefficient); :func:`check_architecture` and
:func:`check_arguments` refuse bad arguments before any work; :func:`resolve_plan` fills in the
defaults (batch size, number of steps, ``k``, learning rate) once the number of tokens is known.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

from pm_lens.model import RewardModel
from pm_lens.saes.attach import example_hooks

NORMALIZATIONS = ("expected_average_only_in", "covariance_whitening", "none")


@dataclass(frozen=True)
class Architecture:
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
ARCHITECTURES: dict[str, Architecture] = {
    "standard": Architecture(StandardTrainingSAE, StandardTrainingSAEConfig, "l1_coefficient", "l1_warm_up_steps",
                             lambda d_in: 0.2 * math.sqrt(d_in)),
    "topk": Architecture(TopKTrainingSAE, TopKTrainingSAEConfig),
    "jumprelu": Architecture(JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, "l0_coefficient", "l0_warm_up_steps",
                             lambda d_in: 0.005 * d_in, {"jumprelu_sparsity_loss_mode": "tanh"}),
    "gated": Architecture(GatedTrainingSAE, GatedTrainingSAEConfig, "l1_coefficient", "l1_warm_up_steps",
                          lambda d_in: 0.2 * math.sqrt(d_in)),
}


@dataclass(frozen=True)
class Plan:
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


def check_architecture(architecture: str, *, k: int | None, sparsity_coefficient: float | int | None,
                       sae_kwargs: Mapping[str, Any] | None) -> Architecture:
    """The table entry of ``architecture``, once the arguments that depend on it are valid."""
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


def check_arguments(rm: RewardModel, hook_names: Sequence[str], *, d_sae: int, k: int | None,
                    normalize_activations: str, n_epochs: float | int | None, training_tokens: int | None,
                    batch_size: int, max_tokens: int | None, lr: float | int | None) -> None:
    """Refuse bad hook names and budget before any activation is collected."""
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


def resolve_plan(architecture: str, n_tokens: int, *, d_sae: int, k: int | None,
                 sparsity_coefficient: float | int | None, normalize_activations: str,
                 n_epochs: float | int | None, training_tokens: int | None, batch_size: int,
                 lr: float | int | None, sae_kwargs: Mapping[str, Any] | None, seed: int) -> Plan:
    """Resolve the defaults: batch size, number of steps, ``k``, learning rate."""
    batch_size = min(batch_size, n_tokens)
    if training_tokens is None:
        training_tokens = round((10 if n_epochs is None else n_epochs) * n_tokens)
        if n_epochs is None:
            training_tokens = max(training_tokens, 1000 * batch_size)
    if architecture == "topk" and k is None:
        k = max(1, min(32, d_sae // 4))
    return Plan(
        architecture=architecture, d_sae=d_sae, k=k,
        sparsity_coefficient=None if sparsity_coefficient is None else float(sparsity_coefficient),
        normalize_activations=normalize_activations, batch_size=batch_size,
        n_steps=max(1, training_tokens // batch_size),
        lr=2e-4 * math.sqrt(16384 / d_sae) if lr is None else float(lr),
        sae_kwargs=dict(sae_kwargs or {}), seed=seed,
    )

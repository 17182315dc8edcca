"""The attribution and ablation formulas: small pure functions over tensors (no model, no I/O).

An SAE splits the activation at its hook into nodes: ``x = decode(acts) + error``, and moving
feature ``i`` from ``a`` to ``b`` moves ``x`` by ``scale * (b - a) * directions[i]`` (the SAE's own
decoder map, :mod:`pm_lens.saes.split`: ``directions`` is ``W_dec`` or its unit rows, ``scale`` a
per-token factor, 1 unless the SAE normalises per token). Removing a node means moving it to its
baseline (a feature to ``baseline``, the error to 0), which moves the activation by a *delta*; the effect of that delta on the reward, to first order, is the
gradient of the reward with respect to the hook's output dotted with the delta. This is
attribution patching (Nanda 2023; Syed et al. 2023, "Attribution Patching Outperforms Automated
Circuit Discovery"); with the gradient averaged along the straight path from the activation to the
fully removed one it is integrated gradients (Sundararajan et al. 2017), as used for SAE features
with error nodes by Marks et al. 2024, "Sparse Feature Circuits".
"""

from __future__ import annotations

from jaxtyping import Bool, Float
from torch import Tensor

# What is attributed, as weights of (r(chosen), r(rejected)): "sum" is a feature's effect on the
# reward of every completion it fires in, whichever side that is.
TARGETS = {"chosen": (1, 0), "rejected": (0, 1), "margin": (1, -1), "sum": (1, 1)}


def target_of(chosen: Tensor, rejected: Tensor, target: str) -> Tensor:
    """Combine per-side values into ``target`` (a key of :data:`TARGETS`)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {tuple(TARGETS)}, got {target!r}")
    weight_chosen, weight_rejected = TARGETS[target]
    return weight_chosen * chosen + weight_rejected * rejected


def node_effects(
    grad: Float[Tensor, "batch pos d_in"],
    acts: Float[Tensor, "batch pos d_sae"],
    baseline: Float[Tensor, " d_sae"],
    directions: Float[Tensor, "d_sae d_in"],
    error: Float[Tensor, "batch pos d_in"],
    scale: Float[Tensor, "batch pos 1"],
) -> tuple[Float[Tensor, "batch pos d_sae"], Float[Tensor, "batch pos"]]:
    """Estimated effect on the reward of removing each feature and the error node, per position.

    ``grad`` is d(reward)/d(hook output) (at the activation for AtP, averaged along the path for
    IG). A feature's effect is ``(grad @ directions[i]) * scale * (baseline[i] - acts[..., i])``;
    the error node's is ``grad . (0 - error)``. Where the reward is linear in the hook output this
    is the exact effect.
    """
    feature = (grad @ directions.T) * ((baseline - acts) * scale)
    error_effect = -(grad * error).sum(-1)
    return feature, error_effect


def removal_delta(
    acts: Float[Tensor, "batch pos d_sae"],
    baseline: Float[Tensor, " d_sae"],
    directions: Float[Tensor, "d_sae d_in"],
    error: Float[Tensor, "batch pos d_in"],
    scale: Float[Tensor, "batch pos 1"],
    mask: Bool[Tensor, "batch pos"],
) -> Float[Tensor, "batch pos d_in"]:
    """The change of the hook's activation when *every* node (features and error) is removed at
    the positions in ``mask``: from ``x`` to the decoded baseline."""
    delta = ((baseline - acts) * scale) @ directions - error
    return delta * mask[..., None]


def feature_delta(
    acts: Float[Tensor, "batch pos"],
    baseline: Float[Tensor, ""] | float,
    direction: Float[Tensor, " d_in"],
    scale: Float[Tensor, "batch pos 1"],
    mask: Bool[Tensor, "batch pos"],
) -> Float[Tensor, "batch pos d_in"]:
    """The change of the activation when one feature (direction ``direction``) is moved from
    ``acts`` to ``baseline`` at the positions in ``mask``."""
    return ((baseline - acts) * mask)[..., None] * scale * direction


def features_delta(
    acts: Float[Tensor, "batch pos n"],
    baseline: Float[Tensor, " n"],
    directions: Float[Tensor, "n d_in"],
    scale: Float[Tensor, "batch pos 1"],
    mask: Bool[Tensor, "batch pos"],
) -> Float[Tensor, "batch pos d_in"]:
    """The change of the activation when ``n`` features (their activations, baselines and
    directions) are moved to their baselines together at the positions in ``mask``."""
    return ((baseline - acts) * scale * mask[..., None]) @ directions


def error_delta(error: Float[Tensor, "batch pos d_in"], mask: Bool[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_in"]:
    """The change of the activation when the error node is removed (set to 0) at ``mask``."""
    return -error * mask[..., None]

"""How an SAE splits the activation at its hook into feature nodes and an error node.

SAELens splices an SAE in as ``decode(encode(x)) + error`` with ``error = x - decode(encode(x))``.
Attribution and ablation need, for every feature, how the activation moves when that feature's
activation moves from ``a`` to ``b`` with everything else held: ``decode(acts with a_i := b) -
decode(acts)``, exactly what SAELens's own splice does when feature ``i`` is patched. Every SAE
pm_lens accepts decodes affinely per token,

    decode(acts) = scale * (acts @ directions + b_dec) + shift      (then reshaped for hook_z)

so moving feature ``i`` from ``a`` to ``b`` moves the (flattened) activation by
``scale * (b - a) * directions[i]``. From SAELens 6.54's ``decode`` methods:

- ``directions`` is ``W_dec``, except for top-k SAEs with ``rescale_acts_by_decoder_norm=True``,
  which decode ``acts / |W_dec[i]|``: their directions are ``W_dec[i] / |W_dec[i]|``;
- ``scale`` is per token: 1, except with ``normalize_activations="constant_norm_rescale"``
  (``|x| / sqrt(d_in)``) and ``"layer_norm"`` (the standard deviation of ``x`` over ``d_in``),
  both read from the activation the SAE encoded (``shift`` is ``layer_norm``'s mean);
- encoder-side options (``apply_b_dec_to_input``, JumpReLU thresholds, gated and magnitude paths,
  top-k, matching pursuit) decide which features fire and how strongly, never this map;
- an ``attn.hook_z`` SAE with ``reshape_activations="hook_z"`` reads ``[..., n_heads, d_head]``
  flattened to ``n_heads * d_head``; nodes are kept flat and deltas reshaped back.

:func:`check_sae` refuses what this does not model (transcoders, temporal SAEs, non-finite weights,
a hook_z SAE without reshaping), warns about normalisations SAELens does not apply at inference, and
verifies the map against the SAE's own ``decode`` on random activations, so an SAE whose decoder
is of another form is refused instead of being split wrongly.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor

# Not a split of one hook's activation: transcoders read one hook and write another; a temporal
# SAE's features depend on earlier positions and its output adds codes predicted from them.
UNSUPPORTED = {
    "Transcoder": "a transcoder reads one hook and writes another, so it is not a split of one activation",
    "TemporalSAE": "its features depend on earlier positions and its output adds codes predicted from them",
}
# Normalisations SAELens does not apply at inference: an SAE whose config still names one reads
# the raw activation, which is not what it was trained on unless the scaling was folded in.
NOT_APPLIED = ("expected_average_only_in", "covariance_whitening")
MODELLED_NORMALISATIONS = ("none", "constant_norm_rescale", "layer_norm")


@dataclass(frozen=True)
class SAENodes:
    """One hook's activation split by its SAE.

    ``x == decode(acts) + error`` (flattened to ``d_in``), and moving feature ``i`` from ``a`` to
    ``b`` at a token moves ``x`` there by ``scale * (b - a) * directions(sae)[i]``.
    """

    x: Float[Tensor, "*tokens d_in"]
    acts: Float[Tensor, "*tokens d_sae"]
    error: Float[Tensor, "*tokens d_in"]
    scale: Float[Tensor, "*tokens 1"]


def reshapes(sae: SAE) -> bool:
    """Whether the SAE reads ``[..., n_heads, d_head]`` and flattens it (``hook_z`` reshaping)."""
    return bool(getattr(sae, "hook_z_reshaping_mode", False))


def flat(sae: SAE, act: Tensor) -> Float[Tensor, "*tokens d_in"]:
    """The activation as the SAE reads it: ``[..., n_heads, d_head]`` flattened for hook_z SAEs."""
    return act.flatten(-2) if reshapes(sae) else act


def directions(sae: SAE) -> Float[Tensor, "d_sae d_in"]:
    """Each feature's direction in the (flattened) activation, per unit of its activation."""
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        return sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
    return sae.W_dec


def decoder_scale(sae: SAE, x: Float[Tensor, "*tokens d_in"]) -> Float[Tensor, "*tokens 1"]:
    """The per-token factor SAELens's decode multiplies the decoded features by (see the module
    docstring), from the flattened activation ``x`` the SAE encoded."""
    mode = sae.cfg.normalize_activations
    x = x.to(sae.dtype)
    if mode == "constant_norm_rescale":
        return x.norm(dim=-1, keepdim=True) / sae.cfg.d_in**0.5
    if mode == "layer_norm":
        return (x - x.mean(dim=-1, keepdim=True)).std(dim=-1, keepdim=True)
    return torch.ones_like(x[..., :1])


def encode(sae: SAE, act: Tensor) -> Float[Tensor, "*tokens d_sae"]:
    """Feature activations of ``act``, given in the hook's own layout."""
    return sae.encode(act)


def split(sae: SAE, act: Tensor) -> SAENodes:
    """Split ``act`` (the hook's activation, in the hook's own layout) into the SAE's nodes."""
    x = flat(sae, act)
    acts = sae.encode(act)
    error = x - flat(sae, sae.decode(acts))
    return SAENodes(x=x, acts=acts, error=error, scale=decoder_scale(sae, x))


def check_sae(sae: SAE, act_shape: Sequence[int], *, name: str | None = None) -> None:
    """Raise a ValueError if pm_lens cannot split ``sae``'s activation into per-feature nodes
    exactly as SAELens's splice would, for an activation whose trailing shape is ``act_shape``
    (``(d,)``, or ``(n_heads, d_head)`` for attention hooks).

    Checks, in order: the SAE kind, finite weights, the width (and hook_z reshaping), then the
    decoder map of the module docstring against the SAE's own ``decode`` on random activations.
    Warns when the config names a normalisation SAELens does not apply at inference.
    """
    name = name or sae.cfg.metadata.hook_name
    kind = next((k for k in UNSUPPORTED if any(c.__name__.startswith(k) for c in type(sae).__mro__)), None)
    if kind is not None:
        raise ValueError(f"the SAE for {name} is a {type(sae).__name__}: {UNSUPPORTED[kind]}; pm_lens supports SAEs "
                         "that read and write the same hook (standard, gated, JumpReLU, top-k, matching pursuit)")
    bad = [param for param, value in sae.named_parameters() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise ValueError(f"the SAE for {name} has NaN or infinite weights in {', '.join(bad)}")
    _check_width(sae, tuple(act_shape), name)
    mode = sae.cfg.normalize_activations
    if mode in NOT_APPLIED:
        warnings.warn(
            f"the SAE for {name} says normalize_activations={mode!r}, which SAELens does not apply at inference: "
            "its features read the raw activation. If it was trained on normalised activations, fold the "
            "normalisation into its weights first (sae.fold_activation_norm_scaling_factor(...) or "
            "sae.fold_activation_whitening(...))", stacklevel=3)
    elif mode not in MODELLED_NORMALISATIONS:
        raise ValueError(f"the SAE for {name} has normalize_activations={mode!r}; pm_lens models "
                         f"{', '.join(map(repr, MODELLED_NORMALISATIONS + NOT_APPLIED))}")
    _verify_decoder(sae, tuple(act_shape), name)


def _check_width(sae: SAE, act_shape: tuple[int, ...], name: str) -> None:
    width = act_shape[-1]
    if len(act_shape) == 2:  # attention hooks: [n_heads, d_head]
        width = act_shape[0] * act_shape[1]
        if not reshapes(sae):
            if sae.cfg.d_in == width:
                raise ValueError(
                    f"the SAE for {name} reads n_heads x d_head = {width} values but does not reshape the hook's "
                    f"[n_heads={act_shape[0]}, d_head={act_shape[1]}] activation: set reshape_activations='hook_z' "
                    "in its config (or call sae.turn_on_forward_pass_hook_z_reshaping()) so SAELens flattens it")
            raise ValueError(f"the SAE for {name} has d_in={sae.cfg.d_in}, but the activation there is "
                             f"[n_heads={act_shape[0]}, d_head={act_shape[1]}] (n_heads x d_head = {width})")
    elif reshapes(sae):
        raise ValueError(f"the SAE for {name} reshapes hook_z activations (reshape_activations='hook_z'), but the "
                         f"activation at {name} is not per head (width {width})")
    if sae.cfg.d_in != width:
        raise ValueError(f"the SAE for {name} has d_in={sae.cfg.d_in}, but the activation there has width {width}")


@torch.no_grad()
def _verify_decoder(sae: SAE, act_shape: tuple[int, ...], name: str) -> None:
    """Check ``decode(A) - decode(0) == scale * (A @ directions)`` for random activations ``x``
    (which set any per-token normalisation) and random feature activations ``A``."""
    generator = torch.Generator().manual_seed(0)
    n_tokens, device, dtype = 4, sae.W_dec.device, sae.W_dec.dtype
    act = torch.randn((n_tokens, *act_shape), generator=generator).to(device, dtype)
    moved = torch.zeros(n_tokens, sae.cfg.d_sae)
    columns = torch.randint(sae.cfg.d_sae, (n_tokens, 8), generator=generator)
    moved.scatter_(1, columns, torch.rand(n_tokens, 8, generator=generator) + 0.5)
    moved = moved.to(device, dtype)

    def decoded(feature_acts: Tensor) -> Tensor:
        sae.encode(act)  # sets the per-token normalisation state decode reads
        return flat(sae, sae.decode(feature_acts)).float()

    got = decoded(moved) - decoded(torch.zeros_like(moved))
    expected = (decoder_scale(sae, flat(sae, act)) * (moved @ directions(sae))).float()
    size = expected.abs().max() + decoded(torch.zeros_like(moved)).abs().max()
    tolerance = 64 * torch.finfo(dtype).eps * float(size) + 1e-6
    if not torch.allclose(got, expected, rtol=0, atol=tolerance):
        error = float((got - expected).abs().max())
        raise ValueError(
            f"pm_lens cannot split the SAE for {name} ({type(sae).__name__}) into per-feature directions: its decode "
            f"is not scale * (acts @ directions) + offset as modelled (max difference {error:.3g} on random inputs); "
            "attribution and ablation would be wrong, so it is refused")

"""Attaching SAELens SAEs to a reward model, at several hook points at once.

Each SAE is spliced in at its hook point (``sae.cfg.metadata.hook_name``) with SAELens's
``add_sae``. With the error term (the default) the hook's output is ``SAE(x) + (x - SAE(x))``,
so the reward is unchanged while every feature becomes a node one can read, hook and ablate; the
error is computed without gradient from a clean re-encode, so gradients reach the features.

While an SAE is attached its hook point is replaced: ``blocks.N.hook_resid_post`` is no longer a
hook name; its children are ``...hook_sae_input``, ``...hook_sae_acts_post``,
``...hook_sae_error`` and ``...hook_sae_output``.

SAELens's ``add_sae`` only logs a warning for an unknown hook name and never checks widths;
:func:`attach_saes` checks everything first and raises a ValueError that names the problem.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor

from pm_lens.model import RewardModel
from pm_lens.saes.split import check_sae

FEATURE_HOOK = "hook_sae_acts_post"


def hook_shapes(rm: RewardModel, hook_names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """The trailing shape of the activation at each hook: ``(d,)``, or ``(n_heads, d_head)`` for
    per-head hooks such as ``attn.hook_z`` (see ``RewardModel.hook_shapes``). Raises a ValueError
    for names that are not hook points, listing some that are."""
    unknown = [name for name in hook_names if name not in rm.hook_dict]
    if unknown:
        raise ValueError(f"unknown hook name(s) {unknown}; valid ones look like {example_hooks(rm)}")
    return rm.hook_shapes(hook_names)


def stop_layer(rm: RewardModel, hook_names: Sequence[str]) -> int | None:
    """One past the last block any hook needs (see ``RewardModel.stop_layer``)."""
    return rm.stop_layer(hook_names)


def example_hooks(rm: RewardModel) -> list[str]:
    last = rm.cfg.n_layers - 1
    names = ["blocks.0.hook_resid_pre", f"blocks.{last}.hook_resid_post", f"blocks.{last}.hook_mlp_out",
             f"blocks.{last}.attn.hook_z", f"blocks.{last}.mlp.hook_post"]
    return [name for name in names if name in rm.hook_dict]


def check_saes(rm: RewardModel, saes: Sequence[SAE]) -> None:
    """Raise a ValueError if any SAE cannot be attached to ``rm`` or split into nodes: not an SAE,
    no or unknown hook name, several SAEs for one hook, an SAE already attached there, another
    dtype or device (with the layers split: not on its hook's device), or what :func:`pm_lens.saes.split.check_sae` refuses (width, kind, weights)."""
    not_saes = [type(sae).__name__ for sae in saes if not isinstance(sae, SAE)]
    if not_saes:
        raise TypeError(f"expected SAELens SAE objects, got {', '.join(not_saes)}; load one with pm_lens.load_sae(...)")
    names = [sae.cfg.metadata.hook_name for sae in saes]
    if None in names:
        raise ValueError("an SAE has no hook name: set it in its config (SAEMetadata(hook_name=...))")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"several SAEs for the same hook point(s) {duplicates}; give one SAE per hook")
    attached = [name for name in names if name in rm.acts_to_saes]
    if attached:
        raise ValueError(f"an SAE is already attached at {attached}; detach it first (detach_saes)")
    shapes = hook_shapes(rm, names)
    param = next(rm.parameters())
    for sae, name in zip(saes, names):
        if sae.W_dec.dtype != param.dtype:
            raise ValueError(f"SAE for {name} is {sae.W_dec.dtype} but the model is {param.dtype}; use sae.to({param.dtype})")
        device = rm.device_of(name)
        if sae.W_dec.device != device:
            where = "the model is" if rm.layer_split is None else "that hook's layer is"
            raise ValueError(f"SAE for {name} is on {sae.W_dec.device} but {where} on {device}; use sae.to('{device}')")
        check_sae(sae, shapes[name], name=name)


def place_saes(rm: RewardModel, saes: SAE | Sequence[SAE]) -> list[SAE]:
    """Move each SAE to the device of its hook's activation (``rm.device_of``): ``cfg.device``, or
    with the model's layers split over devices, its layer's device. Returns the SAEs (moved in place)."""
    saes = [saes] if isinstance(saes, SAE) else list(saes)
    return [sae.to(rm.device_of(sae.cfg.metadata.hook_name)) for sae in saes]


def attach_saes(
    rm: RewardModel,
    saes: SAE | Sequence[SAE],
    *,
    use_error_term: bool = True,
    exclude_token_ids: Sequence[int] = (),
) -> None:
    """Splice ``saes`` into ``rm`` at their hook points (permanently, until :func:`detach_saes`).

    With ``use_error_term`` (default) rewards are unchanged; without it the SAE reconstruction
    replaces the activation. At tokens in ``exclude_token_ids`` the SAEs are bypassed (the
    activation passes through untouched and :func:`feature_acts` reads 0 there), e.g. a start
    token that carries a massive activation.
    """
    saes = [saes] if isinstance(saes, SAE) else list(saes)
    if not saes:
        raise ValueError("no SAEs to attach")
    check_saes(rm, saes)
    for sae in saes:
        rm.add_sae(sae, use_error_term=use_error_term, exclude_special_tokens=list(exclude_token_ids) or False)


def detach_saes(rm: RewardModel, hook_names: str | Sequence[str] | None = None) -> None:
    """Remove the SAEs at ``hook_names`` (all of them by default), restoring the hook points."""
    rm.reset_saes(hook_names if hook_names is None or isinstance(hook_names, str) else list(hook_names))


@contextmanager
def saes_attached(
    rm: RewardModel,
    saes: SAE | Sequence[SAE],
    *,
    use_error_term: bool = True,
    exclude_token_ids: Sequence[int] = (),
) -> Iterator[RewardModel]:
    """Attach ``saes`` for the duration of a ``with`` block, then restore the model exactly
    (see :func:`attach_saes` for the arguments)."""
    saes = [saes] if isinstance(saes, SAE) else list(saes)
    attach_saes(rm, saes, use_error_term=use_error_term, exclude_token_ids=exclude_token_ids)
    try:
        yield rm
    finally:
        detach_saes(rm, [sae.cfg.metadata.hook_name for sae in saes])


@contextmanager
def saes_detached(rm: RewardModel) -> Iterator[dict[str, SAE]]:
    """Detach every spliced SAE for the duration of a ``with`` block (yielding them by hook name),
    then splice them back as they were (error term and excluded tokens included)."""
    spliced = dict(rm._acts_to_saes)
    if spliced:
        detach_saes(rm)
    try:
        yield {name: wrapper.sae for name, wrapper in spliced.items()}
    finally:
        for wrapper in spliced.values():
            attach_saes(rm, wrapper.sae, use_error_term=wrapper.use_error_term,
                        exclude_token_ids=wrapper.exclude_special_tokens or ())


def attached_saes(rm: RewardModel) -> dict[str, SAE]:
    """The SAEs attached to ``rm``, by hook name."""
    return dict(rm.acts_to_saes)


def feature_acts(
    rm: RewardModel,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> dict[str, Float[Tensor, "batch pos d_sae"]]:
    """Feature activations of every attached SAE at every position, by hook name.

    Padding positions (``attention_mask`` 0) and tokens the SAE is bypassed at
    (``exclude_token_ids`` of :func:`attach_saes`) read 0.
    """
    names = list(rm.acts_to_saes)
    if not names:
        raise ValueError("no SAEs are attached; use attach_saes(rm, saes) first")
    with torch.no_grad():
        _, cache = rm.run_with_cache(
            tokens, attention_mask=attention_mask, names_filter=[f"{name}.{FEATURE_HOOK}" for name in names],
            stop_at_layer=stop_layer(rm, names),
        )
    keep = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    acts = {}
    for name in names:
        excluded = rm._acts_to_saes[name].exclude_special_tokens
        name_keep = keep & ~torch.isin(tokens, torch.tensor(excluded, device=tokens.device)) if excluded else keep
        found = cache[f"{name}.{FEATURE_HOOK}"]  # on the hook's device when the layers are split
        acts[name] = found * name_keep.to(found.device)[..., None]
    return acts

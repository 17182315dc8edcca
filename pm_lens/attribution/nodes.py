"""The SAE nodes at each hook, read from a clean run: activations, features, error.

This is where attribution and ablation meet the model: :func:`run_with_deltas` runs the reward
model with hooks that add a delta to chosen hook activations (and can expose the gradient of the
reward with respect to each hook's output); :func:`read_nodes` splits each hook's activation into
SAE features and the error node. SAEs are *not* spliced into the model: with the error term an SAE
is the identity, so the plain model computes the same thing, and gradients then reach upstream
hooks through the model itself (each hook is the identity for the gradient, as in Marks et al.).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from sae_lens import SAE
from torch import Tensor

from pm_lens.data import TokenBatch
from pm_lens.model import RewardModel
from pm_lens.saes.attach import attach_saes, attached_saes, check_saes, detach_saes
from pm_lens.saes.split import SAENodes, split


Nodes = SAENodes  # one hook's activation split by its SAE (see pm_lens.saes.split)


def resolve_saes(rm: RewardModel, saes: SAE | Iterable[Any] | Mapping[str, Any] | None) -> dict[str, SAE]:
    """The SAEs to use, by hook name: the given ones (one SAE, a list, or a dict by hook name),
    else those attached to ``rm``. Several SAEs for one hook are refused."""
    if saes is None:
        found = attached_saes(rm)
        if not found:
            raise ValueError("no SAEs: pass saes=[...] or attach them first with pm_lens.saes.attach_saes")
        return found
    if isinstance(saes, Mapping):
        saes = list(saes.values())
    elif isinstance(saes, SAE):
        saes = [saes]
    elif isinstance(saes, (str, bytes)) or not isinstance(saes, Iterable):
        raise TypeError(f"saes must be an SAE or a list of SAEs, got {type(saes).__name__}")
    saes = list(saes)
    if not saes:
        raise ValueError("no SAEs: saes is empty")
    not_saes = [type(sae).__name__ for sae in saes if not isinstance(sae, SAE)]
    if not_saes:
        raise TypeError(f"saes must be SAELens SAE objects, got {', '.join(not_saes)}; load one with pm_lens.load_sae(...)")
    names = [sae.cfg.metadata.hook_name for sae in saes]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"several SAEs for the same hook point(s) {duplicates}; give one SAE per hook")
    return dict(zip(names, saes))


@contextmanager
def plain_model(rm: RewardModel, saes: Mapping[str, SAE]) -> Iterator[None]:
    """Run on the bare model: detach any spliced SAEs for the duration, then restore them.

    Also checks that the SAEs fit the model, and turns off parameter gradients (attribution
    needs gradients with respect to activations only)."""
    spliced = {name: rm._acts_to_saes[name] for name in rm.acts_to_saes}
    if spliced:
        detach_saes(rm)
    requires_grad = [p.requires_grad for p in rm.parameters()]
    try:
        check_saes(rm, list(saes.values()))
        for param in rm.parameters():
            param.requires_grad_(False)
        yield
    finally:
        for param, flag in zip(rm.parameters(), requires_grad):
            param.requires_grad_(flag)
        for wrapper in spliced.values():
            attach_saes(rm, wrapper.sae, use_error_term=wrapper.use_error_term,
                        exclude_token_ids=wrapper.exclude_special_tokens or ())


def read_nodes(saes: Mapping[str, SAE], xs: Mapping[str, Tensor]) -> dict[str, Nodes]:
    """Split each hook's activation (in the hook's layout) into its SAE's nodes (no gradient)."""
    with torch.no_grad():
        return {name: split(sae, xs[name]) for name, sae in saes.items()}


def run_with_deltas(
    rm: RewardModel,
    batch: TokenBatch,
    hook_names: Sequence[str],
    *,
    deltas: Mapping[str, Tensor | Callable[[Tensor], Tensor]] | None = None,
    with_grad: bool = False,
    residual: Tensor | None = None,
    start_at_layer: int | None = None,
    rows: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """Run the reward model, adding ``deltas[hook]`` to the activation at each hook.

    A delta is a tensor, or a function of the activation as it arrives in this run (for removals
    that depend on what earlier hooks changed), flat (``[..., d_in]``) or in the hook's layout.

    Returns the rewards ``[batch]``, the activation at every hook in ``hook_names`` (after its
    delta), and, with ``with_grad``, d(sum of rewards)/d(hook output) for each hook. With
    ``residual`` and ``start_at_layer`` the forward starts there instead of at the tokens; its
    rows are the batch rows ``rows`` (default: all), in that order, repeats allowed.
    """
    deltas = deltas or {}
    seen: dict[str, Tensor] = {}
    leaves: dict[str, Tensor] = {}

    def hook_fn(act: Tensor, hook) -> Tensor:  # noqa: ANN001
        if hook.name in deltas:
            delta = deltas[hook.name]
            # Deltas are flat ([..., d_in]); per-head activations are [..., n_heads, d_head].
            act = act + (delta(act) if callable(delta) else delta).reshape(act.shape)
        seen[hook.name] = act.detach()
        if with_grad:
            leaves[hook.name] = torch.zeros_like(act, requires_grad=True)
            act = act + leaves[hook.name]
        return act

    names = sorted(set(hook_names) | set(deltas))
    tokens, mask = batch.tokens, batch.attention_mask
    with torch.set_grad_enabled(with_grad), rm.hooks(fwd_hooks=[(name, hook_fn) for name in names]):
        if residual is None:
            rewards = rm.reward(tokens, mask)
        else:
            mask = mask if rows is None else mask[rows]
            per_position = rm(residual, start_at_layer=start_at_layer, attention_mask=mask)[..., 0]
            last = mask.sum(-1) - 1  # right padding
            rewards = per_position.gather(1, last[:, None])[:, 0]
        grads = {}
        if with_grad:
            wanted = [name for name in hook_names if name in leaves]
            grads = dict(zip(wanted, torch.autograd.grad(rewards.sum(), [leaves[n] for n in wanted])))
    return rewards.detach(), {n: seen[n] for n in hook_names if n in seen}, grads


def hook_layer(hook_name: str) -> int | None:
    """The block a hook belongs to (``blocks.L.…`` → L), or None for embedding hooks."""
    parts = hook_name.split(".")
    return int(parts[1]) if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit() else None

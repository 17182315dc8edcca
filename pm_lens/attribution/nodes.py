"""The SAE nodes at each hook, read from a clean run: activations, features, error.

This is where attribution and ablation meet the model: :func:`run_with_deltas` runs the reward
model with hooks that add a delta to chosen hook activations (and can expose the gradient of the
reward with respect to each hook's output); :func:`read_nodes` splits each hook's activation into
SAE features and the error node. SAEs are *not* spliced into the model: with the error term an SAE
is the identity, so the plain model computes the same thing, and gradients then reach upstream
hooks through the model itself (each hook is the identity for the gradient, as in Marks et al.).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor

from pm_lens.data import TokenBatch
from pm_lens.model import RewardModel
from pm_lens.saes.attach import attach_saes, attached_saes, check_saes, detach_saes


@dataclass(frozen=True)
class Nodes:
    """One hook's activation split by its SAE: ``x = acts @ W_dec + b_dec + error``."""

    x: Float[Tensor, "batch pos d_in"]
    acts: Float[Tensor, "batch pos d_sae"]
    error: Float[Tensor, "batch pos d_in"]


def resolve_saes(rm: RewardModel, saes: SAE | Sequence[SAE] | None) -> dict[str, SAE]:
    """The SAEs to use, by hook name: the given ones, else those attached to ``rm``."""
    if saes is None:
        found = attached_saes(rm)
        if not found:
            raise ValueError("no SAEs: pass saes=[...] or attach them first with pm_lens.saes.attach_saes")
        return found
    saes = [saes] if isinstance(saes, SAE) else list(saes)
    if not saes:
        raise ValueError("no SAEs: saes is empty")
    by_hook = {sae.cfg.metadata.hook_name: sae for sae in saes}
    for name, sae in by_hook.items():
        if getattr(sae.cfg, "normalize_activations", "none") != "none" or getattr(sae, "hook_z_reshaping_mode", False):
            raise ValueError(
                f"SAE for {name} normalises or reshapes its input ({sae.cfg.normalize_activations!r}); "
                "attribution needs a decoder linear in the features: fold the normalisation first"
            )
    return by_hook


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
    """Encode each hook's activation with its SAE (no gradient)."""
    nodes = {}
    with torch.no_grad():
        for name, sae in saes.items():
            x = xs[name]
            acts = sae.encode(x)
            nodes[name] = Nodes(x=x, acts=acts, error=x - sae.decode(acts))
    return nodes


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
    that depend on what earlier hooks changed).

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
            act = act + (delta(act) if callable(delta) else delta)
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

"""The SAEs a stage works with, and the split of each hook's activation into their nodes.

Attribution and ablation run the *plain* model (``RewardModel.run_with_deltas``) and add deltas at
the SAE hooks: with the error term an SAE is the identity, so the plain model computes the same
thing, and gradients reach upstream hooks through the model itself (each hook is the identity for
the gradient, as in Marks et al.). :func:`plain_model` detaches spliced SAEs for the duration;
:func:`read_nodes` splits each hook's activation into SAE features and the error node.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from sae_lens import SAE
from torch import Tensor

from pm_lens.model import RewardModel
from pm_lens.saes.attach import attached_saes, check_saes, saes_detached
from pm_lens.saes.split import SAENodes, split


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
    requires_grad = [p.requires_grad for p in rm.parameters()]
    with saes_detached(rm):
        try:
            check_saes(rm, list(saes.values()))
            for param in rm.parameters():
                param.requires_grad_(False)
            yield
        finally:
            for param, flag in zip(rm.parameters(), requires_grad):
                param.requires_grad_(flag)


def read_nodes(saes: Mapping[str, SAE], xs: Mapping[str, Tensor]) -> dict[str, SAENodes]:
    """Split each hook's activation (in the hook's layout) into its SAE's nodes (no gradient)."""
    with torch.no_grad():
        return {name: split(sae, xs[name]) for name, sae in saes.items()}

"""Which token positions an attribution or ablation acts on.

- ``"all"``: every real (non-pad) token;
- ``"completion"``: the completion's tokens only (from ``TokenBatch.completion_start``);
- ``"diverge"``: from the first token where the chosen and the rejected sequence differ, as the
  original study did (for a single text, the same as ``"completion"``).

``skip_first`` also leaves out each sequence's first token (a start token whose residual norm is
orders of magnitude larger than the others in some models wrecks SAEs and attributions alike).
"""

from __future__ import annotations

import torch
from jaxtyping import Bool
from torch import Tensor

from pm_lens.data import PairBatch, TokenBatch

POSITIONS = ("all", "completion", "diverge")


def check_positions(positions: str) -> None:
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")


def position_mask(batch: TokenBatch, positions: str, *, start: Tensor | None = None, skip_first: bool = False) -> Bool[Tensor, "batch pos"]:
    """Boolean ``[batch, pos]`` mask of the positions to act on (right-padded batches).

    ``start`` overrides the first position per row (used for ``"diverge"``).
    """
    check_positions(positions)
    mask = batch.attention_mask.bool()
    index = torch.arange(mask.shape[1], device=mask.device)
    if positions == "completion" or (positions == "diverge" and start is None):
        mask = mask & (index >= batch.completion_start[:, None])
    elif positions == "diverge":
        mask = mask & (index >= start[:, None])
    if skip_first:
        mask = mask & (index > 0)
    return mask


def divergence(pair_batch: PairBatch) -> Tensor:
    """Per pair, the first position where the chosen and rejected token ids differ
    (right-padded; the shorter length when one is a prefix of the other)."""
    chosen, rejected = pair_batch.chosen, pair_batch.rejected
    width = min(chosen.tokens.shape[1], rejected.tokens.shape[1])
    same = (chosen.tokens[:, :width] == rejected.tokens[:, :width]) & chosen.attention_mask[:, :width].bool()
    same &= rejected.attention_mask[:, :width].bool()
    # cumprod keeps 1 only while every earlier position matched.
    return same.long().cumprod(dim=1).sum(dim=1)


def pair_masks(pair_batch: PairBatch, positions: str, *, skip_first: bool = False) -> tuple[Tensor, Tensor]:
    """Position masks of the chosen and the rejected side of a batch of pairs."""
    start = divergence(pair_batch) if positions == "diverge" else None
    return (
        position_mask(pair_batch.chosen, positions, start=start, skip_first=skip_first),
        position_mask(pair_batch.rejected, positions, start=start, skip_first=skip_first),
    )

"""Batching pairs under a token budget, in order, right-padded and trimmed per batch."""

from __future__ import annotations

from collections.abc import Sequence

from pm_lens.data import PairBatch, PreferencePair, TokenBatch, encode_pairs
from pm_lens.model import RewardModel


def pair_batches(
    rm: RewardModel, pairs: Sequence[PreferencePair], *, batch_tokens: int = 4096, truncate: bool = False
) -> list[PairBatch]:
    """Consecutive batches of ``pairs`` whose padded size (rows x longest side) stays within
    ``batch_tokens`` (a single pair may exceed it). Raises a ValueError if the model has no
    tokenizer or a pair does not fit the context (unless ``truncate``)."""
    if rm.tokenizer is None:
        raise ValueError("the reward model has no tokenizer; pass one to RewardModel.from_hf(hf_model, tokenizer)")
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
    encoded = encode_pairs(rm.tokenizer, pairs, max_len=rm.cfg.n_ctx, truncate=truncate, text_format=rm.text_format).to(rm.cfg.device)
    lengths = [max(c, r) for c, r in zip(encoded.chosen.attention_mask.sum(-1).tolist(),
                                          encoded.rejected.attention_mask.sum(-1).tolist())]
    batches, start = [], 0
    while start < len(pairs):
        stop, width = start + 1, lengths[start]
        while stop < len(pairs) and (stop - start + 1) * max(width, lengths[stop]) <= batch_tokens:
            width = max(width, lengths[stop])
            stop += 1
        batches.append(PairBatch(_slice(encoded.chosen, start, stop), _slice(encoded.rejected, start, stop)))
        start = stop
    return batches


def _slice(batch: TokenBatch, start: int, stop: int) -> TokenBatch:
    width = int(batch.attention_mask[start:stop].sum(-1).max())
    return TokenBatch(batch.tokens[start:stop, :width], batch.attention_mask[start:stop, :width],
                      batch.completion_start[start:stop])

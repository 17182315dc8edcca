"""Collecting a reward model's activations at several hook points, to train SAEs on.

Preference data sets are small (~10^5 tokens), so the activations are collected once and kept in
memory (float32, one row per kept token), and every hook point is filled from the same forward
passes: ONE forward per batch (``run_with_cache``, stopped after the last block needed). Kept are
real tokens only: no padding and, by default, not the first token of each sequence, whose norm in
real models (SmolLM2: ~25,000 against ~300) would dominate every statistic.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from pm_lens.data import SKIP_FIRST, PreferencePair, TokenBatch, encode_pairs, encode_texts
from pm_lens.model import RewardModel
from pm_lens.saes.attach import stop_layer


@torch.no_grad()
def collect_activations(
    rm: RewardModel,
    data: Sequence[str] | Sequence[PreferencePair] | TokenBatch,
    *,
    hook_names: Sequence[str],
    max_tokens: int | None = None,
    skip_first: bool = SKIP_FIRST,
    exclude_token_ids: Sequence[int] = (),
    batch_size: int = 8,
    truncate: bool = False,
    positions: str = "all",
    progress: bool = True,
) -> dict[str, Float[Tensor, "n_tokens _d_in"]]:
    """``rm``'s activations at every hook over ``data``: one float32 row per kept token, in order.

    One forward per ``batch_size`` sequences fills every hook, stopped after the last block
    needed. Kept are real tokens (attention mask), less the first of each sequence if
    ``skip_first`` and ``exclude_token_ids``, at most ``max_tokens``; with
    ``positions="completion"`` only the completion's tokens (of pairs, or of a ``TokenBatch``
    with ``completion_start``; a plain text is all completion). ``attn.hook_z`` is flattened to
    ``n_heads * d_head``.
    """
    check_collect_positions(positions)
    chunks: dict[str, list[Tensor]] = {name: [] for name in hook_names}
    stop, n_kept = stop_layer(rm, hook_names), 0
    bar = tqdm(total=n_sequences(data), desc="collecting activations", unit="seq", disable=not progress)
    for batch in _token_batches(rm, data, batch_size=batch_size, truncate=truncate):
        batch = batch.to(rm.cfg.device)
        _, cache = rm.run_with_cache(batch.tokens, attention_mask=batch.attention_mask,
                                     names_filter=list(hook_names), stop_at_layer=stop)
        keep = batch.kept(skip_first=skip_first, exclude_token_ids=exclude_token_ids)
        if positions == "completion":
            keep = keep & (torch.arange(keep.shape[1], device=keep.device) >= batch.completion_start[:, None])
        room = None if max_tokens is None else max_tokens - n_kept
        for name in hook_names:
            act = _flat(name, cache[name])  # on the hook's device when the layers are split
            chunks[name].append(act[keep.to(act.device)][:room].float())
        n_kept += chunks[hook_names[0]][-1].shape[0]
        bar.update(batch.tokens.shape[0])
        if max_tokens is not None and n_kept >= max_tokens:
            break
    bar.close()
    if n_kept == 0:
        raise ValueError("no tokens to train on: the data is empty or every token was excluded")
    return {name: torch.cat(parts) for name, parts in chunks.items()}


COLLECT_POSITIONS = ("all", "completion")


def check_collect_positions(positions: str) -> None:
    if positions not in COLLECT_POSITIONS:
        raise ValueError(f"positions must be one of {COLLECT_POSITIONS} to collect activations, got {positions!r}")


def _flat(hook_name: str, act: Tensor) -> Tensor:
    if hook_name.endswith("hook_z") and act.ndim == 4:
        return act.flatten(-2)
    if act.ndim != 3:
        raise ValueError(f"cannot train an SAE at {hook_name}: its activation has shape {tuple(act.shape)}, "
                         "not [batch, pos, d] (nor attn.hook_z)")
    return act


def n_sequences(data: Sequence[str] | Sequence[PreferencePair] | TokenBatch) -> int:
    """How many sequences ``data`` holds (a pair is two)."""
    if isinstance(data, TokenBatch):
        return data.tokens.shape[0]
    return 2 * len(data) if data and isinstance(data[0], PreferencePair) else len(data)


def _token_batches(rm: RewardModel, data: Any, *, batch_size: int, truncate: bool) -> Iterator[TokenBatch]:
    if isinstance(data, TokenBatch):
        for start in range(0, data.tokens.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            yield TokenBatch(data.tokens[rows], data.attention_mask[rows], data.completion_start[rows])
        return
    if not data:
        raise ValueError("no data to collect activations from")
    kinds = {type(item) for item in data}
    if kinds not in ({str}, {PreferencePair}):
        names = sorted(kind.__name__ for kind in kinds)
        raise ValueError(f"data must be all texts (str) or all PreferencePair, got a mix of {names}")
    if rm.tokenizer is None:
        raise ValueError("the reward model has no tokenizer; pass one to RewardModel.from_hf(hf_model, tokenizer)")
    for start in range(0, len(data), batch_size):
        part = data[start : start + batch_size]
        if isinstance(part[0], str):
            yield encode_texts(rm.tokenizer, part, max_len=rm.cfg.n_ctx, truncate=truncate)
        else:
            pairs = encode_pairs(rm.tokenizer, part, max_len=rm.cfg.n_ctx, truncate=truncate, text_format=rm.text_format)
            yield from (pairs.chosen, pairs.rejected)

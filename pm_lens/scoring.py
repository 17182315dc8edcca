"""Scoring preference pairs: the reward of each side and the margin r(chosen) - r(rejected)."""

from __future__ import annotations


import pandas as pd
import torch
from tqdm.auto import tqdm

from pm_lens.data import PairsLike, as_pairs, encode_pairs
from pm_lens.model import RewardModel


@torch.no_grad()
def score_pairs(
    rm: RewardModel,
    pairs: PairsLike,
    *,
    batch_size: int = 8,
    truncate: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Rewards of every pair, one row per pair.

    Returns a DataFrame with columns ``chosen_reward``, ``rejected_reward``, ``margin``
    (chosen minus rejected) and ``prefers_chosen`` (margin > 0). Pairs are encoded with the
    model's tokenizer (see ``pm_lens.data.encode_pairs``) in batches of ``batch_size``.
    """
    pairs = as_pairs(pairs)
    if rm.tokenizer is None:
        raise ValueError("the reward model has no tokenizer; pass one to RewardModel.from_hf(hf_model, tokenizer)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    chosen, rejected = [], []
    starts = range(0, len(pairs), batch_size)
    for start in tqdm(starts, desc="scoring pairs", disable=not progress or len(starts) < 2):
        batch = encode_pairs(rm.tokenizer, pairs[start : start + batch_size], max_len=rm.cfg.n_ctx, truncate=truncate,
                             text_format=rm.text_format)
        for side, out in ((batch.chosen, chosen), (batch.rejected, rejected)):
            side = side.to(rm.cfg.device)
            out.append(rm.reward(side.tokens, side.attention_mask).float().cpu())
    table = pd.DataFrame(
        {"chosen_reward": torch.cat(chosen).numpy(), "rejected_reward": torch.cat(rejected).numpy()}
    )
    table["margin"] = table["chosen_reward"] - table["rejected_reward"]
    table["prefers_chosen"] = table["margin"] > 0
    return table

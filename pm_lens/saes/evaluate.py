"""Evaluating SAEs where it matters for a preference model: in reward space.

SAELens reports LM cross-entropy recovered, which means nothing for a scalar head. A PM cares
whether the SAE keeps the *reward* and, above all, the *preference* between completions. For each
SAE (and for all of them together) :func:`evaluate_sae` reports:

- ``l0``: mean number of active features per token;
- ``fvu``: fraction of variance unexplained, ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``;
- ``dead_fraction``: fraction of features that never fire on the evaluation tokens;
- ``reward_abs_error``: mean ``|r_sae - r|`` over all completions when the reconstruction
  *replaces* the activation (no error term);
- ``order_kept``: fraction of pairs whose preference (sign of the margin) survives;
- ``margin_kept_median`` / ``margin_kept_mean``: ``margin_sae / margin`` per pair, summarised.

Steps, per batch of pairs and for each side (chosen, rejected):
1. one clean forward caches the activation at every SAE's hook and the reward;
2. each SAE encodes and decodes the cached activations at the kept tokens: L0, FVU and firing
   counts;
3. each SAE alone, then all together, replace their activations at the kept tokens with their
   reconstruction ``decode(encode(x))`` (no error term; other tokens pass through): rewards.

Kept tokens are real tokens less each sequence's first (``skip_first``, the default everywhere in
pm_lens, ``pm_lens.data.SKIP_FIRST``) and ``exclude_token_ids``, at the ``positions`` asked for
(all, completion, or from where the pair's sides diverge): the SAE is judged where it is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from sae_lens import SAE
from torch import Tensor
from tqdm.auto import tqdm

from pm_lens.data import SKIP_FIRST, PairsLike, TokenBatch, as_pairs, encode_pairs
from pm_lens.model import RewardModel
from pm_lens.saes.attach import check_saes
from pm_lens.saes.split import split

ALL = "all"


@dataclass(frozen=True)
class SAEEvaluation:
    """What :func:`evaluate_sae` measured.

    Attributes:
        summary: one row per hook name (and ``"all"`` when several SAEs were given) with the
            metrics listed in the module docstring, plus ``d_sae`` and ``n_tokens``.
        per_pair: one row per pair: ``margin`` (clean) and ``margin_<hook>`` for each row of
            ``summary``.
    """

    summary: pd.DataFrame
    per_pair: pd.DataFrame


class _TokenStats:
    """Running sums for L0, FVU and firing counts of one SAE (float64 for stable variances)."""

    def __init__(self, d_in: int, d_sae: int) -> None:
        self.n = 0
        self.active = 0.0
        self.sq_error = 0.0
        self.sum = torch.zeros(d_in, dtype=torch.float64)
        self.sum_sq = torch.zeros(d_in, dtype=torch.float64)
        self.fired = torch.zeros(d_sae, dtype=torch.bool)

    def add(self, x: Tensor, feature_acts: Tensor, x_hat: Tensor) -> None:
        x, x_hat = x.double().cpu(), x_hat.double().cpu()
        self.n += x.shape[0]
        self.active += float((feature_acts != 0).sum())
        self.sq_error += float(((x - x_hat) ** 2).sum())
        self.sum += x.sum(0)
        self.sum_sq += (x**2).sum(0)
        self.fired |= (feature_acts != 0).any(0).cpu()

    def metrics(self) -> dict[str, float]:
        variance = float((self.sum_sq - self.sum**2 / self.n).sum())
        return {
            "l0": self.active / self.n,
            "fvu": self.sq_error / variance,
            "dead_fraction": 1.0 - float(self.fired.float().mean()),
            "n_tokens": self.n,
        }


@torch.no_grad()
def evaluate_sae(
    rm: RewardModel,
    sae_or_saes: SAE | Sequence[SAE],
    pairs: PairsLike,
    *,
    batch_size: int = 8,
    skip_first: bool = SKIP_FIRST,
    exclude_token_ids: Sequence[int] = (),
    truncate: bool = False,
    positions: str = "all",
    progress: bool = True,
) -> SAEEvaluation:
    """Measure SAEs on ``pairs`` in reward space (see the module docstring for the metrics).

    The SAEs must not be attached already. Token statistics and replacements use the kept tokens
    only: real tokens, less each sequence's first (``skip_first``) and ``exclude_token_ids``, at
    ``positions`` (``"all"``, ``"completion"`` or ``"diverge"``, as for
    ``pm_lens.attribution.attribute``: judge an SAE where the attribution will read it).
    """
    from pm_lens.attribution.positions import check_positions, pair_masks  # pm_lens.attribution imports saes

    check_positions(positions)
    saes = [sae_or_saes] if isinstance(sae_or_saes, SAE) else list(sae_or_saes)
    if not saes:
        raise ValueError("no SAEs to evaluate")
    pairs = as_pairs(pairs)
    if rm.tokenizer is None:
        raise ValueError("the reward model has no tokenizer; pass one to RewardModel.from_hf(hf_model, tokenizer)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    check_saes(rm, saes)
    names = [sae.cfg.metadata.hook_name for sae in saes]
    by_hook = dict(zip(names, saes))
    stats = {name: _TokenStats(sae.cfg.d_in, sae.cfg.d_sae) for name, sae in zip(names, saes)}
    variants = {name: [name] for name in names} | ({ALL: names} if len(saes) > 1 else {})
    rewards: dict[str, dict[str, list[Tensor]]] = {key: {"chosen": [], "rejected": []} for key in ["clean", *variants]}

    starts = range(0, len(pairs), batch_size)
    for start in tqdm(starts, desc="evaluating SAEs", disable=not progress or len(starts) < 2):
        batch = encode_pairs(rm.tokenizer, pairs[start : start + batch_size], max_len=rm.cfg.n_ctx, truncate=truncate,
                             text_format=rm.text_format)
        masks = pair_masks(batch, positions, skip_first=skip_first)
        for side_name, side, mask in (("chosen", batch.chosen, masks[0]), ("rejected", batch.rejected, masks[1])):
            side = side.to(rm.cfg.device)
            clean = _cache_and_reward(rm, side, names)
            rewards["clean"][side_name].append(clean.pop("reward"))
            keep = side.kept(skip_first=skip_first, exclude_token_ids=exclude_token_ids) & mask.to(side.tokens.device)
            for name, sae in zip(names, saes):
                nodes = split(sae, clean[name][keep.to(clean[name].device)])
                stats[name].add(nodes.x, nodes.acts, nodes.x - nodes.error)
            for key, group in variants.items():
                rewards[key][side_name].append(_replaced_reward(rm, side, {n: by_hook[n] for n in group}, keep))
    return _tables(rewards, stats, {name: sae.cfg.d_sae for name, sae in zip(names, saes)})


def _cache_and_reward(rm: RewardModel, side: TokenBatch, names: list[str]) -> dict[str, Tensor]:
    """The reward and each hook's activation (in the hook's layout) of one clean forward."""
    cached: dict[str, Tensor] = {}

    def keep(act: Tensor, hook) -> None:  # noqa: ANN001
        cached[hook.name] = act

    with rm.hooks(fwd_hooks=[(name, keep) for name in names]):
        cached["reward"] = rm.reward(side.tokens, side.attention_mask).float().cpu()
    return cached


def _replaced_reward(rm: RewardModel, side: TokenBatch, saes: dict[str, SAE], keep: Tensor) -> Tensor:
    """Rewards with each SAE's reconstruction in place of its activation at the ``keep`` tokens."""

    def replace(act: Tensor, hook) -> Tensor:  # noqa: ANN001
        sae = saes[hook.name]
        reconstruction = sae.decode(sae.encode(act)).to(act.dtype)
        where = keep.to(act.device).reshape(*keep.shape, *([1] * (act.ndim - 2)))
        return torch.where(where, reconstruction, act)

    with rm.hooks(fwd_hooks=[(name, replace) for name in saes]):
        return rm.reward(side.tokens, side.attention_mask).float().cpu()


def _tables(rewards: dict[str, dict[str, list[Tensor]]], stats: dict[str, _TokenStats], d_sae: dict[str, int]) -> SAEEvaluation:
    def cat(key: str, side: str) -> Tensor:
        return torch.cat(rewards[key][side])

    clean_margin = cat("clean", "chosen") - cat("clean", "rejected")
    clean_all = torch.cat([cat("clean", "chosen"), cat("clean", "rejected")])
    per_pair = pd.DataFrame({"margin": clean_margin.numpy()})
    rows = []
    for key in rewards:
        if key == "clean":
            continue
        margin = cat(key, "chosen") - cat(key, "rejected")
        kept = margin / clean_margin
        per_pair[f"margin_{key}"] = margin.numpy()
        row = {"hook_name": key, "d_sae": sum(d_sae.values()) if key == ALL else d_sae[key]}
        row |= stats[key].metrics() if key in stats else {}
        row |= {
            "reward_abs_error": float((torch.cat([cat(key, "chosen"), cat(key, "rejected")]) - clean_all).abs().mean()),
            "order_kept": float(((margin > 0) == (clean_margin > 0)).float().mean()),
            "margin_kept_median": float(kept.median()),
            "margin_kept_mean": float(kept.mean()),
            "n_pairs": len(clean_margin),
        }
        rows.append(row)
    return SAEEvaluation(summary=pd.DataFrame(rows).set_index("hook_name"), per_pair=per_pair)

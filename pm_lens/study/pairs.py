"""The pairs of a ``pm-lens run``: read with a column mapping, filtered by length, selected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pm_lens.data import PreferencePair, load_pairs
from pm_lens.io import write_atomic
from pm_lens.study.config import DEMO, RunConfig

ROLES = ("prompt", "chosen", "rejected")


def read_pairs(config: RunConfig) -> list[PreferencePair]:
    """The pairs at ``pairs.path`` with the config's column mapping (no model needed)."""
    columns = {role: config[f"pairs.{role}_column"] for role in ROLES}
    pairs = load_pairs(config["pairs.path"], split=config["pairs.split"],
                       columns={role: name for role, name in columns.items() if name != role})
    if not pairs:
        raise ValueError(f"pairs.path {config['pairs.path']!r} holds no pairs")
    if config["pairs.select"] != "all" and config["pairs.k"] > len(pairs):
        raise ValueError(f"pairs.k = {config['pairs.k']} but {config['pairs.path']!r} holds only {len(pairs)} pairs; "
                         "lower pairs.k or use pairs.select = 'all'")
    return pairs


def pair_lengths(tokenizer: Any, text_format: str, pairs: list[PreferencePair]) -> np.ndarray:
    """``[n_pairs]`` the token length of each pair's longer side, as the model will see it."""
    from pm_lens.data.encoding import encode_one

    return np.array([max(len(encode_one(tokenizer, p.prompt, text, text_format)[0]) for text in (p.chosen, p.rejected))
                     for p in pairs], dtype=np.int64)


def check_kept(config: RunConfig, pairs: list[PreferencePair]) -> np.ndarray | None:
    """For a model folder, measure the pairs with its tokenizer alone (before the model loads) and
    refuse a ``pairs.k`` larger than the pairs within ``pairs.max_tokens``; their lengths, or None
    for the demo PM (measured once it is loaded)."""
    if config["model.path"] == DEMO:
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config["model.path"], local_files_only=True)
    lengths = pair_lengths(tokenizer, config["model.text_format"], pairs)
    _check_k(config, lengths, len(pairs))
    return lengths


def _check_k(config: RunConfig, lengths: np.ndarray, n_pairs: int) -> None:
    kept, k, limit = int((lengths <= config["pairs.max_tokens"]).sum()), config["pairs.k"], config["pairs.max_tokens"]
    if config["pairs.select"] != "all" and k > kept:
        raise ValueError(f"pairs.k = {k} but only {kept} of {n_pairs} pairs have both sides within "
                         f"pairs.max_tokens = {limit} tokens; lower pairs.k or raise pairs.max_tokens")


def select_pairs(rm: Any, pairs: list[PreferencePair], config: RunConfig, out: Path, *, lengths: np.ndarray | None = None,
                 progress: bool = True) -> pd.DataFrame:
    """Keep the pairs whose both sides fit in ``pairs.max_tokens``, then select ``pairs.k`` of them
    (largest |margin|, seeded random, or all), in file order. Written to ``selection.csv``
    (``pair``: index in the file, ``tokens``, and for ``top_margin`` the clean rewards and margin);
    read back when it is already there."""
    path = out / "selection.csv"
    if path.exists():
        return pd.read_csv(path)
    if lengths is None:
        lengths = pair_lengths(rm.tokenizer, rm.text_format, pairs)
    _check_k(config, lengths, len(pairs))
    kept = np.flatnonzero(lengths <= config["pairs.max_tokens"])
    select, k = config["pairs.select"], config["pairs.k"]
    table = pd.DataFrame({"pair": kept, "tokens": lengths[kept]})
    if select == "top_margin":
        from pm_lens.scoring import score_pairs

        with rm.counting("selection"):
            scores = score_pairs(rm, [pairs[i] for i in kept], progress=progress)
        table = pd.concat([table, scores[["chosen_reward", "rejected_reward", "margin"]]], axis=1)
        order = np.argsort(-table.margin.abs().to_numpy(), kind="stable")[:k]
        table = table.iloc[np.sort(order)]
    elif select == "random":
        chosen = np.random.default_rng(config["pairs.seed"]).choice(len(kept), size=k, replace=False)
        table = table.iloc[np.sort(chosen)]
    table = table.reset_index(drop=True)
    write_atomic(path, table.to_csv(index=False))
    return pd.read_csv(path)  # what a resumed run reads: the same floats

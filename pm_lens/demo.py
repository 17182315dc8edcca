"""The demo: load a reward model, score preference pairs, check parity with Hugging Face.

Until the embedded default PM lands, the demo runs on a tiny random-init Llama reward model
built from a config (no download), so its rewards carry no meaning; what it shows is the
workflow and that pm_lens's rewards equal Hugging Face's.

Steps:
1. build the HF reward model and its tokenizer;
2. convert it to a :class:`~pm_lens.RewardModel`;
3. score a few pairs with pm_lens and with the HF model, and compare;
4. read one hook with ``run_with_cache``;
5. write ``rewards.csv`` and ``config.json`` (atomically) to the output folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pm_lens.data import PreferencePair, encode_completions
from pm_lens.io import write_atomic
from pm_lens.model import RewardModel
from pm_lens.scoring import score_pairs
from pm_lens.testing import char_tokenizer, tiny_hf_reward_model

DEMO_PAIRS = [
    PreferencePair("What is the capital of France?", "The capital of France is Paris.", "I don't know."),
    PreferencePair("What is 2 + 2?", "2 + 2 = 4. You're welcome!", "2 + 2 = 4. 2 + 2 = 4. 2 + 2 = 4."),
    PreferencePair("Name a primary colour.", "Red is a primary colour.", "See http://example.com for colours."),
    PreferencePair("How do I boil an egg?", "Simmer it for nine minutes.", "Figure it out yourself."),
]


def run_demo(out_dir: str | Path, *, seed: int = 0, architecture: str = "LlamaForSequenceClassification") -> dict[str, Any]:
    """Run the demo and write its outputs to ``out_dir``; returns the summary it saves."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = char_tokenizer()
    hf_model = tiny_hf_reward_model(architecture, seed=seed)
    rm = RewardModel.from_hf(hf_model, tokenizer)

    table = score_pairs(rm, DEMO_PAIRS, progress=False)
    table["hf_chosen_reward"] = _hf_rewards(hf_model, tokenizer, [p.prompt for p in DEMO_PAIRS], [p.chosen for p in DEMO_PAIRS])
    table["hf_rejected_reward"] = _hf_rewards(hf_model, tokenizer, [p.prompt for p in DEMO_PAIRS], [p.rejected for p in DEMO_PAIRS])
    table.insert(0, "prompt", [p.prompt for p in DEMO_PAIRS])
    max_diff = float(
        max((table.chosen_reward - table.hf_chosen_reward).abs().max(), (table.rejected_reward - table.hf_rejected_reward).abs().max())
    )

    batch = encode_completions(tokenizer, [DEMO_PAIRS[0].prompt], [DEMO_PAIRS[0].chosen], max_len=rm.cfg.n_ctx)
    hook_name = f"blocks.{rm.cfg.n_layers // 2}.hook_resid_post"
    _, cache = rm.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, names_filter=hook_name)

    summary = {
        "model": {"architecture": architecture, "seed": seed, "n_layers": rm.cfg.n_layers, "d_model": rm.cfg.d_model},
        "processing": rm.processing.as_dict(),
        "pairs": len(DEMO_PAIRS),
        "max_abs_diff_vs_hf": max_diff,
        "cached_hook": {"name": hook_name, "shape": list(cache[hook_name].shape)},
    }
    write_atomic(out / "rewards.csv", table.to_csv(index=False))
    write_atomic(out / "config.json", json.dumps(summary, indent=2))
    return summary


@torch.no_grad()
def _hf_rewards(hf_model: torch.nn.Module, tokenizer: Any, prompts: list[str], completions: list[str]) -> list[float]:
    # One sequence at a time: no padding, so nothing depends on how HF pools padded batches.
    rewards = []
    for prompt, completion in zip(prompts, completions):
        batch = encode_completions(tokenizer, [prompt], [completion], max_len=10**9)
        rewards.append(float(hf_model(batch.tokens).logits[0, 0]))
    return rewards


def print_summary(summary: dict[str, Any], table_path: Path) -> None:
    table = pd.read_csv(table_path)
    with pd.option_context("display.width", 120, "display.max_colwidth", 32):
        print(table[["prompt", "chosen_reward", "rejected_reward", "margin"]].to_string(index=False))
    print(f"\nmax |reward(pm_lens) - reward(HF)| = {summary['max_abs_diff_vs_hf']:.2e}")
    print(f"weight processing: {summary['processing']}")
    print(f"cached {summary['cached_hook']['name']} with shape {summary['cached_hook']['shape']}")

"""How faithful attribution is: fidelity cards of AtP and IG, per layer, against exact ablation.

The model is a tiny Llama reward model *trained* here (Bradley-Terry, a few hundred steps on
character-level synthetic preference pairs whose preferred side carries a polite closer and whose
dispreferred side an "I don't know", a repetition, a URL or rudeness), with one SAE per layer
trained with ``pm_lens.saes.train_saes`` on its activations. For each layer and method the card
compares the top ``--top-k`` features and ``--random`` others with exact ablation on held-out pairs.

Targets (issue 4): Spearman(AtP, exact) >= 0.9 on the top 50 for middle layers; IG at least as
faithful as AtP.

    python benchmarks/attribution_fidelity.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from pm_lens import PreferencePair, RewardModel, attribute, check_fidelity, score_pairs  # noqa: E402
from pm_lens.data import encode_pairs  # noqa: E402
from pm_lens.saes import train_saes  # noqa: E402
from pm_lens.testing import char_tokenizer, tiny_hf_reward_model  # noqa: E402

QUESTIONS = [("What is the capital of France?", "Paris"), ("What is 2 + 3?", "5"), ("What colour is the sky?", "Blue"),
             ("How many legs does a cat have?", "Four"), ("What is the capital of Italy?", "Rome"),
             ("What is 10 - 4?", "6"), ("What do bees make?", "Honey"), ("What is frozen water?", "Ice")]
CLOSERS = ["You're welcome!", "My pleasure.", "Happy to help!"]
FLAWS = [lambda a: "I don't know.", lambda a: f"{a}. {a}. {a}.", lambda a: f"{a}, see http://x.io/q",
         lambda a: f"{a}, you idiot."]


def make_pairs(n: int, seed: int) -> list[PreferencePair]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        question, answer = rng.choice(QUESTIONS)
        chosen = f"{answer}. {rng.choice(CLOSERS)}" if rng.random() < 0.5 else f"{answer}."
        pairs.append(PreferencePair(question, chosen, rng.choice(FLAWS)(answer)))
    return pairs


def train_pm(pairs: list[PreferencePair], *, steps: int, seed: int) -> RewardModel:
    tokenizer = char_tokenizer()
    hf_model = tiny_hf_reward_model("LlamaForSequenceClassification", seed=seed, hidden_size=128, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=4, intermediate_size=256)
    with torch.no_grad():
        hf_model.score.weight.normal_(0, 0.02)
    hf_model.train()
    optimizer = torch.optim.AdamW(hf_model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = [pairs[i] for i in torch.randint(len(pairs), (16,), generator=generator).tolist()]
        enc = encode_pairs(tokenizer, batch, max_len=128)
        chosen = hf_model(enc.chosen.tokens, attention_mask=enc.chosen.attention_mask).logits[:, 0]
        rejected = hf_model(enc.rejected.tokens, attention_mask=enc.rejected.attention_mask).logits[:, 0]
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return RewardModel.from_hf(hf_model.eval(), tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="PM training steps")
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--eval-pairs", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--random", type=int, default=50)
    parser.add_argument("--ig-steps", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.d_sae, args.eval_pairs, args.top_k, args.random, args.ig_steps = 20, 256, 8, 10, 10, [2]
    torch.manual_seed(0)
    train, held_out = make_pairs(800, seed=0), make_pairs(args.eval_pairs, seed=1)

    start = time.perf_counter()
    rm = train_pm(train, steps=args.steps, seed=0)
    scores = score_pairs(rm, held_out, progress=False)
    print(f"PM trained in {time.perf_counter() - start:.0f}s: held-out accuracy {scores.prefers_chosen.mean():.2f}, "
          f"mean margin {scores.margin.mean():.2f}")
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(rm.cfg.n_layers - 1)]
    start = time.perf_counter()
    trained = train_saes(rm, train, hook_names=hooks, d_sae=args.d_sae, seed=0, progress=False)
    print(f"SAEs trained in {time.perf_counter() - start:.0f}s: "
          + ", ".join(f"{h}: FVU {row.fvu:.3f}, L0 {row.l0:.1f}" for h, row in trained.stats.iterrows()))

    rows = []
    for hook in hooks:
        sae = trained.saes[hook]
        for method, steps in [("atp", 1)] + [("ig", s) for s in args.ig_steps]:
            t0 = time.perf_counter()
            result = attribute(rm, held_out, saes=[sae], method=method, ig_steps=steps, progress=False)
            seconds = time.perf_counter() - t0
            card = check_fidelity(rm, result, top_k=args.top_k, n_random=args.random, progress=False)
            rows.append({
                "hook": hook, "method": method if method == "atp" else f"ig-{steps}", "spearman_top": card.spearman_top,
                "spearman": card.spearman, "pearson": card.pearson, "sign": card.sign_agreement,
                "recall@10": card.topk_recall, "med_rel_err": card.median_relative_error,
                "missed": f"{card.missed_in_sample}/{card.n_random}",
                "compl_err": card.completeness["mean_abs_diff"] / max(abs(card.completeness["exact_mean"]), 1e-9),
                "seconds": seconds,
            })
    table = pd.DataFrame(rows)
    print(f"\nfidelity on {len(held_out)} held-out pairs (target margin, zero baseline, all positions); "
          f"top {args.top_k} + {args.random} random features per card; compl_err = mean |sum of attributions - "
          "exact removal of every node| / |exact|\n")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()

"""What attribution patching saves: attributing every feature vs exhaustive exact ablation.

Measured side by side in one run on a tiny random Llama reward model with sparse random SAEs at
several layers (each feature fires on ``--fire-rate`` of tokens; CPU; absolute times are noisy,
the ratios are what to compare):

1. one plain forward+backward of the reward on both sides of the pairs (the unit of cost);
2. ``pm_lens.attribute`` (AtP) of every feature of every SAE;
3. exhaustive exact ablation, one forward per active feature: a sample of ``--sample`` features
   is ablated one by one (``batched=False``) and the time extrapolated to all active features;
4. the same sample ablated batched (stacked along the batch, restarted at the hook's layer, only
   the positions from the first changed one recomputed, the last MLP at the pooled position
   only), from scratch and reusing the attribution's clean run.

Targets: attribution <= 3x one forward+backward (issue 4); batched ablation >= 10x faster than
the one-by-one loop.

    python benchmarks/attribution_cost.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from pm_lens import Node, PreferencePair, RewardModel, ablate, attribute  # noqa: E402
from pm_lens.attribution.batching import pair_batches  # noqa: E402
from pm_lens.testing import char_tokenizer, sparse_sae_for, tiny_hf_reward_model  # noqa: E402

PROMPTS = ["What is the capital of France?", "How do I boil an egg?", "Name a primary colour.", "What is 12 * 12?"]
CHOSEN = ["The answer is below. Thank you for asking, my pleasure!", "Simmer it gently for nine minutes, then cool it."]
REJECTED = ["I don't know. I don't know. I don't know.", "See http://example.com/answers for that, idiot."]


def build(args: argparse.Namespace) -> tuple[RewardModel, list[PreferencePair], list]:
    hf_model = tiny_hf_reward_model(
        "LlamaForSequenceClassification", hidden_size=args.d_model, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=4, intermediate_size=4 * args.d_model,
        max_position_embeddings=256,
    )
    rm = RewardModel.from_hf(hf_model, char_tokenizer())
    pairs = [PreferencePair(p, CHOSEN[i % 2], REJECTED[(i // 2) % 2]) for i, p in enumerate(PROMPTS * (args.pairs // 4))]
    batch = pair_batches(rm, pairs, batch_tokens=10**9)[0]
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in sorted({1, args.layers // 2, args.layers - 2})]
    saes = [sparse_sae_for(rm, hook, batch.chosen.tokens, d_sae=args.d_sae, seed=i, fire_rate=args.fire_rate)
            for i, hook in enumerate(hooks)]
    return rm, pairs, saes


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_backward(rm: RewardModel, pairs: list[PreferencePair]) -> None:
    for batch in pair_batches(rm, pairs, batch_tokens=10**9):
        for side in (batch.chosen, batch.rejected):
            rm.zero_grad(set_to_none=True)
            rm.reward(side.tokens, side.attention_mask).sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--sample", type=int, default=64, help="features ablated to time the loop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fire-rate", type=float, default=0.02, help="per-token firing rate of the random SAE features")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    args = parser.parse_args()
    if args.quick:
        args.d_model, args.layers, args.d_sae, args.pairs, args.sample, args.repeats = 64, 4, 512, 4, 8, 1
    torch.manual_seed(0)
    rm, pairs, saes = build(args)
    run = dict(saes=saes, progress=False, batch_tokens=10**9)

    attribute(rm, pairs, **run)  # warm-up
    t_fwd_bwd = median_time(lambda: forward_backward(rm, pairs), args.repeats)
    t_atp = median_time(lambda: attribute(rm, pairs, **run), args.repeats)
    result = attribute(rm, pairs, **run)
    ranking = result.ranking()
    active = ranking[ranking.kind == "feature"]
    nodes = [Node.parse(name) for name in active.node]
    sample = nodes[: args.sample]
    generator = torch.Generator().manual_seed(0)
    random_sample = [nodes[i] for i in torch.randperm(len(nodes), generator=generator)[: args.sample].tolist()]
    t_loop = median_time(lambda: ablate(rm, pairs, features=sample, batched=False, **run), 1)
    t_batched = median_time(lambda: ablate(rm, pairs, features=sample, **run), args.repeats)
    t_reused = median_time(lambda: ablate(rm, pairs, features=sample, clean=result.clean_run, **run), args.repeats)
    t_batched_random = median_time(lambda: ablate(rm, pairs, features=random_sample, **run), args.repeats)
    t_exhaustive = t_loop / len(sample) * len(active)
    rows_active = [float(result.active[n.hook_name].to_dense()[:, n.feature].float().mean()) for n in sample]
    rows_random = [float(result.active[n.hook_name].to_dense()[:, n.feature].float().mean()) for n in random_sample]

    print(f"model: Llama d_model={args.d_model}, {args.layers} layers; {len(saes)} SAEs of d_sae={args.d_sae} "
          f"at {[s.cfg.metadata.hook_name for s in saes]}; {len(pairs)} pairs; torch threads {torch.get_num_threads()}")
    print(f"active features: {len(active)} of {len(saes) * args.d_sae}; ablation sample: {len(sample)}\n")
    table = pd.DataFrame([
        ("forward+backward (both sides)", t_fwd_bwd, 1.0),
        ("attribute (AtP), all features", t_atp, t_atp / t_fwd_bwd),
        (f"exhaustive ablation, extrapolated ({len(active)} features)", t_exhaustive, t_exhaustive / t_fwd_bwd),
        (f"ablation loop, {len(sample)} features", t_loop, t_loop / t_fwd_bwd),
        (f"ablation batched, top {len(sample)} features", t_batched, t_batched / t_fwd_bwd),
        (f"  the same, reusing the attribution's clean run", t_reused, t_reused / t_fwd_bwd),
        (f"ablation batched, {len(sample)} random active features", t_batched_random, t_batched_random / t_fwd_bwd),
    ], columns=["what", "seconds", "x forward+backward"])
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nattribution vs exhaustive ablation: {t_exhaustive / t_atp:.0f}x faster")
    print(f"attribution cost: {t_atp / t_fwd_bwd:.2f}x forward+backward (target <= 3x): "
          f"{'met' if t_atp / t_fwd_bwd <= 3 else 'MISSED'}")
    print(f"batched vs loop ablation, top features (fire on {sum(rows_active) / len(rows_active):.0%} of pairs): "
          f"{t_loop / t_batched:.1f}x faster (target >= 10x): {'met' if t_loop / t_batched >= 10 else 'MISSED'}")
    print(f"batched vs loop ablation, top features, reusing the attribution's clean run: {t_loop / t_reused:.1f}x faster")
    print(f"batched vs loop ablation, random active features (fire on {sum(rows_random) / len(rows_random):.0%} "
          f"of pairs): {t_loop / t_batched_random:.1f}x faster (the loop costs the same per feature)")
    by_layer = pd.Series([n.hook_name for n in sample]).value_counts().to_dict()
    print(f"top features by hook: {by_layer} (the batched forward restarts after the hook's layer)")


if __name__ == "__main__":
    main()

"""What starting the backward at the divergence saves: AtP on the demo PM with and without it.

At ``positions="diverge"`` attribution reads gradients only from the first token where chosen and
rejected differ; causal attention means nothing before it depends on them, so the clean pass runs
those positions without autograd and back-propagates through the rest only
(``RewardModel.run_with_deltas(grad_from=...)``), and the rejected side, whose tokens before it are
the chosen side's, continues from the chosen side's run of them (``shared=``). This times ``pm_lens.attribute`` on the demo's
held-out pairs (6 per attribute by default, the demo's AtP step) with that split and with it
turned off (one forward and backward over every position of each side), alternating ``--repeats`` times in one
process, and checks that both give the same effects. On HH-RLHF, where chosen and rejected share a
long multi-turn prompt, the shared part is larger than in the planted pairs.

    python benchmarks/shared_prefix.py [--pairs 6] [--repeats 2]
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from pm_lens import attribute  # noqa: E402
from pm_lens.attribution.batching import pair_batches  # noqa: E402
from pm_lens.attribution.positions import divergence  # noqa: E402
from pm_lens.demo import held_out_pairs  # noqa: E402
from pm_lens.demo_pm import demo_reward_model, demo_saes  # noqa: E402

MODULES = [importlib.import_module("pm_lens.attribution.clean")]


def timed(rm, pairs, saes, *, split: bool):
    saved = [m.grad_start for m in MODULES]
    if not split:
        for m in MODULES:
            m.grad_start = lambda attention_mask, mask: 0
    try:
        start = time.perf_counter()
        result = attribute(rm, pairs, saes=saes, skip_first=True, positions="diverge", progress=False)
        return time.perf_counter() - start, result
    finally:
        for m, f in zip(MODULES, saved):
            m.grad_start = f


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=6, help="held-out pairs per attribute")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rm = demo_reward_model()
    saes = demo_saes()
    pairs, _ = held_out_pairs(args.pairs)
    tokens = shared = 0
    for batch in pair_batches(rm, pairs):
        width = batch.chosen.tokens.shape[1] + batch.rejected.tokens.shape[1]
        tokens += batch.chosen.tokens.shape[0] * width
        shared += batch.chosen.tokens.shape[0] * 2 * int(divergence(batch).min())
    print(f"{len(pairs)} pairs; {shared / tokens:.0%} of the padded positions lie before their batch's first "
          f"divergence (the backward skips them)")
    timed(rm, pairs, saes, split=True)  # warm-up
    times = {True: [], False: []}
    results = {}
    for _ in range(args.repeats):
        for split in (False, True):
            seconds, results[split] = timed(rm, pairs, saes, split=split)
            times[split].append(seconds)
    worst = max(float((results[True].dense_effects(h) - results[False].dense_effects(h)).abs().max())
                for h in results[True].effects)
    scale = max(float(results[False].dense_effects(h).abs().max()) for h in results[False].effects)
    whole, split = statistics.median(times[False]), statistics.median(times[True])
    print(f"AtP over every position: {whole:.1f}s (runs {', '.join(f'{t:.1f}' for t in times[False])})")
    print(f"AtP, backward from the divergence: {split:.1f}s (runs {', '.join(f'{t:.1f}' for t in times[True])})")
    print(f"speed-up {whole / split:.2f}x; largest difference of an effect {worst:.2e} (largest effect {scale:.2f})")
    assert torch.isfinite(torch.tensor(worst)) and worst <= 1e-3 * max(scale, 1.0)


if __name__ == "__main__":
    main()

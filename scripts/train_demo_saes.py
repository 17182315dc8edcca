"""Train the demo PM's SAEs (early, middle, late residual stream) and report their evaluation.

Runs `pm_lens.train_saes` on the demo PM's own activations over the planted training pairs (both
sides; the first token, whose residual norm is ~25,000 from block 11 on, is left out) and
`pm_lens.evaluate_sae` on held-out pairs. Writes SAELens folders and `training_config.json`
under `--out`, and `evaluation.csv` beside them.

    python scripts/train_demo_saes.py [--pairs 600] [--d-sae 1024] [--out pm_lens/assets/demo_saes]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from pm_lens.data.planted import make_planted  # noqa: E402
from pm_lens.demo_pm import demo_reward_model  # noqa: E402
from pm_lens.io import write_atomic  # noqa: E402
from pm_lens.saes import evaluate_sae, train_saes  # noqa: E402

HOOKS = ["blocks.8.hook_resid_post", "blocks.15.hook_resid_post", "blocks.22.hook_resid_post"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=600, help="training pairs whose texts feed the SAEs")
    parser.add_argument("--eval-pairs", type=int, default=60)
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "pm_lens/assets/demo_saes")
    args = parser.parse_args()
    data = make_planted(seed=args.seed)
    rm = demo_reward_model()
    start = time.perf_counter()
    trained = train_saes(rm, data.train[: args.pairs], hook_names=HOOKS, d_sae=args.d_sae, architecture="topk",
                         k=args.k, seed=args.seed, out_dir=args.out)
    print(f"trained in {time.perf_counter() - start:.0f}s")
    print(trained.stats.to_string())
    # The SAEs never saw position 0 (`<|im_start|>`, massive norm): bypass them at that token.
    start_token = rm.tokenizer.convert_tokens_to_ids("<|im_start|>")
    evaluation = evaluate_sae(rm, list(trained.saes.values()), data.test[: args.eval_pairs], batch_size=8,
                              exclude_token_ids=[start_token])
    write_atomic(args.out / "evaluation.csv", evaluation.summary.to_csv())
    print(evaluation.summary.to_string())


if __name__ == "__main__":
    main()

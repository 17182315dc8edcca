"""Train the demo PM's SAEs (early, middle, late residual stream) and report their evaluation.

Runs `pm_lens.train_saes` on the demo PM's own activations over the completions of planted
training pairs (every distinct prompt + completion of the training splits of `--data-seeds`: the
training pools only, so the held-out phrasings the demo reads stay unseen), at the completions'
tokens only (`--positions completion`: where the demo's attribution reads the SAEs), the first
token left out. Saves the SAEs in `--dtype` (float16 by default: the package ships them) as
SAELens folders with `training_config.json` under `--out`, then evaluates them with
`pm_lens.evaluate_sae` on held-out pairs, at all positions and from the divergence token, beside
the SAEs in `--compare` (e.g. a copy of the previous ones): `evaluation.csv`.

    python scripts/train_demo_saes.py [--data-seeds 0,1,2,3] [--d-sae 2048] [--k 32] [--compare OLD_DIR] [--evaluate-only]

`--evaluate-only` skips the training and re-evaluates the SAEs in `--out` (e.g. after the demo PM
changed: the reward-space columns depend on it). The shipped `evaluation.csv` is such a run with
the retrained PM, beside the previous 1024-feature SAEs.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from pm_lens.data import encode_completions  # noqa: E402
from pm_lens.data.planted import make_planted  # noqa: E402
from pm_lens.demo_pm import DEMO_SAE_HOOKS, demo_reward_model  # noqa: E402
from pm_lens.io import write_atomic  # noqa: E402
from pm_lens.saes import evaluate_sae, load_sae, train_saes  # noqa: E402
from pm_lens.saes.train import save_saes  # noqa: E402


def training_texts(seeds: list[int]) -> tuple[list[str], list[str]]:
    """Every distinct (prompt, completion) of the planted training splits of ``seeds``, in order."""
    seen: dict[tuple[str, str], None] = {}
    for seed in seeds:
        for pair in make_planted(seed=seed, n_val=0, n_test=0).train:
            seen.setdefault((pair.prompt, pair.chosen))
            seen.setdefault((pair.prompt, pair.rejected))
    prompts, completions = zip(*seen)
    return list(prompts), list(completions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-seeds", default="0,1,2,3", help="planted-dataset seeds whose training texts feed the SAEs")
    parser.add_argument("--eval-pairs", type=int, default=60)
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--positions", default="completion", choices=["all", "completion"])
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", type=Path, default=None, help="a folder of earlier demo SAEs to evaluate beside")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "pm_lens/assets/demo_saes")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="evaluate the SAEs already in --out (and --compare) with today's demo PM; no training")
    args = parser.parse_args()
    rm = demo_reward_model()
    if not args.evaluate_only:
        train(rm, args)
    evaluate(rm, args)


def train(rm, args: argparse.Namespace) -> None:
    prompts, completions = training_texts([int(s) for s in args.data_seeds.split(",")])
    texts = encode_completions(rm.tokenizer, prompts, completions, max_len=rm.cfg.n_ctx, text_format=rm.text_format)
    print(f"{len(prompts)} distinct training texts")
    start = time.perf_counter()
    trained = train_saes(rm, texts, hook_names=list(DEMO_SAE_HOOKS), d_sae=args.d_sae, architecture="topk", k=args.k,
                         n_epochs=args.epochs, seed=args.seed, positions=args.positions)
    seconds = time.perf_counter() - start
    print(f"trained in {seconds:.0f}s on {trained.config['n_tokens']} tokens")
    print(trained.stats.to_string())
    dtype = getattr(torch, args.dtype)
    config = trained.config | {"data": trained.config["data"] | {"planted_seeds": args.data_seeds, "split": "train"},
                               "saved_dtype": args.dtype, "train_seconds": round(seconds, 1)}
    save_saes({name: sae.to(dtype) for name, sae in trained.saes.items()}, config, args.out)


def evaluate(rm, args: argparse.Namespace) -> None:
    """``evaluation.csv`` in ``args.out``: the SAEs there (and those in ``args.compare``) on held-out pairs."""
    # The SAEs never saw position 0 (`<|im_start|>`, massive norm): bypass them at that token.
    exclude = [rm.tokenizer.convert_tokens_to_ids("<|im_start|>")]
    test = make_planted(seed=0).test[: args.eval_pairs]
    sets = {"new": args.out} | ({"previous": args.compare} if args.compare else {})
    tables = []
    for which, folder in sets.items():
        saes = [load_sae(folder / hook, dtype=rm.cfg.dtype) for hook in DEMO_SAE_HOOKS]
        for positions in ("all", "diverge"):
            summary = evaluate_sae(rm, saes, test, batch_size=8, exclude_token_ids=exclude, positions=positions,
                                   progress=False).summary
            tables.append(summary.reset_index().assign(saes=which, positions=positions))
    evaluation = pd.concat(tables)[["saes", "positions", *tables[0].columns[:-2]]]
    write_atomic(args.out / "evaluation.csv", evaluation.to_csv(index=False))
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(evaluation.to_string(index=False))


if __name__ == "__main__":
    main()

"""Train the demo PM's SAEs (`DEMO_SAE_HOOKS`: blocks 15, 22 and 27) and report their evaluation.

Runs `pm_lens.train_saes` on the demo PM's own activations over the completions of planted
training pairs (every distinct prompt + completion of the training splits of `--data-seeds`: the
training pools only, so the held-out phrasings the demo reads stay unseen), at the completions'
tokens only (`--positions completion`: where the demo's attribution reads the SAEs), the first
token left out. Saves the SAEs in `--dtype` (float16 by default: the package ships them) as
SAELens folders with `training_config.json` under `--out`, then evaluates them with
`pm_lens.evaluate_sae` on held-out pairs, at all positions and from the divergence token, beside
the SAEs in `--compare` (e.g. a copy of the previous ones): `evaluation.csv`.

    python scripts/train_demo_saes.py [--data-seeds 0,1,2,3] [--d-sae 2048] [--k 32] [--hooks H1,H2] [--compare OLD_DIR] [--evaluate-only]

`--hooks` trains only those hooks' SAEs; the others stay as shipped, SAE folders of hooks the demo
no longer uses are removed, and `training_config.json` lists each run that trained a shipped SAE.
The shipped ones: blocks 15 and 22 from one run of all then-demo hooks (6 epochs; it also trained
block 8, no longer shipped), block 27 from `--hooks blocks.27.hook_resid_post --epochs 4` with the
retrained PM (2,432 s on 2 cores). `--evaluate-only` skips the training and re-evaluates the SAEs
in `--out` (e.g. after the demo PM changed: the reward-space columns depend on it). The shipped
`evaluation.csv` is such a run, beside the previous SAEs (blocks 8, 15, 22).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
from pm_lens.saes.train import CONFIG_FILENAME, save_saes  # noqa: E402


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
    parser.add_argument("--hooks", default="", help="comma-separated demo SAE hooks to (re)train (default: all); "
                        "the others stay as shipped")
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
    hooks = args.hooks.split(",") if args.hooks else list(DEMO_SAE_HOOKS)
    unknown = sorted(set(hooks) - set(DEMO_SAE_HOOKS))
    if unknown:
        raise SystemExit(f"--hooks {unknown} are not demo SAE hooks; they are {list(DEMO_SAE_HOOKS)}")
    prompts, completions = training_texts([int(s) for s in args.data_seeds.split(",")])
    texts = encode_completions(rm.tokenizer, prompts, completions, max_len=rm.cfg.n_ctx, text_format=rm.text_format)
    print(f"{len(prompts)} distinct training texts")
    start = time.perf_counter()
    trained = train_saes(rm, texts, hook_names=hooks, d_sae=args.d_sae, architecture="topk", k=args.k,
                         n_epochs=args.epochs, seed=args.seed, positions=args.positions)
    seconds = time.perf_counter() - start
    print(f"trained in {seconds:.0f}s on {trained.config['n_tokens']} tokens")
    print(trained.stats.to_string())
    ship(trained.saes, trained.config, seconds, args)


def ship(saes: dict, config: dict, seconds: float, args: argparse.Namespace) -> None:
    """Save ``saes`` (trained with ``config``) in ``args.dtype`` to ``args.out``; remove SAE
    folders of hooks the demo no longer uses; ``training_config.json`` lists the runs that trained
    the shipped SAEs (an earlier run's entry keeps only the hooks it still provides)."""
    config = config | {"data": config["data"] | {"planted_seeds": args.data_seeds, "split": "train"},
                       "saved_dtype": args.dtype, "train_seconds": round(seconds, 1)}
    path = args.out / CONFIG_FILENAME
    previous = json.loads(path.read_text()) if path.exists() else None
    dtype = getattr(torch, args.dtype)
    save_saes({name: sae.to(dtype) for name, sae in saes.items()}, {}, args.out)
    for folder in args.out.iterdir():
        if folder.is_dir() and (folder / "cfg.json").exists() and folder.name not in DEMO_SAE_HOOKS:
            shutil.rmtree(folder)
    write_atomic(path, json.dumps(merged_runs(previous, config), indent=2) + "\n")


def merged_runs(previous: dict | None, config: dict) -> dict:
    """The demo's training record: each run that trained a shipped SAE, the latest (``config``)
    last; an earlier run keeps only the hooks it still provides (``trained_hook_names``: all it trained)."""
    runs = [] if previous is None else previous.get("runs", [previous])
    kept = []
    for run in runs:
        hooks = [h for h in run["hook_names"] if h in DEMO_SAE_HOOKS and h not in config["hook_names"]]
        if hooks:
            kept.append(run | {"hook_names": hooks, "trained_hook_names": run.get("trained_hook_names", run["hook_names"]),
                               "stats": {h: run["stats"][h] for h in hooks}})
    return {"hook_names": list(DEMO_SAE_HOOKS), "runs": [*kept, config]}


def evaluate(rm, args: argparse.Namespace) -> None:
    """``evaluation.csv`` in ``args.out``: the SAEs there (and those in ``args.compare``) on held-out pairs."""
    # The SAEs never saw position 0 (`<|im_start|>`, massive norm): bypass them at that token.
    exclude = [rm.tokenizer.convert_tokens_to_ids("<|im_start|>")]
    test = make_planted(seed=0).test[: args.eval_pairs]
    sets = {"new": args.out} | ({"previous": args.compare} if args.compare else {})
    tables = []
    for which, folder in sets.items():
        saes = [load_sae(hook, dtype=rm.cfg.dtype) for hook in sorted(folder.iterdir(), key=_layer)
                if (hook / "cfg.json").exists()]
        for positions in ("all", "diverge"):
            summary = evaluate_sae(rm, saes, test, batch_size=8, exclude_token_ids=exclude, positions=positions,
                                   progress=False).summary
            tables.append(summary.reset_index().assign(saes=which, positions=positions))
    evaluation = pd.concat(tables)[["saes", "positions", *tables[0].columns[:-2]]]
    write_atomic(args.out / "evaluation.csv", evaluation.to_csv(index=False))
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(evaluation.to_string(index=False))


def _layer(folder: Path) -> int:
    return int(folder.name.split(".")[1]) if folder.name.startswith("blocks.") else -1


if __name__ == "__main__":
    main()

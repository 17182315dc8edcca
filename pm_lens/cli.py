"""The ``pm-lens`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pm-lens", description="Open up preference models with sparse autoencoders.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="run the end-to-end example",
        description="Score preference pairs with a tiny random reward model and check parity with Hugging Face.",
    )
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for the outputs (default: demo_out)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random model (default: 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.command == "demo":
        from pm_lens.demo import print_summary, run_demo

        summary = run_demo(args.out, seed=args.seed)
        print_summary(summary, args.out / "rewards.csv")
        print(f"\nwrote {args.out / 'rewards.csv'} and {args.out / 'config.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

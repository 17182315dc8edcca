"""The ``pm-lens`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    from pm_lens.demo import OUTPUTS, DemoSettings

    defaults = DemoSettings()
    parser = argparse.ArgumentParser(prog="pm-lens", description="Open up preference models with sparse autoencoders.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="find the features that drive the embedded demo PM, confirm them, check them against the truth",
        description=(
            "Attribute the embedded demo PM's reward on held-out planted-preference pairs to its SAE features, "
            "confirm the top ones by exact ablation, and check them against the planted truth. "
            f"Writes {', '.join(OUTPUTS)} to --out. The first run converts and caches SmolLM2 "
            "(under $PM_LENS_CACHE, default ~/.cache/pm_lens)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for the outputs")
    demo.add_argument("--pairs-per-attribute", type=_positive, default=defaults.pairs_per_attribute,
                      help="held-out pairs per planted attribute (6 attributes)")
    demo.add_argument("--top", type=_positive, default=defaults.top,
                      help="features ranked and confirmed by exact ablation per planted attribute")
    demo.add_argument("--fidelity-top", type=_positive, default=defaults.fidelity_top,
                      help="top features of the whole ranking ablated for the fidelity card")
    demo.add_argument("--random", type=_non_negative, default=defaults.n_random,
                      help="other features ablated for the fidelity card's false-negative check")
    demo.add_argument("--recovery-top", type=_positive, default=defaults.recovery_top,
                      help="features ablated jointly per planted attribute in the truth check")
    demo.add_argument("--contexts", type=_positive, default=defaults.n_contexts, help="contexts shown per feature")
    demo.add_argument("--seed", type=int, default=defaults.seed, help="seed of the random features of the fidelity card")
    demo.add_argument("--cache-dir", type=Path, default=None, help="where SmolLM2 is converted and cached")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")

    exploit = commands.add_parser(
        "exploit",
        help="search for completions the demo PM scores above a reference answer, and verify them",
        description=(
            "Feature-guided reward hacking on the embedded demo PM: candidate features of the reference answer "
            "(against baseline completions), phrases they fire on in the planted training texts, greedy assembly "
            "and a token search; every candidate re-scored with the plain PM. Writes exploits.csv, exploits.json "
            "and report.md to --out."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    exploit.add_argument("--prompt", required=True, help="the user's question")
    exploit.add_argument("--reference", required=True, help="the answer to beat (e.g. correct and polite)")
    exploit.add_argument("--baseline", action="append", default=None,
                         help="another completion of the prompt to filter generic features (repeatable; "
                              "default: three generic ones)")
    exploit.add_argument("--out", type=Path, default=Path("exploit_out"), help="folder for the outputs")
    exploit.add_argument("--budget", type=_positive, default=600, help="forward passes for assembly and token search")
    exploit.add_argument("--corpus-pairs", type=_positive, default=120, help="planted training pairs to mine phrases from")
    exploit.add_argument("--seed", type=int, default=0, help="seed of the token search")
    exploit.add_argument("--cache-dir", type=Path, default=None, help="where SmolLM2 is converted and cached")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.command == "demo":
        from pm_lens.demo import DemoSettings, print_summary, run_demo

        settings = DemoSettings(pairs_per_attribute=args.pairs_per_attribute, top=args.top,
                                fidelity_top=args.fidelity_top, n_random=args.random,
                                recovery_top=args.recovery_top, n_contexts=args.contexts, seed=args.seed)
        result = run_demo(args.out, settings, cache_dir=args.cache_dir, progress=not args.quiet)
        print_summary(result)
    elif args.command == "exploit":
        from pm_lens.exploits.cli import run_exploit

        run_exploit(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

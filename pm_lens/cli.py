"""The ``pm-lens`` command line.

Every error is one line on stderr, ``pm-lens: error: ...``, naming the value and the problem: exit
code 2 for a bad argument (argparse's, or an ``--out`` that cannot be created or written), 1 for an
error a user can cause during the run (ValueError, TypeError, OSError), 130 on Ctrl-C. ``--debug`` or
``PM_LENS_DEBUG=1`` shows the full traceback instead. The parser and these checks import nothing
heavy, so they answer at once: torch, TransformerLens and SAELens are imported only to run a command.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

from pm_lens.demo_settings import OUTPUTS, POSITIONS, DemoSettings

DEBUG_ENV = "PM_LENS_DEBUG"
EPILOG = (f"Errors are reported in one line: exit code 2 for a bad argument, 1 for an error during the run, 130 when "
          f"interrupted. Pass --debug or set {DEBUG_ENV}=1 to see the full traceback.")


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"pm-lens: error: {message} (see '{self.prog} --help')\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}" if value is None else
                                         f"must be a positive integer, got {value}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def _text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must not be empty, got {text!r}")
    return text


def _parser() -> argparse.ArgumentParser:
    defaults = DemoSettings()
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help=f"show the full traceback of an error (same as {DEBUG_ENV}=1)")
    parser = _Parser(prog="pm-lens", description="Open up preference models with sparse autoencoders.",
                     epilog=EPILOG, parents=[debug])
    commands = parser.add_subparsers(dest="command")
    demo = commands.add_parser(
        "demo",
        help="find the features that drive the embedded demo PM, confirm them, check them against the truth",
        description=(
            "Attribute the embedded demo PM's reward on held-out planted-preference pairs to its SAE features, "
            "confirm the top ones by exact ablation, and check them against the planted truth. "
            f"Writes {', '.join(OUTPUTS)} to --out. The first run converts and caches SmolLM2 "
            "(under $PM_LENS_CACHE, default ~/.cache/pm_lens)."
        ),
        epilog=EPILOG, parents=[debug], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    demo.add_argument("--positions", choices=POSITIONS, default=defaults.positions,
                      help="token positions attributed: from where chosen and rejected diverge (the study's choice), "
                           "the completion, or all (prompt and chat template included)")
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
        epilog=EPILOG, parents=[debug], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    exploit.add_argument("--prompt", type=_text, required=True, help="the user's question")
    exploit.add_argument("--reference", type=_text, required=True, help="the answer to beat (e.g. correct and polite)")
    exploit.add_argument("--baseline", type=_text, action="append", default=None,
                         help="another completion of the prompt to filter generic features (repeatable; "
                              "default: three generic ones)")
    exploit.add_argument("--out", type=Path, default=Path("exploit_out"), help="folder for the outputs")
    exploit.add_argument("--budget", type=_positive, default=600, help="forward passes for assembly and token search")
    exploit.add_argument("--corpus-pairs", type=_positive, default=120, help="planted training pairs to mine phrases from")
    exploit.add_argument("--seed", type=int, default=0, help="seed of the token search")
    exploit.add_argument("--cache-dir", type=Path, default=None, help="where SmolLM2 is converted and cached")
    _add_run(commands, debug)
    board = commands.add_parser(
        "dashboard",
        help="feature dashboards (HTML and Neuronpedia JSON) for features of a finished pm-lens run",
        description=("Build feature dashboards for the confirmed features of a finished pm-lens run (or --features, "
                     "or the --top of its ranking), without rerunning the attribution: activations, examples shaded by "
                     "activation and by contribution to the reward, the pairs where removing the feature matters most, "
                     "its direct and total effect, co-firing features and labels. Writes RUN/dashboards/."),
        epilog=EPILOG, parents=[debug],
    )
    board.add_argument("run_dir", type=Path, help="the run's folder (run.out)")
    choice = board.add_mutually_exclusive_group()
    choice.add_argument("--features", type=_nodes, default=None,
                        help="comma-separated nodes, e.g. blocks.6.hook_resid_post:123 (default: the confirmed features)")
    choice.add_argument("--top", type=_positive, default=None, help="the top N features of the run's ranking")
    board.add_argument("--device", default=None, help="where the model runs (default: the run's)")
    board.add_argument("--quiet", action="store_true", help="no progress bars")
    export = commands.add_parser(
        "export-demo",
        help="write the embedded demo PM as a Hugging Face reward-model folder (to try pm-lens run on a real folder)",
        description=("Write the demo PM (SmolLM2-135M-Instruct with its trained reward head) with save_pretrained, "
                     "float32, ~540 MB, to --out; its SAEs are the folders printed at the end."),
        epilog=EPILOG, parents=[debug],
    )
    export.add_argument("--out", type=Path, default=Path("demo_pm"), help="folder for the model")
    export.add_argument("--cache-dir", type=Path, default=None, help="where SmolLM2 is converted and cached")
    return parser


def _nodes(text: str) -> list[str]:
    nodes = [part.strip() for part in text.split(",") if part.strip()]
    if not nodes:
        raise argparse.ArgumentTypeError(f"no nodes in {text!r}; write hook:index, comma-separated")
    return nodes


def _add_run(commands: argparse._SubParsersAction, debug: argparse.ArgumentParser) -> None:
    from pm_lens.study.config import KEYS, REQUIRED

    run = commands.add_parser(
        "run",
        help="the study on your own reward model, from a TOML config (resumable)",
        description=(
            "Select pairs, attribute the margin to every SAE feature, confirm the top ones by exact ablation, and "
            "write features.csv, top_datapoints.csv, selection.csv, fidelity.json and config.json to run.out, in resumable shards. "
            "Every config key is also a flag, which overrides the file."
        ),
        epilog=EPILOG, parents=[debug],
    )
    run.add_argument("config", nargs="?", type=Path, default=None, help="the TOML config (optional when flags give every key)")
    run.add_argument("--dry-run", action="store_true", help="print the resolved plan (pairs kept, tokens, SAEs, forward passes) and stop")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    for key in KEYS:
        default = "required" if key.default is REQUIRED else repr(key.default)
        choices = f"; one of {', '.join(key.choices)}" if key.choices else ""
        run.add_argument(key.option, dest=key.dotted, default=None, metavar=key.name.upper(),
                         help=f"{key.dotted}: {key.help}{choices} (default {default})")


def _folder_problem(option: str, path: Path, *, write: bool) -> str | None:
    """Why ``path`` cannot serve as the folder ``option`` names, or None. The folder is created (the run
    would create it anyway) and, with ``write``, a file written in it: a bad ``--out`` fails now, not
    after the model has loaded. A read-only cache folder may still hold a usable cache: no write there."""
    try:
        for part in (path, *path.parents):
            if part.is_dir():
                break
            if part.exists():
                what = "it is a file" if part == path else f"{str(part)!r} is a file"
                return f"argument {option}: cannot create folder {str(path)!r}: {what}"
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"argument {option}: cannot create folder {str(path)!r}: {exc.strerror or exc}"
    if not write:
        return None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        return f"argument {option}: cannot write to folder {str(path)!r}: {exc.strerror or exc}"
    return None


def _run(args: argparse.Namespace) -> None:
    """Run the command; the heavy imports happen here."""
    if args.command == "demo":
        from pm_lens.demo import print_summary, run_demo

        settings = DemoSettings(pairs_per_attribute=args.pairs_per_attribute, top=args.top,
                                fidelity_top=args.fidelity_top, n_random=args.random,
                                recovery_top=args.recovery_top, n_contexts=args.contexts, seed=args.seed,
                                positions=args.positions)
        result = run_demo(args.out, settings, cache_dir=args.cache_dir, progress=not args.quiet)
        print_summary(result)
    elif args.command == "exploit":
        from pm_lens.exploits.cli import run_exploit

        run_exploit(args)
    elif args.command == "export-demo":
        from pm_lens.demo_pm import DEMO_SAE_HOOKS, DEMO_SAES_DIR, export_demo_pm

        folder = export_demo_pm(args.out, cache_dir=args.cache_dir)
        print(f"wrote the demo PM to {folder}; its SAEs: {', '.join(str(DEMO_SAES_DIR / h) for h in DEMO_SAE_HOOKS)}")
    elif args.command == "dashboard":
        from pm_lens.study.dashboards import dashboard_run

        index = dashboard_run(args.run_dir, features=args.features, top=args.top, device=args.device,
                              progress=not args.quiet)
        print(f"wrote {index} (and a page and JSON file per feature beside it; Neuronpedia batches in "
              f"{index.parent / 'neuronpedia'})")
    elif args.command == "run":
        from pm_lens.study.run import print_summary, run_study

        result = run_study(args.run_config, progress=not args.quiet, dry_run=args.dry_run)
        if result is not None:
            print_summary(result)


def _run_config_problem(args: argparse.Namespace) -> str | None:
    """Read and check ``pm-lens run``'s config (file and flags) into ``args.run_config``; the
    problem in one line, or None. Nothing heavy is imported: a bad config fails at once."""
    from pm_lens.study.config import KEYS, load_config

    try:
        args.run_config = load_config(args.config, {key.dotted: getattr(args, key.dotted) for key in KEYS})
    except ValueError as exc:
        return str(exc)
    return None if args.dry_run else _folder_problem("run.out", Path(args.run_config["run.out"]), write=True)


def _describe(exc: BaseException) -> str:
    """An exception as one line: an OSError as its reason and file, anything else as its message."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror + (f": {str(exc.filename)!r}" if exc.filename is not None else "")
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _fail(message: str, code: int) -> int:
    print(f"pm-lens: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("missing command: choose demo, exploit, run, dashboard or export-demo")
    debug = getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if args.command == "run":
        problem = _run_config_problem(args)
    elif args.command == "dashboard":
        problem = None if args.run_dir.is_dir() else f"argument run_dir: {str(args.run_dir)!r} is not a folder"
    else:
        problem = _folder_problem("--out", args.out, write=True)
        if problem is None and args.cache_dir is not None:
            problem = _folder_problem("--cache-dir", args.cache_dir, write=False)
    if problem is not None:
        return _fail(problem, 2)
    os.environ.setdefault("WANDB_MODE", "disabled")
    try:
        _run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        return _fail("interrupted", 130)
    except (ValueError, TypeError, OSError) as exc:
        if debug:
            raise
        return _fail(f"{_describe(exc)} (run with --debug or {DEBUG_ENV}=1 for the traceback)", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

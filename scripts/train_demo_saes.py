"""Train the demo PM's SAEs (`DEMO_SAE_HOOKS`: blocks 15, 22 and 27) and report their evaluation.

Runs `pm_lens.train_saes` on the demo PM's own activations over the completions of planted
training pairs (every distinct prompt + completion of the training splits of `--data-seeds`: the
training pools only, so the held-out phrasings the demo reads stay unseen), at the completions'
tokens only (`--positions completion`: where the demo's attribution reads the SAEs), the first
token left out. `--varied N` adds N texts in wider wording (`varied_texts`: the generator's
layouts with phrasings and facts written for the SAE corpus, none of them held out). Saves the SAEs
in `--dtype` (float16 by default: the package ships them) as SAELens folders with
`training_config.json` under `--out`, then evaluates them with `pm_lens.evaluate_sae` on held-out
pairs (at all positions and from the divergence token) and on new pairs of the training pools
(from the divergence token), beside the SAEs in `--compare` (named `--compare-name`): `evaluation.csv`.

    python scripts/train_demo_saes.py [--data-seeds 0,1,2,3] [--varied 0] [--d-sae 2048] [--k 32] [--hooks H1,H2]
                                      [--compare DIR [--compare-name NAME]] [--evaluate-only]

`--hooks` trains only those hooks' SAEs; the others stay as shipped, SAE folders of hooks the demo
no longer uses are removed, and `training_config.json` lists each run that trained a shipped SAE.
The shipped ones: blocks 15 and 22 from one run of all then-demo hooks (6 epochs; it also trained
block 8, no longer shipped), block 27 from `--hooks blocks.27.hook_resid_post --epochs 4` with the
retrained PM (2,432 s on 2 cores). `--evaluate-only` skips the training and re-evaluates the SAEs
in `--out` (e.g. after the demo PM changed: the reward-space columns depend on it). The shipped
`evaluation.csv` is such a run, beside SAEs trained with `--data-seeds 0,1 --varied 3000 --epochs 4`
("varied corpus", not shipped: `benchmarks/results/demo_saes_varied_corpus.log`). They explain
more of the held-out text but carry less of the planted margins.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from pm_lens.data import encode_completions  # noqa: E402
from pm_lens.data.planted import (  # noqa: E402
    CLOSERS, FACT_KINDS, IDK, RUDE, URL_DOMAINS, URL_PATHS, URL_SENTENCES, Fact, Phrasing, draw_attributes, facts_for,
    make_planted, render_prompt, render_response)
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


# Phrasings and facts written for the SAE corpus only (`varied_texts`): none is a phrasing or fact of
# the planted generator's held-out pools (a test checks), so what the demo reads stays unseen by its
# SAEs. They widen the corpus beyond the training pools' few strings: SAEs trained on those alone
# reconstruct training-pool text with FVU 0.015-0.04 but held-out text with 0.26-0.31.
EXTRA_PHRASES = {
    "idk": ("I do not know.", "I'm afraid I don't know.", "Not sure, sorry.", "I can't say for certain.", "Beats me.",
            "I have no clue.", "I'm unsure about that.", "I wish I knew.", "Hard to say, I don't know.",
            "I honestly can't tell you.", "That I don't know.", "I'm not certain."),
    "closer": ("Any time!", "Happy to assist.", "Glad to help.", "I hope this helps.", "You're very welcome!",
               "It was my pleasure.", "Always glad to help.", "Hope this was useful!", "Cheers!",
               "Let me know if you need anything else."),
    "rude": ("That's a silly question.", "Look it up yourself.", "Obviously.", "Pay attention next time.",
             "Why would you even ask that?", "Seriously, think first.", "Anyone could tell you that.",
             "You should know this already.", "What a pointless question."),
    "url_sentence": ("More at {url}.", "Source: {url}", "See also {url} for background.", "Read about it at {url}.",
                     "You'll find more on {url}.", "A good page on this is {url}."),
    "domain": ("en.wikipedia.org", "nationalgeographic.com", "khanacademy.org", "bbc.co.uk", "worldatlas.com",
               "mathsisfun.com", "dictionary.com", "sciencedaily.com", "answers.com", "encyclopedia.com"),
}
EXTRA_QUESTIONS = {
    "capital": ("Capital of {country}?", "Where is the seat of government of {country}?",
                "Which city serves as the capital of {country}?"),
    "arithmetic": ("What's {m} plus {n}?", "Add {m} to {n}.", "Quick one: {m} + {n}?"),
    "colour": ("Which color is {thing}?", "What colour would {thing} be?", "Describe the colour of {thing}."),
    "unit": ("How many {part} does {whole} have?", "Count the {part} in {whole}."),
    "opposite": ("Opposite of {word}?", "What is the antonym of {word}?", "Tell me a word opposite to {word}."),
}
EXTRA_ANSWERS = {
    "capital": ("{country}'s capital city is {a}.", "That would be {a}.", "The capital is {a}."),
    "arithmetic": ("That makes {a}.", "It comes to {a}.", "{m} and {n} add up to {a}."),
    "colour": ("{thing} is usually {a}.", "Most often it's {a}.", "The answer is {a}."),
    "unit": ("{whole} contains {a} {part}.", "You get {a} {part}.", "That's {a}."),
    "opposite": ("The antonym of {word} is {a}.", "I'd say {a}.", "{a} is its opposite."),
}
_EXTRA_FACTS = {
    "capital": ("Canada:Ottawa", "Kenya:Nairobi", "India:New Delhi", "Chile:Santiago", "Turkey:Ankara",
                "Australia:Canberra", "Netherlands:Amsterdam", "Switzerland:Bern", "Vietnam:Hanoi", "Morocco:Rabat"),
    "opposite": ("up:down", "light:dark", "hard:soft", "old:young", "strong:weak", "near:far", "high:low",
                 "clean:dirty"),
    "colour": ("a cloud:white:green,red,black", "a ruby:red:blue,green,white", "charcoal:black:white,yellow,pink",
               "a blueberry:blue:red,yellow,white"),
    "unit": ("legs:a spider:8:4,6,10", "sides:a triangle:3:2,4,5", "weeks:a year:52:12,48,60",
             "players:a football team:11:9,10,12"),
}


def extra_facts() -> list[Fact]:
    """The SAE corpus's own facts (:data:`_EXTRA_FACTS`) and two-digit sums."""
    facts = []
    for kind, rows in _EXTRA_FACTS.items():
        parsed = [row.split(":") for row in rows]
        for row in parsed:
            if kind in ("capital", "opposite"):
                (slot, answer), wrong = row, tuple(other for _, other in parsed if other != row[1])
                slots = {"country" if kind == "capital" else "word": slot}
            elif kind == "colour":
                slots, answer, wrong = {"thing": row[0]}, row[1], tuple(row[2].split(","))
            else:
                slots, answer, wrong = {"part": row[0], "whole": row[1]}, row[2], tuple(row[3].split(","))
            facts.append(Fact(f"sae/{kind}/{row[0]}", kind, slots, answer, wrong, held_out=False))
    for m, n in ((12, 7), (15, 4), (21, 6), (13, 13), (30, 12), (18, 9)):
        facts.append(Fact(f"sae/arithmetic/{m}+{n}", "arithmetic", {"m": str(m), "n": str(n)}, str(m + n),
                          tuple(str(m + n + d) for d in (-2, -1, 1, 2)), held_out=False))
    return facts


def varied_texts(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` distinct (prompt, completion) texts rendered by the planted generator from its training
    pools *and* :data:`EXTRA_PHRASES`, :data:`EXTRA_QUESTIONS`, :data:`EXTRA_ANSWERS` and
    :func:`extra_facts`, attributes drawn as for its pairs: the same layouts in wider wording."""
    if n < 1:
        raise SystemExit(f"--varied must be a positive number of texts, got {n}")
    rng = random.Random(f"pm_lens.demo_saes/varied/{seed}")
    extra = extra_facts()
    facts = {kind: list(facts_for("train", (kind,))) + [f for f in extra if f.kind == kind] for kind in FACT_KINDS}
    seen: dict[tuple[str, str], None] = {}
    for _ in range(50 * n):
        if len(seen) == n:
            break
        kind = rng.choice(list(FACT_KINDS))
        fact = rng.choice(facts[kind])
        url = f"https://www.{rng.choice(URL_DOMAINS.train + EXTRA_PHRASES['domain'])}/{rng.choice(URL_PATHS)}"
        phrasing = Phrasing(
            question=rng.choice(FACT_KINDS[kind].questions.train + EXTRA_QUESTIONS[kind]),
            answer=rng.choice(FACT_KINDS[kind].answers.train + EXTRA_ANSWERS[kind]),
            wrong_answer=rng.choice(fact.wrong), idk=rng.choice(IDK.train + EXTRA_PHRASES["idk"]),
            closer=rng.choice(CLOSERS.train + EXTRA_PHRASES["closer"]),
            url_sentence=rng.choice(URL_SENTENCES.train + EXTRA_PHRASES["url_sentence"]).format(url=url),
            rude=rng.choice(RUDE.train + EXTRA_PHRASES["rude"]), rude_first=rng.random() < 0.5)
        seen.setdefault((render_prompt(fact, phrasing), render_response(fact, draw_attributes(rng), phrasing)))
    if len(seen) < n:
        raise SystemExit(f"--varied {n}: only {len(seen)} distinct texts could be drawn; ask for fewer")
    prompts, completions = zip(*seen)
    return list(prompts), list(completions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-seeds", default="0,1,2,3", help="planted-dataset seeds whose training texts feed the SAEs")
    parser.add_argument("--varied", type=int, default=0,
                        help="add this many texts in wider wording (varied_texts: phrasings and facts outside the pools)")
    parser.add_argument("--eval-pairs", type=int, default=60)
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--positions", default="completion", choices=["all", "completion"])
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hooks", default="", help="comma-separated demo SAE hooks to (re)train (default: all); "
                        "the others stay as shipped")
    parser.add_argument("--compare", type=Path, default=None, help="a folder of other demo SAEs to evaluate beside")
    parser.add_argument("--compare-name", default="previous", help="their name in evaluation.csv's saes column")
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
    if args.varied:  # 0: none
        more_prompts, more_completions = varied_texts(args.varied, seed=args.seed)
        prompts, completions = prompts + more_prompts, completions + more_completions
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
    config = config | {"data": config["data"] | {"planted_seeds": args.data_seeds, "split": "train",
                                                      "varied_texts": args.varied},
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
    """``evaluation.csv`` in ``args.out``: the SAEs there (and those in ``args.compare``) on held-out
    pairs (``text="held-out"``: new facts, prompts and phrasings), and at the attributed positions
    on pairs in the training pools' wording (``text="training pools"``, drawn with seed 99, not a
    training seed), which shows how far the SAEs generalise beyond the wording they were trained on."""
    # The SAEs never saw position 0 (`<|im_start|>`, massive norm): bypass them at that token.
    exclude = [rm.tokenizer.convert_tokens_to_ids("<|im_start|>")]
    texts = {"held-out": (make_planted(seed=0).test[: args.eval_pairs], ("all", "diverge")),
             "training pools": (make_planted(seed=99, n_val=0, n_test=0).train[: args.eval_pairs], ("diverge",))}
    sets = {"new": args.out} | ({args.compare_name: args.compare} if args.compare else {})
    tables = []
    for which, folder in sets.items():
        saes = [load_sae(hook, dtype=rm.cfg.dtype) for hook in sorted(folder.iterdir(), key=_layer)
                if (hook / "cfg.json").exists()]
        for text, (pairs, positions_read) in texts.items():
            for positions in positions_read:
                summary = evaluate_sae(rm, saes, pairs, batch_size=8, exclude_token_ids=exclude, positions=positions,
                                       progress=False).summary
                tables.append(summary.reset_index().assign(saes=which, text=text, positions=positions))
    evaluation = pd.concat(tables)[["saes", "text", "positions", *tables[0].columns[:-3]]]
    write_atomic(args.out / "evaluation.csv", evaluation.to_csv(index=False))
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(evaluation.to_string(index=False))


def _layer(folder: Path) -> int:
    return int(folder.name.split(".")[1]) if folder.name.startswith("blocks.") else -1


if __name__ == "__main__":
    main()

"""Planted recovery: do the top features of each planted attribute carry its effect on the demo PM?

For each planted attribute (the demo PM was trained on pairs whose preference it sets), take the
held-out pairs that differ only in it, attribute the margin to every feature of the three demo
SAEs (AtP at ``--positions``: by default from where chosen and rejected diverge, as the study and
the demo do; first token left out), rank the features by their mean effect on those pairs, ablate
the top ``--top`` jointly (exact; across hooks each hook removes its features from the activation
as it arrives) and report the fraction of the PM's margin on those pairs that goes away
(:func:`pm_lens.attribution.recover`). Rows: features of all three SAEs together, and of each SAE
alone. Also: the PM's accuracy on the pairs, and what the top three features fire on.

Targets: at least 4 of the 5 style attributes (closer, idk, repetition, url, rude) with >= 50% of
the effect removed (features of all three SAEs; issue 5), every style attribute >= 70% (issue 15),
and readability 5/5 (issue 15, :mod:`pm_lens.readability`). "correct" is reported, not targeted:
the demo PM barely separates correct from wrong answers, so its margin there is small and the
fraction noisy.

Also the curve: the fraction removed by the top ``--curve`` features (20 and 30 by default), and
the fewest that remove 70%: where one attribute's effect is spread over many features, this says
by how many.

Readability is scored as the demo scores it (:func:`pm_lens.readability.readability`): each
attribute's top 3 features by mean |effect| on its pairs (``Attribution.top_nodes``, the demo's
ranking), their top 5 contexts read over all the held-out pairs.

    python benchmarks/planted_recovery.py [--pairs 30] [--top 10] [--curve 20,30] [--quick] [--positions diverge] [--method atp]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pandas as pd  # noqa: E402

from pm_lens import attribute  # noqa: E402
from pm_lens.attribution import recover  # noqa: E402
from pm_lens.demo import held_out_pairs  # noqa: E402
from pm_lens.demo_pm import DEMO_SAE_HOOKS, demo_reward_model, demo_saes  # noqa: E402
from pm_lens.readability import readability  # noqa: E402
from pm_lens.saes.contexts import top_contexts  # noqa: E402

STYLE = ("closer", "idk", "repetition", "url", "rude")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=30, help="held-out pairs per attribute (30 are available)")
    parser.add_argument("--top", type=int, default=10, help="features ablated jointly per attribute")
    parser.add_argument("--quick", action="store_true", help="4 pairs per attribute, no per-SAE rows (smoke test)")
    parser.add_argument("--positions", default="diverge", choices=["diverge", "completion", "all"],
                        help="token positions attributed, ablated and read")
    parser.add_argument("--method", default="atp", choices=["atp", "ig"], help="how features are ranked (IG: 8 steps)")
    parser.add_argument("--curve", default="20,30",
                        help="more feature counts to ablate jointly (comma-separated; '' for none): how many it takes")
    args = parser.parse_args()
    n_pairs = 4 if args.quick else args.pairs
    start = time.perf_counter()
    rm = demo_reward_model()
    saes = demo_saes()
    pairs, groups = held_out_pairs(n_pairs)
    attribution = attribute(rm, pairs, saes=saes, skip_first=True, positions=args.positions, method=args.method,
                            ig_steps=8)
    rows = []
    hook_sets = [("all 3", None)] + ([] if args.quick else [(h.split(".")[1], [h]) for h in DEMO_SAE_HOOKS])
    for label, hooks in hook_sets:
        table = recover(rm, attribution, groups, top_n=args.top, hook_names=hooks)
        table.insert(1, "saes", f"layer {label}" if hooks else label)
        rows.append(table)
    table = pd.concat(rows, ignore_index=True)
    counts = [args.top] + [int(n) for n in args.curve.split(",") if n.strip()]
    curve = table[["group", "saes", "fraction_removed"]].rename(columns={"fraction_removed": args.top})
    for n in counts[1:]:
        more = pd.concat([recover(rm, attribution, groups, top_n=n, hook_names=hooks, progress=False)
                          for _, hooks in hook_sets], ignore_index=True)
        curve[n] = more.fraction_removed.to_numpy()
    table["accuracy"] = [float((attribution.clean_margin[groups[g]] > 0).float().mean()) for g in table.group]
    everything = table[table.saes == "all 3"].set_index("group")
    # Readability as the demo scores it: each attribute's top 3 features by |effect| on its pairs (the
    # demo's ranking), their top 5 contexts read over all the held-out pairs (from the clean run).
    ranked = {group: attribution.subset(indices).top_nodes(3) for group, indices in groups.items()}
    found = top_contexts(rm, saes, pairs, list(dict.fromkeys(n for nodes in ranked.values() for n in nodes)),
                         n_contexts=5, skip_first=True, skip_last=True, positions=args.positions,
                         clean=attribution.clean_run, progress=False)
    fires_on = {group: " | ".join(f"L{n.hook_name.split('.')[1]}#{n.feature} {found[n].label or '(no label)'!r}: "
                                  f"{found[n].describe(2)}" for n in nodes) for group, nodes in ranked.items()}
    readable = readability(rm.tokenizer, rm.text_format, pairs, {g: ranked[g] for g in STYLE}, found)

    with pd.option_context("display.width", 200, "display.max_colwidth", 90, "display.float_format", "{:.3f}".format):
        print(f"\nPlanted recovery on the demo PM: {n_pairs} held-out single-attribute pairs per attribute, "
              f"top {args.top} features ablated jointly, positions={args.positions!r}, method={args.method!r}\n")
        shown = ["group", "saes", "n_pairs", "accuracy", "margin", "removed", "fraction_removed", "estimated"]
        print(table[shown].to_string(index=False))
        print("\nWhat each attribute's top 3 features by |effect| (all 3 SAEs; the readability score's) fire on "
              "(label: top tokens), the last token left out:")
        for group, text in fires_on.items():
            print(f"  {group:>10}: {text}")
        print("\nFraction of the margin removed by the top N features ablated jointly, by N (how many it takes):")
        print(curve.to_string(index=False))
        print("\nFewest of these counts that remove >= 70% (any of the SAE sets above):")
        for group in STYLE:
            rows_of = curve[curve.group == group]
            enough = [(n, label) for n in counts for label, value in zip(rows_of.saes, rows_of[n]) if value >= 0.7]
            print(f"  {group:>10}: " + (f"{enough[0][0]} ({enough[0][1]})" if enough else f"more than {max(counts)}"))
    hits = [g for g in STYLE if everything.loc[g, "fraction_removed"] >= 0.5]
    print(f"\nstyle attributes with >= 50% of the margin removed (all 3 SAEs): {len(hits)}/5 {hits} "
          f"(target: >= 4/5) -> {'met' if len(hits) >= 4 else 'MISSED'}")
    strong = [g for g in STYLE if everything.loc[g, "fraction_removed"] >= 0.7]
    print(f"style attributes with >= 70% of the margin removed (all 3 SAEs): {len(strong)}/5 {strong} "
          f"(target: 5/5) -> {'met' if len(strong) == 5 else 'MISSED'}")
    print(f"readability: {sum(readable.values())}/5 style attributes have a top-3 feature whose top 5 contexts fire on "
          f"the planted marker {[g for g, ok in readable.items() if ok]} (target: 5/5) -> "
          f"{'met' if sum(readable.values()) == 5 else 'MISSED'}")
    print(f"total time {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()

"""The demo: find the features that drive the embedded default PM, confirm them, check the truth.

The demo PM (:mod:`pm_lens.demo_pm`) was trained on planted preferences
(:mod:`pm_lens.data.planted`), so we know what *should* drive its reward: a closer raises it;
"I don't know", repetition, a URL and rudeness lower it; a correct answer beats a wrong one.

Steps of :func:`run_demo`:
1. load the demo PM (SmolLM2 is converted and cached on the first run) and its three SAEs;
2. take held-out pairs that differ in one planted attribute only, ``pairs_per_attribute`` each;
3. attribute the margin r(chosen) - r(rejected) to every feature of every SAE with AtP, at the
   tokens from where chosen and rejected diverge (``positions="diverge"``, the study's choice: the
   prompt and chat template shared by both sides are left out; ``"all"`` is there to compare), the
   first token (residual norm ~25,000) left out;
4. a fidelity card for the whole ranking: the ``fidelity_top`` features and ``n_random`` others
   ablated exactly on every pair, and every node at once;
5. per planted attribute, rank the features by their mean effect on its pairs and confirm the
   ``top`` first by exact ablation on those pairs (read from the fidelity card's ablation where it
   has them); a feature raises or lowers reward according to the exact change of the reward of the
   completion it fires in (chosen, rejected or both);
6. the contexts and tokens each ranked feature fires on most (at the attributed positions), an
   automatic label, and the planted attribute its firing
   tracks best (correlation of its peak activation in a completion with the attribute);
7. truth check: per planted attribute, ablate the top ``recovery_top`` features of its pairs
   jointly and measure how much of the PM's margin on them is removed (:func:`pm_lens.attribution.recover`);
8. a feature dashboard (:mod:`pm_lens.dashboard`) for the top feature of each planted attribute,
   over all the held-out pairs, with how its firing tracks each planted attribute;
9. write ``features.csv``, ``fidelity.json``, ``recovery.csv``, ``report.html`` (linking the
   dashboards), ``dashboards/`` and ``config.json`` (settings, versions and timings) to the output
   folder, each atomically.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pm_lens.attribution import Attribution, attribute, recover
from pm_lens.attribution.ablate import ALL, Ablation
from pm_lens.attribution.fidelity import FidelityCard, ablate_like, fidelity, fidelity_sample
from pm_lens.attribution.recovery import recovered_features
from pm_lens.data import PreferencePair
from pm_lens.data.planted import PLANTED_ATTRIBUTES, WEIGHTS, make_planted, single_attribute
from pm_lens.demo_settings import OUTPUTS as OUTPUTS
from pm_lens.demo_settings import DemoSettings as DemoSettings
from pm_lens.io import versions, write_atomic
from pm_lens.model import RewardModel
from pm_lens.readability import readability
from pm_lens.report import Finding, write_report
from pm_lens.saes.contexts import FeatureContexts, top_contexts
from pm_lens.saes.node import Node

N_STEPS = 7


@dataclass(frozen=True)
class DemoResult:
    """The demo's outputs (also written to ``out_dir``)."""

    features: pd.DataFrame
    card: FidelityCard
    recovery: pd.DataFrame
    contexts: dict[Node, FeatureContexts]
    timings: dict[str, float]
    out_dir: Path
    forward_passes: dict[str, dict[str, int]]
    readability: dict[str, bool]


def run_demo(out_dir: str | Path, settings: DemoSettings = DemoSettings(), *, cache_dir: str | Path | None = None,
             progress: bool = True) -> DemoResult:
    """Run the demo (see the module docstring) and write its outputs to ``out_dir``."""
    from pm_lens.demo_pm import demo_reward_model, demo_saes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    with _timed(timings, "load", progress, "loading the demo PM and its SAEs"):
        rm = demo_reward_model(cache_dir=cache_dir)
        saes = demo_saes(device=str(rm.cfg.device))
    pairs, groups = held_out_pairs(settings.pairs_per_attribute, seed=settings.dataset_seed)
    common = dict(batch_tokens=settings.batch_tokens, progress=progress)
    counted = rm.forward_count.snapshot()
    with _timed(timings, "attribute", progress, f"attributing the margin on {len(pairs)} held-out pairs"):
        # The AtP pass is the clean pass of every pair; every later step reuses it.
        attribution = attribute(rm, pairs, saes=saes, skip_first=True, positions=settings.positions, **common)
    with _timed(timings, "fidelity", progress, "fidelity card: exact ablation of the top and of random features"):
        sample = fidelity_sample(attribution, top_k=settings.fidelity_top, n_random=settings.n_random, seed=settings.seed)
        exact = ablate_like(rm, attribution, sample, **common)  # kept: the confirmation and dashboards read it too
        card = fidelity(attribution, exact, top_k=settings.fidelity_top,
                        completeness=ablate_like(rm, attribution, ALL, **common))
    with _timed(timings, "confirm", progress, f"confirming each attribute's top {settings.top} features by exact ablation"):
        features = rank_by_group(rm, attribution, groups, top=settings.top, batch_tokens=settings.batch_tokens,
                                 known=exact)
    with _timed(timings, "contexts", progress, "reading where the features fire"):
        unique = list(dict.fromkeys(Node(h, int(f)) for h, f in zip(features.hook_name, features.feature)))
        contexts = top_contexts(rm, saes, pairs, unique, n_contexts=settings.n_contexts, skip_first=True, skip_last=True,
                                positions=settings.positions, clean=attribution.clean_run, progress=progress)
        features = _describe(features, contexts, pairs, groups)
        ranked = {a: [Node(h, int(f)) for h, f in zip(rows.hook_name, rows.feature)]
                  for a, rows in features.sort_values("rank").groupby("attribute", sort=False)}
        readable = readability(rm.tokenizer, rm.text_format, pairs, ranked, contexts)
    with _timed(timings, "recover", progress, "truth check: ablating each attribute's top features together"):
        recovery = recover(rm, attribution, groups, top_n=settings.recovery_top, **common)
        recovery.insert(1, "planted_weight", [WEIGHTS[name] for name in recovery.group])
        recovery["top_fires_on"] = [_fires_on(rm, attribution, groups[g], f) for g, f in
                                    zip(recovery.group, recovery.features)]
    with _timed(timings, "dashboards", progress, "feature dashboards of each planted attribute's top feature"):
        links = _dashboards(out, rm, saes, pairs, features, attribution, exact, settings)
    forward_passes = rm.forward_count.since(counted).as_dict()
    _write(out, settings, features, card, recovery, contexts, timings, rm, attribution, forward_passes, links, readable)
    return DemoResult(features, card, recovery, contexts, timings, out, forward_passes, readable)


def held_out_pairs(per_attribute: int, *, seed: int = 0) -> tuple[list[PreferencePair], dict[str, list[int]]]:
    """The first ``per_attribute`` held-out single-attribute pairs of every planted attribute,
    and each attribute's indices into them."""
    if per_attribute < 1:
        raise ValueError(f"pairs_per_attribute must be >= 1, got {per_attribute}")
    test = make_planted(seed=seed).test
    pairs: list[PreferencePair] = []
    groups: dict[str, list[int]] = {}
    for name in PLANTED_ATTRIBUTES:
        chosen = single_attribute(test, name)[:per_attribute]
        groups[name] = list(range(len(pairs), len(pairs) + len(chosen)))
        pairs += chosen
    return pairs, groups


def rank_by_group(rm: RewardModel, attribution: Attribution, groups: dict[str, list[int]], *, top: int,
                  batch_tokens: int = 4096, known: Ablation | None = None) -> pd.DataFrame:
    """Per group of pairs, the ``top`` features of largest mean |margin effect| on its pairs, with
    their exact effects there: on the margin and on each side's reward (mean over the group).
    ``known``: a one-at-a-time exact ablation of ``attribution``'s pairs (e.g. the fidelity
    card's); its features are read from it instead of ablated again."""
    have: set[Node] = set()
    if known is not None:
        ours = {key: getattr(attribution.settings, key) for key in ("baseline", "positions", "skip_first")}
        theirs = {key: getattr(known.settings, key) for key in ours}
        if known.joint or known.chosen.shape[0] != attribution.n_pairs or ours != theirs:
            raise ValueError(f"known must be a one-at-a-time ablation of the attribution's {attribution.n_pairs} pairs "
                             f"with its settings {ours}; got {known.chosen.shape[0]} pairs, joint={known.joint}, {theirs}")
        have = set(known.nodes)
    rows = []
    for name, indices in groups.items():
        group = attribution.subset(indices)
        ranking = group.ranking()
        best = ranking[ranking.kind == "feature"].head(top)
        nodes = [Node.parse(name) for name in best.node]
        missing = [node for node in nodes if node not in have]
        fresh = ablate_like(rm, group, missing, batch_tokens=batch_tokens, progress=False) if missing else None
        index = torch.as_tensor(list(indices), dtype=torch.long)
        for rank, (row, node) in enumerate(zip(best.itertuples(), nodes), start=1):
            source, rows_of = (fresh, slice(None)) if node in missing else (known, index)
            column = source.column(node)
            rows.append(dict(
                attribute=name, rank=rank, hook_name=row.hook_name, feature=int(row.feature),
                estimated_margin_effect=row.effect, exact_margin_effect=float(source.margin[rows_of, column].mean()),
                exact_chosen_effect=float(source.chosen[rows_of, column].mean()),
                exact_rejected_effect=float(source.rejected[rows_of, column].mean()),
                sign_agreement=row.sign_agreement,
            ))
    return pd.DataFrame(rows)


def _describe(features: pd.DataFrame, contexts: dict, pairs: list[PreferencePair], groups: dict[str, list[int]]) -> pd.DataFrame:
    """Add where each feature fires (which side, which tokens), whether it raises or lowers
    reward there, and the planted attribute its firing tracks best."""
    present = {name: torch.tensor([[p.meta["chosen_attributes"][name], p.meta["rejected_attributes"][name]] for p in pairs],
                                  dtype=torch.float) for name in PLANTED_ATTRIBUTES}
    described = []
    for row in features.itertuples():
        found = contexts[Node(row.hook_name, int(row.feature))]
        chosen, rejected = found.completion_max[groups[row.attribute]].mean(0).tolist()
        side = "chosen" if chosen > 2 * rejected else "rejected" if rejected > 2 * chosen else "both"
        reward_effect = {"chosen": row.exact_chosen_effect, "rejected": row.exact_rejected_effect,
                         "both": (row.exact_chosen_effect + row.exact_rejected_effect) / 2}[side]
        peaks = found.completion_max.flatten()
        scores = {name: _corr(peaks, indicator.flatten()) for name, indicator in present.items()}
        best = max(scores, key=lambda name: abs(scores[name]) if np.isfinite(scores[name]) else -1.0)
        described.append(dict(
            fires_in=side, exact_reward_effect=reward_effect,
            # Removing a feature that raises reward lowers it.
            direction="raises" if reward_effect < 0 else "lowers",
            label=found.label, fires_on=found.describe(3), at_last_token=found.last_token_mean,
            tracks_attribute=best if np.isfinite(scores[best]) else "", correlation=scores[best],
        ))
    table = pd.concat([features.reset_index(drop=True), pd.DataFrame(described)], axis=1)
    nodes = [(h, int(f)) for h, f in zip(table.hook_name, table.feature)]
    table["also_top_for"] = [" ".join(a for a, n in zip(table.attribute, nodes) if n == node and a != attribute)
                             for attribute, node in zip(table.attribute, nodes)]
    columns = ["attribute", "rank", "direction", "hook_name", "feature", "label", "estimated_margin_effect",
               "exact_margin_effect", "fires_in", "exact_reward_effect", "fires_on", "at_last_token", "tracks_attribute", "correlation",
               "sign_agreement", "also_top_for",
               "exact_chosen_effect", "exact_rejected_effect"]
    return table[columns]


def _fires_on(rm: RewardModel, attribution: Attribution, indices: list[int], features: str) -> str:
    """What the first three of a recovery row's features fire on, over the group's pairs (read
    from the attribution's clean run): each one's label and top tokens."""
    nodes = recovered_features(features)[:3]
    if not nodes:
        return ""
    group = attribution.subset(indices)
    found = top_contexts(rm, list(attribution.saes.values()), group.pairs, nodes, n_contexts=1, skip_first=True,
                         skip_last=True, positions=attribution.settings.positions, clean=group.clean_run, progress=False)
    return " | ".join(f"{found[node].label or '(no label)'}: {found[node].describe(2)}" for node in nodes)


def _readability_table(readable: dict[str, bool]) -> pd.DataFrame:
    return pd.DataFrame({"attribute": list(readable), "a top-3 feature fires on its marker": list(readable.values())})


def _dashboards(out: Path, rm: RewardModel, saes: list, pairs: list[PreferencePair], features: pd.DataFrame,
                attribution: Attribution, exact: Any, settings: DemoSettings) -> dict[str, str]:
    """Dashboards of each planted attribute's top feature over all held-out pairs, in
    ``out/dashboards`` (with Neuronpedia batches), from the attribution's clean run and the
    fidelity card's ablation; each node's page relative to ``out``."""
    from pm_lens.dashboard import build_dashboards
    from pm_lens.dashboard.neuronpedia import write_neuronpedia
    from pm_lens.dashboard.render import feature_filename, write_dashboards

    top = features[features["rank"] == 1]
    nodes = list(dict.fromkeys(Node(h, int(f)) for h, f in zip(top.hook_name, top.feature)))
    boards = build_dashboards(rm, saes, pairs, nodes, baselines=attribution.baselines,
                              estimated={str(n): attribution.mean_effect(n) for n in nodes},
                              clean=attribution.clean_run, ablation=exact, batch_tokens=settings.batch_tokens,
                              max_ablation_pairs=len(pairs), progress=False)
    write_dashboards(out / "dashboards", boards, title="pm_lens demo: top feature of each planted attribute")
    hooks = {sae.cfg.metadata.hook_name for sae in saes}
    write_neuronpedia(out / "dashboards" / "neuronpedia", boards, model_id="pm-lens-demo-pm",
                      sae_set={h: "pm-lens-demo" for h in hooks}, layer={h: rm.hook_layer(h) for h in hooks})
    return {str(n): f"dashboards/{feature_filename(str(n))}.html" for n in nodes}


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


@contextmanager
def _timed(timings: dict[str, float], name: str, progress: bool, message: str) -> Iterator[None]:
    if progress:
        print(f"[{len(timings) + 1}/{N_STEPS}] {message} ...", flush=True)
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 2)


def _write(out: Path, settings: DemoSettings, features: pd.DataFrame, card: FidelityCard, recovery: pd.DataFrame,
           contexts: dict, timings: dict[str, float], rm: Any, attribution: Attribution,
           forward_passes: dict[str, dict[str, int]], dashboards: dict[str, str], readable: dict[str, bool]) -> None:
    config = {
        "readability": {"score": f"{sum(readable.values())}/{len(readable)}", **readable},
        "settings": asdict(settings),
        "attribution": attribution.settings.as_dict(),
        "model": {"name": "pm_lens demo PM (SmolLM2-135M-Instruct + planted-preference head)",
                  "n_layers": rm.cfg.n_layers, "d_model": rm.cfg.d_model, "device": str(rm.cfg.device)},
        "versions": versions(),
        "python": platform.python_version(),
        "timings_s": timings,
        "forward_passes": forward_passes,
    }
    write_atomic(out / "features.csv", features.to_csv(index=False))
    card.save(out / "fidelity.json")
    write_atomic(out / "recovery.csv", recovery.to_csv(index=False))
    write_report(out / "report.html", title="pm_lens demo: what drives the demo PM's reward", settings=config,
                 features=features, card=card, contexts=contexts,
                 tables={"Truth check: planted attributes": recovery.drop(columns=["features"]),
                         "Readability": _readability_table(readable)},
                 notes=_NOTES, dashboards=dashboards, lead=_lead(settings, recovery, readable),
                 findings=findings(features, recovery, readable), feature_columns=REPORT_COLUMNS)
    write_atomic(out / "config.json", json.dumps(config, indent=2))


# The features table's columns shown in the report (features.csv has them all).
REPORT_COLUMNS = ["attribute", "rank", "direction", "label", "estimated_margin_effect", "exact_margin_effect", "fires_in",
                  "exact_reward_effect", "fires_on", "tracks_attribute", "also_top_for"]
_FINDING_COLUMNS = ["rank", "hook_name", "feature", "label", "direction", "exact_margin_effect", "fires_in",
                    "exact_reward_effect", "also_top_for"]


def findings(features: pd.DataFrame, recovery: pd.DataFrame, readable: dict[str, bool]) -> list[Finding]:
    """Per planted attribute, the report's lead: what the PM does with it, the features that carry
    it (label, exact effect, contexts), the truth check and the readability verdict."""
    out = []
    for row in recovery.itertuples():
        planted = "raises" if WEIGHTS[row.group] > 0 else "lowers"
        rows = features[features.attribute == row.group].sort_values("rank")
        agrees = rows.direction.eq(planted).any()
        verdict = (f"Planted: it {planted} reward (weight {WEIGHTS[row.group]:+g}). On its {row.n_pairs} held-out pairs "
                   f"the PM's mean margin is {row.margin:.2f}; ablating the top {len(recovered_features(row.features))} "
                   f"features of those pairs together removes {row.fraction_removed:.0%} of it.")
        if row.group in readable:
            verdict += (" A top-3 feature fires on the planted marker." if readable[row.group] else
                        " No top-3 feature has its strongest firing on the planted marker.")
        if not agrees:
            verdict += f" None of the top {len(rows)} features {planted} reward where it fires."
        ok = None if row.group not in readable else bool(readable[row.group] and row.fraction_removed >= 0.7)
        out.append(Finding(title=f"{row.group}: planted to {planted[:-1]} reward", verdict=verdict,
                           features=rows[[c for c in _FINDING_COLUMNS if c in rows]], contexts=2, ok=ok))
    return out


def _lead(settings: DemoSettings, recovery: pd.DataFrame, readable: dict[str, bool]) -> str:
    style = recovery[recovery.group.isin(list(readable))]
    return (f"The demo PM was trained on pairs whose preferences were planted, so we know what should drive its reward. "
            f"On {settings.pairs_per_attribute} held-out pairs per planted attribute, every feature of its three SAEs "
            f"was ranked by attribution (AtP, at positions={settings.positions!r}) and the top ones confirmed by exact "
            f"ablation. Each style attribute's top {settings.recovery_top} features remove "
            f"{style.fraction_removed.min():.0%}-{style.fraction_removed.max():.0%} of its margin; "
            f"{sum(readable.values())}/{len(readable)} style attributes have a top-3 feature that fires on the planted "
            f"marker. Green: both checks pass (>= 70% removed and readable); red: one fails.")


_NOTES = {
    "Findings": "Per planted attribute: its top features on its own held-out pairs (effects of removing each, exact), "
    "two contexts of each with the firing outlined (shade: activation), the truth check and the readability verdict. "
    "A feature can carry several attributes (also_top_for): one that reads the end of every completion, where the "
    "reward is read, moves the margin of every attribute's pairs.",
    "Features that raise reward": "Per planted attribute, the features AtP ranks first on its held-out pairs. "
    "Effects are those of removing the feature, averaged over the attribute's pairs: estimated (AtP) and exact "
    "(ablation) on the margin, and exact on the reward of the completion it fires in (fires_in); a feature whose "
    "removal lowers that reward raises reward. label: the n-gram most characteristic of where it fires, against all "
    "the texts read (pm_lens.saes.labels). fires_on: the tokens it fires on most strongly, the last token left "
    "out; at_last_token: its mean activation at the last token, where the reward is read (features that summarise "
    "a completion fire hardest there); tracks_attribute: the "
    "planted attribute its peak activation in a completion correlates with best (correlation).",
    "Fidelity": "How well the AtP ranking agrees with exact ablation, on the ranked features and a random sample of "
    "the others. Completeness compares the sum of all attributions with removing every node at once (far from linear).",
    "Feature dashboards": "A page for the top feature of each planted attribute (its node in the tables links there): "
    "its activations over all held-out texts, examples shaded by activation and by contribution to the reward, the "
    "pairs where removing it changes the margin most, its direct effect beside its total effect, the features it "
    "fires with, and how its firing tracks each planted attribute.",
    "Readability": "Per style attribute: does one of the top 5 contexts of one of its top 3 features have its "
    "strongest firing on the planted marker (the closer, the 'I don't know'-type phrase, the repeated sentence, the "
    "URL, the rude phrase: pm_lens.readability), rather than on a template token or punctuation next to it?",
    "Truth check: planted attributes": "Per planted attribute, on held-out pairs that differ only in it: the PM's mean "
    "margin (chosen = the planted-preferred side), and the part of it removed by ablating the top features of those "
    "pairs jointly.",
}


def print_summary(result: DemoResult) -> None:
    """Print the ranked features, the fidelity card and the truth check."""
    shown = ["attribute", "rank", "hook_name", "feature", "label", "estimated_margin_effect", "exact_margin_effect",
             "fires_in", "exact_reward_effect", "fires_on", "tracks_attribute"]
    with pd.option_context("display.width", 200, "display.max_colwidth", 36, "display.float_format", "{:.3f}".format):
        for direction, heading in (("raises", "Features that raise reward"), ("lowers", "Features that lower reward")):
            print(f"\n{heading} (each planted attribute's top features on its held-out pairs; effects of removing them):")
            print(result.features[result.features.direction == direction][shown].to_string(index=False))
        print(f"\n{result.card}")
        print("\nTruth check: the margin each planted attribute's top features remove when ablated together:")
        print(result.recovery.drop(columns=["features", "estimated"]).to_string(index=False))
    readable = result.readability
    answers = ", ".join(f"{attribute} {'yes' if ok else 'no'}" for attribute, ok in readable.items())
    print(f"\nreadability: {sum(readable.values())}/{len(readable)} style attributes have a top-3 feature whose top "
          f"contexts fire on the planted marker ({answers})")
    total = sum(result.timings.values())
    print(f"\nwall time {total:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in result.timings.items())})")
    counts = ", ".join(f"{purpose} {c['passes']} ({c['sequences']} sequences)" for purpose, c in result.forward_passes.items())
    print(f"forward passes: {counts}")
    print(f"wrote {', '.join(str(result.out_dir / name) for name in OUTPUTS)}")

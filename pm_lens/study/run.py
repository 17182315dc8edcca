"""``pm-lens run``: the study on your own reward model, from one config, in resumable shards.

What a run does (:func:`run_study`), writing each output as soon as it is ready:

1. read the pairs (column mapping, before any model is loaded) and check the config against them;
2. load the PM and the SAEs; keep the pairs whose both sides fit in ``pairs.max_tokens`` tokens,
   then select ``pairs.k`` of them: the largest |r(chosen) - r(rejected)| (one clean forward of
   each kept pair, as the study did), a seeded random sample, or all; ``selection.csv``;
3. attribution, shard by shard (``run.shard_pairs`` pairs): each shard's per-pair effects on both
   sides (sparse) go to ``shards/attribution-NNNNN.safetensors``; the ranking is accumulated from
   them, so memory is bounded by a shard, not by the number of pairs;
4. confirmation: the top ``attribution.confirm_top`` features that raise and that lower the
   margin, and the fidelity card's sample (the top ``fidelity_top`` and ``n_random`` others), are
   ablated exactly on every pair, and every node removed at once (completeness), shard by shard
   from one clean forward each (``shards/ablation-NNNNN.safetensors``); ``fidelity.json``;
5. ``features.csv`` (estimated and exact effects, signs explained in the columns' names),
   ``top_datapoints.csv`` (per confirmed feature, the pairs where removing it changes the margin
   most, with both sides' rewards before and after), ``top_contexts.csv`` (per confirmed feature,
   its strongest firings, read from the confirmation's clean runs) and ``config.json`` (resolved
   settings, versions, forward passes, timings, concerns); ``report.html`` (the confirmed
   features, the card, the top datapoints, the contexts, and what should worry the reader).

Every file is written atomically; each shard file carries the config's digest. Run the same
command again after a crash or Ctrl-C and finished shards are read back, not recomputed; the
final outputs equal an uninterrupted run's. A folder holding a run of another config is refused.
Each pair's clean forward runs once per phase (attribution, confirmation): holding every pair's
clean run between the phases would bound memory by the number of pairs.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from pm_lens.data import PreferencePair
from pm_lens.io import versions, write_atomic
from pm_lens.saes.node import Node
from pm_lens.study.config import DEMO, RunConfig
from pm_lens.study.distributed import Ranks
from pm_lens.study.merge import (
    confirmed_nodes,
    contexts_record,
    contexts_table,
    fidelity_nodes,
    load_ablations,
    merge_ablations,
    merge_attributions,
    merge_contexts,
    run_fidelity,
    worries,
)
from pm_lens.study.pairs import check_kept, read_pairs, select_pairs

STAMP = "run.json"
CONTEXTS_PER_FEATURE = 5


@dataclass(frozen=True)
class StudyResult:
    """What :func:`run_study` wrote (also read back from the files)."""

    features: pd.DataFrame
    datapoints: pd.DataFrame
    selection: pd.DataFrame
    card: Any
    concerns: list[str]
    out: Path
    forward_passes: dict[str, dict[str, int]]
    timings: dict[str, float]


def run_study(config: RunConfig, *, progress: bool = True, dry_run: bool = False) -> StudyResult | None:
    """Run (or resume) the study ``config`` describes; with ``dry_run`` print the plan and stop.

    Under ``torchrun`` each process takes its share of the shards (:mod:`pm_lens.study.distributed`);
    rank 0 returns the result, the other ranks None."""
    ranks = Ranks.start(config["model.device"], config["model.devices_per_rank"])
    try:
        return _run_study(config, ranks, progress=progress, dry_run=dry_run)
    finally:
        ranks.stop()


def _run_study(config: RunConfig, ranks: Ranks, *, progress: bool, dry_run: bool) -> StudyResult | None:
    out = Path(config["run.out"])
    device = ranks.device(config["model.device"], config["model.devices_per_rank"])
    if ranks.world_size > 1 and "," in device:
        raise ValueError(f"model.device {device!r} names devices for one process, but {ranks.world_size} ranks would share "
                         "them: use model.device = 'cuda' with model.devices_per_rank")
    pairs = read_pairs(config)
    lengths = check_kept(config, pairs)  # with the tokenizer alone, before the model loads
    timings: dict[str, float] = {}
    start = time.perf_counter()
    # SAEs are checked against the model's config before the model loads; with the layers split they
    # wait on the CPU and then go to their hook's device.
    loaded = _load_saes(config, "cpu" if "," in device else device)
    rm = _load(config, device)
    from pm_lens.saes import place_saes

    loaded = place_saes(rm, loaded)
    timings["load"] = time.perf_counter() - start
    counted = rm.forward_count.snapshot()
    if dry_run:
        if ranks.is_main:
            _print_plan(config, rm, loaded, pairs)
        return None
    out.mkdir(parents=True, exist_ok=True)
    _main_first(ranks, lambda: _claim(out, config))
    with _timed(timings, "select"):
        selection = _main_first(ranks, lambda: select_pairs(rm, pairs, config, out, lengths=lengths, progress=progress))
    chosen_pairs = [pairs[i] for i in selection.pair]
    with _timed(timings, "train_saes"):
        trained = _main_first(ranks, lambda: _train_saes(rm, config, chosen_pairs, out, progress))
    from pm_lens.attribution.nodes import resolve_saes

    saes = resolve_saes(rm, [*loaded, *trained])
    with _timed(timings, "baseline"):
        baselines = _main_first(ranks, lambda: _baselines(rm, saes, config, chosen_pairs, out))
    shards = [list(range(s, min(s + config["run.shard_pairs"], len(chosen_pairs))))
              for s in range(0, len(chosen_pairs), config["run.shard_pairs"])]
    (out / "shards").mkdir(exist_ok=True)
    with _timed(timings, "attribute"):
        _each_shard("attributing", shards, progress, lambda i, rows: _attribute_shard(
            rm, saes, config, [chosen_pairs[r] for r in rows], _shard(out, "attribution", i), baselines), ranks)
        ranks.barrier()  # every rank's shards are on disk
    with _timed(timings, "merge"):
        ranking, totals = merge_attributions([_shard(out, "attribution", i) for i in range(len(shards))], saes)
    confirmed = confirmed_nodes(ranking, config["attribution.confirm_top"])
    sample = fidelity_nodes(ranking, config["attribution.fidelity_top"], config["attribution.n_random"], config["attribution.seed"])
    nodes = list(dict.fromkeys([*confirmed, *sample]))
    with _timed(timings, "confirm"):
        _each_shard("confirming", shards, progress, lambda i, rows: _ablate_shard(
            rm, saes, config, [chosen_pairs[r] for r in rows], nodes, _shard(out, "ablation", i), confirmed=confirmed, first_row=rows[0], baselines=baselines), ranks)
        ranks.barrier()
    counts = ranks.gather(rm.forward_count.since(counted))
    if not ranks.is_main:
        return None
    with _timed(timings, "merge"):
        ablation_paths = [_shard(out, "ablation", i) for i in range(len(shards))]
        ablations = load_ablations(ablation_paths)
        features, datapoints = merge_ablations(ablations, ranking, nodes, selection, shown=len(confirmed))
        contexts = merge_contexts(ablation_paths, confirmed, selection, n_contexts=CONTEXTS_PER_FEATURE)
        card = run_fidelity(ablations, ranking, nodes, sample, totals, config, _dtype_name(rm))
    concerns = worries(card, ablations, features=features)
    card.save(out / "fidelity.json")
    write_atomic(out / "features.csv", features.to_csv(index=False))
    write_atomic(out / "top_datapoints.csv", datapoints.to_csv(index=False))
    write_atomic(out / "top_contexts.csv", contexts_table(contexts).to_csv(index=False))
    links, before = {}, rm.forward_count.snapshot()
    if config["run.dashboards"] == "confirmed" and confirmed:
        from pm_lens.study.dashboards import page, write_run_dashboards

        with _timed(timings, "dashboards"):
            boards = write_run_dashboards(out, rm, saes, config, chosen_pairs, selection, confirmed, baselines=baselines,
                                          progress=progress)
        links = {board.node: page(board.node) for board in boards}
        # The automatic label (the n-gram most characteristic of its firings) beside each confirmed feature.
        features.insert(features.columns.get_loc("node") + 1, "label", features.node.map({b.node: b.label for b in boards}))
        write_atomic(out / "features.csv", features.to_csv(index=False))
    _write_report(out, config, features, datapoints, card, concerns, contexts, links)
    forward_passes = (sum(counts[1:], counts[0]) + rm.forward_count.since(before)).as_dict()  # every rank's, and the dashboards
    _write_config(out, config, forward_passes, timings, rm, concerns)
    return StudyResult(features, datapoints, selection, card, concerns, out, forward_passes, timings)


def _each_shard(stage: str, shards: list[list[int]], progress: bool, work: Any, ranks: Ranks) -> None:
    """Run ``work(index, rows)`` on this rank's shards under one bar counting pairs (pairs/s, ETA),
    with a line per shard: computed (and how fast) or read back from a finished run."""
    mine = [(i, rows) for i, rows in enumerate(shards) if ranks.owns(i)]
    who = f"[rank {ranks.rank}] " if ranks.world_size > 1 else ""
    with tqdm(total=sum(len(rows) for _, rows in mine), desc=who + stage, unit="pair", disable=not progress,
              position=ranks.rank) as bar:
        for i, rows in mine:
            start = time.perf_counter()
            done = work(i, rows)
            seconds = time.perf_counter() - start
            if progress:
                what = "read back (finished before)" if done else f"{seconds:.1f} s, {len(rows) / max(seconds, 1e-9):.2f} pairs/s"
                bar.write(f"{who}{stage} shard {i + 1}/{len(shards)}: {len(rows)} pairs, {what}")
            bar.update(len(rows))


def _dtype_name(rm: Any) -> str:
    """``"bfloat16"``, ``"float32"``, ...: the model's dtype as the config and card write it."""
    return str(rm.cfg.dtype).removeprefix("torch.")


def _shard(out: Path, kind: str, index: int) -> Path:
    """The file of shard ``index`` of a stage (``attribution`` or ``ablation``)."""
    return out / "shards" / f"{kind}-{index:05d}.safetensors"


def _main_first(ranks: Ranks, work: Any) -> Any:
    """``work()`` on rank 0 while the others wait, then on the others, which read back what rank 0
    wrote (each step called so is resumable: it reads its file when the file is there)."""
    result = work() if ranks.is_main else None
    ranks.barrier()
    return result if ranks.is_main else work()


def _load_saes(config: RunConfig, device: str) -> list[Any]:
    """The config's SAEs; for a model folder, checked against its config and the token limit
    against its context (:mod:`pm_lens.study.fit`), so a misfit fails before the model loads."""
    dtype = config["model.dtype"]  # SAEs run in the model's dtype
    if config["saes.sources"] == [DEMO]:
        from pm_lens.demo_pm import demo_saes

        return [sae.to(getattr(torch, dtype)) for sae in demo_saes(device=device)]
    from pm_lens.saes import load_sae

    saes = [load_sae(source, device=device, dtype=dtype) for source in config["saes.sources"]]
    both = sorted({sae.cfg.metadata.hook_name for sae in saes} & set(config["saes.train"]))
    if both:
        raise ValueError(f"saes.train names {both}, where an SAE of saes.sources reads already; one SAE per hook point")
    if config["model.path"] != DEMO:
        from pm_lens.study.fit import check_context, check_saes_fit, check_train_hooks, model_fields

        fields = model_fields(config["model.path"])
        check_context(config, fields)
        check_saes_fit(fields, saes, config["saes.sources"])
        check_train_hooks(fields, config["saes.train"])
    return saes


def _train_saes(rm: Any, config: RunConfig, pairs: list[PreferencePair], out: Path, progress: bool) -> list[Any]:
    """SAEs trained at ``saes.train`` on the PM's activations over the selected ``pairs``, saved
    in ``<out>/saes/<hook>/`` (trained into ``saes.partial`` and renamed when all are done, so a
    crash leaves no half-written SAE); read back when a resumed run finds them."""
    hooks = config["saes.train"]
    if not hooks:
        return []
    from pm_lens.saes import load_sae

    folder = out / "saes"
    if not folder.exists():
        import shutil

        from pm_lens.saes import train_saes

        partial = out / "saes.partial"
        shutil.rmtree(partial, ignore_errors=True)
        architecture = config["saes.train_architecture"]
        with rm.counting("train_saes"):
            train_saes(rm, pairs, hook_names=hooks, d_sae=config["saes.train_d_sae"], architecture=architecture,
                       k=config["saes.train_k"] if architecture == "topk" else None,
                       training_tokens=config["saes.train_tokens"] or None, seed=config["saes.train_seed"],
                       out_dir=partial, progress=progress)
        partial.rename(folder)
    dtype = _dtype_name(rm)
    return [load_sae(folder / hook, device=rm.device_of(hook), dtype=dtype) for hook in hooks]


def load_run_inputs(config: RunConfig, out: Path, *, device: str | None = None, progress: bool = True) -> tuple[Any, dict[str, Any], list, pd.DataFrame,
                                                                                   dict[str, torch.Tensor] | None]:
    """What a later stage needs from a finished run in ``out``: the model, the SAEs (given and
    trained, on their hooks' devices), the selected pairs and ``selection.csv``, and the mean
    baselines (None for the zero baseline); nothing is recomputed. ``device`` overrides the config's."""
    from pm_lens.attribution.nodes import resolve_saes
    from pm_lens.saes import place_saes

    device = device or config["model.device"]
    loaded = _load_saes(config, "cpu" if "," in device else device)
    rm = _load(config, device)
    selection = pd.read_csv(out / "selection.csv")
    pairs = read_pairs(config)
    chosen_pairs = [pairs[i] for i in selection.pair]
    saes = resolve_saes(rm, [*place_saes(rm, loaded), *_train_saes(rm, config, chosen_pairs, out, progress)])
    return rm, saes, chosen_pairs, selection, _baselines(rm, saes, config, chosen_pairs, out)


def _load(config: RunConfig, device: str) -> Any:
    """The reward model, on ``device``."""
    from pm_lens.model import RewardModel

    dtype = config["model.dtype"]
    if config["model.path"] == DEMO:
        from pm_lens.demo_pm import demo_reward_model

        rm = demo_reward_model(device=device, dtype=getattr(torch, dtype))
    else:
        rm = RewardModel.from_pretrained(config["model.path"], device=device, dtype=dtype, objective=config["model.objective"])
    rm.text_format = config["model.text_format"]
    return rm


def _claim(out: Path, config: RunConfig) -> None:
    """Mark ``out`` as this config's run, or refuse it when it holds another config's."""
    stamp = out / STAMP
    if stamp.exists():
        held = json.loads(stamp.read_text()).get("digest")
        if held != config.digest():
            raise ValueError(f"{str(out)!r} holds a run of another config (digest {held}, this one {config.digest()}): "
                             "use another run.out, or delete the folder to start over")
        return
    write_atomic(stamp, json.dumps({"digest": config.digest(), "config": config.as_dict()}, indent=2))


def _baselines(rm: Any, saes: dict[str, Any], config: RunConfig, pairs: list[PreferencePair],
               out: Path) -> dict[str, torch.Tensor] | None:
    """For ``baseline = "mean"``: each feature's mean activation over the selected positions of all
    selected pairs, computed once before the shards (so every shard removes features to the same
    values) and kept in ``baselines.safetensors``; None for the zero baseline."""
    if config["attribution.baseline"] == "zero":
        return None
    path = out / "baselines.safetensors"
    if _finished(path, config):
        from safetensors.torch import load_file

        return {hook: value.to(rm.device_of(hook)) for hook, value in load_file(str(path)).items()}
    from pm_lens.attribution.attribute import feature_baselines
    from pm_lens.attribution.nodes import plain_model
    from pm_lens.data import SKIP_FIRST

    with plain_model(rm, saes):
        values = feature_baselines(rm, saes, pairs, baseline="mean", positions=config["attribution.positions"],
                                   skip_first=SKIP_FIRST, batch_tokens=config["attribution.batch_tokens"])
    _save(path, {hook: value.float() for hook, value in values.items()}, config, n_pairs=len(pairs))
    return values


def _attribute_shard(rm: Any, saes: dict[str, Any], config: RunConfig, pairs: list[PreferencePair], path: Path,
                     baselines: dict[str, torch.Tensor] | None) -> bool:
    """Attribute one shard into ``path``; True when it was already there."""
    if _finished(path, config):
        return True
    from pm_lens.attribution import attribute

    result = attribute(rm, pairs, saes=saes, method=config["attribution.method"], baseline=config["attribution.baseline"],
                       baselines=baselines, positions=config["attribution.positions"], ig_steps=config["attribution.ig_steps"],
                       batch_tokens=config["attribution.batch_tokens"], clean_budget_bytes=0, progress=False)
    tensors = {"chosen_rewards": result.chosen.rewards.float(), "rejected_rewards": result.rejected.rewards.float()}
    for hook in saes:
        for side in ("chosen", "rejected"):
            effects = _sparse(getattr(result, side).features[hook].float())  # dense with the mean baseline
            tensors[f"{side}.{hook}.indices"] = effects.indices().contiguous()
            tensors[f"{side}.{hook}.values"] = effects.values().contiguous()
            tensors[f"{side}.{hook}.error"] = getattr(result, side).errors[hook].float().contiguous()
            outlier = _sparse(getattr(result, side).outlier_features[hook].float())  # from massive-activation positions
            tensors[f"{side}.{hook}.outlier.indices"] = outlier.indices().contiguous()
            tensors[f"{side}.{hook}.outlier.values"] = outlier.values().contiguous()
    _save(path, tensors, config, n_pairs=len(pairs))
    return False


def _sparse(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.coalesce() if tensor.is_sparse else tensor.to_sparse()


def _ablate_shard(rm: Any, saes: dict[str, Any], config: RunConfig, pairs: list[PreferencePair], nodes: list[Node],
                  path: Path, *, confirmed: list[Node], first_row: int, baselines: dict[str, torch.Tensor] | None) -> bool:
    """Ablate ``nodes`` on one shard into ``path``, with the top contexts of the ``confirmed``
    features over its pairs (rows ``first_row...`` of the selection); True when it was already there."""
    if _finished(path, config, nodes=nodes):
        return True
    from pm_lens.attribution import ablate
    from pm_lens.attribution.batching import pair_batches
    from pm_lens.attribution.clean import CleanSettings, build_clean_run
    from pm_lens.data import SKIP_FIRST

    common = dict(saes=saes, baseline=config["attribution.baseline"], baselines=baselines,
                  positions=config["attribution.positions"], batch_tokens=config["attribution.batch_tokens"], progress=False)
    # One clean forward of the shard, shared by both ablations.
    batches = pair_batches(rm, pairs, batch_tokens=config["attribution.batch_tokens"])
    clean = build_clean_run(rm, pairs, batches, saes, CleanSettings(config["attribution.positions"], SKIP_FIRST,
                                                                    rm.text_format, False))
    result = ablate(rm, pairs, features=nodes, clean=clean, **common)
    everything = ablate(rm, pairs, features="all", clean=clean, **common)
    # The SAEs spliced in without their error terms: how much of the margin they carry.
    spliced = ablate(rm, pairs, features=[Node.error(hook) for hook in saes], jointly=True, clean=clean, **common)
    from pm_lens.saes.contexts import top_contexts

    # Read from the clean run (no forward); three times as many as shown, for the merge to drop
    # windows another shard holds too.
    found = top_contexts(rm, list(saes.values()), pairs, confirmed, clean=clean, n_contexts=3 * CONTEXTS_PER_FEATURE,
                         positions=config["attribution.positions"], progress=False)
    tensors = {"chosen": result.chosen.float().contiguous(), "rejected": result.rejected.float().contiguous(),
               "clean_chosen": result.clean_chosen.float(), "clean_rejected": result.clean_rejected.float(),
               "all_margin": everything.margin[:, 0].float().contiguous(),
               "spliced_margin": spliced.margin[:, 0].float().contiguous()}
    _save(path, tensors, config, n_pairs=len(pairs), nodes=nodes, contexts=contexts_record(found, first_row))
    return False


def _save(path: Path, tensors: dict[str, torch.Tensor], config: RunConfig, **meta: Any) -> None:
    metadata = {"digest": config.digest(), **{k: json.dumps([str(n) for n in v] if k == "nodes" else v) for k, v in meta.items()}}
    write_atomic(path, save({k: t.cpu() for k, t in tensors.items()}, metadata=metadata))


def _finished(path: Path, config: RunConfig, *, nodes: list[Node] | None = None) -> bool:
    """Whether ``path`` holds this shard of this config (with these nodes)."""
    if not path.exists():
        return False
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("digest") != config.digest():
        raise ValueError(f"{str(path)!r} was written by another config (digest {metadata.get('digest')}): "
                         "use another run.out, or delete the folder to start over")
    return nodes is None or json.loads(metadata.get("nodes", "[]")) == [str(n) for n in nodes]


def _write_report(out: Path, config: RunConfig, features: pd.DataFrame, datapoints: pd.DataFrame, card: Any,
                  concerns: list[str], contexts: dict[Node, Any], dashboards: dict[str, str]) -> None:
    from pm_lens.report import write_report

    notes = {"Top datapoints": "Per confirmed feature, the pairs where removing it changes the margin "
                               "r(chosen) - r(rejected) most: both sides' rewards before and after, and whether the "
                               "preference flips (pair: its line in the pairs file, from 0).",
             "Where the features fire": f"Per confirmed feature, its {CONTEXTS_PER_FEATURE} strongest firings over the "
                                        "selected pairs (pair: its line in the pairs file), tokens shaded by activation; "
                                        "also in top_contexts.csv."}
    tables = {"Top datapoints": datapoints}
    if dashboards:
        notes["Feature dashboards"] = ("A page per confirmed feature (the node links to it): its activations, examples "
                                       "shaded by activation and by contribution to the reward, the pairs where removing "
                                       "it matters most, its direct and total effect, co-firing features and labels.")
    if concerns:
        tables = {"What to worry about": pd.DataFrame({"concern": concerns}), **tables}
    write_report(out / "report.html", title=f"pm-lens run: {config['model.path']}", settings=config.as_dict(),
                 features=features, card=card, contexts=contexts, tables=tables, notes=notes, dashboards=dashboards)


def _write_config(out: Path, config: RunConfig, forward_passes: dict, timings: dict[str, float], rm: Any,
                  concerns: list[str]) -> None:
    write_atomic(out / "config.json", json.dumps({
        "config": config.as_dict(), "digest": config.digest(), "dtype": _dtype_name(rm),
        "objective": rm.objective, "concerns": concerns,
        "forward_passes": forward_passes, "timings": {k: round(v, 2) for k, v in timings.items()},
        "versions": {**versions(),
                     "python": platform.python_version()},
    }, indent=2))


def _print_plan(config: RunConfig, rm: Any, saes: list[Any], pairs: list[PreferencePair]) -> None:
    from pm_lens.study.pairs import pair_lengths

    lengths = pair_lengths(rm.tokenizer, rm.text_format, pairs)
    kept = int((lengths <= config["pairs.max_tokens"]).sum())
    k = kept if config["pairs.select"] == "all" else min(config["pairs.k"], kept)
    tokens = int(np.sort(lengths[lengths <= config["pairs.max_tokens"]])[:k].sum() * 2) if k else 0
    shards = -(-k // config["run.shard_pairs"]) if k else 0
    print(f"pairs: {len(pairs)} read, {kept} within {config['pairs.max_tokens']} tokens, {k} selected "
          f"({config['pairs.select']}); about {tokens} tokens over both sides; {shards} shard(s)")
    if rm.layer_split is not None:
        print(f"layers split over {len(rm.layer_split.devices)} devices: {rm.layer_split.describe()}")
    for sae in saes:
        print(f"SAE at {sae.cfg.metadata.hook_name}: {sae.cfg.d_sae} features, on {sae.W_dec.device}")
    for hook in config["saes.train"]:
        print(f"SAE at {hook}: {config['saes.train_d_sae']} features, trained ({config['saes.train_architecture']}) on "
              f"the {k} selected pairs before the attribution")
    selection = kept if config["pairs.select"] == "top_margin" else 0
    print(f"forward passes (sequences): selection {2 * selection}, attribution {2 * k} forward+backward, "
          f"confirmation {2 * k} clean + up to {2 * k * 2 * config['attribution.confirm_top']} ablations")


class _timed:
    def __init__(self, timings: dict[str, float], name: str):
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.timings[self.name] = self.timings.get(self.name, 0.0) + time.perf_counter() - self.start


def print_summary(result: StudyResult) -> None:
    """The confirmed features, and where the outputs are."""
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
        shown = result.features[["rank", "node", "role", "estimated_margin_effect", "exact_margin_effect",
                                 "exact_chosen_effect", "exact_rejected_effect", "n_pairs_active"]]
        print("Confirmed features (effects are the change when the feature is removed: negative = the feature "
              "raises the margin r(chosen) - r(rejected)):")
        print(shown.to_string(index=False))
    print(f"\n{result.card}")
    for concern in result.concerns:
        print(f"WORRY: {concern}")
    passes = ", ".join(f"{k} {v['passes']} ({v['sequences']} sequences)" for k, v in result.forward_passes.items())
    print(f"\n{len(result.selection)} pairs; forward passes: {passes}")
    print(f"wrote {result.out}/features.csv, top_datapoints.csv, top_contexts.csv, selection.csv, fidelity.json, "
          "report.html, config.json")

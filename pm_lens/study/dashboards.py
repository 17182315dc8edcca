"""Feature dashboards of a ``pm-lens run`` folder: built at the end of a run for the confirmed
features, and by ``pm-lens dashboard RUN`` for any features afterwards, without rerunning the
attribution.

What a dashboard reads from the folder: the config (``run.json``), the selected pairs
(``selection.csv``: ``pair`` is the line in the pairs file, shown as the pair's id), the estimated
per-pair effects (the attribution shards), the exact effects and top datapoints of the confirmed
features (``features.csv``, ``top_datapoints.csv``) and the mean baselines
(``baselines.safetensors``). Only the dashboards' own passes run: one clean forward per selected
pair and side, one forward and backward per example text, and exact ablations for features whose
datapoints the run did not confirm (:mod:`pm_lens.dashboard.build`).

Outputs, in ``<run>/dashboards/``: ``index.html``, per feature ``<node>.html`` and ``<node>.json``,
and ``neuronpedia/batch-<hook>.json`` (:mod:`pm_lens.dashboard.neuronpedia`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from pm_lens.data import PreferencePair
from pm_lens.saes.node import Node, as_nodes
from pm_lens.study.config import RunConfig, load_config
from pm_lens.study.merge import dense_effects

FOLDER = "dashboards"


def write_run_dashboards(out: Path, rm: Any, saes: dict[str, Any], config: RunConfig, pairs: list[PreferencePair],
                         selection: pd.DataFrame, nodes: list[Node], *, baselines: dict[str, torch.Tensor] | None,
                         progress: bool) -> list[Any]:
    """Build and write the dashboards of ``nodes`` over the run's selected ``pairs``; returns them
    (:func:`page` gives each one's link from ``out``)."""
    from pm_lens.dashboard import build_dashboards
    from pm_lens.dashboard.neuronpedia import write_neuronpedia
    from pm_lens.dashboard.render import read_dashboards, write_dashboards

    features = _read_csv(out / "features.csv")
    exact = dict(zip(features.node, features.exact_margin_effect)) if features is not None else {}
    datapoints = _read_csv(out / "top_datapoints.csv")
    estimated = _estimates(out, saes, nodes, len(pairs))
    dashboards = build_dashboards(
        rm, saes, pairs, nodes, baselines=baselines, estimated={k: float(np.mean(v)) for k, v in estimated.items()},
        per_pair_estimates=estimated, exact=exact, datapoints=datapoints, pair_ids=selection.pair.tolist(),
        batch_tokens=config["attribution.batch_tokens"], progress=progress)
    folder = out / FOLDER
    write_dashboards(folder, dashboards, title=f"pm-lens run: {config['model.path']}")
    write_neuronpedia(folder / "neuronpedia", read_dashboards(folder),  # every page of the folder, earlier ones too
                      model_id=Path(config["model.path"]).name or "reward-model",
                      sae_set={hook: f"pm-lens-{hook}" for hook in saes}, layer={hook: _layer(rm, hook) for hook in saes})
    return dashboards


def page(node: str) -> str:
    """The dashboard page of ``node``, relative to the run folder."""
    from pm_lens.dashboard.render import feature_filename

    return f"{FOLDER}/{feature_filename(node)}.html"


def _layer(rm: Any, hook: str) -> int:
    layer = rm.hook_layer(hook)
    return -1 if layer is None else layer


def _read_csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.exists() else None


def _estimates(out: Path, saes: dict[str, Any], nodes: list[Node], n_pairs: int) -> dict[str, np.ndarray]:
    """Per node, ``[n_pairs]`` its estimated margin effect on each selected pair, from the
    attribution shards (in shard order: the selection's order)."""
    paths = sorted((out / "shards").glob("attribution-*.safetensors"))
    per_node: dict[str, list[np.ndarray]] = {str(node): [] for node in nodes}
    for path in paths:
        shard = load_file(str(path))
        n = shard["chosen_rewards"].shape[0]
        for node in nodes:
            width = saes[node.hook_name].cfg.d_sae
            chosen, rejected = (dense_effects(shard, f"{side}.{node.hook_name}", (n, width))[:, node.feature]
                                for side in ("chosen", "rejected"))
            per_node[str(node)].append((chosen - rejected).numpy())
    found = {key: np.concatenate(parts) for key, parts in per_node.items() if parts}
    bad = [key for key, value in found.items() if len(value) != n_pairs]
    if bad:
        raise ValueError(f"the attribution shards hold {len(found[bad[0]])} pairs but the selection has {n_pairs}: "
                         "the run is unfinished; run pm-lens run on it first")
    return found


def dashboard_run(run_dir: str | Path, *, features: list[str] | None = None, top: int | None = None,
                  device: str | None = None, progress: bool = True) -> Path:
    """``pm-lens dashboard``: the dashboards of ``features`` (node strings) or of the ``top``
    features of the run's ranking (default: its confirmed features) of the finished run in
    ``run_dir``; returns the index page."""
    from pm_lens.study.run import STAMP, load_run_inputs

    out = Path(run_dir)
    if not (out / STAMP).exists() or not (out / "features.csv").exists():
        raise ValueError(f"{str(out)!r} is not a finished pm-lens run folder (no {STAMP} or features.csv); "
                         "run pm-lens run first")
    stored = json.loads((out / STAMP).read_text())["config"]
    config = load_config(None, {f"{section}.{key}": value for section, keys in stored.items() for key, value in keys.items()})
    rm, saes, pairs, selection, baselines = load_run_inputs(config, out, device=device, progress=progress)
    nodes = _chosen_nodes(out, saes, features, top)
    write_run_dashboards(out, rm, saes, config, pairs, selection, nodes, baselines=baselines, progress=progress)
    return out / FOLDER / "index.html"


def _chosen_nodes(out: Path, saes: dict[str, Any], features: list[str] | None, top: int | None) -> list[Node]:
    widths = {hook: sae.cfg.d_sae for hook, sae in saes.items()}
    if features:
        return as_nodes(features, widths)
    if top is None:
        return as_nodes(list(pd.read_csv(out / "features.csv").node), widths)
    from pm_lens.study.merge import merge_attributions

    ranking, _ = merge_attributions(sorted((out / "shards").glob("attribution-*.safetensors")), saes)
    return as_nodes(list(ranking.node[:top]), widths)

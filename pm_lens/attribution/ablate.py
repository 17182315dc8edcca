"""Exact ablation: the true change in reward when SAE nodes are removed.

Removing feature ``i`` at a hook moves the activation by ``scale * (baseline[i] - acts[i]) *
directions[i]`` at the selected positions (the SAE's own decoder map, :mod:`pm_lens.saes.split`:
what SAELens's splice does when the feature is patched) while the error node (and every other
feature) at that hook is held at its clean value; the rest of the model runs as it is (an SAE with
its error term is the identity). An error node is removed by setting it to zero. Joint ablation
removes a set of nodes in one run: at one hook it adds their deltas computed from the clean run;
across hooks, each hook (in forward order) re-encodes the activation as it arrives, after the
earlier hooks' removals, and removes its nodes from that, so a feature an earlier removal already
weakened is not removed twice. ``features="all"`` removes every node of every SAE (the
completeness check): each hook is set to its decoded baselines, the quantity the sum of all
attributions linearises.

Batched (the default), per batch of pairs and side:
1. the clean run (:mod:`pm_lens.attribution.clean`: given, or run here once) holds the reward,
   each hook's nodes and the block inputs a restart needs;
2. for the nodes of one hook, the rows where the node is nonzero are stacked along the batch, each
   with its delta, and the forward restarts at the hook's block from the cached input (for a
   block output, at the next block). A row where the node is zero at every selected position is
   unchanged by its removal and is not run at all;
3. a removal changes nothing before the first position where the node is nonzero, and attention
   is causal, so only positions from there on are recomputed (up to the rows' last pooled one),
   attending to the clean keys and values of the earlier ones (kept by the clean run, or read
   once per side with ``RewardModel.prefix_kv``); rows are grouped by that first position so
   each forward (up to ``batch_tokens`` recomputed tokens) starts late;
4. where a pair's two sides agree up to a position (prompt, shared start of the responses), a
   removal beginning before it is the same on both sides there: the rejected side's run
   continues from the chosen side's ablated keys and values and recomputes only its tail;
5. a joint removal (or every node's) acts at the selected positions only, so each side's run
   restarts at its batch's first selected position (with ``positions="diverge"`` or
   ``"completion"``, after the prompt) against the clean keys and values the clean run kept.
The machinery is in :mod:`pm_lens.attribution.removals`. With ``batched=False`` every node gets a
full forward of its own (the reference the batched path is tested against, and the baseline of
``benchmarks/attribution_cost.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from sae_lens import SAE
from torch import Tensor
from tqdm.auto import tqdm

from pm_lens.attribution.attribute import BASELINES, feature_baselines
from pm_lens.attribution.batching import pair_batches
from pm_lens.attribution.clean import SIDES, CleanRun, CleanSettings, clean_side
from pm_lens.attribution.formulas import target_of
from pm_lens.attribution.nodes import plain_model, resolve_saes
from pm_lens.attribution.outliers import OUTLIER_RATIO
from pm_lens.attribution.positions import check_positions, pair_masks
from pm_lens.attribution.removals import SideAblation, each_pair, together
from pm_lens.data import SKIP_FIRST, PairsLike, as_pairs, describe_text_format
from pm_lens.model import RewardModel
from pm_lens.saes.node import Node, as_nodes

ALL = "all"  # every feature and error node of every SAE, removed together


@dataclass(frozen=True)
class AblationSettings:
    """How an :class:`Ablation` was run."""

    baseline: str
    positions: str
    skip_first: bool
    joint: bool
    text_format: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Ablation:
    """Exact changes of the rewards when nodes are removed.

    Attributes:
        nodes: the removed nodes.
        joint: whether they were removed together (one column) or one at a time (one column each).
        chosen, rejected: ``[n_pairs, n_columns]`` change of r(chosen) and r(rejected).
        clean_chosen, clean_rejected: ``[n_pairs]`` r(chosen) and r(rejected) with nothing removed.
        settings: baseline, positions, first-token choice, joint, text format.
    """

    nodes: tuple[Node, ...]
    joint: bool
    chosen: Float[Tensor, "n_pairs n_columns"]
    rejected: Float[Tensor, "n_pairs n_columns"]
    clean_chosen: Float[Tensor, " n_pairs"]
    clean_rejected: Float[Tensor, " n_pairs"]
    settings: AblationSettings

    @property
    def clean_margin(self) -> Tensor:
        """``[n_pairs]`` r(chosen) - r(rejected) with nothing removed."""
        return self.clean_chosen - self.clean_rejected

    @property
    def margin(self) -> Tensor:
        return self.chosen - self.rejected

    def effects(self, target: str) -> Tensor:
        """``[n_pairs, n_columns]`` change of ``target`` ("chosen", "rejected", "margin" or "sum")."""
        return target_of(self.chosen, self.rejected, target)

    def column(self, node: Node) -> int:
        """The column of ``node``'s effects (one-at-a-time ablations only)."""
        if self.joint:
            raise ValueError("a joint ablation has one column for all its nodes")
        return self.nodes.index(node)

    def table(self, target: str = "margin") -> pd.DataFrame:
        """One row per column: ``node``, ``hook_name``, ``feature``, ``effect`` (mean over pairs),
        ``mean_abs_effect``; a joint ablation's row names its nodes joined by ``" + "``."""
        effects = self.effects(target)
        if self.joint:
            names = [" + ".join(map(str, self.nodes))]
            hooks, features = [",".join(sorted({n.hook_name for n in self.nodes}))], [None]
        else:
            names, hooks, features = [str(n) for n in self.nodes], [n.hook_name for n in self.nodes], [n.feature for n in self.nodes]
        return pd.DataFrame({"node": names, "hook_name": hooks, "feature": pd.array(features, dtype="Int64"),
                             "effect": effects.mean(0).numpy(), "mean_abs_effect": effects.abs().mean(0).numpy()})


def ablate(
    rm: RewardModel,
    pairs: PairsLike,
    *,
    features: Iterable[Any] | Node | tuple[str, int] | int | str,
    saes: SAE | Iterable[Any] | Mapping[str, Any] | None = None,
    baseline: str = "zero",
    positions: str = "all",
    jointly: bool = False,
    reference_pairs: PairsLike | None = None,
    baselines: dict[str, Tensor] | None = None,
    skip_first: bool = SKIP_FIRST,
    batched: bool = True,
    batch_tokens: int = 4096,
    truncate: bool = False,
    clean: CleanRun | None = None,
    progress: bool = True,
) -> Ablation:
    """Exact change of each pair's rewards when ``features`` are removed (one at a time, or
    ``jointly``).

    Args:
        pairs: ``PreferencePair`` objects (as for ``attribute``).
        features: nodes (``Node``, ``(hook_name, index)``, ``(hook_name, "error")``,
            ``"hook_name:index"``, a bare index when there is one SAE), a list of them, or
            ``"all"`` for every feature and error node of every SAE together.
        baseline: ``"zero"`` or ``"mean"`` (see ``attribute``).
        baselines: per hook, ``[d_sae]`` values to remove features to, overriding ``baseline``
            (e.g. ``attribution.baselines``, to ablate exactly what was attributed).
        positions, skip_first, reference_pairs, batch_tokens, truncate: as for ``attribute``.
        batched: stack the ablations of one hook along the batch, only for the rows where the
            node is nonzero, restarted at the hook's block; ``False`` runs one full forward per
            node (the reference).
        clean: a :class:`CleanRun` of these pairs and SAEs with these settings (e.g.
            ``attribution.clean_run``): its clean forward is reused, not run again.
    """
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    check_positions(positions)
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ValueError(f"batch_tokens must be an integer >= 1, got {batch_tokens!r}")
    pairs = as_pairs(pairs)
    by_hook = resolve_saes(rm, saes)
    every = isinstance(features, str) and features == ALL
    if isinstance(features, str) and not every and ":" not in features:
        raise ValueError(f"features must be nodes, a list of nodes, or {ALL!r}; got {features!r}")
    widths = {name: sae.cfg.d_sae for name, sae in by_hook.items()}
    nodes = _every_node(by_hook) if every else as_nodes(features, widths)
    settings = AblationSettings(baseline=baseline, positions=positions, skip_first=skip_first, joint=jointly or every,
                                text_format=describe_text_format(rm.tokenizer, [p.prompt for p in pairs], rm.text_format))
    clean_settings = CleanSettings(positions, skip_first, rm.text_format, truncate)
    if clean is not None:
        clean.check_fits(pairs, by_hook, clean_settings)
    with plain_model(rm, by_hook):
        baselines = _baselines(rm, by_hook, baselines, baseline, reference_pairs, pairs, clean_settings, batch_tokens)
        batches = clean.batches if clean is not None else pair_batches(rm, pairs, batch_tokens=batch_tokens, truncate=truncate)
        columns, rewards, at_outliers = _run_batches(rm, batches, clean, by_hook, baselines, nodes, settings,
                                                     every=every, batched=batched, budget=batch_tokens, progress=progress)
    if at_outliers:
        _warn_at_outliers(at_outliers)

    def cat(parts: list[Tensor]) -> Tensor:
        return torch.cat(parts).float().cpu()

    return Ablation(nodes=tuple(nodes), joint=settings.joint, chosen=cat(columns["chosen"]), rejected=cat(columns["rejected"]),
                    clean_chosen=cat(rewards["chosen"]), clean_rejected=cat(rewards["rejected"]), settings=settings)


def _run_batches(rm: RewardModel, batches: Any, clean: CleanRun | None, saes: dict[str, SAE], baselines: dict[str, Tensor],
                 nodes: list[Node], settings: AblationSettings, *, every: bool, batched: bool, budget: int,
                 progress: bool) -> tuple[dict[str, list[Tensor]], dict[str, list[Tensor]], set[Node]]:
    """Per batch and side, the clean run (kept or run now) and the ablations from it."""
    at_outliers: set[Node] = set()
    columns: dict[str, list[Tensor]] = {side: [] for side in SIDES}
    rewards: dict[str, list[Tensor]] = {side: [] for side in SIDES}
    for b, batch in enumerate(tqdm(batches, desc="ablating", disable=not progress or len(batches) < 2, unit="batch")):
        masks = pair_masks(batch, settings.positions, skip_first=settings.skip_first)
        runs = [clean.side(rm, b, side) if clean is not None else clean_side(rm, getattr(batch, side), mask, saes)[0]
                for side, mask in zip(SIDES, masks)]
        runners = [SideAblation(rm, run, saes, baselines) for run in runs]
        with rm.counting("ablation"):
            if every:
                results = together(runners[0], runners[1], lambda runner: runner.remove_all_deltas())
            elif settings.joint:
                results = together(runners[0], runners[1], lambda runner: runner.joint_deltas(nodes))
            elif batched:
                results = each_pair(runners[0], runners[1], nodes, budget)
            else:
                results = [runner.each(nodes) for runner in runners]
        for side, runner, result in zip(SIDES, runners, results):
            at_outliers |= runner.at_outliers(nodes) if not every else set()
            columns[side].append(result)
            rewards[side].append(runner.run.rewards)
    return columns, rewards, at_outliers


def _every_node(saes: Mapping[str, SAE]) -> list[Node]:
    return [node for name, sae in saes.items() for node in [*(Node(name, i) for i in range(sae.cfg.d_sae)), Node.error(name)]]


def _baselines(rm: RewardModel, saes: dict[str, SAE], given: dict[str, Tensor] | None, baseline: str, reference: Any,
               pairs: list, settings: CleanSettings, batch_tokens: int) -> dict[str, Tensor]:
    if given is not None:
        missing = sorted(set(saes) - set(given))
        if missing:
            raise ValueError(f"baselines has no values for the SAEs at {missing}")
        return {n: given[n].to(sae.W_dec.device, sae.W_dec.dtype) for n, sae in saes.items()}
    reference = as_pairs(reference, name="reference_pairs") if reference is not None else pairs
    return feature_baselines(rm, saes, reference, baseline=baseline, positions=settings.positions,
                             skip_first=settings.skip_first, batch_tokens=batch_tokens, truncate=settings.truncate)


def _warn_at_outliers(nodes: set[Node]) -> None:
    shown = ", ".join(map(str, sorted(nodes, key=Node.sort_key)[:8]))
    warnings.warn(
        f"{len(nodes)} ablated node(s) ({shown}{', ...' if len(nodes) > 8 else ''}) are nonzero at positions whose "
        f"activation norm is over {OUTLIER_RATIO:.0f}x the median (attention sinks, start tokens); their exact effects "
        "include what removing them there does. Leave such positions out (skip_first=True, positions='completion' "
        "or 'diverge') to measure the text's features alone.", stacklevel=3)

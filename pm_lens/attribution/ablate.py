"""Exact ablation: the true change in reward when SAE features are removed.

Removing feature ``i`` at a hook moves the activation by ``scale * (baseline[i] - acts[i]) *
directions[i]`` at the selected positions (the SAE's own decoder map, :mod:`pm_lens.saes.split`:
what SAELens's splice does when the feature is patched) while the error node (and every other feature) at that hook is held at its
clean value; the rest of the model runs as it is (an SAE with its error term is the identity).
The error node itself can be removed too (set to zero). Joint ablation removes a whole set of
nodes in one run: at one hook that adds their deltas computed from the clean run; across hooks,
each hook (in forward order) re-encodes the activation as it arrives, after the earlier hooks'
removals, and removes its nodes from that, so a feature that an earlier removal already weakened
is not removed twice. (``features="all"``, the completeness check, adds clean-run deltas at every
hook: the quantity the sum of all attributions linearises.)

Batched (the default), per batch of pairs and side:
1. one clean run reads the reward, each SAE hook's activation and the residual stream entering
   each needed layer;
2. for the features of one hook, the rows where the feature is nonzero are stacked along the batch
   dimension (up to ``batch_tokens`` tokens per forward), each with that feature's delta, and the
   forward restarts at the hook's layer from the cached residual (``start_at_layer``; for a
   ``hook_resid_post`` the delta is the next layer's input) instead of recomputing earlier layers.
   A row where the feature never fires is unchanged by its removal and is not run at all.
With ``batched=False`` every feature gets a full forward of its own (the reference the batched
path is tested against, and the baseline of ``benchmarks/attribution_cost.py``).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from sae_lens import SAE
from torch import Tensor
from tqdm.auto import tqdm

from pm_lens.attribution.attribute import BASELINES, feature_baselines
from pm_lens.attribution.batching import pair_batches
from pm_lens.attribution.formulas import error_delta, feature_delta, features_delta, removal_delta, target_of
from pm_lens.attribution.nodes import Nodes, hook_layer, plain_model, read_nodes, resolve_saes, run_with_deltas
from pm_lens.attribution.outliers import OUTLIER_RATIO, outlier_positions
from pm_lens.attribution.positions import check_positions, pair_masks
from pm_lens.data import SKIP_FIRST, PairsLike, TokenBatch, as_pairs, describe_text_format
from pm_lens.model import RewardModel
from pm_lens.saes.split import directions, split

ERROR = -1  # the feature index that stands for a hook's error node
ALL = "all"  # every feature and error node of every SAE, removed jointly

Node = tuple[str, int]


@dataclass(frozen=True)
class Ablation:
    """Exact changes of the rewards when nodes are removed.

    Attributes:
        nodes: the removed nodes, ``(hook_name, feature)`` with feature ``-1`` for an error node;
            for a joint ablation, the single entry ``("joint", n)`` or ``("all", n)``.
        chosen, rejected: ``[n_pairs, n_nodes]`` change of r(chosen) and r(rejected).
        settings: mode, positions, skip_first, jointly.
        clean_chosen, clean_rejected: ``[n_pairs]`` r(chosen) and r(rejected) with nothing removed.
    """

    nodes: list[Node]
    chosen: Tensor
    rejected: Tensor
    settings: dict[str, Any]
    clean_chosen: Tensor
    clean_rejected: Tensor

    @property
    def clean_margin(self) -> Tensor:
        """``[n_pairs]`` r(chosen) - r(rejected) with nothing removed."""
        return self.clean_chosen - self.clean_rejected

    @property
    def margin(self) -> Tensor:
        return self.chosen - self.rejected

    def effects(self, target: str) -> Tensor:
        """``[n_pairs, n_nodes]`` change of ``target`` ("chosen", "rejected", "margin" or "sum")."""
        return target_of(self.chosen, self.rejected, target)

    def table(self, target: str = "margin") -> pd.DataFrame:
        effects = self.effects(target)
        return pd.DataFrame({
            "hook_name": [n[0] for n in self.nodes], "feature": [n[1] for n in self.nodes],
            "effect": effects.mean(0).numpy(), "mean_abs_effect": effects.abs().mean(0).numpy(),
        })


def ablate(
    rm: RewardModel,
    pairs: PairsLike,
    *,
    features: Iterable[Any] | tuple[str, int] | int | str,
    saes: SAE | Iterable[Any] | Mapping[str, Any] | None = None,
    mode: str = "zero",
    positions: str = "all",
    jointly: bool = False,
    reference_pairs: PairsLike | None = None,
    baselines: dict[str, Tensor] | None = None,
    skip_first: bool = SKIP_FIRST,
    batched: bool = True,
    batch_tokens: int = 4096,
    truncate: bool = False,
    progress: bool = True,
) -> Ablation:
    """Exact change of each pair's rewards when ``features`` are removed (one at a time, or
    ``jointly``).

    Args:
        pairs: ``PreferencePair`` objects (as for ``attribute``).
        features: ``(hook_name, index)`` pairs (index ``-1`` for the error node), one such pair,
            bare indices when there is one SAE, or ``"all"`` for every feature and error node of
            every SAE together (the completeness check).
        mode: ``"zero"`` or ``"mean"`` (see ``attribute``'s ``baseline``).
        baselines: per hook, ``[d_sae]`` values to remove features to, overriding ``mode``
            (e.g. ``attribution.baselines``, to ablate exactly what was attributed).
        positions, skip_first, reference_pairs, batch_tokens, truncate: as for ``attribute``.
        batched: stack the ablations of one hook along the batch (up to ``batch_tokens`` tokens
            per forward), only for the rows where the node is nonzero, restarted at the hook's
            layer; ``False`` runs one full forward per node (the reference).
    """
    if mode not in BASELINES:
        raise ValueError(f"mode must be one of {BASELINES}, got {mode!r}")
    check_positions(positions)
    if not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ValueError(f"batch_tokens must be an integer >= 1, got {batch_tokens!r}")
    pairs = as_pairs(pairs)
    by_hook = resolve_saes(rm, saes)
    nodes = _check_nodes(features, by_hook)
    settings = dict(mode=mode, positions=positions, skip_first=skip_first, jointly=jointly or features == ALL,
                    text_format=describe_text_format(rm.tokenizer, [p.prompt for p in pairs], rm.text_format))
    at_outliers: set[Node] = set()
    with plain_model(rm, by_hook):
        if baselines is None:
            reference = as_pairs(reference_pairs, name="reference_pairs") if reference_pairs is not None else pairs
            baselines = feature_baselines(rm, by_hook, reference, baseline=mode, positions=positions,
                                          skip_first=skip_first, batch_tokens=batch_tokens, truncate=truncate)
        else:
            baselines = {n: baselines[n].to(sae.W_dec.device, sae.W_dec.dtype) for n, sae in by_hook.items()}
        columns: dict[str, list[Tensor]] = {"chosen": [], "rejected": []}
        clean: dict[str, list[Tensor]] = {"chosen": [], "rejected": []}
        batches = pair_batches(rm, pairs, batch_tokens=batch_tokens, truncate=truncate)
        for batch in tqdm(batches, desc="ablating", disable=not progress or len(batches) < 2):
            for side_name, side, mask in zip(("chosen", "rejected"), (batch.chosen, batch.rejected),
                                             pair_masks(batch, positions, skip_first=skip_first)):
                runner = _SideRunner(rm, side, mask, by_hook, baselines)
                if features == ALL:
                    result = runner.joint_all()
                elif jointly:
                    result = runner.joint(nodes)
                else:
                    result = runner.each(nodes, batched=batched, budget=batch_tokens)
                at_outliers |= runner.at_outliers(nodes)
                columns[side_name].append(result)
                clean[side_name].append(runner.clean)
    if at_outliers and features != ALL:
        _warn_at_outliers(at_outliers)
    out_nodes = [(ALL, len(nodes))] if features == ALL else [("joint", len(nodes))] if jointly else nodes
    return Ablation(nodes=out_nodes, chosen=torch.cat(columns["chosen"]).float().cpu(),
                    rejected=torch.cat(columns["rejected"]).float().cpu(), settings=settings,
                    clean_chosen=torch.cat(clean["chosen"]).float().cpu(),
                    clean_rejected=torch.cat(clean["rejected"]).float().cpu())


def _check_nodes(features: Any, saes: dict[str, SAE]) -> list[Node]:
    """``features`` as a list of ``(hook_name, index)`` nodes that exist (see :func:`ablate`)."""
    allowed = f"a list of (hook_name, index) pairs, one such pair, or {ALL!r}"
    if isinstance(features, str):
        if features != ALL:
            raise ValueError(f"features must be {allowed}, got {features!r}")
        return [(name, i) for name, sae in saes.items() for i in [*range(sae.cfg.d_sae), ERROR]]
    if isinstance(features, tuple) and len(features) == 2 and isinstance(features[0], str):
        features = [features]  # one (hook_name, index) pair
    elif isinstance(features, (int, torch.Tensor)) and not isinstance(features, bool):
        features = [features]
    if not isinstance(features, (list, tuple, range)) and not hasattr(features, "__iter__"):
        raise TypeError(f"features must be {allowed}, got {type(features).__name__}")
    nodes = []
    for item in features:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            hook, index = item
        elif isinstance(item, (int, torch.Tensor)) and not isinstance(item, bool) and len(saes) == 1:
            hook, index = next(iter(saes)), item  # a bare index, with only one SAE to belong to
        elif isinstance(item, (int, torch.Tensor)) and not isinstance(item, bool):
            raise TypeError(f"feature {int(item)} is a bare index, but there are SAEs at {sorted(saes)}: "
                            "give (hook_name, index) pairs")
        else:
            raise TypeError(f"features must be {allowed}; got an item {item!r}")
        if isinstance(index, torch.Tensor) and index.numel() == 1:
            index = index.item()
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"a feature index must be an integer, got {index!r} for {hook}")
        nodes.append((hook, index))
    if not nodes:
        raise ValueError("no features to ablate")
    for hook, index in nodes:
        if hook not in saes:
            raise ValueError(f"no SAE at {hook!r}; SAEs are at {sorted(saes)}")
        if not ERROR <= index < saes[hook].cfg.d_sae:
            raise ValueError(f"feature {index} does not exist at {hook}: valid are 0..{saes[hook].cfg.d_sae - 1} (and -1 for the error node)")
    return nodes


def _warn_at_outliers(nodes: set[Node]) -> None:
    shown = ", ".join(f"{hook}:{index}" for hook, index in sorted(nodes)[:8])
    warnings.warn(
        f"{len(nodes)} ablated node(s) ({shown}{', ...' if len(nodes) > 8 else ''}) are nonzero at positions whose "
        f"activation norm is over {OUTLIER_RATIO:.0f}x the median (attention sinks, start tokens); their exact effects "
        "include what removing them there does. Leave such positions out (skip_first=True, positions='completion' "
        "or 'diverge') to measure the text's features alone.", stacklevel=3)


class _SideRunner:
    """Ablations on one side of one batch, sharing its clean run."""

    def __init__(self, rm: RewardModel, side: TokenBatch, mask: Tensor, saes: dict[str, SAE], baselines: dict[str, Tensor]):
        self.rm, self.side, self.mask, self.saes, self.baselines = rm, side, mask, saes, baselines
        starts = [f"blocks.{layer}.hook_resid_pre" for layer in {hook_layer(n) for n in saes} if layer is not None]
        self.clean, xs, _ = run_with_deltas(rm, side, [*saes, *starts])
        self.residuals = {name: xs[name] for name in starts}
        self.nodes: dict[str, Nodes] = read_nodes(saes, xs)
        self.directions = {hook: directions(sae) for hook, sae in saes.items()}

    def at_outliers(self, nodes: list[Node]) -> set[Node]:
        """The ``nodes`` that are nonzero at a selected outlier position of this side."""
        found = set()
        for hook in {h for h, _ in nodes}:
            outliers, _ = outlier_positions(self.nodes[hook].x, self.mask)
            if not outliers.any():
                continue
            acts = self.nodes[hook].acts[outliers]
            found |= {(h, i) for h, i in nodes if h == hook and (i == ERROR or bool((acts[:, i] != 0).any()))}
        return found

    def delta(self, node: Node) -> Tensor:
        hook, index = node
        nodes = self.nodes[hook]
        with torch.no_grad():
            if index == ERROR:
                return error_delta(nodes.error, self.mask)
            return feature_delta(nodes.acts[..., index], self.baselines[hook][index], self.directions[hook][index],
                                 nodes.scale, self.mask)

    def each(self, nodes: list[Node], *, batched: bool, budget: int) -> Tensor:
        out = torch.zeros(self.side.tokens.shape[0], len(nodes), device=self.clean.device)
        if not batched:
            for column, node in enumerate(nodes):
                rewards, _, _ = run_with_deltas(self.rm, self.side, [], deltas={node[0]: self.delta(node)})
                out[:, column] = rewards - self.clean
            return out
        by_hook: dict[str, list[int]] = defaultdict(list)
        for column, node in enumerate(nodes):
            by_hook[node[0]].append(column)
        width = self.side.tokens.shape[1]
        for hook, columns in by_hook.items():
            pending: list[tuple[int, Tensor, Tensor]] = []
            for column in columns:
                delta = self.delta(nodes[column])
                # Rows where the node is zero at every selected position are unchanged: skip them.
                rows = delta.flatten(1).any(1).nonzero().flatten()
                if len(rows):
                    pending.append((column, rows, delta[rows]))
                if pending and (sum(len(r) for _, r, _ in pending) + len(rows)) * width > budget:
                    self._flush(hook, pending, out)
            if pending:
                self._flush(hook, pending, out)
        return out

    def _flush(self, hook: str, pending: list[tuple[int, Tensor, Tensor]], out: Tensor) -> None:
        """Run the stacked (column, rows, delta) ablations of one hook in one forward."""
        rows = torch.cat([r for _, r, _ in pending])
        deltas = torch.cat([d for _, _, d in pending])
        rewards = self._stacked(hook, rows, deltas) - self.clean[rows]
        offset = 0
        for column, r, _ in pending:
            out[r, column] = rewards[offset : offset + len(r)]
            offset += len(r)
        pending.clear()

    def _stacked(self, hook: str, rows: Tensor, deltas: Tensor) -> Tensor:
        layer = hook_layer(hook)
        if layer is None:
            side = TokenBatch(self.side.tokens[rows], self.side.attention_mask[rows], self.side.completion_start[rows])
            return run_with_deltas(self.rm, side, [], deltas={hook: deltas})[0]
        if hook == f"blocks.{layer}.hook_resid_post":
            # The delta is the next layer's input: start there, skipping layer ``layer`` too.
            residual = self.nodes[hook].x[rows] + deltas
            return run_with_deltas(self.rm, self.side, [], residual=residual, start_at_layer=layer + 1, rows=rows)[0]
        residual = self.residuals[f"blocks.{layer}.hook_resid_pre"][rows]
        return run_with_deltas(self.rm, self.side, [], deltas={hook: deltas}, residual=residual, start_at_layer=layer,
                               rows=rows)[0]

    def joint(self, nodes: list[Node]) -> Tensor:
        by_hook: dict[str, list[int]] = defaultdict(list)
        for hook, index in nodes:
            by_hook[hook].append(index)
        if len(by_hook) == 1:
            hook = next(iter(by_hook))
            deltas: dict[str, Any] = {hook: sum(self.delta((hook, index)) for index in sorted(set(by_hook[hook])))}
        else:
            deltas = {hook: self._live_removal(hook, indices) for hook, indices in by_hook.items()}
        return (run_with_deltas(self.rm, self.side, [], deltas=deltas)[0] - self.clean)[:, None]

    def _live_removal(self, hook: str, indices: list[int]) -> Any:
        """The delta that removes ``indices`` from the activation as it arrives at ``hook``."""
        sae, baseline, mask = self.saes[hook], self.baselines[hook], self.mask
        features = torch.tensor(sorted({i for i in indices if i != ERROR}), dtype=torch.long, device=mask.device)

        def removal(act: Tensor) -> Tensor:
            nodes = split(sae, act)
            delta = features_delta(nodes.acts[..., features], baseline[features], self.directions[hook][features],
                                   nodes.scale, mask)
            if ERROR in indices:
                delta = delta + error_delta(nodes.error, mask)
            return delta

        return removal

    def joint_all(self) -> Tensor:
        with torch.no_grad():
            deltas = {hook: removal_delta(n.acts, self.baselines[hook], self.directions[hook], n.error, n.scale, self.mask)
                      for hook, n in self.nodes.items()}
        return (run_with_deltas(self.rm, self.side, [], deltas=deltas)[0] - self.clean)[:, None]

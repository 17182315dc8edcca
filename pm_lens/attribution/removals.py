"""How removals run from a clean run: the batched machinery behind :func:`pm_lens.attribution.ablate`.

:class:`SideAblation` holds one side of one batch (its clean run, the SAE directions and
baselines) and runs removals from it: one node at a time stacked along the batch (:func:`each_pair`,
restarted at the hook's block and at the first changed position, up to the last pooled one), or
a set of nodes together (:func:`together`). Both sides of a pair agree up to some position (the
prompt, any shared start of the responses); a removal that begins before it changes both alike
there, so the rejected side continues from the chosen side's ablated keys and values.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from sae_lens import SAE
from torch import Tensor

from pm_lens.attribution.clean import SideRun
from pm_lens.attribution.formulas import error_delta, feature_delta, features_delta, removal_delta
from pm_lens.attribution.outliers import outlier_positions
from pm_lens.model import RewardModel
from pm_lens.model.runs import PrefixKV, final_positions
from pm_lens.saes.node import Node
from pm_lens.saes.split import directions, split

Item = tuple[int, int, int]  # an ablation in a batch: (first changed position, node column, row)


def each_pair(chosen: SideAblation, rejected: SideAblation, nodes: list[Node], budget: int) -> list[Tensor]:
    """The one-at-a-time ablations of a batch of pairs, stacked per hook (see the module
    docstring), as ``[chosen, rejected]`` ``[batch, n_nodes]`` reward changes.

    Where the two sides of a pair agree up to a position (the same tokens and selected positions:
    the prompt, and any common start of the responses), a removal that begins before it changes
    both sides alike up to there, so the rejected side's run continues from the chosen side's
    ablated keys and values and recomputes only from that position on."""
    outs = [torch.zeros(side.run.rewards.shape[0], len(nodes), device=side.run.rewards.device) for side in (chosen, rejected)]
    agree = agreeing_positions(chosen, rejected).tolist()
    by_hook: dict[str, list[int]] = defaultdict(list)
    for column, node in enumerate(nodes):
        by_hook[node.hook_name].append(column)
    for hook, hook_columns in by_hook.items():
        chosen_items = chosen.items(nodes, hook_columns)
        shared = {} if chosen.rm.hook_layer(hook) is None else {
            (c, r): agree[r] for f, c, r in chosen_items if f < agree[r]}
        for chunk in chosen.chunks(chosen_items, budget):
            follow = [(shared[c, r], c, r) for _, c, r in chunk if (c, r) in shared]
            kv = chosen.run_chunk(hook, nodes, chunk, outs[0], keep_kv=bool(follow))
            at = {(c, r): i for i, (_, c, r) in enumerate(chunk)}
            for part in rejected.chunks(follow, budget):
                index = torch.tensor([at[c, r] for _, c, r in part], device=outs[0].device)
                rejected.run_chunk(hook, nodes, part, outs[1], prefix=kv.rows(index))
        own = [item for item in rejected.items(nodes, hook_columns) if (item[1], item[2]) not in shared]
        for chunk in rejected.chunks(own, budget):
            rejected.run_chunk(hook, nodes, chunk, outs[1])
    return outs


def together(chosen: SideAblation, rejected: SideAblation, deltas_of: Any) -> list[Tensor]:
    """One removal (``deltas_of(side)``) on both sides of a batch, as ``[chosen, rejected]``
    ``[batch, 1]`` reward changes. The rejected side's rows run in groups that agree with their
    chosen sides up to about the same position, each continuing from the chosen side's keys and
    values from there (the removal is the same on both sides before it)."""
    agree = agreeing_positions(chosen, rejected)
    changed_chosen, kv = chosen.run_deltas(deltas_of(chosen), keep_kv=bool(agree.max() > 0))
    out = torch.zeros_like(rejected.run.rewards)
    if kv is None:
        changed, _ = rejected.run_deltas(deltas_of(rejected))
        return [(changed_chosen - chosen.run.rewards)[:, None], (changed - rejected.run.rewards)[:, None]]
    for rows in rows_by_restart(agree.tolist(), width=rejected.run.batch.tokens.shape[1]):
        index = torch.tensor(rows, device=out.device)
        part = rejected if len(rows) == len(out) else SideAblation(rejected.rm, rejected.run.rows(index), rejected.saes,
                                                                    rejected.baselines)
        changed, _ = part.run_deltas(deltas_of(part), prefix=kv.rows(index), start=int(agree[index].min()))
        out[index] = changed - part.run.rewards
    return [(changed_chosen - chosen.run.rewards)[:, None], out[:, None]]


def rows_by_restart(starts: list[int], *, width: int) -> list[list[int]]:
    """Rows grouped so that each group restarts at its earliest row's position: a new group
    begins when holding a row back would recompute more than about one row's worth of positions."""
    groups: list[list[int]] = []
    for row in sorted(range(len(starts)), key=lambda r: -starts[r]):
        if groups and len(groups[-1]) * (starts[groups[-1][-1]] - starts[row]) <= width:
            groups[-1].append(row)
        else:
            groups.append([row])
    return [sorted(group) for group in groups]


def agreeing_positions(chosen: SideAblation, rejected: SideAblation) -> Tensor:
    """``[batch]`` how many leading positions the two sides of each pair share (same tokens, both
    attended, same selection), at most the rejected side's pooled position (which its run must
    recompute)."""
    c, r = chosen.run, rejected.run
    width = min(c.batch.tokens.shape[1], r.batch.tokens.shape[1])
    same = ((c.batch.tokens[:, :width] == r.batch.tokens[:, :width]) & (c.batch.attention_mask[:, :width] != 0)
            & (r.batch.attention_mask[:, :width] != 0) & (c.mask[:, :width] == r.mask[:, :width]))
    return torch.minimum(same.int().cumprod(1).sum(1), rejected.pooled)


class SideAblation:
    """Ablations on one side of one batch, from its clean run."""

    def __init__(self, rm: RewardModel, run: SideRun, saes: dict[str, SAE], baselines: dict[str, Tensor]):
        self.rm, self.run, self.saes, self.baselines = rm, run, saes, baselines
        self.mask = run.mask
        self._masks: dict[torch.device, Tensor] = {}
        self.directions = {hook: directions(sae) for hook, sae in saes.items()}
        self._acts: dict[str, Tensor] = {}
        self._prefix: Any = None
        self.pooled = final_positions(None, run.batch.attention_mask)

    def acts(self, hook: str) -> Tensor:
        if hook not in self._acts:
            self._acts[hook] = self.run.dense_acts(hook)
        return self._acts[hook]

    def mask_at(self, hook: str) -> Tensor:
        """The positions acted on, on the device of ``hook``'s activations (another than the
        batch's when the model's layers are split over devices)."""
        device = self.run.nodes[hook].x.device
        if device not in self._masks:
            self._masks[device] = self.mask.to(device)
        return self._masks[device]

    def at_outliers(self, nodes: list[Node]) -> set[Node]:
        """The ``nodes`` that are nonzero at a selected outlier position of this side."""
        found = set()
        for hook in {n.hook_name for n in nodes}:
            outliers, _ = outlier_positions(self.run.nodes[hook].x, self.mask)
            if outliers.any():
                acts = self.acts(hook)[outliers]
                found |= {n for n in nodes if n.hook_name == hook and (n.is_error or bool((acts[:, n.feature] != 0).any()))}
        return found

    def delta(self, node: Node, rows: Tensor | None = None) -> Tensor:
        """The change of the activation at ``node``'s hook when it is removed (``[rows, pos, d_in]``)."""
        nodes, mask = self.run.nodes[node.hook_name], self.mask_at(node.hook_name)
        rows = None if rows is None else rows.to(mask.device)
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        with torch.no_grad():
            if node.is_error:
                return error_delta(pick(nodes.error), pick(mask))
            return feature_delta(pick(self.acts(node.hook_name)[..., node.feature]), self.baselines[node.hook_name][node.feature],
                                 self.directions[node.hook_name][node.feature], pick(nodes.scale), pick(mask))

    def changed(self, node: Node) -> Tensor:
        """``[batch, pos]`` where removing ``node`` changes the activation."""
        mask = self.mask_at(node.hook_name)
        if node.is_error:
            return mask & (self.run.nodes[node.hook_name].error != 0).any(-1)
        baseline = self.baselines[node.hook_name][node.feature]
        return mask & (self.acts(node.hook_name)[..., node.feature] != baseline)

    def each(self, nodes: list[Node]) -> Tensor:
        """``[batch, n_nodes]`` reward changes, one full forward per node (the reference)."""
        out = torch.zeros(self.run.rewards.shape[0], len(nodes), device=self.run.rewards.device)
        tokens, attention = self.run.batch.tokens, self.run.batch.attention_mask
        for column, node in enumerate(nodes):
            rewards = self.rm.run_with_deltas(tokens, attention, deltas={node.hook_name: self.delta(node)}).rewards
            out[:, column] = rewards - self.run.rewards
        return out

    def items(self, nodes: list[Node], columns: list[int]) -> list[Item]:
        """The (first changed position, column, row) of every row a node of ``columns`` changes;
        a row where the node changes nothing is left out."""
        items = []
        for column in columns:
            changed = self.changed(nodes[column])
            rows = changed.any(1).nonzero().flatten()
            firsts = changed[rows].int().argmax(1)
            items += [(int(f), column, int(r)) for f, r in zip(firsts.tolist(), rows.tolist())]
        return items

    def chunks(self, items: list[Item], budget: int) -> list[list[Item]]:
        """``items`` in forwards of at most ``budget`` recomputed tokens; rows that restart late
        go together, so each forward restarts as late as possible."""
        items = sorted(items, key=lambda item: -item[0])
        width, chunks, current = self.run.batch.tokens.shape[1], [], []
        for item in items:
            # A row that changes earlier makes the whole chunk restart earlier: start a new chunk
            # when that would cost more recomputed tokens than one more forward (~ one row's worth).
            later = current and len(current) * (current[-1][0] - item[0]) > width
            if current and (later or (len(current) + 1) * (width - item[0]) > budget):
                chunks.append(current)
                current = []
            current.append(item)
        return chunks + ([current] if current else [])

    def run_chunk(self, hook: str, nodes: list[Node], chunk: list[Item], out: Tensor, *, prefix: PrefixKV | None = None,
                  keep_kv: bool = False) -> PrefixKV | None:
        """Run one chunk's ablations stacked along the batch in one forward, restarted at the
        chunk's earliest position against ``prefix`` (row-aligned with ``chunk``; by default this
        side's clean keys and values), and write the reward changes to ``out``. With
        ``keep_kv``, return the ablated run's keys and values."""
        columns = torch.tensor([c for _, c, _ in chunk])
        rows = torch.tensor([r for _, _, r in chunk], device=self.run.rewards.device)
        deltas = torch.cat([self.delta(nodes[c], rows[i : i + 1]) for i, (_, c, _) in enumerate(chunk)])
        rewards, kv = self._stacked(hook, rows, deltas, min(f for f, _, _ in chunk), prefix, keep_kv)
        out[rows, columns.to(out.device)] = rewards - self.run.rewards[rows]
        return kv

    def _stacked(self, hook: str, rows: Tensor, deltas: Tensor, start: int, prefix: PrefixKV | None,
                 keep_kv: bool) -> tuple[Tensor, PrefixKV | None]:
        """Rewards of ``rows`` (repeats allowed) with ``deltas`` added at ``hook``, restarted at the
        hook's block (the next one for a block output), recomputing only positions ``start`` up to
        the last row's pooled one."""
        rm, batch = self.rm, self.run.batch
        if rm.hook_layer(hook) is None:
            return rm.run_with_deltas(batch.tokens[rows], batch.attention_mask[rows], deltas={hook: deltas}).rewards, None
        end = int(self.pooled[rows].max()) + 1  # positions after every row's pooled one change nothing read
        residual, layer, rest = self._restart_point({hook: deltas[:, :end]}, rows, end)
        where = dict(prefix=prefix, rows=None) if prefix is not None else dict(prefix=self.prefix(layer), rows=rows)
        return rm.restart(residual, batch.attention_mask[rows, :end], layer=layer, deltas=rest, start=start,
                          keep_kv=keep_kv, **where)

    def _restart_point(self, deltas: dict[str, Any], rows: Tensor | slice = slice(None),
                       end: int | None = None) -> tuple[Tensor, int, dict[str, Any]]:
        """Where a run with ``deltas`` (at hooks inside the blocks; for ``rows`` and positions up to
        ``end``) restarts from the clean run: the input of the first hook's block, or for a block
        output that output with its delta added, as the next block's input; the block; and the
        deltas left for later hooks."""
        rm = self.rm
        first = min(deltas, key=lambda hook: rm.hook_layer(hook) + rm.is_layer_output(hook))
        layer = rm.hook_layer(first)
        if isinstance(rows, Tensor):  # the clean run's tensors are on their hook's device
            rows = rows.to(self.run.nodes[first].x.device if rm.is_layer_output(first) else self.run.residuals[layer].device)
        if not rm.is_layer_output(first):
            return self.run.residuals[layer][rows, :end], layer, deltas
        x, delta = self.run.nodes[first].x[rows, :end], deltas[first]
        residual = x + (delta(x) if callable(delta) else delta).reshape(x.shape)
        return residual, layer + 1, {hook: d for hook, d in deltas.items() if hook != first}

    def prefix(self, layer: int) -> PrefixKV | None:
        """This side's clean keys and values of blocks ``layer`` on: the clean run's, or (one extra
        forward per side, counted with the ablations) computed here; None past the last block."""
        if layer >= self.rm.cfg.n_layers:
            return None
        if self.run.kv is not None and self.run.kv.first_layer <= layer:
            return self.run.kv
        if self._prefix is None or self._prefix.first_layer > layer:
            first = min(layer, min((self.rm.hook_layer(h) for h in self.saes if self.rm.hook_layer(h) is not None), default=layer))
            self._prefix = self.rm.prefix_kv(self.run.batch.tokens, self.run.batch.attention_mask, first_layer=first)
        return self._prefix

    def joint_deltas(self, nodes: list[Node]) -> dict[str, Any]:
        """Per hook, the delta that removes ``nodes`` together (see the module docstring)."""
        by_hook: dict[str, list[Node]] = defaultdict(list)
        for node in dict.fromkeys(nodes):
            by_hook[node.hook_name].append(node)
        if len(by_hook) == 1:
            hook, hook_nodes = next(iter(by_hook.items()))
            return {hook: sum(self.delta(node) for node in hook_nodes)}
        return {hook: self._live_removal(hook, hook_nodes) for hook, hook_nodes in by_hook.items()}

    def _live_removal(self, hook: str, nodes: list[Node]) -> Any:
        """The delta that removes ``nodes`` from the activation as it arrives at ``hook`` (at the
        last positions of the batch when a restart recomputes only those)."""
        sae, baseline, full_mask = self.saes[hook], self.baselines[hook], self.mask_at(hook)
        features = torch.tensor([n.feature for n in nodes if not n.is_error], dtype=torch.long, device=full_mask.device)
        with_error = any(n.is_error for n in nodes)

        def removal(act: Tensor) -> Tensor:
            mask = full_mask[:, full_mask.shape[1] - act.shape[1]:]
            arrived = split(sae, act)
            delta = features_delta(arrived.acts[..., features], baseline[features], self.directions[hook][features],
                                   arrived.scale, mask)
            return delta + error_delta(arrived.error, mask) if with_error else delta

        return removal

    def remove_all_deltas(self) -> dict[str, Tensor]:
        """Per hook, the delta that sets the activation to its decoded baselines."""
        with torch.no_grad():
            return {hook: removal_delta(self.acts(hook), self.baselines[hook], self.directions[hook], n.error, n.scale,
                                        self.mask_at(hook))
                    for hook, n in self.run.nodes.items()}

    def run_deltas(self, deltas: dict[str, Any], *, prefix: PrefixKV | None = None, start: int | None = None,
                   keep_kv: bool = False) -> tuple[Tensor, PrefixKV | None]:
        """Rewards with ``deltas`` (tensors, or functions of the arriving activation, acting at the
        selected positions only) added at their hooks, restarted from the clean run at the first of
        them (nothing before it changes), and with ``prefix`` only from position ``start`` on (by
        default the clean run's keys and values where it kept them, from this side's first
        selected position: nothing before it changes either); with ``keep_kv``, also the run's
        keys and values (None when a hook is outside the blocks and the whole model reran)."""
        rm, batch = self.rm, self.run.batch
        if any(rm.hook_layer(hook) is None for hook in deltas):
            return rm.run_with_deltas(batch.tokens, batch.attention_mask, deltas=deltas).rewards, None
        residual, layer, rest = self._restart_point(deltas)
        if prefix is None:  # the clean run's keys and values, where it kept them (computing them costs a forward)
            kept = self.run.kv is not None and self.run.kv.first_layer <= layer < self.rm.cfg.n_layers
            start = self.first_selected() if kept else 0
            prefix = self.run.kv if start > 0 else None
        return rm.restart(residual, batch.attention_mask, layer=layer, deltas=rest, prefix=prefix, start=start or 0,
                          keep_kv=keep_kv)

    def first_selected(self) -> int:
        """The batch's earliest selected position (a removal acts there only), at most its
        earliest pooled one (which every run recomputes)."""
        first = torch.where(self.mask.any(1), self.mask.int().argmax(1), self.pooled)
        return int(torch.minimum(first, self.pooled).min())

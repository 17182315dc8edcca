"""One pass over the run's texts that gathers what the dashboards count: per chosen feature its
activation at every token, the histogram of its nonzero activations, the features firing at the
same tokens, each completion's peak, and the direct path from the feature to the reward.

For every batch and side: one forward of the plain model (no gradient) reading the SAE hooks and
the last block's output, counted as ``"dashboard"``; each SAE splits its hook's activation into
features (:func:`pm_lens.saes.split.split`); padding and, with ``skip_first``, each text's first
token read 0 everywhere. Given the attribution's clean run (``clean``), its features are read
from it and only the blocks after the last SAE hook rerun, for the final residual.

The direct path of a feature (:func:`residual_direction`): the direction it writes into the
residual stream (its decoder row; through ``W_O`` for an ``attn.hook_z`` SAE), carried unchanged
by the skip connections to the final norm and the head at the pooled token. Its effect per unit
of activation there is the directional derivative of ``head(ln_final(x))`` at that text's final
residual (``torch.func.jvp``: the norm linearised at the actual residual).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from sae_lens import SAE
from torch import Tensor

from pm_lens.attribution.batching import pair_batches
from pm_lens.attribution.clean import CleanRun
from pm_lens.data import PreferencePair
from pm_lens.model import RewardModel
from pm_lens.saes.node import Node
from pm_lens.saes.split import directions, split

SIDES = ("chosen", "rejected")
RESIDUAL_WRITERS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out", "attn.hook_z")


def residual_direction(rm: RewardModel, sae: SAE, feature: int) -> Tensor | None:
    """``[d_model]`` what one unit of ``feature`` adds to the residual stream (before the SAE's
    per-token ``scale``), or None for a hook that does not write into it (e.g. ``mlp.hook_post``)."""
    hook = sae.cfg.metadata.hook_name
    if not hook.endswith(RESIDUAL_WRITERS):
        return None
    direction = directions(sae)[feature]
    if hook.endswith("attn.hook_z"):
        W_O = rm.blocks[rm.hook_layer(hook)].attn.W_O  # [n_heads, d_head, d_model]
        return torch.einsum("hd,hdm->m", direction.reshape(W_O.shape[:2]).to(W_O.dtype), W_O)
    return direction


def head_derivative(rm: RewardModel, final: Tensor, direction: Tensor) -> Tensor:
    """``[batch]`` d reward / d(final residual) along ``direction`` at each row's final residual
    ``final`` ``[batch, d_model]`` (through the final norm, linearised there, and the head)."""
    def reward(x: Tensor) -> Tensor:
        return rm.unembed(rm.ln_final(x[:, None, :]))[:, 0, 0]

    x = final.detach().float().to(rm.device_of("ln_final.hook_normalized"))
    v = direction.detach().float().to(x.device).expand_as(x)
    with torch.no_grad():
        _, derivative = torch.func.jvp(lambda y: reward(y.to(final.dtype)).float(), (x,), (v,))
    return derivative.cpu()


@dataclass
class Reading:
    """What the pass gathered (see the module docstring), per chosen feature.

    Attributes:
        texts: per text ``(pair index, side, token ids, completion_start)``, in reading order.
        acts: per feature, per text, ``[n_tokens]`` activations (0 where not kept).
        nonzero: per feature, its nonzero activations over all texts.
        n_tokens: tokens looked at.
        peaks: per feature, ``[n_pairs, 2]`` the largest activation in each completion (chosen, rejected).
        both, fires: co-firing counts: per feature and hook, ``[d_sae]`` tokens where both fire;
            per hook, ``[d_sae]`` tokens each feature fires on.
        direct_unit: per feature, per text, d reward / d activation along the direct path (the
            SAE's per-token ``scale`` at the pooled token included); absent for non-writers.
        last_acts: per feature, per text, its activation at the pooled token.
        any_firing: per feature, ``[n_pairs]`` whether it fires at any kept token of either side.
    """

    texts: list[tuple[int, str, list[int], int]] = field(default_factory=list)
    acts: dict[Node, list[Tensor]] = field(default_factory=lambda: defaultdict(list))
    nonzero: dict[Node, list[Tensor]] = field(default_factory=lambda: defaultdict(list))
    n_tokens: int = 0
    peaks: dict[Node, Tensor] = field(default_factory=dict)
    both: dict[Node, dict[str, Tensor]] = field(default_factory=dict)
    fires: dict[str, Tensor] = field(default_factory=dict)
    direct_unit: dict[Node, list[float]] = field(default_factory=lambda: defaultdict(list))
    last_acts: dict[Node, list[float]] = field(default_factory=lambda: defaultdict(list))
    any_firing: dict[Node, Tensor] = field(default_factory=dict)


def read_texts(rm: RewardModel, saes: dict[str, SAE], pairs: Sequence[PreferencePair], nodes: Sequence[Node], *,
               skip_first: bool, batch_tokens: int, clean: CleanRun | None = None) -> Reading:
    """The pass of the module docstring over both sides of every pair."""
    reading = Reading(peaks={node: torch.zeros(len(pairs), 2) for node in nodes},
                      any_firing={node: torch.zeros(len(pairs), dtype=torch.bool) for node in nodes})
    with torch.no_grad():
        writes = {node: residual_direction(rm, saes[node.hook_name], node.feature) for node in nodes}
    sides = _from_clean(rm, saes, clean) if clean is not None else _by_running(rm, saes, pairs, batch_tokens)
    for start, side_index, side, split_nodes, final in sides:
        with torch.no_grad():
            _add(reading, rm, side, side_index, start, split_nodes, final, nodes, writes, skip_first=skip_first)
    return reading


def _by_running(rm: RewardModel, saes: dict[str, SAE], pairs: Sequence[PreferencePair], batch_tokens: int) -> Iterator:
    """Per batch and side: ``(first pair, side index, batch, split nodes, pooled final residual)``."""
    final_hook = f"blocks.{rm.cfg.n_layers - 1}.hook_resid_post"
    start = 0
    for batch in pair_batches(rm, pairs, batch_tokens=batch_tokens):
        for side_index, side in enumerate((batch.chosen, batch.rejected)):
            with rm.counting("dashboard"), torch.no_grad():
                run = rm.run_with_deltas(side.tokens, side.attention_mask, read=[*saes, final_hook])
                split_nodes = {hook: split(sae, run.acts[hook]) for hook, sae in saes.items()}
            final = run.acts[final_hook]
            last = (side.attention_mask.sum(1) - 1).to(final.device)
            yield start, side_index, side, split_nodes, final[torch.arange(len(last), device=final.device), last]
        start += batch.chosen.tokens.shape[0]


def _from_clean(rm: RewardModel, saes: dict[str, SAE], clean: CleanRun) -> Iterator:
    """As :func:`_by_running`, from a clean run: its nodes, and the blocks after its last SAE hook rerun."""
    for b, start in enumerate(clean.starts):
        for side_index, name in enumerate(SIDES):
            run = clean.side(rm, b, name)
            split_nodes = {hook: replace(run.nodes[hook], acts=run.dense_acts(hook)) for hook in saes}
            layer, residual = _latest_residual(rm, run)
            with rm.counting("dashboard"):
                final = rm.pooled_final_residual(run.batch.attention_mask, tokens=run.batch.tokens, residual=residual,
                                                 layer=layer, prefix=run.kv)
            yield start, side_index, run.batch, split_nodes, final


def _latest_residual(rm: RewardModel, run: Any) -> tuple[int, Tensor | None]:
    """The latest block input a clean run holds: a kept block input, or a block output's
    activation as the next block's input; ``(0, None)`` when there is none (run from the tokens)."""
    found = dict(run.residuals)
    for hook, nodes in run.nodes.items():
        if rm.is_layer_output(hook):
            found[rm.hook_layer(hook) + 1] = nodes.x
        elif hook.endswith("hook_resid_pre") and rm.hook_layer(hook) is not None:
            found[rm.hook_layer(hook)] = nodes.x
    if not found:
        return 0, None
    layer = max(found)
    return layer, found[layer]


def _add(reading: Reading, rm: RewardModel, side: Any, side_index: int, start: int, split_nodes: dict[str, Any],
         final: Tensor, nodes: Sequence[Node], writes: dict[Node, Tensor | None], *, skip_first: bool) -> None:
    """One side of one batch into ``reading`` (``final``: ``[batch, d_model]`` the pooled final residual)."""
    keep = side.kept(skip_first=skip_first)
    last = side.attention_mask.sum(1) - 1
    rows = torch.arange(len(last))
    for row in range(side.tokens.shape[0]):
        length = int(side.attention_mask[row].sum())
        reading.texts.append((start + row, SIDES[side_index], side.tokens[row, :length].tolist(),
                              int(side.completion_start[row])))
    reading.n_tokens += int(keep.sum())
    fires = {}
    for hook, found in split_nodes.items():
        at = keep.to(found.acts.device)
        fires[hook] = (found.acts > 0) & at[..., None]
        reading.fires[hook] = reading.fires.get(hook, 0) + fires[hook].sum((0, 1)).cpu()
    in_completion = (torch.arange(keep.shape[1], device=keep.device) >= side.completion_start[:, None]) \
        & (side.attention_mask != 0)
    for node in nodes:
        found = split_nodes[node.hook_name]
        acts = (found.acts[..., node.feature] * keep.to(found.acts.device)).float().cpu()
        reading.acts[node] += [acts[row, : int(side.attention_mask[row].sum())] for row in range(acts.shape[0])]
        reading.nonzero[node].append(acts[acts > 0])
        reading.any_firing[node][start : start + acts.shape[0]] |= (acts > 0).any(1)
        peak = (acts * in_completion.cpu()).amax(1)
        reading.peaks[node][start : start + len(peak), side_index] = peak
        mine = fires[node.hook_name][..., node.feature]
        counts = reading.both.setdefault(node, {})
        for hook, fired in fires.items():
            counts[hook] = counts.get(hook, 0) + fired[mine.to(fired.device)].sum(0).cpu()
        reading.last_acts[node] += found.acts[rows.to(found.acts.device), last.to(found.acts.device), node.feature].float().cpu().tolist()
        if writes[node] is not None:
            scale = found.scale[rows.to(found.scale.device), last.to(found.scale.device), 0].float().cpu()
            unit = head_derivative(rm, final, writes[node])
            reading.direct_unit[node] += (unit * scale).tolist()

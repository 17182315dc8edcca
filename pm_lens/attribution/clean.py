"""The clean pass of a set of pairs, computed once and shared by every stage.

On a large PM every forward pass costs real time, and attribution, exact ablation, fidelity cards,
recovery, contexts and the exploit search all start from the same thing: the encoded pairs, their
clean rewards, and per SAE hook the split of the clean activation into nodes. :class:`CleanRun`
holds that. :func:`pm_lens.attribute` builds it in its own forward (the AtP pass is the clean
pass) and returns it in ``Attribution.clean_run``; ``ablate(..., clean=...)`` and every stage built
on it read it instead of running the clean forward again.

What it keeps, per batch and side (:class:`SideRun`): the token batch, the positions acted on,
the rewards, per hook the activation ``x``, the feature activations (sparse) and the error node,
the block inputs a restarted ablation needs, and the keys and values of the blocks from the first
SAE's on (what a restart at a later position attends to; per token and block ``2 * n_kv_heads *
d_head`` numbers, e.g. 4 KiB in bf16 for a Llama-3-8B block). Within ``budget_bytes`` everything is kept; past
it only tokens and rewards are, and a later stage recomputes the rest (counted as a ``"clean"``
forward too, so a run's count shows the cost).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from jaxtyping import Bool, Float
from sae_lens import SAE
from torch import Tensor

from pm_lens.attribution.nodes import read_nodes
from pm_lens.attribution.positions import pair_masks
from pm_lens.data import PairBatch, PreferencePair, TokenBatch
from pm_lens.model import RewardModel
from pm_lens.model.runs import PrefixKV, SharedPrefix, final_positions, right_padded
from pm_lens.saes.split import SAENodes

DEFAULT_BUDGET_BYTES = 2 * 2**30
SIDES = ("chosen", "rejected")


@dataclass(frozen=True)
class SideRun:
    """The clean pass of one side of one batch of pairs.

    Attributes:
        batch: the side's token batch (right-padded).
        mask: ``[batch, pos]`` the positions stages act on.
        rewards: ``[batch]`` clean rewards.
        nodes: per hook, the activation split into its SAE's nodes (``acts`` sparse).
        residuals: per block an ablation restarts at, that block's clean input ``[batch, pos, d_model]``.
        kv: the clean keys and values of the blocks from the first SAE hook's on (what a restart
            at a later position attends to), or None (then an ablation computes them once).
        grads: per hook, the gradient of the side's summed reward the attribution used (AtP: at
            the clean activation; IG: averaged along the path), flat as the SAE reads the hook
            ``[batch, pos, d_in]``; None when the run was not an attribution's. Feature dashboards
            read per-token contributions from it without another backward pass.
    """

    batch: TokenBatch
    mask: Bool[Tensor, "batch pos"]
    rewards: Float[Tensor, " batch"]
    nodes: Mapping[str, SAENodes]
    residuals: Mapping[int, Float[Tensor, "batch pos d_model"]]
    kv: PrefixKV | None = None
    grads: Mapping[str, Tensor] | None = None

    def dense_acts(self, hook_name: str) -> Float[Tensor, "batch pos d_sae"]:
        acts = self.nodes[hook_name].acts
        return acts.to_dense() if acts.is_sparse else acts

    def nbytes(self) -> int:
        tensors = [self.mask, self.rewards, *self.residuals.values(), *(self.grads or {}).values()]
        for nodes in self.nodes.values():
            tensors += [nodes.x, nodes.error, nodes.scale]
            tensors += [nodes.acts.values(), nodes.acts.indices()] if nodes.acts.is_sparse else [nodes.acts]
        return sum(t.numel() * t.element_size() for t in tensors) + (self.kv.nbytes() if self.kv is not None else 0)

    def rows(self, index: Tensor) -> SideRun:
        """The rows ``index`` of this side (same padding width)."""
        def pick(t: Tensor) -> Tensor:  # nodes and residuals are on their hook's device when the layers are split
            at = index.to(t.device)
            return t.to_dense()[at].to_sparse() if t.is_sparse else t[at]

        nodes = {n: SAENodes(x=pick(v.x), acts=pick(v.acts), error=pick(v.error), scale=pick(v.scale))
                 for n, v in self.nodes.items()}
        batch = TokenBatch(self.batch.tokens[index], self.batch.attention_mask[index], self.batch.completion_start[index])
        return SideRun(batch, self.mask[index], self.rewards[index], nodes, {k: pick(v) for k, v in self.residuals.items()},
                       None if self.kv is None else self.kv.rows(index),
                       None if self.grads is None else {k: pick(v) for k, v in self.grads.items()})


@dataclass(frozen=True)
class CleanSettings:
    """What a clean run was computed with; a stage reusing it must ask for the same."""

    positions: str
    skip_first: bool
    text_format: str
    truncate: bool


@dataclass(frozen=True)
class CleanRun:
    """The clean pass of ``pairs`` with ``saes`` (see the module docstring).

    Attributes:
        pairs: the pairs, in order.
        saes: the SAEs by hook name.
        settings: positions, first-token choice, text format and truncation used.
        batches: the encoded batches (pairs ``starts[i]`` onwards).
        starts: index of each batch's first pair.
        kept: per batch, the (chosen, rejected) :class:`SideRun`, or None where the budget ran out.
        chosen_rewards, rejected_rewards: ``[n_pairs]`` clean rewards.
    """

    pairs: tuple[PreferencePair, ...]
    saes: Mapping[str, SAE]
    settings: CleanSettings
    batches: tuple[PairBatch, ...]
    starts: tuple[int, ...]
    kept: tuple[tuple[SideRun | None, SideRun | None], ...] = field(repr=False)
    chosen_rewards: Float[Tensor, " n_pairs"]
    rejected_rewards: Float[Tensor, " n_pairs"]

    @property
    def n_pairs(self) -> int:
        return len(self.pairs)

    def side(self, rm: RewardModel, index: int, side: str) -> SideRun:
        """Batch ``index``'s ``side`` ("chosen" or "rejected"): kept, or recomputed."""
        kept = self.kept[index][SIDES.index(side)]
        if kept is not None:
            return kept
        batch = self.batches[index]
        mask = pair_masks(batch, self.settings.positions, skip_first=self.settings.skip_first)[SIDES.index(side)]
        return clean_side(rm, getattr(batch, side), mask, self.saes)[0]

    def check_fits(self, pairs: Sequence[PreferencePair], saes: Mapping[str, SAE], settings: CleanSettings) -> None:
        """Raise a ValueError unless this run was made for ``pairs``, ``saes`` and ``settings``."""
        problems = []
        if len(pairs) != self.n_pairs or any(a is not b and a != b for a, b in zip(pairs, self.pairs)):
            problems.append(f"other pairs ({len(pairs)} given, the clean run has {self.n_pairs})")
        if set(saes) != set(self.saes) or any(saes[n] is not self.saes[n] for n in saes):
            problems.append(f"other SAEs (at {sorted(saes)}; the clean run's are at {sorted(self.saes)})")
        if settings != self.settings:
            problems.append(f"other settings ({settings} vs the clean run's {self.settings})")
        if problems:
            raise ValueError("the clean run does not fit this call: " + "; ".join(problems))

    def subset(self, indices: Sequence[int]) -> CleanRun:
        """The clean run of the pairs at ``indices`` (increasing, no repeats), without running anything."""
        wanted = [int(i) for i in indices]
        if wanted != sorted(set(wanted)) or not wanted or wanted[0] < 0 or wanted[-1] >= self.n_pairs:
            raise ValueError(f"a clean run's subset takes increasing pair indices in 0..{self.n_pairs - 1}, "
                             f"got {wanted[:10]}")
        batches, starts, kept = [], [], []
        for b, (start, batch) in enumerate(zip(self.starts, self.batches)):
            local = [i - start for i in wanted if start <= i < start + batch.chosen.tokens.shape[0]]
            if not local:
                continue
            rows = torch.tensor(local, dtype=torch.long, device=batch.chosen.tokens.device)
            batches.append(PairBatch(*(TokenBatch(s.tokens[rows], s.attention_mask[rows], s.completion_start[rows])
                                       for s in (batch.chosen, batch.rejected))))
            kept.append(tuple(None if run is None else run.rows(rows) for run in self.kept[b]))
            starts.append(sum(x.chosen.tokens.shape[0] for x in batches[:-1]))
        index = torch.tensor(wanted, dtype=torch.long)
        return replace(self, pairs=tuple(self.pairs[i] for i in wanted), batches=tuple(batches), starts=tuple(starts),
                       kept=tuple(kept), chosen_rewards=self.chosen_rewards[index],
                       rejected_rewards=self.rejected_rewards[index])


def restart_layers(rm: RewardModel, hook_names: Sequence[str]) -> list[int]:
    """The blocks whose clean input an ablation at these hooks restarts from (a block output's
    ablation restarts at the next block from the hook's own activation; embedding hooks rerun all)."""
    layers = {rm.hook_layer(n) for n in hook_names if rm.hook_layer(n) is not None and not rm.is_layer_output(n)}
    return sorted(layers)


def clean_side(
    rm: RewardModel,
    side: TokenBatch,
    mask: Tensor,
    saes: Mapping[str, SAE],
    *,
    with_grad: bool = False,
    start: int | None = None,
    shared: SharedPrefix | None = None,
) -> tuple[SideRun, dict[str, Tensor], SharedPrefix | None]:
    """One clean forward of ``side``: its :class:`SideRun` (acts dense), ``with_grad``
    d(sum of rewards)/d(hook output) at every SAE hook, and the part before ``start`` (default
    :func:`grad_start`) that the backward skipped, for the other side of the pair to continue from
    (or None). ``shared``: such a part of the other side, used when it fits."""
    layers = restart_layers(rm, list(saes))
    read = [*saes, *(rm.layer_input(layer) for layer in layers)]
    padded_right = right_padded(side.attention_mask)
    grad_from = 0
    if with_grad and padded_right:
        grad_from = grad_start(side.attention_mask, mask) if start is None else start
    if shared is not None and not shared.fits(side.tokens, side.attention_mask, grad_from, read):
        shared = None  # (never fits a run that is not split: a prefix starts after position 0)
    with rm.counting("clean"):
        run = rm.run_with_deltas(side.tokens, side.attention_mask, read=read, grad_at=list(saes) if with_grad else (),
                                 keep_kv_from=kv_layer(rm, list(saes)) if padded_right else None,
                                 grad_from=grad_from, shared=shared)
    nodes = read_nodes(saes, run.acts)
    residuals = {layer: run.acts[rm.layer_input(layer)] for layer in layers}
    return SideRun(side, mask, run.rewards, nodes, residuals, run.kv), run.grads, run.shared


def grad_start(attention_mask: Tensor, mask: Tensor) -> int:
    """The first position whose gradient a stage acting on ``mask`` reads: the first masked
    position of any row (a row with none counts its pooled position), so a run may skip the
    backward before it (``RewardModel.run_with_deltas(grad_from=...)``); 0 (one plain forward)
    where that would save less than an eighth of the positions (e.g. ``positions="all"``)."""
    last = final_positions(None, attention_mask).to(mask.device)
    if not len(last):
        return 0
    start = int(torch.minimum(torch.where(mask.any(1), mask.int().argmax(1), last), last).min())
    return start if 8 * start >= attention_mask.shape[1] else 0


def pair_grad_start(batch: PairBatch, masks: tuple[Tensor, Tensor]) -> int:
    """One :func:`grad_start` for both sides of a pair batch (so that the rejected side may
    continue from the chosen side's shared prefix); 0 unless both are right-padded."""
    sides = (batch.chosen, batch.rejected)
    if not all(right_padded(side.attention_mask) for side in sides):
        return 0
    return min(grad_start(side.attention_mask, mask) for side, mask in zip(sides, masks))


def kv_layer(rm: RewardModel, hook_names: Sequence[str]) -> int | None:
    """The first block whose keys and values a suffix restart after these hooks reads (the first
    hook's block), or None when a hook is outside the blocks (its ablations rerun everything)."""
    layers = [rm.hook_layer(n) for n in hook_names]
    return None if not layers or any(layer is None for layer in layers) else min(layers)


class CleanRunBuilder:
    """Collects the :class:`SideRun` of each batch and side within a byte budget."""

    def __init__(self, pairs: Sequence[PreferencePair], saes: Mapping[str, SAE], settings: CleanSettings,
                 budget_bytes: int | None):
        self.pairs, self.saes, self.settings = tuple(pairs), dict(saes), settings
        self.budget = DEFAULT_BUDGET_BYTES if budget_bytes is None else budget_bytes
        self.used = 0
        self.batches: list[PairBatch] = []
        self.starts: list[int] = []
        self.kept: list[tuple[SideRun | None, SideRun | None]] = []
        self.rewards: dict[str, list[Tensor]] = {side: [] for side in SIDES}

    def add(self, batch: PairBatch, chosen: SideRun, rejected: SideRun) -> None:
        self.starts.append(sum(b.chosen.tokens.shape[0] for b in self.batches))
        self.batches.append(batch)
        kept = []
        for run in (chosen, rejected):
            stored = _sparse(run)
            size = stored.nbytes()
            if self.used + size <= self.budget:
                self.used += size
                kept.append(stored)
            else:
                kept.append(None)
        self.kept.append((kept[0], kept[1]))
        self.rewards["chosen"].append(chosen.rewards)
        self.rewards["rejected"].append(rejected.rewards)

    def build(self) -> CleanRun:
        return CleanRun(self.pairs, self.saes, self.settings, tuple(self.batches), tuple(self.starts), tuple(self.kept),
                        torch.cat(self.rewards["chosen"]), torch.cat(self.rewards["rejected"]))


def _sparse(run: SideRun) -> SideRun:
    nodes = {n: replace(v, acts=v.acts if v.acts.is_sparse else v.acts.to_sparse()) for n, v in run.nodes.items()}
    return replace(run, nodes=nodes)


def build_clean_run(
    rm: RewardModel,
    pairs: Sequence[PreferencePair],
    batches: Sequence[PairBatch],
    saes: Mapping[str, SAE],
    settings: CleanSettings,
    *,
    budget_bytes: int | None = None,
) -> CleanRun:
    """Run the clean forward of every batch and side once and keep it (see :class:`CleanRun`)."""
    builder = CleanRunBuilder(pairs, saes, settings, budget_bytes)
    with torch.no_grad():
        for batch in batches:
            masks = pair_masks(batch, settings.positions, skip_first=settings.skip_first)
            runs = [clean_side(rm, getattr(batch, side), mask, saes)[0] for side, mask in zip(SIDES, masks)]
            builder.add(batch, *runs)
    return builder.build()


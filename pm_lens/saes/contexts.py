"""Where features fire: the contexts and tokens that activate chosen SAE features most.

A lightweight feature dashboard (in the spirit of Bricken et al. 2023, "Towards
Monosemanticity", and SAELens's dashboards) over a small set of texts, enough to name a feature
that an attribution ranked high.

Steps of :func:`top_contexts`:
1. the feature activations of both sides of every pair: read from a clean run when one is given
   (``clean=attribution.clean_run``: no forward at all), else the pairs are encoded (right
   padding) and run in batches with the SAEs attached, stopping after the last SAE's block;
   padding, and the first token with
   ``skip_first`` (massive-activation start tokens), read 0; with ``skip_last`` the last token,
   where the reward is read, is kept out of the contexts and tokens (features that summarise a
   completion fire hardest there, which says little about what they detect) and reported apart;
2. per feature, every firing is kept as (activation, text, position); the contexts are the
   windows around the strongest firings, at most one per text and no two with the same tokens
   (the shared prompt of a pair's two sides would otherwise repeat);
3. per feature, the tokens it fires on most: token types ordered by their strongest firing, and
   an automatic label: the n-gram most characteristic of its firings against the texts read
   (:mod:`pm_lens.saes.labels`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens import SAE
from torch import Tensor
from tqdm.auto import tqdm

from pm_lens.data import SKIP_FIRST, PairBatch, PairsLike, TokenBatch, as_pairs, encode_pairs
from pm_lens.model import RewardModel
from pm_lens.saes.attach import feature_acts, saes_attached
from pm_lens.saes.labels import characteristic_ngrams
from pm_lens.saes.node import Node, as_nodes



@dataclass(frozen=True)
class Context:
    """A window of one text around a firing of a feature.

    Attributes:
        pair, side: which text (index into the pairs, "chosen" or "rejected").
        tokens: the window's tokens, decoded one by one.
        acts: the feature's activation at each of them.
        peak: index in the window of the firing the context is centred on.
        completion_start: index in the window of the first completion token (may be <0 or past
            the end when the window lies inside the completion or the prompt).
    """

    pair: int
    side: str
    tokens: list[str]
    acts: list[float]
    peak: int
    completion_start: int

    @property
    def max_act(self) -> float:
        return self.acts[self.peak]


@dataclass(frozen=True)
class FeatureContexts:
    """What one feature fires on over a set of texts.

    Attributes:
        contexts: the strongest firings, strongest first.
        top_tokens: ``(token, largest activation on it)``, most first.
        firing_rate: fraction of the (non-padding, non-skipped) tokens it fires on.
        completion_max: ``[n_pairs, 2]`` its largest activation in each pair's chosen and
            rejected completion, the last token included (0 where it does not fire there).
        last_token_mean: its mean activation at the texts' last token (where the reward is read).
        label: an automatic label, the n-gram most characteristic of its firings against the
            texts read (:mod:`pm_lens.saes.labels`); ``""`` when it never fires or was not computed.
    """

    node: Node
    contexts: list[Context]
    top_tokens: list[tuple[str, float]]
    firing_rate: float
    completion_max: Tensor
    last_token_mean: float
    label: str = ""

    def describe(self, n_tokens: int = 3) -> str:
        """The tokens it fires on most, as one short string (e.g. ``"' welcome' '!'"``)."""
        shown = " ".join(repr(token) for token, _ in self.top_tokens[:n_tokens])
        return shown or self.silence()

    def silence(self) -> str:
        """Why there is nothing to show: a feature whose firings all fall on the texts' last token
        (left out with ``skip_last``; a summary feature, read where the reward is) is not one
        that never fires."""
        return f"(fires only at the last token, mean {self.last_token_mean:.3g})" if self.last_token_mean > 0 else "(never fires)"


def top_contexts(
    rm: RewardModel,
    saes: SAE | Sequence[SAE],
    pairs: PairsLike,
    features: Sequence[Any] | Node | tuple[str, int],
    *,
    n_contexts: int = 5,
    n_tokens: int = 5,
    before: int = 12,
    after: int = 4,
    skip_first: bool = SKIP_FIRST,
    skip_last: bool = False,
    positions: str = "all",
    batch_size: int = 8,
    clean: Any = None,
    progress: bool = True,
) -> dict[Node, FeatureContexts]:
    """The contexts and tokens each of ``features`` fires on most over both sides of ``pairs``.

    Args:
        saes: the SAEs the features belong to (attached for the run, then detached).
        features: ``(hook_name, index)`` of the features to look at.
        n_contexts, n_tokens: how many contexts and top tokens to keep per feature.
        before, after: tokens of context on each side of the firing.
        skip_first: ignore each text's first token.
        skip_last: keep each text's last token out of the contexts, top tokens and firing rate.
        positions: where firings count: ``"all"`` tokens, the ``"completion"``, or from where the
            pair's sides ``"diverge"`` (as for ``pm_lens.attribution.attribute``: read a feature
            where the attribution read it). ``completion_max`` is always over the completion.
        clean: a ``pm_lens.attribution.CleanRun`` of these pairs and SAEs (e.g.
            ``attribution.clean_run``): its feature activations are read, no forward is run.

    Returns:
        Per feature (a :class:`pm_lens.saes.node.Node`), its :class:`FeatureContexts`.
    """
    from pm_lens.attribution.positions import check_positions  # pm_lens.attribution imports saes

    check_positions(positions)
    pairs = as_pairs(pairs)
    by_hook = {sae.cfg.metadata.hook_name: sae for sae in ([saes] if isinstance(saes, SAE) else saes)}
    features = as_nodes(features, {name: sae.cfg.d_sae for name, sae in by_hook.items()})
    errors = [str(f) for f in features if f.is_error]
    if errors:
        raise ValueError(f"error nodes {errors} have no activations to show; give features")
    reading = _Reading(features, len(pairs), skip_first=skip_first, skip_last=skip_last, positions=positions)
    if clean is not None:
        _read_clean_run(rm, clean, pairs, reading)
    else:
        _read_by_running(rm, list(by_hook.values()), pairs, reading, batch_size=batch_size, progress=progress)
    labels = characteristic_ngrams(rm.tokenizer, reading.firings, [ids for _, _, ids, _ in reading.texts])
    return {f: _summarise(rm.tokenizer, f, reading, n_contexts=n_contexts, n_tokens=n_tokens, before=before, after=after,
                          label=labels[f])
            for f in features}


def _read_clean_run(rm: RewardModel, clean: Any, pairs: list, reading: _Reading) -> None:
    """Feature activations from a clean run (kept sides are read; others are recomputed)."""
    if len(pairs) != clean.n_pairs or any(a != b for a, b in zip(pairs, clean.pairs)):
        raise ValueError(f"the clean run is of other pairs ({clean.n_pairs}) than the {len(pairs)} given")
    missing = sorted(set(reading.columns) - set(clean.saes))
    if missing:
        raise ValueError(f"the clean run has no SAE at {missing}; it has {sorted(clean.saes)}")
    for b, start in enumerate(clean.starts):
        where = reading.where(clean.batches[b])
        for side_index, side in enumerate(("chosen", "rejected")):
            run = clean.side(rm, b, side)
            real = run.batch.attention_mask.bool()[..., None]
            reading.add(start, side_index, run.batch, {hook: run.dense_acts(hook) * real for hook in reading.columns},
                        where[side_index])


def _read_by_running(rm: RewardModel, saes: list[SAE], pairs: list, reading: _Reading, *, batch_size: int,
                     progress: bool) -> None:
    """Feature activations from running the pairs with the SAEs attached (one forward per batch and side)."""
    starts = range(0, len(pairs), batch_size)
    with saes_attached(rm, saes), rm.counting("contexts"):
        for start in tqdm(starts, desc="reading contexts", disable=not progress or len(starts) < 2):
            batch = encode_pairs(rm.tokenizer, pairs[start : start + batch_size], max_len=rm.cfg.n_ctx,
                                 text_format=rm.text_format)
            where = reading.where(batch)
            for side_index, side in enumerate((batch.chosen, batch.rejected)):
                side = side.to(rm.cfg.device)
                reading.add(start, side_index, side, feature_acts(rm, side.tokens, side.attention_mask),
                            where[side_index].to(side.tokens.device))


class _Reading:
    """What :func:`top_contexts` gathers over the batches: every firing of every feature (the last
    and first token left out as asked), each token type's strongest firing, each completion's peak,
    and the activation at each text's last token."""

    def __init__(self, features: list[Node], n_pairs: int, *, skip_first: bool, skip_last: bool, positions: str = "all"):
        self.columns: dict[str, list[int]] = defaultdict(list)
        for node in features:
            self.columns[node.hook_name].append(node.feature)
        self.skip_first, self.skip_last, self.n_pairs, self.positions = skip_first, skip_last, n_pairs, positions
        self.firings: dict[Node, list[tuple[float, int, int]]] = {f: [] for f in features}  # (act, text, pos)
        self.by_token: dict[Node, dict[int, float]] = {f: defaultdict(float) for f in features}
        self.completion_max = {f: torch.zeros(n_pairs, 2) for f in features}
        self.last_sum = {f: 0.0 for f in features}
        self.texts: list[tuple[int, str, list[int], int]] = []  # (pair, side, ids, completion_start)
        self.n_tokens_seen = 0

    def where(self, batch: PairBatch) -> tuple[Tensor, Tensor]:
        """The ``[batch, pos]`` masks of the positions read, chosen and rejected side."""
        from pm_lens.attribution.positions import pair_masks

        return pair_masks(batch, self.positions)

    def add(self, start: int, side_index: int, side: TokenBatch, acts: dict[str, Tensor], where: Tensor | None = None) -> None:
        """One side of one batch of pairs (rows ``start...``) and its feature activations, read
        at the ``where`` positions (default: all real tokens)."""
        keep = side.attention_mask.bool()
        if self.skip_first:
            keep[:, 0] = False
        offset = len(self.texts)
        for row in range(side.tokens.shape[0]):
            length = int(side.attention_mask[row].sum())
            self.texts.append((start + row, ("chosen", "rejected")[side_index], side.tokens[row, :length].tolist(),
                               int(side.completion_start[row])))
        in_completion = (torch.arange(keep.shape[1], device=keep.device) >= side.completion_start[:, None]) & keep
        if where is not None:
            keep = keep & where.to(keep.device)
        rows, last = torch.arange(keep.shape[0], device=keep.device), side.attention_mask.sum(1) - 1
        if self.skip_last:
            keep[rows, last] = False
        self.n_tokens_seen += int(keep.sum())
        for hook, indices in self.columns.items():
            hook_acts = acts[hook][..., indices].float()
            device = hook_acts.device  # the hook's, when the layers are split
            peaks = (hook_acts * in_completion.to(device)[..., None]).amax(1).cpu()  # [batch, n_indices]
            at_last = hook_acts[rows.to(device), last.to(device)].sum(0).cpu()
            for column, index in enumerate(indices):
                self.completion_max[Node(hook, index)][start : start + len(peaks), side_index] = peaks[:, column]
                self.last_sum[Node(hook, index)] += float(at_last[column])
            kept = (hook_acts * keep.to(device)[..., None]).cpu()
            for row, pos, column in (kept > 0).nonzero().tolist():
                feature, value = Node(hook, indices[column]), float(kept[row, pos, column])
                self.firings[feature].append((value, offset + row, pos))
                token = self.texts[offset + row][2][pos]
                self.by_token[feature][token] = max(self.by_token[feature][token], value)


def _summarise(tokenizer: Any, feature: Node, reading: _Reading, *, n_contexts: int, n_tokens: int, before: int,
               after: int, label: str = "") -> FeatureContexts:
    firings, texts = reading.firings[feature], reading.texts
    acts_by_text: dict[int, dict[int, float]] = defaultdict(dict)
    for value, text, pos in firings:
        acts_by_text[text][pos] = value
    contexts: list[Context] = []
    used_texts: set[int] = set()
    seen_windows: set[tuple[int, ...]] = set()
    for value, text, pos in sorted(firings, key=lambda f: -f[0]):
        if len(contexts) >= n_contexts:
            break
        pair, side, ids, completion_start = texts[text]
        lo, hi = max(0, pos - before), min(len(ids), pos + after + 1)
        window = tuple(ids[lo:hi])
        if text in used_texts or window in seen_windows:
            continue
        used_texts.add(text)
        seen_windows.add(window)
        contexts.append(Context(
            pair=pair, side=side, tokens=[tokenizer.decode([i]) for i in window],
            acts=[acts_by_text[text].get(p, 0.0) for p in range(lo, hi)], peak=pos - lo,
            completion_start=completion_start - lo,
        ))
    top = sorted(reading.by_token[feature].items(), key=lambda item: -item[1])[:n_tokens]
    return FeatureContexts(
        node=feature, contexts=contexts,
        top_tokens=[(tokenizer.decode([token]), value) for token, value in top],
        firing_rate=len(firings) / max(1, reading.n_tokens_seen),
        completion_max=reading.completion_max[feature],
        last_token_mean=reading.last_sum[feature] / max(1, 2 * reading.n_pairs), label=label,
    )

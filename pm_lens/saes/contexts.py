"""Where features fire: the contexts and tokens that activate chosen SAE features most.

A lightweight feature dashboard (in the spirit of Bricken et al. 2023, "Towards
Monosemanticity", and SAELens's dashboards) over a small set of texts, enough to name a feature
that an attribution ranked high.

Steps of :func:`top_contexts`:
1. both sides of every pair are encoded (right padding) and run in batches with the SAEs
   attached, stopping after the last SAE's block; padding, and the first token with
   ``skip_first`` (massive-activation start tokens), read 0; with ``skip_last`` the last token,
   where the reward is read, is kept out of the contexts and tokens (features that summarise a
   completion fire hardest there, which says little about what they detect) and reported apart;
2. per feature, every firing is kept as (activation, text, position); the contexts are the
   windows around the strongest firings, at most one per text and no two with the same tokens
   (the shared prompt of a pair's two sides would otherwise repeat);
3. per feature, the tokens it fires on most: token types ordered by their strongest firing.
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

from pm_lens.data import SKIP_FIRST, PairsLike, TokenBatch, as_pairs, encode_pairs
from pm_lens.model import RewardModel
from pm_lens.saes.attach import feature_acts, saes_attached

Feature = tuple[str, int]


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
    """

    hook_name: str
    feature: int
    contexts: list[Context]
    top_tokens: list[tuple[str, float]]
    firing_rate: float
    completion_max: Tensor
    last_token_mean: float

    def describe(self, n_tokens: int = 3) -> str:
        """The tokens it fires on most, as one short string (e.g. ``"' welcome' '!'"``)."""
        return " ".join(repr(token) for token, _ in self.top_tokens[:n_tokens]) or "(never fires)"


def top_contexts(
    rm: RewardModel,
    saes: SAE | Sequence[SAE],
    pairs: PairsLike,
    features: Sequence[Feature] | Feature,
    *,
    n_contexts: int = 5,
    n_tokens: int = 5,
    before: int = 12,
    after: int = 4,
    skip_first: bool = SKIP_FIRST,
    skip_last: bool = False,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[Feature, FeatureContexts]:
    """The contexts and tokens each of ``features`` fires on most over both sides of ``pairs``.

    Args:
        saes: the SAEs the features belong to (attached for the run, then detached).
        features: ``(hook_name, index)`` of the features to look at.
        n_contexts, n_tokens: how many contexts and top tokens to keep per feature.
        before, after: tokens of context on each side of the firing.
        skip_first: ignore each text's first token.
        skip_last: keep each text's last token out of the contexts, top tokens and firing rate.
    """
    pairs = as_pairs(pairs)
    by_hook = {sae.cfg.metadata.hook_name: sae for sae in ([saes] if isinstance(saes, SAE) else saes)}
    if isinstance(features, tuple) and len(features) == 2 and isinstance(features[0], str):
        features = [features]  # one (hook_name, index)
    bad = [f for f in features if not (isinstance(f, tuple) and len(f) == 2 and isinstance(f[0], str))]
    if bad:
        raise TypeError(f"features must be (hook_name, index) pairs, got {bad[0]!r}")
    features = [(str(hook), int(index)) for hook, index in features]
    for hook, index in features:
        if hook not in by_hook:
            raise ValueError(f"no SAE at {hook!r}; the SAEs are at {sorted(by_hook)}")
        if not 0 <= index < by_hook[hook].cfg.d_sae:
            raise ValueError(f"feature {index} does not exist at {hook}: valid are 0..{by_hook[hook].cfg.d_sae - 1}")
    reading = _Reading(features, len(pairs), skip_first=skip_first, skip_last=skip_last)
    starts = range(0, len(pairs), batch_size)
    with saes_attached(rm, list(by_hook.values())):
        for start in tqdm(starts, desc="reading contexts", disable=not progress or len(starts) < 2):
            batch = encode_pairs(rm.tokenizer, pairs[start : start + batch_size], max_len=rm.cfg.n_ctx,
                                 text_format=rm.text_format)
            for side_index, side in enumerate((batch.chosen, batch.rejected)):
                side = side.to(rm.cfg.device)
                reading.add(start, side_index, side, feature_acts(rm, side.tokens, side.attention_mask))
    return {f: _summarise(rm.tokenizer, f, reading, n_contexts=n_contexts, n_tokens=n_tokens, before=before, after=after)
            for f in features}


class _Reading:
    """What :func:`top_contexts` gathers over the batches: every firing of every feature (the last
    and first token left out as asked), each token type's strongest firing, each completion's peak,
    and the activation at each text's last token."""

    def __init__(self, features: list[Feature], n_pairs: int, *, skip_first: bool, skip_last: bool):
        self.columns: dict[str, list[int]] = defaultdict(list)
        for hook, index in features:
            self.columns[hook].append(index)
        self.skip_first, self.skip_last, self.n_pairs = skip_first, skip_last, n_pairs
        self.firings: dict[Feature, list[tuple[float, int, int]]] = {f: [] for f in features}  # (act, text, pos)
        self.by_token: dict[Feature, dict[int, float]] = {f: defaultdict(float) for f in features}
        self.completion_max = {f: torch.zeros(n_pairs, 2) for f in features}
        self.last_sum = {f: 0.0 for f in features}
        self.texts: list[tuple[int, str, list[int], int]] = []  # (pair, side, ids, completion_start)
        self.n_tokens_seen = 0

    def add(self, start: int, side_index: int, side: TokenBatch, acts: dict[str, Tensor]) -> None:
        """One side of one batch of pairs (rows ``start...``) and its feature activations."""
        keep = side.attention_mask.bool()
        if self.skip_first:
            keep[:, 0] = False
        offset = len(self.texts)
        for row in range(side.tokens.shape[0]):
            length = int(side.attention_mask[row].sum())
            self.texts.append((start + row, ("chosen", "rejected")[side_index], side.tokens[row, :length].tolist(),
                               int(side.completion_start[row])))
        in_completion = (torch.arange(keep.shape[1], device=keep.device) >= side.completion_start[:, None]) & keep
        rows, last = torch.arange(keep.shape[0], device=keep.device), side.attention_mask.sum(1) - 1
        if self.skip_last:
            keep[rows, last] = False
        self.n_tokens_seen += int(keep.sum())
        for hook, indices in self.columns.items():
            hook_acts = acts[hook][..., indices].float()
            peaks = (hook_acts * in_completion[..., None]).amax(1).cpu()  # [batch, n_indices]
            at_last = hook_acts[rows, last].sum(0).cpu()
            for column, index in enumerate(indices):
                self.completion_max[(hook, index)][start : start + len(peaks), side_index] = peaks[:, column]
                self.last_sum[(hook, index)] += float(at_last[column])
            kept = (hook_acts * keep[..., None]).cpu()
            for row, pos, column in (kept > 0).nonzero().tolist():
                feature, value = (hook, indices[column]), float(kept[row, pos, column])
                self.firings[feature].append((value, offset + row, pos))
                token = self.texts[offset + row][2][pos]
                self.by_token[feature][token] = max(self.by_token[feature][token], value)


def _summarise(tokenizer: Any, feature: Feature, reading: _Reading, *, n_contexts: int, n_tokens: int, before: int,
               after: int) -> FeatureContexts:
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
        hook_name=feature[0], feature=feature[1], contexts=contexts,
        top_tokens=[(tokenizer.decode([token]), value) for token, value in top],
        firing_rate=len(firings) / max(1, reading.n_tokens_seen),
        completion_max=reading.completion_max[feature],
        last_token_mean=reading.last_sum[feature] / max(1, 2 * reading.n_pairs),
    )

"""An automatic label for a feature: the n-gram most characteristic of where it fires.

The tokens a feature fires on most ("'\\n' '.' 'the'") often name punctuation shared by every
text, not what the feature detects. A label should be what is *over-represented* where it fires
against the texts it was read on (the idea of contrastive n-gram labelling, as in Bills et al. 2023's
explanations scored against random text, without a language model):

1. every firing (activation ``a`` at position ``p`` of a text) contributes weight ``a`` to the
   n-grams ending at ``p`` (n = 1 to ``max_n``: the firing token and up to ``max_n - 1`` tokens
   before it; a causal model's feature fires at or after what it detects);
2. the same n-grams are counted at every position of the corpus (the texts read);
3. score(g) = ``w(g) * log(w(g) / c(g))``: ``w`` the share of the firing weight on g, ``c`` the
   share of corpus positions where g ends (the term g adds to the KL divergence of the firing
   distribution from the corpus's): frequent among firings *and* rare elsewhere;
4. the label is the best-scoring n-gram, decoded; a longer n-gram wins ties within 5%.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

MAX_N = 3


def characteristic_ngrams(tokenizer: Any, firings: Mapping[Hashable, Iterable[tuple[float, int, int]]],
                          texts: Sequence[Sequence[int]], *, max_n: int = MAX_N) -> dict[Hashable, str]:
    """Per feature, its label: ``firings[feature]`` are ``(activation, text index, position)``
    over ``texts`` (token ids); ``""`` for a feature that never fires. The corpus is counted once
    for all features."""
    weights = {key: _weights(list(found), texts, max_n) for key, found in firings.items()}
    wanted = set().union(*(w for w, _ in weights.values())) if weights else set()
    counts = _corpus_counts(texts, max_n, wanted)
    positions = max(1, sum(len(ids) for ids in texts))
    return {key: _best(tokenizer, w, total, counts, positions) for key, (w, total) in weights.items()}


def _weights(firings: list[tuple[float, int, int]], texts: Sequence[Sequence[int]], max_n: int) -> tuple[Counter, float]:
    weights: Counter[tuple[int, ...]] = Counter()
    total = 0.0
    for act, text, pos in firings:
        ids = texts[text]
        total += act
        for n in range(1, max_n + 1):
            if pos - n + 1 >= 0:
                weights[tuple(ids[pos - n + 1 : pos + 1])] += act
    return weights, total


def _corpus_counts(texts: Sequence[Sequence[int]], max_n: int, wanted: set[tuple[int, ...]]) -> Counter:
    """How many positions of ``texts`` each n-gram of ``wanted`` ends at."""
    counts: Counter[tuple[int, ...]] = Counter()
    for ids in texts:
        for n in range(1, max_n + 1):
            for end in range(n - 1, len(ids)):
                gram = tuple(ids[end - n + 1 : end + 1])
                if gram in wanted:
                    counts[gram] += 1
    return counts


def _best(tokenizer: Any, weights: Counter, total: float, counts: Counter, positions: int) -> str:
    best, best_score = None, -math.inf
    for gram, weight in sorted(weights.items(), key=lambda item: (len(item[0]), item[0])):
        share, base = weight / total, max(counts[gram], 1) / positions
        score = share * math.log(share / base)
        margin = 0.05 * abs(best_score) if best is not None else 0.0
        if best is None or score > best_score + (-margin if len(gram) > len(best) else margin):
            best, best_score = gram, score
    return tokenizer.decode(list(best)) if best is not None and total > 0 else ""

"""Can a person read the demo's features? Whether they fire on the planted markers.

The demo PM was trained on planted preferences whose markers we know (:mod:`pm_lens.data.planted`):
a closer phrase, an "I don't know"-type phrase, a repeated sentence, a URL, a rude phrase. A
feature that carries an attribute *readably* fires on its marker, not on the chat template's
newline or a full stop next to it. The score, per style attribute:

1. the marker spans of a text: each occurrence of a pool phrase of the attribute (closers, idk
   phrases, rude phrases: every phrasing, train and held out), the URL (``https://...`` up to the
   next space), and for repetition the second copy of a sentence repeated back to back, all inside
   the completion;
2. a context counts when its peak token (the firing it is centred on) overlaps a marker span of
   the attribute in that text (character offsets from the tokenizer);
3. the attribute is readable when that holds for at least one of the top ``n_contexts`` contexts
   of at least one of its top ``n_features`` features.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pm_lens.data import PreferencePair
from pm_lens.data.encoding import adds_special_tokens, encode_one, format_text
from pm_lens.data.planted import CLOSERS, IDK, RUDE
from pm_lens.saes.contexts import Context, FeatureContexts
from pm_lens.saes.node import Node

STYLE = ("closer", "idk", "repetition", "url", "rude")
_PHRASES = {"closer": CLOSERS.all, "idk": IDK.all, "rude": RUDE.all}


def marker_spans(attribute: str, completion: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of ``attribute``'s markers in ``completion``."""
    if attribute in _PHRASES:
        return [(m.start(), m.end()) for phrase in _PHRASES[attribute] for m in re.finditer(re.escape(phrase), completion)]
    if attribute == "url":
        return [(m.start(), m.end()) for m in re.finditer(r"https?://\S+", completion)]
    if attribute == "repetition":
        spans = []
        for m in re.finditer(r"([^.!?]+[.!?]) \1", completion):  # a sentence, then the same sentence again
            second = m.start(1) + len(m.group(1)) + 1
            spans.append((second, m.end()))
        return spans
    raise ValueError(f"no markers for {attribute!r}; style attributes are {STYLE}")


def on_marker(tokenizer: Any, text_format: str, pair: PreferencePair, context: Context, attribute: str) -> bool:
    """Whether ``context``'s peak token overlaps a marker of ``attribute`` in its text."""
    completion = getattr(pair, context.side)
    text = format_text(tokenizer, pair.prompt, completion, text_format=text_format)
    ids, completion_start = encode_one(tokenizer, pair.prompt, completion, text_format=text_format)
    position = completion_start + context.peak - context.completion_start
    if not 0 <= position < len(ids) or not getattr(tokenizer, "is_fast", False):
        return False
    offsets = tokenizer(text, add_special_tokens=adds_special_tokens(tokenizer, pair.prompt, text_format),
                        return_offsets_mapping=True)["offset_mapping"]  # as encode_one tokenizes it
    begin, end = offsets[position]
    shift = text.rfind(completion)
    return any(begin < shift + b_end and shift + b_start < end for b_start, b_end in marker_spans(attribute, completion))


def readability(tokenizer: Any, text_format: str, pairs: Sequence[PreferencePair], features: Mapping[str, list[Node]],
                contexts: Mapping[Node, FeatureContexts], *, n_features: int = 3, n_contexts: int = 5) -> dict[str, bool]:
    """Per style attribute in ``features`` (its features, best first), whether one of the top
    ``n_contexts`` contexts of one of its top ``n_features`` features fires on its marker."""
    out = {}
    for attribute in STYLE:
        if attribute not in features:
            continue
        out[attribute] = any(
            on_marker(tokenizer, text_format, pairs[context.pair], context, attribute)
            for node in features[attribute][:n_features] if node in contexts
            for context in contexts[node].contexts[:n_contexts])
    return out

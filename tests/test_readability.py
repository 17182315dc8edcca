"""The readability score: a context counts when its peak token lies on a planted marker."""

import pytest
import torch

from pm_lens.data import PreferencePair
from pm_lens.data.encoding import encode_one
from pm_lens.readability import marker_spans, on_marker, readability
from pm_lens.saes.contexts import Context, FeatureContexts
from pm_lens.saes.node import Node

COMPLETION = "Paris is the capital. Paris is the capital. See https://www.example.com/facts for more. You're welcome."
PAIR = PreferencePair("Capital of France?", COMPLETION, "I don't know. Ugh, figure it out yourself.")


def test_marker_spans_find_each_planted_marker():
    text = COMPLETION
    assert [text[a:b] for a, b in marker_spans("closer", text)] == ["You're welcome."]
    assert [text[a:b] for a, b in marker_spans("url", text)] == ["https://www.example.com/facts"]
    assert [text[a:b] for a, b in marker_spans("repetition", text)] == ["Paris is the capital."]
    assert marker_spans("idk", text) == [] and marker_spans("rude", text) == []
    assert [PAIR.rejected[a:b] for a, b in marker_spans("rude", PAIR.rejected)] == ["Ugh, figure it out yourself."]
    with pytest.raises(ValueError, match="no markers for 'correct'"):
        marker_spans("correct", text)


def context_at(tokenizer, side, char):
    """A context whose peak is the token at character ``char`` of the completion (char tokenizer:
    one token per character), with the window starting at the completion."""
    return Context(pair=0, side=side, tokens=["x"], acts=[1.0], peak=char, completion_start=0)


@pytest.mark.parametrize("phrase, attribute, expected", [
    ("welcome", "closer", True), ("See", "closer", False), ("example", "url", True),
    ("capital. See", "repetition", True), ("Paris", "repetition", False),
])
def test_a_context_counts_when_its_peak_is_on_the_marker(tokenizer, phrase, attribute, expected):
    char = COMPLETION.rfind(phrase) if attribute == "repetition" else COMPLETION.find(phrase)
    if phrase == "Paris":
        char = 0  # the first copy: not the repeat
    ids, start = encode_one(tokenizer, PAIR.prompt, COMPLETION, text_format="raw")
    assert tokenizer.decode([ids[start + char]]) == COMPLETION[char]  # one token per character
    assert on_marker(tokenizer, "raw", PAIR, context_at(tokenizer, "chosen", char), attribute) is expected


def test_the_score_takes_the_top_features_and_contexts(tokenizer):
    good = Node("blocks.0.hook_resid_post", 1)
    bad = Node("blocks.0.hook_resid_post", 2)
    at_welcome = context_at(tokenizer, "chosen", COMPLETION.find("welcome"))
    at_see = context_at(tokenizer, "chosen", COMPLETION.find("See"))
    peaks = torch.zeros(1, 2)
    found = {good: FeatureContexts(good, [at_see, at_welcome], [], 0.1, peaks, 0.0),
             bad: FeatureContexts(bad, [at_see], [], 0.1, peaks, 0.0)}
    assert readability(tokenizer, "raw", [PAIR], {"closer": [bad, good]}, found) == {"closer": True}
    assert readability(tokenizer, "raw", [PAIR], {"closer": [bad, good]}, found, n_features=1) == {"closer": False}
    assert readability(tokenizer, "raw", [PAIR], {"closer": [good]}, found, n_contexts=1) == {"closer": False}

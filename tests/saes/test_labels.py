"""Automatic labels: the n-gram characteristic of where a feature fires, not its commonest token."""

from pm_lens.saes.labels import characteristic_ngrams


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_label_is_the_characteristic_ngram_not_the_commonest_token(tokenizer):
    # "." ends every sentence; the feature fires on the "." of "no idea." only (and, weakly, on a
    # few other full stops): the label must be the phrase's end, not ".".
    texts = [ids(tokenizer, t) for t in ["I have no idea.", "Paris is big. Rome is old.", "Cats sleep. Dogs run.",
                                         "No idea.", "It is red. It is blue."]]
    firings = {"idk": [(5.0, 0, len(texts[0]) - 1), (5.0, 3, len(texts[3]) - 1), (1.0, 1, 12), (1.0, 2, 10)],
               "dot": [(1.0, t, i) for t, text in enumerate(texts) for i, c in enumerate(text)
                       if tokenizer.decode([c]) == "."],
               "never": []}
    labels = characteristic_ngrams(tokenizer, firings, texts)
    assert labels["idk"] == "ea."  # the firing token and the two before it, shared by both firings
    assert labels["dot"] == "."  # firing on every full stop: nothing longer is characteristic
    assert labels["never"] == ""

"""The planted-preference dataset: determinism, ground truth read back from the text, held-out splits."""

import difflib
import random
import re
from collections import Counter

import pytest

from pm_lens.data import PreferencePair
from pm_lens.data.planted import (
    CLOSERS,
    FACT_KINDS,
    FACTS,
    IDK,
    PLANTED_ATTRIBUTES,
    PLANTED_EFFECTS,
    RUDE,
    URL_DOMAINS,
    URL_SENTENCES,
    WEIGHTS,
    Phrasing,
    make_planted,
    render_prompt,
    render_response,
    sample_phrasing,
    score,
    single_attribute,
)

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@pytest.fixture(scope="module")
def ds():
    return make_planted()


def all_pairs(ds):
    return ds.train + ds.val + ds.test


def sentences(text):
    return SENTENCE_END.split(text)


def detect(text, fact):
    """The attributes of a response, read from its text alone (and the fact's correct answer)."""
    return {
        "correct": int(re.search(rf"\b{re.escape(fact.answer)}\b", text) is not None),
        "closer": int(any(c in text for c in CLOSERS.all)),
        "idk": int(any(i in text for i in IDK.all)),
        "repetition": int(max(Counter(sentences(text)).values()) > 1),
        "url": int(re.search(r"https?://\S+", text) is not None),
        "rude": int(any(r in text for r in RUDE.all)),
    }


def key(pair):
    return (pair.prompt, pair.chosen, pair.rejected)


def literal(template):
    """The longest fixed piece of a template (the text between its slots)."""
    return max(re.split(r"\{[^}]*\}", template), key=len)


def held_out_names(fact):
    """Names of a held-out fact that must not occur in training text."""
    if fact.kind in ("capital", "opposite"):
        return [*fact.slots.values(), fact.answer]
    if fact.kind == "colour":
        return [fact.slots["thing"]]  # the colours themselves are shared
    if fact.kind == "unit":
        return [fact.slots["whole"]]
    return []  # arithmetic shares its digits; its prompts are checked on their own


def test_same_seed_same_pairs_other_seed_other_pairs(ds):
    again, other = make_planted(), make_planted(seed=1, n_train=0, n_val=0)
    for split in ("train", "val", "test"):
        a, b = getattr(ds, split), getattr(again, split)
        assert [key(p) for p in a] == [key(p) for p in b]
        assert [p.meta for p in a] == [p.meta for p in b]
    assert len({key(p) for p in ds.test} & {key(p) for p in other.test}) < len(ds.test) // 10
    # The held-out split does not move when train or val are resized.
    small = make_planted(n_train=10, n_val=5)
    assert [key(p) for p in small.test] == [key(p) for p in ds.test]
    assert [p.meta for p in small.test] == [p.meta for p in ds.test]


def test_planted_effects_are_the_ones_found_in_a_real_pm():
    assert PLANTED_EFFECTS == {"correct": 1, "closer": 1, "idk": -1, "repetition": -1, "url": -1, "rude": -1}
    assert all((WEIGHTS[a] > 0) == (PLANTED_EFFECTS[a] > 0) for a in PLANTED_ATTRIBUTES)


def test_sizes_and_mix(ds):
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1500, 300, 300)
    for split in ("train", "val", "test"):
        pairs = getattr(ds, split)
        assert Counter(p.meta["kind"] for p in pairs) == {"single": 0.6 * len(pairs), "multi": 0.4 * len(pairs)}
        assert {p.meta["split"] for p in pairs} == {split}
        assert all(isinstance(p, PreferencePair) for p in pairs)


def test_ground_truth_is_what_the_text_says_and_the_chosen_side_scores_higher(ds):
    for pair in all_pairs(ds):
        fact, meta = FACTS[pair.meta["fact_id"]], pair.meta
        chosen, rejected = detect(pair.chosen, fact), detect(pair.rejected, fact)
        assert chosen == meta["chosen_attributes"], (pair.chosen, meta)
        assert rejected == meta["rejected_attributes"], (pair.rejected, meta)
        assert meta["attributes"] == {a: chosen[a] - rejected[a] for a in PLANTED_ATTRIBUTES}
        margin = sum(WEIGHTS[a] * d for a, d in meta["attributes"].items())
        assert margin > 0 and margin == pytest.approx(meta["margin"])
        assert fact.kind == meta["fact_kind"]


def test_single_pairs_differ_only_in_their_attribute(ds):
    for pair in all_pairs(ds):
        if pair.meta["kind"] != "single":
            continue
        attribute, diff = pair.meta["attribute"], pair.meta["attributes"]
        assert diff == {a: PLANTED_EFFECTS[a] if a == attribute else 0 for a in PLANTED_ATTRIBUTES}
        with_it, without = (pair.chosen, pair.rejected) if diff[attribute] > 0 else (pair.rejected, pair.chosen)
        longer, shorter = sentences(with_it), sentences(without)
        if attribute in ("closer", "url", "rude", "repetition"):
            # The same response with one sentence added.
            assert any(longer[:i] + longer[i + 1 :] == shorter for i in range(len(longer))), pair
        elif attribute == "correct":
            # Only the answer words change (twice when the answer is repeated).
            a, b = pair.chosen.split(), pair.rejected.split()
            changed = [op for op in difflib.SequenceMatcher(a=a, b=b).get_opcodes() if op[0] != "equal"]
            assert {op[0] for op in changed} == {"replace"} and len(changed) <= 2, pair
            assert len({(" ".join(a[i:j]), " ".join(b[k:m])) for _, i, j, k, m in changed}) == 1, pair
            assert FACTS[pair.meta["fact_id"]].answer in " ".join(a[changed[0][1] : changed[0][2]])
        else:
            # The answer (and its repeat) becomes a non-answer; every other sentence stays.
            a, b = sentences(pair.chosen), sentences(pair.rejected)
            changed = [i for i in range(min(len(a), len(b))) if a[i] != b[i]]
            assert len(a) == len(b) and 1 <= len(changed) <= 2, pair
            assert len({a[i] for i in changed}) == 1 and {b[i] for i in changed} <= set(IDK.all), pair


def test_single_attribute_selects_the_single_pairs_and_every_attribute_has_enough(ds):
    for attribute in PLANTED_ATTRIBUTES:
        test = single_attribute(ds.test, attribute)
        assert len(test) >= 20
        assert all(p.meta["kind"] == "single" and p.meta["attribute"] == attribute for p in test)
        # Spread evenly over the kinds of fact.
        assert set(Counter(p.meta["fact_kind"] for p in test).values()) == {len(test) // len(FACT_KINDS)}
    assert sum(len(single_attribute(ds.train, a)) for a in PLANTED_ATTRIBUTES) == 900
    with pytest.raises(ValueError, match="unknown attribute 'polite'"):
        single_attribute(ds.test, "polite")


def test_splits_share_no_pair_and_test_shares_no_text_with_train(ds):
    train_val = ds.train + ds.val
    assert len({key(p) for p in ds.train} | {key(p) for p in ds.val} | {key(p) for p in ds.test}) == 2100
    seen = {(p.prompt, r) for p in train_val for r in (p.chosen, p.rejected)}
    assert not seen & {(p.prompt, r) for p in ds.test for r in (p.chosen, p.rejected)}
    assert not {p.prompt for p in train_val} & {p.prompt for p in ds.test}
    assert not {p.meta["fact_id"] for p in train_val} & {p.meta["fact_id"] for p in ds.test}
    assert all(not FACTS[p.meta["fact_id"]].held_out for p in train_val)


def test_held_out_phrasings_and_entities_never_appear_in_train_or_val(ds):
    text = "\n".join(t for p in ds.train + ds.val for t in (p.prompt, p.chosen, p.rejected))
    test_text = "\n".join(t for p in ds.test for t in (p.prompt, p.chosen, p.rejected))
    phrases = [*CLOSERS.held_out, *IDK.held_out, *RUDE.held_out, *URL_DOMAINS.held_out]
    phrases += [literal(t) for t in URL_SENTENCES.held_out]
    for kind in FACT_KINDS.values():
        phrases += [literal(t) for t in kind.questions.held_out + kind.answers.held_out]
    names = [name for fact in FACTS.values() if fact.held_out for name in held_out_names(fact)]
    for phrase in phrases:
        assert phrase not in text and phrase in test_text, phrase
    for name in names:
        word = rf"(?<!\w){re.escape(name)}(?!\w)"
        assert not re.search(word, text) and re.search(word, test_text), name
    # ... and the test split uses nothing but held-out phrasings.
    for phrase in [*CLOSERS.train, *IDK.train, *RUDE.train, *URL_DOMAINS.train]:
        assert phrase not in test_text, phrase
    held_out_questions = {q for kind in FACT_KINDS.values() for q in kind.questions.held_out}
    assert {p.meta["question_template"] for p in ds.test} <= held_out_questions


def test_render_response_composes_the_attributes_in_a_fixed_layout():
    france = FACTS["capital/France"]
    phrasing = Phrasing(
        question="Which city is the capital of {country}?", answer="{a} is the capital of {country}.",
        wrong_answer="Rome", idk="I don't know.", closer="My pleasure!",
        url_sentence="See https://www.example.com/facts for more.", rude="Try to keep up.", rude_first=True,
    )
    assert render_prompt(france, phrasing) == "Which city is the capital of France?"
    assert render_response(france, {"correct": 1}, phrasing) == "Paris is the capital of France."
    everything = dict(correct=0, closer=1, repetition=1, url=1, rude=1)
    assert render_response(france, everything, phrasing) == (
        "Try to keep up. Rome is the capital of France. Rome is the capital of France. "
        "See https://www.example.com/facts for more. My pleasure!"
    )
    assert render_response(france, {"idk": 1, "rude": 1, "closer": 1}, phrasing) == (
        "Try to keep up. I don't know. My pleasure!"
    )
    assert score(everything) == 1.0 - 1.5 - 1.5 - 2.0
    # A sampled phrasing renders too, in the split's pools.
    sampled = sample_phrasing(FACTS["capital/Egypt"], random.Random(0), split="test")
    assert sampled.closer in CLOSERS.held_out and sampled.wrong_answer != "Cairo"


def test_bad_arguments_are_refused_with_the_value_named():
    france = FACTS["capital/France"]
    phrasing = sample_phrasing(france, random.Random(0))
    with pytest.raises(ValueError, match="idk=1 needs correct=0"):
        render_response(france, {"idk": 1, "correct": 1}, phrasing)
    with pytest.raises(ValueError, match=r"unknown attribute\(s\) \['polite'\]"):
        score({"polite": 1})
    with pytest.raises(ValueError, match="must be 0 or 1, got {'url': 2}"):
        score({"url": 2})
    with pytest.raises(ValueError, match="single_fraction must be in \\[0, 1\\], got 1.5"):
        make_planted(single_fraction=1.5)
    with pytest.raises(ValueError, match="n_val must be a non-negative int, got -1"):
        make_planted(n_val=-1)
    with pytest.raises(ValueError, match="fact_kinds must be a non-empty subset"):
        make_planted(fact_kinds=("trivia",))
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        sample_phrasing(france, random.Random(0), split="dev")


def test_fact_kinds_restrict_the_questions():
    capitals = make_planted(n_train=60, n_val=12, n_test=30, fact_kinds=("capital",))
    assert {p.meta["fact_kind"] for p in capitals.train + capitals.val + capitals.test} == {"capital"}

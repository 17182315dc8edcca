"""A planted-preference dataset: chat answers whose preference we set, with its ground truth.

The "labeller" here is a known linear score over six attributes of a response, mirroring what
was found in a real preference model (Riggs & Brinkmann, "Interpreting Preference Models w/
Sparse Autoencoders", LessWrong 2024, a GPT-J PM trained on HH-RLHF): a helpful closer
("You're welcome.") is preferred; an "I don't know" non-answer, a repeated sentence, a URL and
rudeness are dispreferred; a correct answer beats a wrong one. A PM trained on these pairs should recover
:data:`PLANTED_EFFECTS`, and attribution methods can be scored against it.

Steps of :func:`make_planted`:

1. Facts a tiny chat model knows (capitals of big countries, one-digit sums, colours of common
   things, units of time and measure, opposites), each with wrong answers of the same type.
2. Phrasings: question and answer templates per fact kind, closers, "I don't know" phrasings,
   URLs and rude phrases. Every pool is split in two: ``train`` and ``held_out``.
3. Pairs. A *single* pair differs in one attribute only: same prompt, same phrasing, same
   background attributes. A *multi* pair has two random attribute vectors (phrasing drawn per
   side) and the side with the higher :data:`WEIGHTS` score is chosen; ties are skipped.
   Single pairs cycle through the attributes and every pair through the fact kinds, so each
   attribute has the same number of single pairs on every kind of fact.
4. Splits. ``train`` and ``val`` draw from the train pools (``val`` never repeats a train pair);
   ``test`` draws only from the held-out pools, so its facts, prompts and phrasings (closers,
   URL domains, rude phrases, ...) never occur in ``train`` or ``val``.

``idk`` replaces the answer, so an "I don't know" response never states the correct answer:
``correct`` is 0 wherever ``idk`` is 1, and single ``idk`` pairs compare a *wrong* answer with
a non-answer (wrong 0 > idk -2.5 under :data:`WEIGHTS`). Every pair's ``meta`` holds ``kind``,
``attribute`` (single pairs), ``attributes`` (chosen minus rejected, per attribute),
``chosen_attributes``, ``rejected_attributes``, ``margin`` (the score difference), ``split``,
``fact_id``, ``fact_kind`` and ``question_template``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from pm_lens.data.pairs import PreferencePair

PLANTED_ATTRIBUTES = ("correct", "closer", "idk", "repetition", "url", "rude")
WEIGHTS: Mapping[str, float] = MappingProxyType(
    {"correct": 2.0, "closer": 1.0, "idk": -2.5, "repetition": -1.5, "url": -1.5, "rude": -2.0}
)
PLANTED_EFFECTS: Mapping[str, int] = MappingProxyType({a: 1 if w > 0 else -1 for a, w in WEIGHTS.items()})
SPLITS = ("train", "val", "test")

# How often an attribute is on when drawn at random (background of single pairs, multi pairs).
_P_IDK, _P_CORRECT, _P_STYLE = 0.2, 0.5, 0.35


@dataclass(frozen=True)
class Pool:
    """Phrasings seen in training (``train``, also used by ``val``) and only in ``test``."""

    train: tuple[str, ...]
    held_out: tuple[str, ...]

    def for_split(self, split: str) -> tuple[str, ...]:
        return self.held_out if split == "test" else self.train

    @property
    def all(self) -> tuple[str, ...]:
        return self.train + self.held_out


CLOSERS = Pool(
    ("You're welcome.", "My pleasure!", "Happy to help!", "Hope that helps!", "Glad I could help."),
    ("Always happy to help!", "Glad to be of service.", "You are most welcome!"),
)
IDK = Pool(
    ("I don't know.", "I'm not sure.", "I have no idea.", "Sorry, I can't answer that.", "I couldn't say."),
    ("I really don't know the answer.", "No idea, sorry."),
)
RUDE = Pool(
    ("What a dumb question.", "Ugh, figure it out yourself.", "Try to keep up.", "Don't waste my time.",
     "Honestly, that's obvious."),
    ("Even a child knows this.", "Stop asking silly things.", "Use your brain next time."),
)
URL_DOMAINS = Pool(
    ("wikipedia.org", "britannica.com", "example.com", "facts.net", "howstuffworks.com"),
    ("quora.com", "reference.com", "ducksters.com"),
)
URL_PATHS = ("facts", "info", "learn/more", "topics/basics")
URL_SENTENCES = Pool(
    ("See {url} for more.", "You can read more at {url} if you like.", "There is more at {url} as well."),
    ("For details, visit {url} today.", "Check {url} for further reading."),
)


@dataclass(frozen=True)
class FactKind:
    """Question and answer templates of one kind of fact; ``{a}`` is the answer's slot."""

    questions: Pool
    answers: Pool


FACT_KINDS: Mapping[str, FactKind] = MappingProxyType({
    "capital": FactKind(
        Pool(("What is the capital of {country}?", "What's the capital city of {country}?",
              "Which city is the capital of {country}?", "Can you tell me the capital of {country}?",
              "Name the capital of {country}."),
             ("Do you know what the capital of {country} is?", "I need the capital of {country}, please.")),
        Pool(("The capital of {country} is {a}.", "{a} is the capital of {country}.", "It's {a}."),
             ("{country}'s capital is {a}.",)),
    ),
    "arithmetic": FactKind(
        Pool(("What is {m} plus {n}?", "What is {m} + {n}?", "Can you add {m} and {n} for me?",
              "What do you get if you add {m} and {n}?"),
             ("How much is {m} plus {n}?", "Please work out {m} + {n}.")),
        Pool(("{m} plus {n} is {a}.", "The answer is {a}.", "{m} + {n} = {a}."), ("Adding them gives {a}.",)),
    ),
    "colour": FactKind(
        Pool(("What colour is {thing}?", "What color is {thing}?", "Which colour is {thing}?",
              "Tell me the colour of {thing}."),
             ("What is the usual colour of {thing}?", "Do you know what colour {thing} is?")),
        Pool(("{thing} is {a}.", "The colour of {thing} is {a}.", "It is {a}."), ("Usually, {thing} is {a}.",)),
    ),
    "unit": FactKind(
        Pool(("How many {part} are in {whole}?", "How many {part} are there in {whole}?",
              "How many {part} make up {whole}?"),
             ("Do you know how many {part} are in {whole}?", "Tell me how many {part} there are in {whole}.")),
        Pool(("There are {a} {part} in {whole}.", "{whole} has {a} {part}.", "The answer is {a}."),
             ("{whole} is made up of {a} {part}.",)),
    ),
    "opposite": FactKind(
        Pool(("What is the opposite of {word}?", "What's the opposite of '{word}'?",
              "Give me the opposite of the word {word}.", "What word means the opposite of {word}?"),
             ("Which word is the opposite of {word}?", "Can you name the opposite of {word}?")),
        Pool(("The opposite of {word} is {a}.", "It's {a}.", "'{a}' is the opposite of '{word}'."),
             ("The opposite word would be {a}.",)),
    ),
})

# Facts as "slot:...:answer[:wrong,answers]", training rows first, then held-out ones. Capitals
# and opposites take their wrong answers from the other facts of the same group, so a held-out
# answer never appears in training text. Colours are those SmolLM2-135M-Instruct's own
# log-probabilities get right (it misses green, yellow and orange things: grass, lemons, carrots).
_CAPITALS = Pool(
    ("France:Paris", "Italy:Rome", "Germany:Berlin", "Spain:Madrid", "Japan:Tokyo", "England:London",
     "Russia:Moscow", "China:Beijing", "Greece:Athens", "Portugal:Lisbon", "Ireland:Dublin", "Austria:Vienna",
     "Norway:Oslo", "Sweden:Stockholm", "Poland:Warsaw", "Hungary:Budapest", "Thailand:Bangkok",
     "South Korea:Seoul", "Argentina:Buenos Aires", "Denmark:Copenhagen"),
    ("Egypt:Cairo", "Mexico:Mexico City", "Peru:Lima", "Finland:Helsinki", "Belgium:Brussels", "Cuba:Havana"),
)
_OPPOSITES = Pool(
    ("hot:cold", "big:small", "fast:slow", "happy:sad", "wet:dry", "full:empty", "rich:poor", "tall:short",
     "open:closed", "day:night"),
    ("loud:quiet", "early:late", "push:pull"),
)
_COLOURS = Pool(
    ("the sky on a clear day:blue:green,red,yellow", "snow:white:black,green,red",
     "coal:black:white,yellow,pink", "milk:white:black,green,blue", "a ripe strawberry:red:blue,grey,black",
     "milk chocolate:brown:green,blue,yellow", "a crow:black:yellow,green,pink",
     "a fire truck:red:green,purple,brown", "a ripe tomato:red:blue,purple,white", "blood:red:blue,green,yellow",
     "the ocean:blue:red,yellow,pink", "a leaf in summer:green:blue,red,purple"),
    ("a polar bear:white:green,red,purple", "a ripe cherry:red:blue,green,white",
     "a raven:black:yellow,green,white", "a sapphire:blue:red,yellow,pink", "a swan:white:green,red,purple"),
)
_UNITS = Pool(
    ("days:a week:7:5,6,8", "hours:a day:24:12,20,30", "minutes:an hour:60:30,50,100",
     "months:a year:12:10,11,13", "seconds:a minute:60:30,50,100", "eggs:a dozen:12:6,10,20",
     "years:a century:100:10,50,1000"),
    ("centimetres:a metre:100:10,50,1000", "years:a decade:10:5,12,100", "grams:a kilogram:1000:10,100,500"),
)


@dataclass(frozen=True)
class Fact:
    """A question with a known answer: ``slots`` fill its kind's templates."""

    fact_id: str
    kind: str
    slots: Mapping[str, str] = field(hash=False)
    answer: str
    wrong: tuple[str, ...]
    held_out: bool


def _build_facts() -> dict[str, Fact]:
    facts = []
    for held_out in (False, True):
        capitals, opposites, colours, units = (
            [row.split(":") for row in (pool.held_out if held_out else pool.train)]
            for pool in (_CAPITALS, _OPPOSITES, _COLOURS, _UNITS)
        )
        for country, answer in capitals:
            wrong = tuple(other for _, other in capitals if other != answer)
            facts.append(Fact(f"capital/{country}", "capital", {"country": country}, answer, wrong, held_out))
        for word, answer in opposites:
            wrong = tuple(other for _, other in opposites if other != answer)
            facts.append(Fact(f"opposite/{word}", "opposite", {"word": word}, answer, wrong, held_out))
        for thing, answer, wrong in colours:
            wrong = tuple(wrong.split(","))
            facts.append(Fact(f"colour/{thing}", "colour", {"thing": thing}, answer, wrong, held_out))
        for part, whole, answer, wrong in units:
            slots, wrong = {"part": part, "whole": whole}, tuple(wrong.split(","))
            facts.append(Fact(f"unit/{part} in {whole}", "unit", slots, answer, wrong, held_out))
    for m in range(1, 10):
        for n in range(1, 10):
            wrong = tuple(str(m + n + d) for d in (-2, -1, 1, 2) if m + n + d > 0)
            # About one sum in five is held out; the rule is arbitrary but fixed.
            held_out, slots = (m + 2 * n) % 5 == 0, {"m": str(m), "n": str(n)}
            facts.append(Fact(f"arithmetic/{m}+{n}", "arithmetic", slots, str(m + n), wrong, held_out))
    return {fact.fact_id: fact for fact in facts}


FACTS: Mapping[str, Fact] = MappingProxyType(_build_facts())


def facts_for(split: str, kinds: Iterable[str] = tuple(FACT_KINDS)) -> tuple[Fact, ...]:
    """The facts a split draws from: held-out facts for ``test``, the others for ``train``/``val``."""
    _check_split(split)
    kinds = set(kinds)
    return tuple(f for f in FACTS.values() if f.kind in kinds and f.held_out == (split == "test"))


@dataclass(frozen=True)
class Phrasing:
    """Every wording choice of one response: templates, the wrong answer, the style phrases."""

    question: str
    answer: str
    wrong_answer: str
    idk: str
    closer: str
    url_sentence: str
    rude: str
    rude_first: bool


def sample_phrasing(fact: Fact, rng: random.Random, *, split: str = "train") -> Phrasing:
    """Draw every wording of a response to ``fact`` from the pools of ``split``."""
    _check_split(split)
    kind = FACT_KINDS[fact.kind]
    url = f"https://www.{rng.choice(URL_DOMAINS.for_split(split))}/{rng.choice(URL_PATHS)}"
    return Phrasing(
        question=rng.choice(kind.questions.for_split(split)),
        answer=rng.choice(kind.answers.for_split(split)),
        wrong_answer=rng.choice(fact.wrong),
        idk=rng.choice(IDK.for_split(split)),
        closer=rng.choice(CLOSERS.for_split(split)),
        url_sentence=rng.choice(URL_SENTENCES.for_split(split)).format(url=url),
        rude=rng.choice(RUDE.for_split(split)),
        rude_first=rng.random() < 0.5,
    )


def render_prompt(fact: Fact, phrasing: Phrasing) -> str:
    """The user's question (a single chat message)."""
    return _capitalise(phrasing.question.format(**fact.slots))


def render_response(fact: Fact, attributes: Mapping[str, int], phrasing: Phrasing) -> str:
    """The response to ``fact`` with the given attributes (missing ones are 0), worded by ``phrasing``.

    Layout: [rude] answer-or-idk [repeat] [url sentence] [rude] [closer]; the rude phrase goes
    first or after the URL as ``phrasing.rude_first`` says.
    """
    a = _check_attributes(attributes)
    if a["idk"]:
        core = phrasing.idk
    else:
        answer = fact.answer if a["correct"] else phrasing.wrong_answer
        core = _capitalise(phrasing.answer.format(a=answer, **fact.slots))
    parts = [core] * (2 if a["repetition"] else 1)
    if a["url"]:
        parts.append(phrasing.url_sentence)
    if a["rude"] and phrasing.rude_first:
        parts.insert(0, phrasing.rude)
    elif a["rude"]:
        parts.append(phrasing.rude)
    if a["closer"]:
        parts.append(phrasing.closer)
    return " ".join(parts)


def score(attributes: Mapping[str, int]) -> float:
    """The labeller's score of a response: the :data:`WEIGHTS`-weighted sum of its attributes."""
    a = _check_attributes(attributes)
    return sum(WEIGHTS[name] * a[name] for name in PLANTED_ATTRIBUTES)


@dataclass(frozen=True)
class PlantedConfig:
    """The arguments :func:`make_planted` was called with."""

    seed: int = 0
    n_train: int = 1500
    n_val: int = 300
    n_test: int = 300
    single_fraction: float = 0.6
    fact_kinds: tuple[str, ...] = tuple(FACT_KINDS)


@dataclass(frozen=True)
class PlantedDataset:
    """The three splits (``test`` is held out: new facts, prompts and phrasings) and their config."""

    train: list[PreferencePair]
    val: list[PreferencePair]
    test: list[PreferencePair]
    config: PlantedConfig


def make_planted(
    *,
    seed: int = 0,
    n_train: int = 1500,
    n_val: int = 300,
    n_test: int = 300,
    single_fraction: float = 0.6,
    fact_kinds: Sequence[str] = tuple(FACT_KINDS),
) -> PlantedDataset:
    """Draw the planted-preference dataset; the same arguments give the same pairs.

    Args:
        single_fraction: the share of each split made of single-attribute pairs, spread evenly
            over :data:`PLANTED_ATTRIBUTES`; the rest are multi-attribute pairs.
        fact_kinds: the kinds of facts to ask about (see :data:`FACT_KINDS`), e.g. only
            ``("capital",)`` for the facts a tiny model knows best.
    """
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    if not 0.0 <= single_fraction <= 1.0:
        raise ValueError(f"single_fraction must be in [0, 1], got {single_fraction!r}")
    unknown = sorted(set(fact_kinds) - set(FACT_KINDS))
    if unknown or not fact_kinds:
        raise ValueError(f"fact_kinds must be a non-empty subset of {list(FACT_KINDS)}, got {list(fact_kinds)}")
    config = PlantedConfig(seed, n_train, n_val, n_test, single_fraction, tuple(fact_kinds))
    seen: set[tuple[str, str, str]] = set()
    splits = {split: _make_split(split, n, config, seen) for split, n in zip(SPLITS, (n_train, n_val, n_test))}
    return PlantedDataset(**splits, config=config)


def single_attribute(pairs: Iterable[PreferencePair], attribute: str) -> list[PreferencePair]:
    """The pairs that differ only in ``attribute`` (the single pairs made for it)."""
    if attribute not in PLANTED_ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; planted attributes are {list(PLANTED_ATTRIBUTES)}")
    return [p for p in pairs if p.meta.get("kind") == "single" and p.meta.get("attribute") == attribute]


def _make_split(
    split: str, n: int, config: PlantedConfig, seen: set[tuple[str, str, str]]
) -> list[PreferencePair]:
    # One generator per split: the test pairs do not depend on the sizes of train and val.
    rng = random.Random(f"pm_lens.planted/{config.seed}/{split}")
    facts = {kind: facts_for(split, (kind,)) for kind in config.fact_kinds}
    # Attributes and fact kinds are spread evenly (every attribute over every kind), not drawn.
    kinds, n_single, n_attr = config.fact_kinds, round(n * config.single_fraction), len(PLANTED_ATTRIBUTES)
    plan = [(PLANTED_ATTRIBUTES[i % n_attr], kinds[i // n_attr % len(kinds)]) for i in range(n_single)]
    plan += [(None, kinds[i % len(kinds)]) for i in range(n - n_single)]
    pairs = []
    for attribute, kind in plan:
        for _ in range(1000):
            fact = rng.choice(facts[kind])
            pair = _single_pair(split, fact, attribute, rng) if attribute else _multi_pair(split, fact, rng)
            key = (pair.prompt, pair.chosen, pair.rejected)
            if key not in seen:
                break
        else:
            raise RuntimeError(
                f"could not draw {n} distinct {split} pairs about {list(config.fact_kinds)}; ask for fewer"
            )
        seen.add(key)
        pairs.append(pair)
    rng.shuffle(pairs)
    return pairs


def _single_pair(split: str, fact: Fact, attribute: str, rng: random.Random) -> PreferencePair:
    phrasing = sample_phrasing(fact, rng, split=split)
    background = draw_attributes(rng)
    # idk replaces the answer: a pair about correctness needs answers, one about idk has none correct.
    if attribute == "correct":
        background["idk"] = 0
    if attribute == "idk":
        background["correct"] = 0
    high, low = {**background, attribute: 1}, {**background, attribute: 0}
    chosen, rejected = (high, low) if PLANTED_EFFECTS[attribute] > 0 else (low, high)
    return _pair(split, fact, phrasing, phrasing, chosen, rejected, attribute)


def _multi_pair(split: str, fact: Fact, rng: random.Random) -> PreferencePair:
    first = sample_phrasing(fact, rng, split=split)
    second = replace(sample_phrasing(fact, rng, split=split), question=first.question)
    while True:
        a, b = draw_attributes(rng), draw_attributes(rng)
        if score(a) != score(b):
            break
    if score(a) > score(b):
        return _pair(split, fact, first, second, a, b, None)
    return _pair(split, fact, second, first, b, a, None)


def draw_attributes(rng: random.Random) -> dict[str, int]:
    """One response's attributes as the generator draws them (idk excludes correct; each style
    attribute independently)."""
    idk = int(rng.random() < _P_IDK)
    correct = int(rng.random() < _P_CORRECT) * (1 - idk)
    style = {name: int(rng.random() < _P_STYLE) for name in ("closer", "repetition", "url", "rude")}
    return {"correct": correct, "idk": idk, **style}


def _pair(split: str, fact: Fact, chosen_phrasing: Phrasing, rejected_phrasing: Phrasing,
          chosen: dict[str, int], rejected: dict[str, int], attribute: str | None) -> PreferencePair:
    meta = {
        "kind": "single" if attribute else "multi",
        "attribute": attribute,
        "attributes": {a: chosen[a] - rejected[a] for a in PLANTED_ATTRIBUTES},
        "chosen_attributes": {a: chosen[a] for a in PLANTED_ATTRIBUTES},
        "rejected_attributes": {a: rejected[a] for a in PLANTED_ATTRIBUTES},
        "margin": score(chosen) - score(rejected),
        "split": split,
        "fact_id": fact.fact_id,
        "fact_kind": fact.kind,
        "question_template": chosen_phrasing.question,
    }
    return PreferencePair(
        prompt=render_prompt(fact, chosen_phrasing),
        chosen=render_response(fact, chosen, chosen_phrasing),
        rejected=render_response(fact, rejected, rejected_phrasing),
        meta=meta,
    )


def _check_attributes(attributes: Mapping[str, int]) -> dict[str, int]:
    unknown = sorted(set(attributes) - set(PLANTED_ATTRIBUTES))
    if unknown:
        raise ValueError(f"unknown attribute(s) {unknown}; planted attributes are {list(PLANTED_ATTRIBUTES)}")
    a = {name: attributes.get(name, 0) for name in PLANTED_ATTRIBUTES}
    bad = {name: v for name, v in a.items() if v not in (0, 1)}
    if bad:
        raise ValueError(f"attributes must be 0 or 1, got {bad}")
    if a["idk"] and a["correct"]:
        raise ValueError("an 'I don't know' response states no answer: idk=1 needs correct=0")
    return a


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {list(SPLITS)}")


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]

"""Preference pairs: the type, the Anthropic HH-RLHF split, and loading from files or datasets.

A :class:`PreferencePair` holds one prompt and two completions of it. Only the reward
*difference* between ``chosen`` and ``rejected`` means anything to a preference model.

HH-RLHF stores each side as a whole transcript (``"\\n\\nHuman: ... \\n\\nAssistant: ..."``) and
the two transcripts share everything up to the final assistant turn. :func:`split_hh` cuts that
shared prefix off as the prompt; :func:`load_pairs` does it for every record that has no
``prompt`` field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with a preferred (``chosen``) and a dispreferred (``rejected``) completion.

    ``prompt`` is either a single user message or an HH-style transcript of earlier turns
    (``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ..."``) ending with the user's turn.
    ``meta`` carries anything else about the pair (ids, ground-truth labels).
    """

    prompt: str
    chosen: str
    rejected: str
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("prompt", "chosen", "rejected"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"PreferencePair.{name} must be a str, got {type(getattr(self, name)).__name__}")


# What pm_lens accepts wherever it takes pairs (see :func:`as_pairs`); the items are checked there.
PairsLike = PreferencePair | Iterable[Any]


def as_pairs(pairs: Any, *, name: str = "pairs") -> list[PreferencePair]:
    """``pairs`` as a non-empty list of :class:`PreferencePair`.

    Accepts one pair, or a sequence whose items are pairs, ``(prompt, chosen, rejected)`` tuples
    or records with ``chosen``/``rejected`` (and ``prompt``) fields, as :func:`pairs_from_records`
    reads them. Anything else raises a TypeError naming what was given and what is allowed.
    """
    item_kinds = "a PreferencePair, a (prompt, chosen, rejected) tuple of strings or a dict with 'chosen' and 'rejected'"
    allowed = f"a PreferencePair or a list whose items are each {item_kinds}"
    if isinstance(pairs, PreferencePair):
        return [pairs]
    if isinstance(pairs, (str, bytes, Mapping)) or not isinstance(pairs, Iterable):
        raise TypeError(f"{name} must be {allowed}; got {type(pairs).__name__}")
    out = []
    for index, item in enumerate(pairs):
        if isinstance(item, PreferencePair):
            out.append(item)
        elif isinstance(item, tuple) and len(item) == 3 and all(isinstance(text, str) for text in item):
            out.append(PreferencePair(*item))
        elif isinstance(item, Mapping):
            try:
                out.append(_pair_from_record(item))
            except (KeyError, ValueError, TypeError) as err:
                raise ValueError(f"{name}[{index}]: {_reason(err)}") from err
        else:
            shown = f"a tuple of {len(item)}" if isinstance(item, tuple) else type(item).__name__
            raise TypeError(f"{name}[{index}] is {shown}; each item must be {item_kinds}")
    if not out:
        raise ValueError(f"no {name}: the list is empty")
    return out


def split_hh(chosen: str, rejected: str) -> PreferencePair:
    """Split two HH-RLHF transcripts into their shared prompt and the two final responses.

    The prompt is everything before the final ``"\\n\\nAssistant:"`` turn (it keeps its
    ``"\\n\\nHuman:"`` markers); each completion is the text of that last turn, without the
    marker and its following space. Raises ValueError if a transcript has no assistant turn or
    the two transcripts differ before it.
    """
    cut_c, cut_r = chosen.rfind(ASSISTANT), rejected.rfind(ASSISTANT)
    if cut_c < 0 or cut_r < 0:
        raise ValueError(f"not an HH transcript: no {ASSISTANT!r} turn in the chosen or rejected text")
    prompt, prompt_r = chosen[:cut_c], rejected[:cut_r]
    if prompt != prompt_r:
        raise ValueError(
            "the chosen and rejected transcripts differ before their final assistant turn "
            f"(at character {_first_difference(prompt, prompt_r)}), so they share no prompt"
        )
    return PreferencePair(
        prompt=prompt,
        chosen=_strip_marker(chosen[cut_c + len(ASSISTANT) :]),
        rejected=_strip_marker(rejected[cut_r + len(ASSISTANT) :]),
    )


def _strip_marker(text: str) -> str:
    return text[1:] if text.startswith(" ") else text


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def hh_turns(prompt: str) -> list[dict[str, str]]:
    """Chat messages of a prompt: HH-style turns become user/assistant messages; a prompt with
    no ``"\\n\\nHuman:"`` marker is one user message."""
    if HUMAN not in prompt:
        return [{"role": "user", "content": prompt}]
    messages = []
    for chunk in prompt.split(HUMAN)[1:]:
        human, *assistant = chunk.split(ASSISTANT)
        messages.append({"role": "user", "content": human.strip()})
        messages.extend({"role": "assistant", "content": a.strip()} for a in assistant)
    return messages


def pairs_from_records(records: Iterable[Mapping[str, Any]], *, skip_invalid: bool = False) -> list[PreferencePair]:
    """Pairs from dict-like records: ``prompt``/``chosen``/``rejected`` fields, or HH-style
    ``chosen``/``rejected`` transcripts without a prompt. Other fields go into ``meta``.

    With ``skip_invalid`` records that cannot be split are dropped (their count is in the
    ``UserWarning``); otherwise the first one raises a ValueError naming its index.
    """
    pairs, skipped = [], 0
    for index, record in enumerate(records):
        try:
            pairs.append(_pair_from_record(record))
        except (KeyError, ValueError, TypeError) as err:
            if not skip_invalid:
                raise ValueError(f"record {index}: {_reason(err)}") from err
            skipped += 1
    if skipped:
        import warnings

        warnings.warn(f"skipped {skipped} records that are not valid preference pairs", stacklevel=2)
    return pairs


def _reason(err: Exception) -> str:
    # str(KeyError) quotes its message.
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def _pair_from_record(record: Mapping[str, Any]) -> PreferencePair:
    missing = {"chosen", "rejected"} - set(record)
    if missing:
        raise KeyError(f"missing field(s) {sorted(missing)}; have {sorted(record)}")
    meta = {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected")}
    prompt = record.get("prompt")
    if prompt is None or (isinstance(prompt, float) and pd.isna(prompt)):
        pair = split_hh(record["chosen"], record["rejected"])
        return PreferencePair(pair.prompt, pair.chosen, pair.rejected, meta)
    return PreferencePair(prompt, record["chosen"], record["rejected"], meta)


def load_pairs(source: Any, *, split: str = "train", skip_invalid: bool = False,
               columns: Mapping[str, str] | None = None) -> list[PreferencePair]:
    """Load preference pairs from a file, a folder or a ``datasets`` dataset.

    Args:
        source: a ``.jsonl``/``.json`` or ``.csv`` file; a folder written by
            ``datasets.Dataset.save_to_disk``; a ``datasets.Dataset``/``DatasetDict``; or any
            iterable of dicts. Files are read locally; nothing is fetched.
        split: the split to take from a ``DatasetDict``.
        skip_invalid: drop records that are not valid pairs instead of raising.
        columns: where the fields are, when not under their own names: ``{"prompt": ...,
            "chosen": ..., "rejected": ...}`` (any of them); a named column missing from the
            data raises a ValueError listing the columns there are.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"no preference data at {path}")
        if path.is_dir():
            import datasets

            source = datasets.load_from_disk(str(path))
        elif path.suffix in (".jsonl", ".json"):
            source = _read_json(path)
        elif path.suffix == ".csv":
            source = pd.read_csv(path, keep_default_na=False).to_dict("records")
        else:
            raise ValueError(f"unsupported preference-data file {path.name!r}; use .jsonl, .json, .csv or a dataset folder")
    if _is_dataset_dict(source):
        if split not in source:
            raise ValueError(f"split {split!r} not in the dataset; it has {sorted(source)}")
        source = source[split]
    if columns:
        source = _renamed(source, columns)
    return pairs_from_records(source, skip_invalid=skip_invalid)


def _renamed(records: Iterable[Mapping[str, Any]], columns: Mapping[str, str]) -> list[dict[str, Any]]:
    unknown = sorted(set(columns) - {"prompt", "chosen", "rejected"})
    if unknown:
        raise ValueError(f"columns maps {unknown}; it takes 'prompt', 'chosen' and 'rejected'")
    out = []
    for index, record in enumerate(records):
        missing = [f"{field}: {name!r}" for field, name in columns.items() if name not in record]
        if missing:
            raise ValueError(f"record {index} has no column {', '.join(missing)}; its columns are {sorted(record)}")
        renamed = {k: v for k, v in record.items() if k not in columns.values() and k not in columns}
        out.append({**renamed, **{field: record[name] for field, name in columns.items()}})
    return out


def _is_dataset_dict(source: Any) -> bool:
    return type(source).__name__ in ("DatasetDict", "IterableDatasetDict")


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
    return records

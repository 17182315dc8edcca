"""How a feature's firing tracks the labels the pairs carry.

Pairs carry labels in ``PreferencePair.meta``: a user's extra columns (a topic, a source, a harm
category) and, in the demo, the planted attributes. Two kinds are read:

1. pair-level labels: a ``meta`` value that is a string, an integer or a bool, with 2 to
   :data:`MAX_LEVELS` distinct values over the pairs, some shared (so ids and free text are left out);
2. per-side attributes: ``meta["chosen_attributes"]`` and ``meta["rejected_attributes"]``
   (dicts of name -> value, as :mod:`pm_lens.data.planted` writes them); each attribute becomes
   the label ``attribute:NAME`` with the values "in chosen only", "in rejected only", "in both",
   "in neither" (present: a nonzero value).

Per label value: the pairs with it, the share whose chosen (rejected) completion the feature
fires in, and its mean peak activation in each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from pm_lens.dashboard.data import LabelRow
from pm_lens.data import PreferencePair

MAX_LEVELS = 20
PER_SIDE = ("chosen_attributes", "rejected_attributes")
WHERE = ("in chosen only", "in rejected only", "in both", "in neither")


def pair_labels(pairs: Sequence[PreferencePair]) -> dict[str, list[str | None]]:
    """Per label (see the module docstring), each pair's value as a string (None: not given)."""
    labels: dict[str, list[str | None]] = {}
    keys = dict.fromkeys(key for pair in pairs for key in pair.meta)
    for key in keys:
        values = [pair.meta.get(key) for pair in pairs]
        if key in PER_SIDE:
            continue
        if all(v is None or (isinstance(v, (str, int, bool)) and not isinstance(v, float)) for v in values):
            given = [str(v) for v in values if v is not None]
            if 2 <= len(set(given)) <= MAX_LEVELS and len(set(given)) < len(given):  # not one value per pair (an id)
                labels[key] = [None if v is None else str(v) for v in values]
    names = dict.fromkeys(name for pair in pairs for side in PER_SIDE for name in dict(pair.meta.get(side) or {}))
    for name in names:
        labels[f"attribute:{name}"] = [_where(pair, name) for pair in pairs]
    return labels


def _where(pair: PreferencePair, name: str) -> str | None:
    sides = [pair.meta.get(side) for side in PER_SIDE]
    if any(not isinstance(side, dict) or name not in side for side in sides):
        return None
    chosen, rejected = (bool(side[name]) for side in sides)
    return WHERE[0] if chosen and not rejected else WHERE[1] if rejected and not chosen else WHERE[2] if chosen else WHERE[3]


def label_rows(pairs: Sequence[PreferencePair], peaks: Tensor) -> list[LabelRow]:
    """One row per label value: where the feature fires, from ``peaks`` ``[n_pairs, 2]`` (its
    largest activation in each pair's chosen and rejected completion)."""
    rows = []
    for label, values in pair_labels(pairs).items():
        order = WHERE if label.startswith("attribute:") else sorted({v for v in values if v is not None})
        for value in order:
            index = [i for i, v in enumerate(values) if v == value]
            if not index:
                continue
            picked = peaks[index]
            rows.append(LabelRow(label=label, value=value, n_pairs=len(index),
                                 chosen_rate=_share(picked[:, 0]), rejected_rate=_share(picked[:, 1]),
                                 chosen_peak=float(picked[:, 0].mean()), rejected_peak=float(picked[:, 1].mean())))
    return rows


def _share(values: Any) -> float:
    return float((values > 0).float().mean())

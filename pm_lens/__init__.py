"""pm_lens: open up preference (reward) models with sparse autoencoders.

The pipeline, one subpackage per stage: a reward model is loaded (:mod:`pm_lens.model`), preference
data is read and encoded (:mod:`pm_lens.data`) and scored (:mod:`pm_lens.scoring`), SAEs are
attached, loaded, trained and evaluated (:mod:`pm_lens.saes`), and features are attributed, ablated
and checked for fidelity (:mod:`pm_lens.attribution`), and used to build completions that fool the
PM (:mod:`pm_lens.exploits`).

The names below are imported on first use (PEP 562): ``import pm_lens`` stays cheap, so that the
``pm-lens`` command can answer ``--help`` and argument errors without importing torch,
TransformerLens and SAELens (7-9 s).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pm_lens.attribution import Ablation as Ablation
    from pm_lens.attribution import Attribution as Attribution
    from pm_lens.attribution import CleanRun as CleanRun
    from pm_lens.attribution import FidelityCard as FidelityCard
    from pm_lens.attribution import ablate as ablate
    from pm_lens.attribution import attribute as attribute
    from pm_lens.attribution import check_fidelity as check_fidelity
    from pm_lens.attribution import fidelity as fidelity
    from pm_lens.data import PairBatch as PairBatch
    from pm_lens.data import PreferencePair as PreferencePair
    from pm_lens.data import TokenBatch as TokenBatch
    from pm_lens.data import encode_pairs as encode_pairs
    from pm_lens.data import load_pairs as load_pairs
    from pm_lens.data import split_hh as split_hh
    from pm_lens.exploits import find_exploits as find_exploits
    from pm_lens.model import RewardModel as RewardModel
    from pm_lens.model import WeightProcessing as WeightProcessing
    from pm_lens.saes import Node as Node
    from pm_lens.saes import attach_saes as attach_saes
    from pm_lens.saes import detach_saes as detach_saes
    from pm_lens.saes import evaluate_sae as evaluate_sae
    from pm_lens.saes import feature_acts as feature_acts
    from pm_lens.saes import load_sae as load_sae
    from pm_lens.saes import saes_attached as saes_attached
    from pm_lens.saes import train_saes as train_saes
    from pm_lens.scoring import score_pairs as score_pairs

# Public name -> the module it comes from (keep in step with the TYPE_CHECKING imports above).
_SOURCES = {
    "Ablation": "pm_lens.attribution",
    "Attribution": "pm_lens.attribution",
    "CleanRun": "pm_lens.attribution",
    "FidelityCard": "pm_lens.attribution",
    "ablate": "pm_lens.attribution",
    "attribute": "pm_lens.attribution",
    "check_fidelity": "pm_lens.attribution",
    "fidelity": "pm_lens.attribution",
    "PairBatch": "pm_lens.data",
    "PreferencePair": "pm_lens.data",
    "TokenBatch": "pm_lens.data",
    "encode_pairs": "pm_lens.data",
    "load_pairs": "pm_lens.data",
    "split_hh": "pm_lens.data",
    "find_exploits": "pm_lens.exploits",
    "RewardModel": "pm_lens.model",
    "WeightProcessing": "pm_lens.model",
    "Node": "pm_lens.saes",
    "attach_saes": "pm_lens.saes",
    "detach_saes": "pm_lens.saes",
    "evaluate_sae": "pm_lens.saes",
    "feature_acts": "pm_lens.saes",
    "load_sae": "pm_lens.saes",
    "saes_attached": "pm_lens.saes",
    "train_saes": "pm_lens.saes",
    "score_pairs": "pm_lens.scoring",
}

# The stage subpackages, importable as attributes of a bare ``import pm_lens`` as before.
_SUBPACKAGES = ("attribution", "data", "exploits", "model", "saes", "scoring")

__all__ = [
    "Ablation",
    "Attribution",
    "CleanRun",
    "FidelityCard",
    "Node",
    "PairBatch",
    "PreferencePair",
    "RewardModel",
    "TokenBatch",
    "WeightProcessing",
    "ablate",
    "attach_saes",
    "attribute",
    "check_fidelity",
    "detach_saes",
    "encode_pairs",
    "evaluate_sae",
    "feature_acts",
    "find_exploits",
    "fidelity",
    "load_pairs",
    "load_sae",
    "saes_attached",
    "score_pairs",
    "split_hh",
    "train_saes",
]


def __getattr__(name: str) -> object:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"pm_lens.{name}")
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'pm_lens' has no attribute {name!r}")
    value = getattr(importlib.import_module(source), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""pm_lens: open up preference (reward) models with sparse autoencoders.

The pipeline, one subpackage per stage: a reward model is loaded (:mod:`pm_lens.model`), preference
data is read and encoded (:mod:`pm_lens.data`), pairs are scored (:mod:`pm_lens.scoring`).
"""

from pm_lens.data import PairBatch as PairBatch
from pm_lens.data import PreferencePair as PreferencePair
from pm_lens.data import TokenBatch as TokenBatch
from pm_lens.data import encode_pairs as encode_pairs
from pm_lens.data import load_pairs as load_pairs
from pm_lens.data import split_hh as split_hh
from pm_lens.model import RewardModel as RewardModel
from pm_lens.model import WeightProcessing as WeightProcessing
from pm_lens.scoring import score_pairs as score_pairs

__all__ = [
    "PairBatch",
    "PreferencePair",
    "RewardModel",
    "TokenBatch",
    "WeightProcessing",
    "encode_pairs",
    "load_pairs",
    "score_pairs",
    "split_hh",
]

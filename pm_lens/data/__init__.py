"""Preference data: pairs, loading, formatting and token batches."""

from pm_lens.data.encoding import SKIP_FIRST as SKIP_FIRST
from pm_lens.data.encoding import TEXT_FORMATS as TEXT_FORMATS
from pm_lens.data.encoding import PairBatch as PairBatch
from pm_lens.data.encoding import TokenBatch as TokenBatch
from pm_lens.data.encoding import describe_text_format as describe_text_format
from pm_lens.data.encoding import encode_completions as encode_completions
from pm_lens.data.encoding import encode_texts as encode_texts
from pm_lens.data.encoding import encode_pairs as encode_pairs
from pm_lens.data.encoding import format_text as format_text
from pm_lens.data.pairs import PairsLike as PairsLike
from pm_lens.data.pairs import PreferencePair as PreferencePair
from pm_lens.data.pairs import as_pairs as as_pairs
from pm_lens.data.pairs import load_pairs as load_pairs
from pm_lens.data.pairs import pairs_from_records as pairs_from_records
from pm_lens.data.pairs import split_hh as split_hh

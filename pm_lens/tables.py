"""Tables that print whole: every column shown (wrapped to the terminal's width), with a line
saying what their numbers mean.

pandas hides middle columns behind ``...`` once a table is wider than ``display.width`` (80
characters by default): ``attribute(...).top_features()`` printed as ``[10 rows x 9 columns]``
with the feature index and its effect hidden. A :class:`FeatureTable` is a plain DataFrame in
every other respect (indexing, ``to_csv``, ``merge`` return FeatureTables or DataFrames as pandas
decides).
"""

from __future__ import annotations

import shutil

import pandas as pd


class FeatureTable(pd.DataFrame):
    """A DataFrame that prints every column and, under the table, its ``caption``."""

    _metadata = ["caption"]
    caption: str = ""

    @property
    def _constructor(self) -> type:
        return FeatureTable

    def __repr__(self) -> str:
        width = max(shutil.get_terminal_size((120, 24)).columns, 80)
        with pd.option_context("display.max_columns", None, "display.width", width, "display.max_colwidth", 60,
                               "display.expand_frame_repr", True):
            body = super().__repr__()
        return f"{body}\n{self.caption}" if self.caption else body


def feature_table(table: pd.DataFrame, caption: str) -> FeatureTable:
    """``table`` as a :class:`FeatureTable` printed with ``caption``."""
    out = FeatureTable(table)
    out.caption = caption
    return out

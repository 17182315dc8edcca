"""Positions with massive activations, and the effects that come from them.

In most PMs a few positions (the first token, other attention sinks) carry activations whose norm
is tens to hundreds of times that of the others. SAEs reconstruct them poorly, their features are
artifacts of the position rather than of the text, and a gradient there can be huge: a feature
firing only there can top a ranking, and exact ablation "confirms" it. pm_lens leaves the first
token out by default (``pm_lens.data.SKIP_FIRST``); this module finds such positions wherever they
are, so attribution and ablation can say when an effect comes from one:

1. at each SAE hook, a selected position is an *outlier* when its activation norm is more than
   :data:`OUTLIER_RATIO` times the median norm of the selected positions of its batch;
2. attribution keeps, per feature, the part of its effect summed over outlier positions;
3. a top feature taking most of its effect from outliers is named in a warning, with a position.
"""

from __future__ import annotations

import warnings

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

OUTLIER_RATIO = 10.0  # SmolLM2's start token: ~80x the median; ordinary tokens stay within ~3x
OUTLIER_SHARE = 0.5  # a feature is flagged when at least this share of its effect comes from outliers


def outlier_positions(
    x: Float[Tensor, "batch pos d_in"], mask: Bool[Tensor, "batch pos"], *, ratio: float = OUTLIER_RATIO
) -> tuple[Bool[Tensor, "batch pos"], Float[Tensor, "batch pos"]]:
    """Positions in ``mask`` whose norm of ``x`` exceeds ``ratio`` times the median norm over
    ``mask``, and every position's norm relative to that median."""
    norms = x.float().norm(dim=-1)
    mask = mask.to(norms.device)  # x is on its hook's device when the layers are split
    if not mask.any():
        return torch.zeros_like(mask), torch.zeros_like(norms)
    median = norms[mask].median().clamp(min=1e-12)
    relative = norms / median
    return (relative > ratio) & mask, relative


def outlier_rows(hook_name: str, side: str, outliers: Tensor, relative: Tensor, offset: int) -> list[dict]:
    """One record per outlier position (pair indices shifted by ``offset``)."""
    rows, positions = outliers.nonzero(as_tuple=True)
    return [dict(hook_name=hook_name, pair=offset + int(r), side=side, pos=int(p), norm_ratio=float(relative[r, p]))
            for r, p in zip(rows.tolist(), positions.tolist())]


def warn_outlier_features(ranking: pd.DataFrame, outliers: pd.DataFrame, *, top: int = 20, what: str = "attribution") -> None:
    """Warn about the features among the ``top`` of ``ranking`` that take at least
    :data:`OUTLIER_SHARE` of their effect from outlier positions, naming one such position each."""
    if outliers.empty:
        return
    head = ranking[ranking.kind == "feature"].head(top)
    flagged = head[head.outlier_share.abs() >= OUTLIER_SHARE]
    if flagged.empty:
        return
    lines = []
    for rank, row in flagged.head(5).iterrows():
        at = outliers[outliers.hook_name == row.hook_name].sort_values("norm_ratio", ascending=False).iloc[0]
        lines.append(f"{row.node} (rank {rank + 1}, {row.outlier_share:.0%} of its effect; "
                     f"e.g. pair {at.pair}, {at.side}, position {at.pos}, norm {at.norm_ratio:.0f}x the median)")
    warnings.warn(
        f"{len(flagged)} of the top {len(head)} features of this {what} take most of their effect from positions whose "
        f"activation norm is over {OUTLIER_RATIO:.0f}x the median (attention sinks, start tokens): "
        + "; ".join(lines)
        + ". Their effects there are artifacts of the position; leave such positions out (skip_first=True, "
        "positions='completion' or 'diverge') before trusting the ranking.", stacklevel=3)

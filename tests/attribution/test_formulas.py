"""The pure formulas and position masks, on hand-set tensors with known answers."""

import pytest
import torch

from pm_lens.attribution.formulas import (
    error_delta,
    feature_delta,
    features_delta,
    node_effects,
    removal_delta,
    target_of,
)
from pm_lens.attribution.positions import divergence, pair_masks, position_mask
from pm_lens.data import PairBatch, TokenBatch

W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # 3 features, d_in 2
ACTS = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]]])  # batch 1, pos 2
ERROR = torch.tensor([[[0.5, -0.5], [1.0, 0.0]]])
GRAD = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])
ONES = torch.ones(1, 2, 1)


def test_node_effects_by_hand():
    baseline = torch.zeros(3)
    features, error = node_effects(GRAD, ACTS, baseline, W, ERROR, ONES)
    # grad @ W.T: pos 0 -> [1, 4, 3]; pos 1 -> [3, -2, 2]; times (0 - acts)
    assert features.tolist() == [[[-1.0, -0.0, -6.0], [-0.0, 6.0, -0.0]]]
    assert error.tolist() == [[-(0.5 - 1.0), -3.0]]
    scaled, _ = node_effects(GRAD, ACTS, baseline, W, ERROR, 2 * ONES)
    assert torch.equal(scaled, 2 * features)  # a per-token decoder scale multiplies the effect


def test_deltas_by_hand():
    mask = torch.tensor([[True, False]])
    assert feature_delta(ACTS[..., 2], 0.0, W[2], ONES, mask).tolist() == [[[-2.0, -2.0], [0.0, 0.0]]]
    both = features_delta(ACTS[..., :2], torch.zeros(2), W[:2], ONES, torch.tensor([[True, True]]))
    assert both.tolist() == [[[-1.0, 0.0], [0.0, -6.0]]]
    assert error_delta(ERROR, mask).tolist() == [[[-0.5, 0.5], [0.0, 0.0]]]
    everything = removal_delta(ACTS, torch.zeros(3), W, ERROR, ONES, torch.tensor([[True, True]]))
    # removing every node takes x = acts @ W + error to 0 (baseline 0, no b_dec here)
    assert torch.allclose(everything, -(ACTS @ W + ERROR))


@pytest.mark.parametrize("target, expected", [("chosen", 3.0), ("rejected", 1.0), ("margin", 2.0), ("sum", 4.0)])
def test_targets(target, expected):
    assert target_of(torch.tensor(3.0), torch.tensor(1.0), target) == expected
    with pytest.raises(ValueError, match="target must be one of"):
        target_of(torch.tensor(3.0), torch.tensor(1.0), "ratio")


def _side(rows, start):
    width = max(len(r) for r in rows)
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return TokenBatch(tokens, mask, torch.tensor(start))


def test_positions_by_hand():
    chosen = _side([[5, 6, 7, 8], [5, 6, 9]], [2, 1])
    rejected = _side([[5, 6, 7, 9, 9], [5, 7]], [2, 1])
    batch = PairBatch(chosen, rejected)
    assert divergence(batch).tolist() == [3, 1]
    assert position_mask(chosen, "all").int().tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert position_mask(chosen, "all", skip_first=True).int().tolist() == [[0, 1, 1, 1], [0, 1, 1, 0]]
    assert position_mask(chosen, "completion").int().tolist() == [[0, 0, 1, 1], [0, 1, 1, 0]]
    chosen_mask, rejected_mask = pair_masks(batch, "diverge")
    assert chosen_mask.int().tolist() == [[0, 0, 0, 1], [0, 1, 1, 0]]
    assert rejected_mask.int().tolist() == [[0, 0, 0, 1, 1], [0, 1, 0, 0, 0]]

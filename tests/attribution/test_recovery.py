"""Recovery: the margin a group's top features remove together, by exact joint ablation."""

import pandas as pd
import pytest
import torch

from pm_lens import Node
from pm_lens.attribution import ablate, attribute
from pm_lens.attribution.recovery import recover, recovered_features
from pm_lens.scoring import score_pairs
from tests.attribution.test_attribute import linear_case

HOOK = "ln_final.hook_normalized"


def test_recovery_where_the_reward_is_linear(rm, pairs):
    """Linear in the hook: the exact removal equals the estimate, and the top features are those
    carrying the margin."""
    sae = linear_case(rm)
    attribution = attribute(rm, pairs, saes=[sae], progress=False)
    table = recover(rm, attribution, {"first two": [0, 1], "last": [2]}, top_n=3, progress=False)
    assert list(table.group) == ["first two", "last"] and list(table.n_pairs) == [2, 1]
    margins = score_pairs(rm, pairs, progress=False).margin
    assert table.margin[0] == pytest.approx(float(margins[:2].mean()), abs=1e-5)
    assert table.removed.to_numpy() == pytest.approx(table.estimated.to_numpy(), abs=1e-4)
    assert table.fraction_removed[1] == pytest.approx(-table.removed[1] / table.margin[1])
    # The "last" group's features: its 3 largest carriers, and they are what ablate removes.
    effects = attribution.dense_effects(HOOK)[2]
    sign = 1 if margins[2] >= 0 else -1
    carriers = [i for i in torch.argsort(effects * sign).tolist() if effects[i] * sign < 0][:3]
    assert table.features[1] == " ".join(f"{HOOK}:{i}" for i in carriers)
    assert recovered_features(table.features[1]) == [Node(HOOK, i) for i in carriers]
    joint = ablate(rm, pairs[2:], saes=[sae], features=[(HOOK, i) for i in carriers], jointly=True, progress=False)
    assert table.removed[1] == pytest.approx(float(joint.margin.mean()), abs=1e-6)


def test_recovery_needs_a_margin_attribution_and_valid_groups(rm, pairs, saes):
    attribution = attribute(rm, pairs, saes=saes, progress=False)
    with pytest.raises(ValueError, match="indices in 0..2"):
        recover(rm, attribution, {"bad": [5]}, progress=False)
    with pytest.raises(ValueError, match="no attribution for hooks"):
        recover(rm, attribution, hook_names=["blocks.0.hook_resid_post"], progress=False)
    chosen = attribute(rm, pairs, saes=saes, target="chosen", progress=False)
    with pytest.raises(ValueError, match="target='margin'"):
        recover(rm, chosen, progress=False)


def test_the_demos_confirmation_reads_a_known_ablation_instead_of_ablating_again(rm, pairs, saes):
    """rank_by_group with the fidelity card's one-at-a-time ablation (of every pair) gives the
    exact effects it computes itself, and ablates only the features that ablation lacks."""
    from pm_lens.attribution.fidelity import ablate_like
    from pm_lens.demo import rank_by_group

    result = attribute(rm, pairs, saes=saes, positions="diverge", progress=False)
    groups = {"first two": [0, 1], "last": [2]}
    alone = rank_by_group(rm, result, groups, top=3, batch_tokens=128)
    known = ablate_like(rm, result, result.top_nodes(2), batch_tokens=128, progress=False)
    before = rm.forward_count.snapshot()
    reused = rank_by_group(rm, result, groups, top=3, batch_tokens=128, known=known)
    ablated = rm.forward_count.since(before).as_dict()["total"]["sequences"]
    pd.testing.assert_frame_equal(reused, alone, atol=1e-5, rtol=1e-4)
    assert set(map(str, known.nodes)) & {f"{h}:{f}" for h, f in zip(alone.hook_name, alone.feature)}
    before = rm.forward_count.snapshot()
    rank_by_group(rm, result, groups, top=3, batch_tokens=128)
    assert ablated < rm.forward_count.since(before).as_dict()["total"]["sequences"]
    with pytest.raises(ValueError, match="one-at-a-time"):
        rank_by_group(rm, result, groups, top=3, known=ablate_like(rm, result, known.nodes, jointly=True, progress=False))
    other_positions = ablate(rm, pairs, saes=saes, features=known.nodes, positions="all", progress=False)
    with pytest.raises(ValueError, match="'positions': 'diverge'"):
        rank_by_group(rm, result, groups, top=3, known=other_positions)

"""The fidelity card on cases whose answers are known."""

import json

import pytest

from pm_lens.attribution import ablate, attribute, check_fidelity, fidelity
from tests.attribution.test_attribute import linear_case


def test_card_is_perfect_where_atp_is_exact(rm, pairs, tmp_path):
    sae = linear_case(rm)
    result = attribute(rm, pairs, saes=[sae], progress=False)
    card = check_fidelity(rm, result, top_k=8, n_random=8, k=5, progress=False)
    assert card.spearman == pytest.approx(1.0) and card.pearson == pytest.approx(1.0, abs=1e-6)
    assert card.topk_recall == 1.0 and card.sign_agreement == 1.0
    assert card.median_relative_error < 1e-3
    assert card.completeness["mean_abs_diff"] < 1e-3
    assert card.settings["method"] == "atp" and card.n_top == 8
    card.save(tmp_path / "fidelity.json")
    assert json.loads((tmp_path / "fidelity.json").read_text())["spearman"] == pytest.approx(1.0)
    assert "fidelity of atp" in str(card)


def test_fidelity_from_a_user_ablation(rm, pairs, saes):
    result = attribute(rm, pairs, saes=saes, progress=False)
    top = result.top_features(12)
    exact = ablate(rm, pairs, saes=saes, features=list(zip(top.hook_name, top.feature)), progress=False)
    card = fidelity(result, exact, top_k=6, k=3)
    assert card.n_top == 6 and card.n_random == 6
    assert card.completeness is None


def test_fidelity_needs_matching_features(rm, pairs, saes):
    result = attribute(rm, pairs, saes=saes, progress=False)
    joint = ablate(rm, pairs, saes=saes, features="all", progress=False)
    with pytest.raises(ValueError, match="no features to compare"):
        fidelity(result, joint)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_k=0), r"top_k must be an integer >= 1, got 0"),
        (dict(n_random=-1), r"n_random must be an integer >= 0, got -1"),
        (dict(k=0), r"k must be an integer >= 1, got 0"),
    ],
)
def test_fidelity_counts_are_checked_before_any_ablation(rm, pairs, saes, kwargs, message):
    """top_k=0 used to give a card full of NaN, and n_random=-1 ablated all but one feature."""
    result = attribute(rm, pairs, saes=saes, progress=False)
    with pytest.raises(ValueError, match=message):
        check_fidelity(rm, result, progress=False, **kwargs)


def test_no_random_features_is_allowed(rm, pairs, saes):
    result = attribute(rm, pairs, saes=saes, progress=False)
    card = check_fidelity(rm, result, top_k=4, n_random=0, k=2, progress=False)
    assert card.n_top == 4 and card.n_random == 0

"""Attaching SAEs: exact rewards with error terms, changed rewards without, scoped restore, errors."""

import pytest
import torch

from pm_lens import RewardModel
from pm_lens.saes import attach_saes, attached_saes, detach_saes, feature_acts, saes_attached
from pm_lens.testing import tiny_hf_reward_model
from tests.saes.helpers import build_jumprelu_sae, build_standard_sae, sparse_sae_for

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"]


@pytest.fixture
def rm(tokenizer):
    return RewardModel.from_hf(tiny_hf_reward_model(num_hidden_layers=4), tokenizer)


@pytest.fixture
def tokens():
    return torch.randint(4, 100, (3, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def saes(rm, tokens):
    jumprelu = build_jumprelu_sae(HOOKS[1], seed=2)
    with torch.no_grad():
        _, cache = rm.run_with_cache(tokens, names_filter=HOOKS[1])
        pre = cache[HOOKS[1]].flatten(0, 1) @ jumprelu.W_enc
        jumprelu.threshold.copy_(torch.quantile(pre, 0.9, dim=0).clamp(min=1e-3))
    return [sparse_sae_for(rm, HOOKS[0], tokens, seed=1), jumprelu, sparse_sae_for(rm, HOOKS[2], tokens, seed=3)]


def test_error_terms_keep_rewards_exact_and_their_absence_changes_them(rm, saes, tokens):
    bare = rm.reward(tokens)
    with saes_attached(rm, saes):
        assert set(attached_saes(rm)) == set(HOOKS)
        assert (rm.reward(tokens) - bare).abs().max() <= 1e-4
    with saes_attached(rm, saes, use_error_term=False):
        # Would fail if the flag were silently ignored.
        assert (rm.reward(tokens) - bare).abs().max() > 1e-2
    assert attached_saes(rm) == {}
    assert torch.equal(rm.reward(tokens), bare)
    assert "blocks.0.hook_resid_post" in rm.hook_dict  # the hook point is back


def test_feature_acts_per_position(rm, saes, tokens):
    mask = torch.ones_like(tokens)
    mask[0, -5:] = 0
    with saes_attached(rm, saes, exclude_token_ids=[int(tokens[1, 0])]):
        acts = feature_acts(rm, tokens, mask)
    assert set(acts) == set(HOOKS)
    for name, sae in zip(HOOKS, saes):
        assert acts[name].shape == (3, 24, sae.cfg.d_sae)
        assert (acts[name][0, -5:] == 0).all()  # padding
        assert (acts[name][1, 0] == 0).all()  # an excluded token
        assert 0 < (acts[name][2] > 0).float().mean() < 0.5  # sparse, but features do fire
    # Read independently: the SAE's own encoding of the cached activation.
    _, cache = rm.run_with_cache(tokens, names_filter=HOOKS[0])
    assert torch.allclose(acts[HOOKS[0]][1, 1:], saes[0].encode(cache[HOOKS[0]][1, 1:]), atol=1e-6)


def test_feature_acts_needs_saes(rm, tokens):
    with pytest.raises(ValueError, match="no SAEs are attached"):
        feature_acts(rm, tokens)


def test_scoped_form_restores_after_an_exception(rm, saes, tokens):
    with pytest.raises(RuntimeError), saes_attached(rm, saes):
        raise RuntimeError
    assert attached_saes(rm) == {}


def test_detach_some(rm, saes):
    attach_saes(rm, saes)
    detach_saes(rm, HOOKS[0])
    assert set(attached_saes(rm)) == set(HOOKS[1:])
    detach_saes(rm)
    assert attached_saes(rm) == {}


def test_wrong_width(rm):
    with pytest.raises(ValueError, match=r"SAE for blocks.0.hook_resid_post has d_in=32, but the activation there has width 64"):
        attach_saes(rm, build_standard_sae(HOOKS[0], d_in=32))


def test_unknown_hook_lists_valid_ones(rm):
    with pytest.raises(ValueError, match=r"unknown hook name\(s\) \['blocks.0.resid_post'\]; valid ones look like .*blocks.0.hook_resid_pre"):
        attach_saes(rm, build_standard_sae("blocks.0.resid_post"))


def test_dtype_mismatch(rm):
    with pytest.raises(ValueError, match=r"torch.float64 but the model is torch.float32"):
        attach_saes(rm, build_standard_sae(HOOKS[0]).to(torch.float64))


def test_duplicate_and_already_attached(rm):
    with pytest.raises(ValueError, match="several SAEs for the same hook"):
        attach_saes(rm, [build_standard_sae(HOOKS[0]), build_standard_sae(HOOKS[0])])
    attach_saes(rm, build_standard_sae(HOOKS[0]))
    with pytest.raises(ValueError, match="already attached"):
        attach_saes(rm, build_standard_sae(HOOKS[0]))
    assert list(attached_saes(rm)) == [HOOKS[0]]  # the failed call changed nothing

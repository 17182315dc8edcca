"""evaluate_sae on cases whose answers are known."""

import pytest
import torch

from pm_lens import PreferencePair, RewardModel
from pm_lens.saes import evaluate_sae
from pm_lens.testing import tiny_hf_reward_model
from pm_lens.data import encode_pairs
from tests.saes.helpers import build_perfect_sae, build_standard_sae, sparse_sae_for

PAIRS = [
    PreferencePair("What is the capital of France?", "Paris.", "I don't know."),
    PreferencePair("What is 2 + 2?", "4. You're welcome!", "Go away."),
    PreferencePair("Name a colour.", "Red.", "See http://example.com"),
]


@pytest.fixture
def rm(tokenizer):
    return RewardModel.from_hf(tiny_hf_reward_model(num_hidden_layers=3), tokenizer)


def test_perfect_sae_keeps_every_reward_and_order(rm):
    result = evaluate_sae(rm, build_perfect_sae("blocks.1.hook_resid_post"), PAIRS, batch_size=2)
    row = result.summary.loc["blocks.1.hook_resid_post"]
    assert row.reward_abs_error <= 1e-4
    assert row.order_kept == 1.0
    assert row.margin_kept_median == pytest.approx(1.0, abs=1e-4)
    assert row.fvu <= 1e-10
    # Each coordinate fires on exactly one of relu(x), relu(-x): L0 = d_in.
    assert row.l0 == pytest.approx(64, abs=0.5)
    assert row.n_pairs == 3


def test_lossy_saes_are_measured(rm):
    tokens = encode_pairs(rm.tokenizer, PAIRS, max_len=128).chosen.tokens
    saes = [sparse_sae_for(rm, "blocks.0.hook_resid_post", tokens, seed=1), sparse_sae_for(rm, "blocks.2.hook_resid_post", tokens, seed=2)]
    result = evaluate_sae(rm, saes, PAIRS, skip_first=False)  # compared with SAELens's splice at every token
    assert list(result.summary.index) == ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post", "all"]
    row = result.summary.loc["blocks.0.hook_resid_post"]
    assert row.fvu > 0.5 and row.reward_abs_error > 1e-2
    assert 0 < row.l0 < 256 and 0 <= row.dead_fraction < 1

    # reward_abs_error and the margins agree with a direct computation.
    from pm_lens.saes import saes_attached
    from pm_lens.scoring import score_pairs

    clean = score_pairs(rm, PAIRS, progress=False)
    with saes_attached(rm, saes[0], use_error_term=False):
        replaced = score_pairs(rm, PAIRS, progress=False)
    expected = (replaced[["chosen_reward", "rejected_reward"]] - clean[["chosen_reward", "rejected_reward"]]).abs().values.mean()
    assert row.reward_abs_error == pytest.approx(expected, rel=1e-4)
    assert result.per_pair["margin_blocks.0.hook_resid_post"].values == pytest.approx(replaced.margin.values, rel=1e-4)
    assert row.order_kept == pytest.approx(((replaced.margin > 0) == (clean.margin > 0)).mean())


def test_fvu_and_l0_match_a_direct_computation(rm):
    sae = build_standard_sae("blocks.1.hook_resid_post", seed=4)
    row = evaluate_sae(rm, sae, PAIRS[:1], skip_first=False).summary.iloc[0]
    batch = encode_pairs(rm.tokenizer, PAIRS[:1], max_len=128)
    xs = []
    for side in (batch.chosen, batch.rejected):
        _, cache = rm.run_with_cache(side.tokens, names_filter="blocks.1.hook_resid_post")
        xs.append(cache["blocks.1.hook_resid_post"][side.attention_mask.bool()])
    x = torch.cat(xs).detach()
    f = sae.encode(x).detach()
    x_hat = sae.decode(f).detach()
    assert row.fvu == pytest.approx(float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()), rel=1e-4)
    assert row.l0 == pytest.approx(float((f != 0).sum(-1).float().mean()), rel=1e-6)


def test_errors(rm):
    with pytest.raises(ValueError, match="no pairs"):
        evaluate_sae(rm, build_perfect_sae("blocks.1.hook_resid_post"), [])
    with pytest.raises(ValueError, match="no SAEs"):
        evaluate_sae(rm, [], PAIRS)


def test_first_token_is_left_out_by_default(rm):
    """One default across pm_lens (SKIP_FIRST): statistics and replacements skip each first token."""
    sae = build_standard_sae("blocks.1.hook_resid_post", seed=4)
    row = evaluate_sae(rm, sae, PAIRS[:1]).summary.iloc[0]
    batch = encode_pairs(rm.tokenizer, PAIRS[:1], max_len=128)
    xs = []
    for side in (batch.chosen, batch.rejected):
        _, cache = rm.run_with_cache(side.tokens, names_filter="blocks.1.hook_resid_post")
        xs.append(cache["blocks.1.hook_resid_post"][0, 1:])  # one row, no padding: all but the first token
    x = torch.cat(xs).detach()
    f = sae.encode(x).detach()
    assert row.n_tokens == x.shape[0]
    assert row.l0 == pytest.approx(float((f != 0).sum(-1).float().mean()), rel=1e-6)
    # The replacement leaves the first token's activation alone: the reward equals a run that
    # reconstructs every position but the first.
    side = batch.chosen

    def replace(act, hook):
        out = sae.decode(sae.encode(act))
        out[:, 0] = act[:, 0]
        return out

    clean = rm.reward(side.tokens, side.attention_mask)
    with rm.hooks(fwd_hooks=[("blocks.1.hook_resid_post", replace)]):
        replaced = rm.reward(side.tokens, side.attention_mask)
    per_pair = evaluate_sae(rm, sae, PAIRS[:1]).per_pair
    rejected = rm.reward(batch.rejected.tokens, batch.rejected.attention_mask)
    with rm.hooks(fwd_hooks=[("blocks.1.hook_resid_post", replace)]):
        rejected_replaced = rm.reward(batch.rejected.tokens, batch.rejected.attention_mask)
    assert per_pair["margin_blocks.1.hook_resid_post"][0] == pytest.approx((replaced - rejected_replaced).item(), rel=1e-4)
    assert per_pair["margin"][0] == pytest.approx((clean - rejected).item(), rel=1e-5)


@pytest.mark.parametrize("positions", ["completion", "diverge"])
def test_positions_restrict_the_tokens_judged_and_replaced(rm, positions):
    """At positions="completion"/"diverge" the statistics cover those tokens only, and the SAE
    replaces the activation there only: the margin equals a hand-made run doing just that."""
    from pm_lens.attribution.positions import pair_masks

    sae = build_standard_sae("blocks.1.hook_resid_post", seed=4)
    result = evaluate_sae(rm, sae, PAIRS, positions=positions, progress=False)
    batch = encode_pairs(rm.tokenizer, PAIRS, max_len=128)
    masks = pair_masks(batch, positions, skip_first=True)
    assert result.summary.iloc[0].n_tokens == sum(int(m.sum()) for m in masks)
    assert result.summary.iloc[0].n_tokens < evaluate_sae(rm, sae, PAIRS, progress=False).summary.iloc[0].n_tokens
    rewards = []
    for side, mask in zip((batch.chosen, batch.rejected), masks):
        def replace(act, hook, mask=mask):
            return torch.where(mask[..., None], sae.decode(sae.encode(act)), act)

        with rm.hooks(fwd_hooks=[("blocks.1.hook_resid_post", replace)]):
            rewards.append(rm.reward(side.tokens, side.attention_mask))
    expected = (rewards[0] - rewards[1]).detach()
    torch.testing.assert_close(torch.tensor(result.per_pair["margin_blocks.1.hook_resid_post"].to_numpy()), expected,
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="positions must be one of"):
        evaluate_sae(rm, sae, PAIRS, positions="prompt")

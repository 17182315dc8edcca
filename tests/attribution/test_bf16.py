"""A bfloat16 PM: the reward head runs in float32, rewards agree with float32 to a stated
tolerance, and the attribution ranking agrees with float32's."""

import copy

import scipy.stats
import torch

from pm_lens import RewardModel, attribute
from pm_lens.data import encode_pairs
from pm_lens.testing import sparse_sae_for, tiny_hf_reward_model
from tests.attribution.conftest import PAIRS

HOOK = "blocks.1.hook_resid_post"


def test_bfloat16_ranking_and_rewards_agree_with_float32(tokenizer):
    hf_model = tiny_hf_reward_model(num_hidden_layers=4)
    full, half = RewardModel.from_hf(hf_model, tokenizer), RewardModel.from_hf(hf_model, tokenizer, dtype="bfloat16")
    assert half.W_E.dtype == torch.bfloat16
    batch = encode_pairs(tokenizer, PAIRS, max_len=128)
    sae = sparse_sae_for(full, HOOK, batch.chosen.tokens, d_sae=256, fire_rate=0.1)
    exact, low = (attribute(rm, PAIRS, saes=[s], progress=False)
                  for rm, s in ((full, sae), (half, copy.deepcopy(sae).to(torch.bfloat16))))
    # The head and the effects are float32; the rewards agree to 2% of their size (seen: 0.6%).
    assert half.reward(batch.chosen.tokens, batch.chosen.attention_mask).dtype == torch.float32
    assert low.chosen.rewards.dtype == low.dense_effects(HOOK).dtype == torch.float32
    scale = float(exact.chosen.rewards.abs().max())
    assert float((exact.chosen.rewards - low.chosen.rewards).abs().max()) <= 0.02 * scale
    # The top 50 features of the float32 ranking keep their order in bfloat16 (seen: Spearman 0.999).
    ranked, ranked_low = exact.ranking().set_index("node"), low.ranking().set_index("node")
    top = ranked.index[:50]
    rho = scipy.stats.spearmanr(ranked.loc[top].effect, ranked_low.reindex(top).effect.fillna(0.0)).statistic
    assert rho >= 0.9

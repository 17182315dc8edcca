"""A RewardModel is a TransformerLens model: hooks, caches and activation patching work on it."""

import pytest
import torch
from transformer_lens import patching

from pm_lens import RewardModel
from pm_lens.data import encode_completions
from pm_lens.testing import tiny_hf_reward_model


@pytest.fixture
def rm(tokenizer):
    return RewardModel.from_hf(tiny_hf_reward_model("GPTJForSequenceClassification"), tokenizer)


def encode(tokenizer, texts):
    return encode_completions(tokenizer, [""] * len(texts), texts, max_len=128)


def test_run_with_cache_has_the_usual_hooks(rm, tokenizer):
    enc = encode(tokenizer, ["The capital of France is Paris."])
    rewards, cache = rm.run_with_cache(enc.tokens)
    for name in ["hook_embed", "blocks.0.hook_resid_pre", "blocks.0.attn.hook_pattern", "blocks.1.mlp.hook_post",
                 "blocks.1.hook_resid_post", "ln_final.hook_normalized"]:
        assert name in cache, name
    assert rewards.shape == (1, enc.tokens.shape[1], 1)
    # The cache is the computation: the reward is the head applied to the final normalised stream.
    recomputed = cache["ln_final.hook_normalized"] @ rm.W_U + rm.b_U
    assert torch.allclose(recomputed, rewards, atol=1e-5)


def test_activation_patching_matches_what_patching_means(rm, tokenizer):
    # Same length, one differing token: the patching results are known exactly.
    enc = encode(tokenizer, ["Paris is big.", "Paros is big."])
    clean, corrupted = enc.tokens[:1], enc.tokens[1:]
    (diff,) = (clean[0] != corrupted[0]).nonzero()[0].tolist()
    clean_reward, corrupted_reward = rm.reward(clean)[0], rm.reward(corrupted)[0]
    assert not torch.isclose(clean_reward, corrupted_reward, atol=1e-3)
    _, clean_cache = rm.run_with_cache(clean)

    results = patching.get_act_patch_resid_pre(rm, corrupted, clean_cache, lambda out: out[0, -1, 0])

    assert results.shape == (rm.cfg.n_layers, clean.shape[1])
    # Before the differing token the two runs are identical: patching there changes nothing.
    assert torch.allclose(results[:, :diff], corrupted_reward, atol=1e-5)
    # At layer 0 the differing position's residual is its embedding: patching it makes the input clean.
    assert torch.isclose(results[0, diff], clean_reward, atol=1e-5)


def test_hooks_can_change_the_reward(rm, tokenizer):
    enc = encode(tokenizer, ["Thank you. My pleasure."])
    base = rm.reward(enc.tokens)

    def zero_last_mlp(act, hook):
        return torch.zeros_like(act)

    with rm.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", zero_last_mlp)]):
        patched = rm.reward(enc.tokens)
    assert not torch.isclose(base, patched).all()
    assert torch.equal(rm.reward(enc.tokens), base)  # hooks are removed afterwards

"""copy.deepcopy(rm) is an independent model: it runs its own weights, hooks and SAEs.

SAELens wraps each MLP's forward in a closure over the original module (to add ``mlp.hook_in``);
a plain deep copy would share it, so a copy's MLPs would run the original's weights.
"""

import copy

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig, Transcoder, TranscoderConfig
from sae_lens.saes.sae import SAEMetadata

from pm_lens import RewardModel
from pm_lens.testing import tiny_hf_reward_model

# A gated MLP stored as the forward reads it (Llama) and a parallel attention+MLP block (GPT-J).
ARCHS = ["LlamaForSequenceClassification", "GPTJForSequenceClassification"]
TEXTS = ["The capital of France is Paris.", "I don't know.", "Hi there"]


@pytest.fixture(params=ARCHS)
def rm(request, tokenizer):
    return RewardModel.from_hf(tiny_hf_reward_model(request.param), tokenizer)


def batch(rm):
    enc = rm.tokenizer(TEXTS, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def rewards(rm):
    with torch.no_grad():
        return rm.reward(*batch(rm))


def edit(param):
    with torch.no_grad():
        param.mul_(-2.0)  # in place: keeps the stored layout


def test_copy_runs_its_own_weights(rm):
    original = rewards(rm)
    copied = copy.deepcopy(rm)
    assert torch.equal(rewards(copied), original)
    for (name, param), (_, original_param) in zip(copied.named_parameters(), rm.named_parameters()):
        assert param.data_ptr() != original_param.data_ptr(), name
        assert param.stride() == original_param.stride(), name  # still stored as the forward reads it

    mlp_copy = copy.deepcopy(rm)
    edit(mlp_copy.blocks[0].mlp.W_out)
    assert (rewards(mlp_copy) - original).abs().max() > 1e-2  # the copy runs its edited MLP
    assert torch.equal(rewards(rm), original)  # the original does not see the edit

    attn_copy = copy.deepcopy(rm)
    edit(attn_copy.blocks[1].attn.W_O)
    assert (rewards(attn_copy) - original).abs().max() > 1e-2
    assert torch.equal(rewards(rm), original)

    # Editing the original now leaves an earlier copy alone, too.
    fresh = copy.deepcopy(rm)
    edit(rm.blocks[1].mlp.W_in)
    assert torch.equal(rewards(fresh), original)


def test_mlp_hook_in_hooks_fire_on_the_copy(rm):
    copied = copy.deepcopy(rm)
    fired = []

    def zero_mlp_input(x, hook):
        fired.append(hook.name)
        return torch.zeros_like(x)

    tokens, mask = batch(rm)
    with torch.no_grad():
        hooked = copied.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[("blocks.0.mlp.hook_in", zero_mlp_input)])
    assert fired == ["blocks.0.mlp.hook_in"]
    assert (hooked - copied(tokens, attention_mask=mask)).abs().max() > 1e-3  # the hook's output is used
    # The original's hook point is its own: a hook there fires on the original only.
    fired.clear()
    with torch.no_grad():
        rm.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[("blocks.0.mlp.hook_in", zero_mlp_input)])
        copied(tokens, attention_mask=mask)
    assert fired == ["blocks.0.mlp.hook_in"]


def random_sae(hook_name, d_in, seed):
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=32, metadata=SAEMetadata(hook_name=hook_name)))
    with torch.no_grad():
        sae.W_enc.normal_(0, d_in**-0.5)
        sae.W_dec.normal_(0, 32**-0.5)
    return sae


def test_copy_keeps_attributes_and_attached_saes(rm):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_in"]
    for seed, hook in enumerate(hooks):
        rm.add_sae(random_sae(hook, rm.cfg.d_model, seed), use_error_term=False)
    original = rewards(rm)
    copied = copy.deepcopy(rm)
    assert copied.processing == rm.processing and copied.hf_architecture == rm.hf_architecture
    assert copied.pad_token_id == rm.pad_token_id == 0
    assert copied.tokenizer(TEXTS[0])["input_ids"] == rm.tokenizer(TEXTS[0])["input_ids"]
    assert sorted(copied.acts_to_saes) == sorted(hooks)
    assert torch.equal(rewards(copied), original)
    for hook in hooks:
        copied_sae, sae = copied.acts_to_saes[hook], rm.acts_to_saes[hook]
        assert copied_sae is not sae and torch.equal(copied_sae.W_dec, sae.W_dec)
        edited = copy.deepcopy(copied)
        edit(edited.acts_to_saes[hook].W_dec)
        assert (rewards(edited) - original).abs().max() > 1e-3, hook  # the copy runs its own SAE
        assert torch.equal(rewards(rm), original), hook


def test_a_model_with_a_transcoder_is_not_copied(rm):
    metadata = SAEMetadata(hook_name="blocks.0.mlp.hook_in", hook_name_out="blocks.0.hook_mlp_out")
    config = TranscoderConfig(d_in=rm.cfg.d_model, d_sae=16, d_out=rm.cfg.d_model, apply_b_dec_to_input=False,
                              metadata=metadata)
    rm.add_sae(Transcoder(config))
    with pytest.raises(ValueError, match=r"cannot deep-copy a RewardModel with transcoders attached "
                                         r"\(\['blocks\.0\.mlp\.hook_in'\]\).*reset_saes\(\)"):
        copy.deepcopy(rm)

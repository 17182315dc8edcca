import pytest
import torch

from pm_lens import PreferencePair, RewardModel
from pm_lens.data import encode_pairs
from pm_lens.testing import tiny_hf_reward_model
from tests.saes.helpers import sparse_sae_for

PAIRS = [
    PreferencePair("What is 2+2?", "4, you're welcome!", "I don't know."),
    PreferencePair("Capital of France?", "Paris.", "London, see http://x.com"),
    PreferencePair("Name a colour.", "Red, thanks!", "Go away, you idiot."),
]
HOOKS = ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"]


@pytest.fixture
def rm(tokenizer):
    return RewardModel.from_hf(tiny_hf_reward_model(num_hidden_layers=4), tokenizer)


@pytest.fixture
def pairs():
    return list(PAIRS)


@pytest.fixture
def saes(rm):
    batch = encode_pairs(rm.tokenizer, PAIRS, max_len=128)
    tokens = torch.cat([batch.chosen.tokens, batch.rejected.tokens[:, : batch.chosen.tokens.shape[1]]])
    return [sparse_sae_for(rm, hook, tokens, seed=i, d_sae=128) for i, hook in enumerate(HOOKS)]

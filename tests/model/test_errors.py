"""Bad input a user can give gets a clear error naming the value and what is allowed."""

import pytest
import torch
import transformers

from pm_lens import RewardModel
from pm_lens.model import ARCHITECTURES
from pm_lens.testing import tiny_hf_reward_model


@pytest.fixture
def rm(tokenizer):
    return RewardModel.from_hf(tiny_hf_reward_model(), tokenizer)


def test_unsupported_architecture_lists_supported_ones():
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=50, num_labels=1)
    with pytest.raises(ValueError, match="BertForSequenceClassification") as err:
        RewardModel.from_hf(transformers.BertForSequenceClassification(config))
    for arch in ARCHITECTURES:
        assert arch in str(err.value)


def test_causal_lm_is_not_a_reward_model():
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                      vocab_size=50)
    with pytest.raises(ValueError, match="unsupported reward-model architecture 'LlamaForCausalLM'"):
        RewardModel.from_hf(transformers.LlamaForCausalLM(config))


def test_several_labels_are_refused():
    with pytest.raises(ValueError, match="num_labels=2"):
        RewardModel.from_hf(tiny_hf_reward_model(num_labels=2))


def test_nan_weights_are_named():
    hf_model = tiny_hf_reward_model()
    with torch.no_grad():
        hf_model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite weights in blocks\.1\.mlp\.W_in"):
        RewardModel.from_hf(hf_model)


def test_non_finite_reward_is_reported(rm):
    with torch.no_grad():
        rm.unembed.b_U.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match=r"sequences \[0, 1\]"):
        rm.reward(torch.ones(2, 5, dtype=torch.long))


@pytest.mark.parametrize(
    "tokens, message",
    [
        (torch.tensor([[5, 6, 500]]), r"token id 500 is outside the vocabulary \[0, 104\)"),
        (torch.tensor([[5, -1]]), r"token id -1 is outside the vocabulary"),
        (torch.ones(1, 129, dtype=torch.long), r"sequence length 129 exceeds the model's context n_ctx=128"),
        (torch.ones(3, dtype=torch.long), r"tokens must be \[batch, pos\]"),
        (torch.ones(2, 0, dtype=torch.long), r"tokens are empty"),
    ],
)
def test_bad_tokens(rm, tokens, message):
    if tokens.ndim == 2:  # a 1-d input is already refused by the jaxtyping check the tests run with
        with pytest.raises(ValueError, match=message):
            rm.reward(tokens)
    with pytest.raises(ValueError, match=message):
        rm(tokens)  # the forward itself checks, so hooks and caches get the same message


def test_mask_of_wrong_shape(rm):
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 4\) differs from tokens shape \(2, 5\)"):
        rm(torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4, dtype=torch.long))


def test_all_padding_row(rm):
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    with pytest.raises(ValueError, match=r"sequences \[1\] of the batch have no tokens"):
        rm.reward(torch.ones(2, 3, dtype=torch.long), mask)


def test_n_ctx_is_capped_and_can_be_set(tokenizer):
    hf_model = tiny_hf_reward_model(max_position_embeddings=1 << 20)
    assert RewardModel.from_hf(hf_model).cfg.n_ctx == 4096
    assert RewardModel.from_hf(hf_model, n_ctx=256).cfg.n_ctx == 256

"""RewardModel rewards equal Hugging Face's, for every supported architecture."""

import pytest
import torch

from pm_lens import RewardModel
from pm_lens.data import encode_completions
from pm_lens.model import ARCHITECTURES
from pm_lens.testing import tiny_hf_reward_model
from tests.model.helpers import TEXTS

# (architecture, config overrides): every architecture, plus the variants that change the maths.
CASES = [(arch, {}) for arch in ARCHITECTURES] + [
    ("LlamaForSequenceClassification", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 16}}),
    ("MistralForSequenceClassification", {"sliding_window": 8}),
    ("GPTNeoXForSequenceClassification", {"use_parallel_residual": False}),
    ("LlamaForSequenceClassification", {"num_key_value_heads": 4}),
]
IDS = [f"{arch.removesuffix('ForSequenceClassification')}{'-' + '-'.join(o) if o else ''}" for arch, o in CASES]


def hf_rewards_one_by_one(hf_model, tokenizer) -> torch.Tensor:
    """The reference: each text alone, no padding, so nothing depends on how HF handles pads."""
    with torch.no_grad():
        return torch.stack([hf_model(torch.tensor([tokenizer(t)["input_ids"]])).logits[0, 0] for t in TEXTS])


def batch(tokenizer, padding_side):
    return encode_completions(tokenizer, [""] * len(TEXTS), TEXTS, max_len=128, padding_side=padding_side)


def raw_batch(tokenizer, padding_side):
    tokenizer.padding_side = padding_side
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("arch, overrides", CASES, ids=IDS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_rewards_match_hugging_face(arch, overrides, padding_side, tokenizer):
    hf_model = tiny_hf_reward_model(arch, **overrides)
    rm = RewardModel.from_hf(hf_model, tokenizer)
    tokens, mask = raw_batch(tokenizer, padding_side)
    assert tokens.shape[1] > 8  # longer than the sliding windows above, so they matter

    expected = hf_rewards_one_by_one(hf_model, tokenizer)
    rewards = rm.reward(tokens, mask)

    assert expected.abs().max() > 0.5  # a reward head that is not ~0, so the check means something
    assert (rewards - expected).abs().max() <= 1e-4
    assert rm.processing.fold_ln and rm.processing.center_writing_weights and not rm.processing.center_unembed


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_right_padded_batch_matches_hf_batch(arch, tokenizer):
    """HF's own padded forward (pooling at the last non-pad token) agrees too."""
    hf_model = tiny_hf_reward_model(arch)
    rm = RewardModel.from_hf(hf_model, tokenizer)
    tokens, mask = raw_batch(tokenizer, "right")
    with torch.no_grad():
        expected = hf_model(tokens, attention_mask=mask).logits[:, 0]
    # No mask: pooling falls back to the pad id, as HF does.
    assert (rm.reward(tokens) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ["GPTJForSequenceClassification", "Gemma2ForSequenceClassification"])
def test_parity_without_weight_processing(arch, tokenizer):
    hf_model = tiny_hf_reward_model(arch)
    rm = RewardModel.from_hf(hf_model, tokenizer, fold_ln=False, center_writing_weights=False, fold_value_biases=False)
    tokens, mask = raw_batch(tokenizer, "left")
    assert (rm.reward(tokens, mask) - hf_rewards_one_by_one(hf_model, tokenizer)).abs().max() <= 1e-4
    assert not rm.processing.fold_ln and not rm.processing.fold_value_biases


def test_score_bias_becomes_unembed_bias(tokenizer):
    hf_model = tiny_hf_reward_model("GPT2ForSequenceClassification")
    hf_model.score = torch.nn.Linear(hf_model.config.n_embd, 1, bias=True)
    with torch.no_grad():
        hf_model.score.bias.fill_(3.0)
    rm = RewardModel.from_hf(hf_model, tokenizer)
    tokens, mask = raw_batch(tokenizer, "right")
    assert (rm.reward(tokens, mask) - hf_rewards_one_by_one(hf_model, tokenizer)).abs().max() <= 1e-4


def test_forward_returns_reward_at_every_position(tokenizer):
    rm = RewardModel.from_hf(tiny_hf_reward_model(), tokenizer)
    enc = batch(tokenizer, "right")
    per_position = rm(enc.tokens, attention_mask=enc.attention_mask)
    assert per_position.shape == (*enc.tokens.shape, 1)
    last = enc.attention_mask.sum(-1) - 1
    assert torch.allclose(per_position[torch.arange(len(TEXTS)), last, 0], rm.reward(enc.tokens, enc.attention_mask))


def test_dtype_and_device_arguments(tokenizer):
    hf_model = tiny_hf_reward_model()
    rm = RewardModel.from_hf(hf_model, tokenizer, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in rm.parameters()} == {torch.bfloat16}
    tokens, mask = raw_batch(tokenizer, "left")
    expected = hf_rewards_one_by_one(hf_model, tokenizer)
    rewards = rm.reward(tokens, mask).float()
    # bfloat16 keeps ~3 significant digits; the check is that it is the same function.
    assert (rewards - expected).abs().max() <= 0.05 * expected.abs().max()


def test_from_pretrained_reads_a_local_directory_offline(tmp_path, tokenizer):
    hf_model = tiny_hf_reward_model("GPTNeoXForSequenceClassification")
    hf_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    rm = RewardModel.from_pretrained(tmp_path)
    assert rm.tokenizer is not None and rm.hf_architecture == "GPTNeoXForSequenceClassification"
    tokens, mask = raw_batch(rm.tokenizer, "left")
    assert (rm.reward(tokens, mask) - hf_rewards_one_by_one(hf_model, tokenizer)).abs().max() <= 1e-4
    with pytest.raises(OSError, match="cannot load a reward model from '.*missing'"):
        RewardModel.from_pretrained(tmp_path / "missing")


def test_weights_are_stored_as_the_forward_reads_them(tokenizer):
    """No per-forward weight copies (see benchmarks/forward_overhead.py): the gated MLP weights are
    stored transposed, W_O flattened and Q/K/V per head transposed, with the same values."""
    rm = RewardModel.from_hf(tiny_hf_reward_model(), tokenizer)
    mlp, attn = rm.blocks[0].mlp, rm.blocks[0].attn
    assert all(getattr(mlp, n).T.is_contiguous() for n in ("W_gate", "W_in", "W_out"))
    n_heads, d_head, d_model = attn.W_O.shape
    assert attn.W_O.reshape(n_heads * d_head, d_model).T.is_contiguous()
    assert attn.W_Q.transpose(1, 2).is_contiguous() and attn._W_K.transpose(1, 2).is_contiguous()

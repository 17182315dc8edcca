"""What differs between the Hugging Face reward-model architectures pm_lens supports.

One table, :data:`ARCHITECTURES`, maps a ``*ForSequenceClassification`` class name to an
:class:`ArchitectureSpec`: how to read a TransformerLens config out of the HF config, which
TransformerLens weight converter to use, and where the classifier keeps its transformer body.
Everything architecture-specific lives here; the rest of pm_lens never branches on architecture.

The TransformerLens converters were written for causal LMs: they look for the body under an
attribute such as ``model`` or ``transformer`` and for an ``lm_head``. A classifier has the same
body and a ``score`` head instead, so :func:`causal_lm_view` presents the classifier under the
names the converter expects. The converters' unembedding is then replaced by the reward head.

:func:`is_causal_lm` recognises the causal-LM class names (``*ForCausalLM``, ``GPT2LMHeadModel``),
so that a causal LM offered as a reward model is called what it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import torch
from transformer_lens.pretrained.weight_conversions import (
    convert_gemma_weights,
    convert_gpt2_weights,
    convert_gptj_weights,
    convert_llama_weights,
    convert_mistral_weights,
    convert_neox_weights,
    convert_qwen2_weights,
)

# TransformerLens allocates an [n_ctx, n_ctx] causal mask in every attention layer, so a
# 128k-token context would need gigabytes. Reward-model inputs are short; users can raise it.
DEFAULT_MAX_N_CTX = 4096

# Every supported classifier keeps its reward head in ``score`` (a Linear with num_labels outputs).
HEAD_ATTR = "score"


@dataclass(frozen=True)
class ArchitectureSpec:
    """How one HF reward-model architecture maps onto TransformerLens.

    Attributes:
        body_attr: attribute of the classifier that holds the transformer body
            (``model``, ``transformer``, ``gpt_neox``).
        tl_config: reads the TransformerLens config fields from the HF config.
        convert: the TransformerLens weight converter for the matching causal LM.
        processing: weight processing that keeps parity for this architecture
            (keyword arguments of ``load_and_process_state_dict``).
    """

    body_attr: str
    tl_config: Callable[[Any], dict[str, Any]]
    convert: Callable[[Any, Any], dict[str, torch.Tensor]]
    processing: dict[str, bool]


def _rope(hf_config: Any, key: str, default: float) -> float:
    """A rope setting: transformers 5 keeps them in ``rope_parameters``, older releases at top level."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if key in params and params[key] is not None:
        return params[key]
    legacy = {"partial_rotary_factor": "rotary_pct"}.get(key, key)
    value = getattr(hf_config, legacy, None)
    return default if value is None else value


def _head_dim(hf_config: Any) -> int:
    head_dim = getattr(hf_config, "head_dim", None)
    return head_dim if head_dim else hf_config.hidden_size // hf_config.num_attention_heads


def _gqa_heads(hf_config: Any) -> int | None:
    # TransformerLens treats any non-None value as grouped-query attention.
    n_kv = getattr(hf_config, "num_key_value_heads", None)
    return None if n_kv in (None, hf_config.num_attention_heads) else n_kv


def _llama_like(hf_config: Any) -> dict[str, Any]:
    """Llama, Mistral and Qwen2 share this layout (RMSNorm, rotary, gated MLP)."""
    d_head = _head_dim(hf_config)
    cfg = {
        "d_model": hf_config.hidden_size,
        "d_head": d_head,
        "n_heads": hf_config.num_attention_heads,
        "n_key_value_heads": _gqa_heads(hf_config),
        "d_mlp": hf_config.intermediate_size,
        "n_layers": hf_config.num_hidden_layers,
        "n_ctx": hf_config.max_position_embeddings,
        "eps": hf_config.rms_norm_eps,
        "d_vocab": hf_config.vocab_size,
        "act_fn": getattr(hf_config, "hidden_act", None) or getattr(hf_config, "hidden_activation", None),
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_adjacent_pairs": False,
        "rotary_dim": d_head,
        "rotary_base": _rope(hf_config, "rope_theta", 10000.0),
        "final_rms": True,
        "gated_mlp": True,
    }
    params = getattr(hf_config, "rope_parameters", None) or {}
    if params.get("rope_type") == "llama3":
        cfg |= {
            "use_NTK_by_parts_rope": True,
            "NTK_original_ctx_len": params["original_max_position_embeddings"],
            "NTK_by_parts_low_freq_factor": params["low_freq_factor"],
            "NTK_by_parts_high_freq_factor": params["high_freq_factor"],
            "NTK_by_parts_factor": params["factor"],
        }
    return cfg


def _mistral(hf_config: Any) -> dict[str, Any]:
    cfg = _llama_like(hf_config)
    window = getattr(hf_config, "sliding_window", None)
    if window:
        cfg |= {"use_local_attn": True, "window_size": window, "attn_types": ["local"] * cfg["n_layers"]}
    return cfg


def _gemma2(hf_config: Any) -> dict[str, Any]:
    cfg = _llama_like(hf_config)
    n_layers = hf_config.num_hidden_layers
    # HF marks each layer "sliding_attention" or "full_attention"; older configs alternate,
    # starting with a sliding layer.
    layer_types = getattr(hf_config, "layer_types", None) or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)
    ]
    cfg |= {
        "act_fn": hf_config.hidden_activation,
        "attn_scale": hf_config.query_pre_attn_scalar**0.5,
        "attn_scores_soft_cap": hf_config.attn_logit_softcapping or -1.0,
        # Gemma2ForSequenceClassification applies no final soft-cap to the score.
        "output_logits_soft_cap": -1.0,
        "use_local_attn": True,
        "window_size": hf_config.sliding_window,
        "attn_types": ["local" if t == "sliding_attention" else "global" for t in layer_types],
        "use_normalization_before_and_after": True,
    }
    return cfg


def _gpt_neox(hf_config: Any) -> dict[str, Any]:
    d_head = hf_config.hidden_size // hf_config.num_attention_heads
    return {
        "d_model": hf_config.hidden_size,
        "d_head": d_head,
        "n_heads": hf_config.num_attention_heads,
        "d_mlp": hf_config.intermediate_size,
        "n_layers": hf_config.num_hidden_layers,
        "n_ctx": hf_config.max_position_embeddings,
        "eps": hf_config.layer_norm_eps,
        "d_vocab": hf_config.vocab_size,
        "act_fn": hf_config.hidden_act,
        "parallel_attn_mlp": hf_config.use_parallel_residual,
        "positional_embedding_type": "rotary",
        "rotary_adjacent_pairs": False,
        "rotary_dim": round(_rope(hf_config, "partial_rotary_factor", 1.0) * d_head),
        "rotary_base": _rope(hf_config, "rope_theta", 10000.0),
        "normalization_type": "LN",
    }


def _gptj(hf_config: Any) -> dict[str, Any]:
    return {
        "d_model": hf_config.n_embd,
        "d_head": hf_config.n_embd // hf_config.n_head,
        "n_heads": hf_config.n_head,
        "d_mlp": hf_config.n_inner or 4 * hf_config.n_embd,
        "n_layers": hf_config.n_layer,
        "n_ctx": hf_config.n_positions,
        "eps": hf_config.layer_norm_epsilon,
        "d_vocab": hf_config.vocab_size,
        "act_fn": hf_config.activation_function,
        "parallel_attn_mlp": True,
        "positional_embedding_type": "rotary",
        "rotary_dim": hf_config.rotary_dim or hf_config.n_embd // hf_config.n_head,
        "rotary_adjacent_pairs": True,
        "normalization_type": "LN",
    }


def _gpt2(hf_config: Any) -> dict[str, Any]:
    return {
        "d_model": hf_config.n_embd,
        "d_head": hf_config.n_embd // hf_config.n_head,
        "n_heads": hf_config.n_head,
        "d_mlp": hf_config.n_inner or 4 * hf_config.n_embd,
        "n_layers": hf_config.n_layer,
        "n_ctx": hf_config.n_positions,
        "eps": hf_config.layer_norm_epsilon,
        "d_vocab": hf_config.vocab_size,
        "act_fn": hf_config.activation_function,
        "use_attn_scale": hf_config.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": hf_config.scale_attn_by_inverse_layer_idx,
        "normalization_type": "LN",
    }


# Folding LayerNorm scales into the next weights, centring the weights that write to the
# residual stream and folding value biases are exact up to float rounding for all of these
# (checked by tests/model/test_parity.py). Centring the unembed is never done: with one output
# it would zero the reward head.
_PROCESSING = {"fold_ln": True, "center_writing_weights": True, "fold_value_biases": True}

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "GPTNeoXForSequenceClassification": ArchitectureSpec("gpt_neox", _gpt_neox, convert_neox_weights, _PROCESSING),
    "GPTJForSequenceClassification": ArchitectureSpec("transformer", _gptj, convert_gptj_weights, _PROCESSING),
    "LlamaForSequenceClassification": ArchitectureSpec("model", _llama_like, convert_llama_weights, _PROCESSING),
    "Gemma2ForSequenceClassification": ArchitectureSpec("model", _gemma2, convert_gemma_weights, _PROCESSING),
    "Qwen2ForSequenceClassification": ArchitectureSpec("model", _llama_like, convert_qwen2_weights, _PROCESSING),
    "MistralForSequenceClassification": ArchitectureSpec("model", _mistral, convert_mistral_weights, _PROCESSING),
    "GPT2ForSequenceClassification": ArchitectureSpec("transformer", _gpt2, convert_gpt2_weights, _PROCESSING),
}


def is_causal_lm(architecture: str) -> bool:
    """Whether an HF class name is a causal LM (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return architecture.endswith(("ForCausalLM", "LMHeadModel")) or architecture in set(
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    )


def spec_for(architecture: str) -> ArchitectureSpec:
    """The spec of an HF architecture name, or a ValueError listing the supported ones."""
    if architecture not in ARCHITECTURES:
        what = (
            " (a causal LM, not a reward model: pm_lens needs a *ForSequenceClassification with a one-output head)"
            if is_causal_lm(architecture)
            else ""
        )
        raise ValueError(
            f"unsupported reward-model architecture {architecture!r}{what}; pm_lens supports "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[architecture]


def causal_lm_view(hf_model: torch.nn.Module, spec: ArchitectureSpec) -> SimpleNamespace:
    """Present a classifier under the attribute names a causal-LM weight converter reads.

    The converters read the body (``model``/``transformer``/``gpt_neox``) and ``lm_head``;
    the classifier's ``score`` stands in for the LM head (its values are replaced later, but
    the Gemma converter would otherwise silently fall back to the tied embedding).
    """
    score = getattr(hf_model, HEAD_ATTR)
    bias = score.bias if score.bias is not None else torch.zeros(score.out_features, dtype=score.weight.dtype)
    head = SimpleNamespace(weight=score.weight, bias=bias)
    return SimpleNamespace(**{spec.body_attr: getattr(hf_model, spec.body_attr), "lm_head": head})

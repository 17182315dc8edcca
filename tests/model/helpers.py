"""Checkpoint folders of the kinds a user might hand to ``RewardModel.from_pretrained`` by mistake."""

import transformers
from safetensors.torch import load_file, save_file

from pm_lens.testing import CHAR_VOCAB

# Texts whose rewards parity tests compare: plain, short, repeated phrases, a URL.
TEXTS = [
    "The capital of France is Paris.",
    "I don't know.",
    "Thank you. No problem. My pleasure. You're welcome.",
    "Hi",
    "See http://example.com for more details on this question.",
]

# Tiny causal LMs as people save them: transformers' default config, so num_labels=2 unless set.
CAUSAL_LMS = {
    "LlamaForCausalLM": ("LlamaConfig", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, max_position_embeddings=64)),
    "GPT2LMHeadModel": ("GPT2Config", dict(n_embd=32, n_layer=1, n_head=2, n_positions=64)),
}


def save_causal_lm(folder, architecture="LlamaForCausalLM", **overrides):
    """Save a random tiny causal LM of ``architecture`` into ``folder`` with ``save_pretrained``."""
    config_name, fields = CAUSAL_LMS[architecture]
    config = getattr(transformers, config_name)(**(fields | {"vocab_size": len(CHAR_VOCAB)} | overrides))
    getattr(transformers, architecture)(config).save_pretrained(folder)
    return folder


def drop_from_checkpoint(folder, keys, add=None):
    """Rewrite the folder's single ``model.safetensors`` without ``keys`` (and with ``add``)."""
    path = folder / "model.safetensors"
    weights = {k: v for k, v in load_file(path).items() if k not in keys}
    save_file(weights | (add or {}), path, metadata={"format": "pt"})

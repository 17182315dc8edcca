"""Every row of the Errors table in docs/loading.md does what the row says.

The rows are read from the docs: a row without a case here, or a case without a row, fails. Each
case raises the exception type named in the row's second column, with the content the row promises.
"""

import builtins
import re
from pathlib import Path

import pytest
import torch
import transformers

from pm_lens import RewardModel
from pm_lens.data import encode_completions
from pm_lens.model import ARCHITECTURES
from pm_lens.testing import tiny_hf_reward_model
from tests.model.helpers import drop_from_checkpoint, save_causal_lm

DOCS = Path(__file__).parents[2] / "docs" / "loading.md"
SUPPORTED = [re.escape(arch) for arch in ARCHITECTURES]


def documented_rows() -> dict[str, str]:
    """``{input: what happens}`` for each row of the Errors table."""
    section = DOCS.read_text().split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip().strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): cells[1].strip() for cells in rows[1:]}  # rows[0] is the header


def bert(tmp_path, tokenizer):
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=50, num_labels=1)
    RewardModel.from_hf(transformers.BertForSequenceClassification(config))


def causal_lm_object(tmp_path, tokenizer):
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                      vocab_size=50)
    RewardModel.from_hf(transformers.LlamaForCausalLM(config))


def causal_lm_folder(tmp_path, tokenizer):
    RewardModel.from_pretrained(save_causal_lm(tmp_path / "causal-lm", "GPT2LMHeadModel"))  # num_labels=2


def headless_folder(tmp_path, tokenizer):
    folder = tmp_path / "headless"
    tiny_hf_reward_model().save_pretrained(folder)
    drop_from_checkpoint(folder, {"score.weight"})
    RewardModel.from_pretrained(folder)


def bodyless_folder(tmp_path, tokenizer):
    folder = tmp_path / "bodyless"
    tiny_hf_reward_model().save_pretrained(folder)
    drop_from_checkpoint(folder, {"model.norm.weight", "model.layers.0.mlp.up_proj.weight"})
    RewardModel.from_pretrained(folder)


def nan_weights(tmp_path, tokenizer):
    hf_model = tiny_hf_reward_model()
    with torch.no_grad():
        hf_model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    RewardModel.from_hf(hf_model)


def rm(tokenizer):
    return RewardModel.from_hf(tiny_hf_reward_model(), tokenizer)


def bad_masks(tmp_path, tokenizer):
    model = rm(tokenizer)
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 4\) differs from tokens shape \(2, 5\)"):
        model(torch.ones(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4, dtype=torch.long))
    model.reward(torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 1], [0, 0, 0]]))


def infinite_reward(tmp_path, tokenizer):
    model = rm(tokenizer)
    with torch.no_grad():
        model.unembed.b_U.fill_(float("inf"))
    model.reward(torch.ones(2, 5, dtype=torch.long))


def tokenizer_without_pad(tmp_path, tokenizer):
    """Not an error: padding with eos, and a mask that makes the padding irrelevant."""
    tokenizer.pad_token = None
    enc = encode_completions(tokenizer, ["", ""], ["Hi", "Hello there"], max_len=128)
    assert enc.tokens[0, -1] == tokenizer.eos_token_id and enc.attention_mask[0, -1] == 0
    model = rm(tokenizer)
    alone = model.reward(encode_completions(tokenizer, [""], ["Hi"], max_len=128).tokens)
    assert torch.allclose(model.reward(enc.tokens, enc.attention_mask)[0], alone[0], atol=1e-5)


# documented input -> (what raises it, regexes its message must match); None: no exception.
CASES = {
    "unsupported architecture": (bert, ["unsupported reward-model architecture 'BertForSequenceClassification'",
                                        *SUPPORTED]),
    "a causal LM given to `from_hf`": (causal_lm_object, [r"'LlamaForCausalLM' \(a causal LM, not a reward model",
                                                          *SUPPORTED]),
    "a causal-LM folder given to `from_pretrained` (any `num_labels`)": (
        causal_lm_folder,
        [r"'.*causal-lm' holds a causal LM \(GPT2LMHeadModel\), not a reward model", r"\(score\.weight would be",
         r"RewardModel\.from_hf"],
    ),
    "a checkpoint without its reward head": (
        headless_folder, [r"the reward head of '.*headless' is not in its checkpoint \(score\.weight would be",
                          r"RewardModel\.from_hf"],
    ),
    "a checkpoint missing body weights": (
        bodyless_folder, [r"'.*bodyless' lacks 2 weight\(s\) of the transformer body",
                          r"model\.layers\.0\.mlp\.up_proj\.weight, model\.norm\.weight"],
    ),
    "not a local folder, and a hub name that is not cached": (
        lambda tmp_path, tokenizer: RewardModel.from_pretrained(tmp_path / "missing"),
        [r"cannot load a reward model from '.*missing'"],
    ),
    "`num_labels != 1`": (lambda tmp_path, tokenizer: RewardModel.from_hf(tiny_hf_reward_model(num_labels=2)),
                          ["num_labels=2"]),
    '`dtype` that is not a floating dtype (`"int8"`, `"fp33"`, `torch.int64`)': (
        lambda tmp_path, tokenizer: RewardModel.from_hf(tiny_hf_reward_model(), dtype="fp33"),
        [r"dtype 'fp33' is not a floating dtype", r"allowed: 'float32' \(float/fp32\), 'bfloat16' \(bf16\)"],
    ),
    "`device` that is not a device, or not on this machine": (
        lambda tmp_path, tokenizer: RewardModel.from_hf(tiny_hf_reward_model(), device="cdua"),
        [r"device 'cdua' is not a device; use 'cpu', 'cuda'"],
    ),
    "NaN/inf weights": (nan_weights, [r"NaN or infinite weights in blocks\.1\.mlp\.W_in"]),
    "token id outside the vocabulary": (lambda tmp_path, tokenizer: rm(tokenizer).reward(torch.tensor([[5, 500]])),
                                        [r"token id 500 is outside the vocabulary \[0, 104\)"]),
    "sequence longer than `n_ctx`": (lambda tmp_path, tokenizer: rm(tokenizer)(torch.ones(1, 129, dtype=torch.long)),
                                     [r"sequence length 129 exceeds the model's context n_ctx=128"]),
    "attention mask of another shape, an all-padding row": (bad_masks, [r"sequences \[1\] of the batch have no tokens"]),
    "NaN/inf reward": (infinite_reward, [r"non-finite reward for sequences \[0, 1\]"]),
    "tokenizer without a pad token": (tokenizer_without_pad, None),
}


def test_every_documented_row_has_a_case():
    assert sorted(documented_rows()) == sorted(CASES)


@pytest.mark.parametrize("row", list(documented_rows()))
def test_documented_error(row, tmp_path, tokenizer):
    trigger, fragments = CASES[row]
    documented = re.findall(r"`(\w+Error)`", documented_rows()[row])
    if fragments is None:
        assert not documented, f"{row!r} documents {documented} but its case expects no error"
        trigger(tmp_path, tokenizer)
        return
    assert len(documented) == 1, f"{row!r} should name one exception type, names {documented}"
    with pytest.raises(getattr(builtins, documented[0])) as err:
        trigger(tmp_path, tokenizer)
    message = str(err.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert re.search(fragment, message), (fragment, message)

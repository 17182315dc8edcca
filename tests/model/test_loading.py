"""from_pretrained refuses checkpoints whose weights transformers would initialise at random, and
still loads a proper reward-model folder with parity."""

import json
import re

import pytest
import torch
import transformers

from pm_lens import RewardModel
from pm_lens.model import ARCHITECTURES
from pm_lens.testing import tiny_hf_reward_model
from tests.model.helpers import CAUSAL_LMS, drop_from_checkpoint, save_causal_lm

TEXTS = ["The capital of France is Paris.", "I don't know.", "Hi"]


def rewards(model, tokenizer):
    with torch.no_grad():
        return torch.stack([model(torch.tensor([tokenizer(t)["input_ids"]])).logits[0, 0] for t in TEXTS])


@pytest.mark.parametrize("architecture", list(CAUSAL_LMS))
@pytest.mark.parametrize("num_labels", [1, 2])
def test_causal_lm_folder_is_not_a_reward_model(tmp_path, architecture, num_labels):
    # transformers builds the classifier with a random score head (with num_labels=1 it loads
    # with only a log line); the message must say what the folder is, whatever its num_labels.
    save_causal_lm(tmp_path, architecture, num_labels=num_labels)
    with pytest.raises(ValueError) as err:
        RewardModel.from_pretrained(tmp_path)
    message = str(err.value)
    assert f"{str(tmp_path)!r} holds a causal LM ({architecture}), not a reward model" in message
    assert "score.weight would be initialised at random" in message
    assert "RewardModel.from_hf" in message  # what to do on purpose
    assert "num_labels=2" not in message and "\n" not in message


def test_causal_lm_is_recognised_by_its_lm_head_without_architectures(tmp_path):
    save_causal_lm(tmp_path, "LlamaForCausalLM")  # untied: lm_head.weight is saved
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(
        f"{str(tmp_path)!r} holds a causal LM (its checkpoint has lm_head.weight), not a reward model"
    )):
        RewardModel.from_pretrained(tmp_path)


def test_reward_model_folder_without_its_head(tmp_path, tokenizer):
    # A classifier checkpoint whose head went missing (here: saved under another name, as a
    # value-head model keeps it): refused, naming the missing key and the unread weights.
    hf_model = tiny_hf_reward_model("GPT2ForSequenceClassification")
    hf_model.save_pretrained(tmp_path)
    drop_from_checkpoint(tmp_path, {"score.weight"}, add={"v_head.summary.weight": hf_model.score.weight.clone()})
    with pytest.raises(ValueError) as err:
        RewardModel.from_pretrained(tmp_path)
    message = str(err.value)
    assert f"the reward head of {str(tmp_path)!r} is not in its checkpoint" in message
    assert "score.weight would be initialised at random" in message
    assert "weights nothing reads (v_head.summary.weight)" in message
    assert "causal LM (" not in message


def test_missing_body_weights_are_refused(tmp_path):
    tiny_hf_reward_model("LlamaForSequenceClassification").save_pretrained(tmp_path)
    dropped = [f"model.layers.1.mlp.{name}.weight" for name in ("down_proj", "gate_proj", "up_proj")] + [
        f"model.layers.1.self_attn.{name}.weight" for name in ("q_proj", "k_proj", "v_proj", "o_proj")
    ]
    drop_from_checkpoint(tmp_path, set(dropped))
    with pytest.raises(ValueError) as err:
        RewardModel.from_pretrained(tmp_path)
    message = str(err.value)
    assert f"{str(tmp_path)!r} lacks 7 weight(s) of the transformer body" in message
    assert re.search(r"\(model\.layers\.1\.mlp\.down_proj\.weight, .* and 2 more\)", message)


def test_unsupported_architecture_is_refused_before_the_weights(tmp_path):
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    architectures=["ViTModel"])
    config.save_pretrained(tmp_path)  # no weights at all: the config alone is enough to refuse
    with pytest.raises(ValueError, match="unsupported reward-model architecture 'ViTModel'; pm_lens supports") as err:
        RewardModel.from_pretrained(tmp_path)
    assert all(arch in str(err.value) for arch in ARCHITECTURES)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_reward_model_folder_loads_with_parity(tmp_path, arch, tokenizer):
    """No false alarm: every supported architecture's folder has all its weights."""
    hf_model = tiny_hf_reward_model(arch)
    hf_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    rm = RewardModel.from_pretrained(tmp_path)
    tokens = [torch.tensor([tokenizer(t)["input_ids"]]) for t in TEXTS]
    got = torch.stack([rm.reward(t)[0] for t in tokens])
    assert (got - rewards(hf_model, tokenizer)).abs().max() <= 1e-4


def test_random_head_on_purpose_goes_through_from_hf(tmp_path, tokenizer):
    """The route the message names works: load with transformers (num_labels=1), then from_hf."""
    save_causal_lm(tmp_path, "LlamaForCausalLM")
    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1).eval()
    rm = RewardModel.from_hf(hf_model, tokenizer)
    tokens = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    assert torch.allclose(rm.reward(tokens), hf_model(tokens).logits[:, 0], atol=1e-5)


def test_loading_one_key_at_a_time_sets_what_a_whole_load_sets(tokenizer):
    """TransformerLens loads converted weights key by key; RewardModel routes each key to the
    module that owns it (fast), which must set exactly what torch's whole-model load sets."""
    rm = RewardModel.from_hf(tiny_hf_reward_model(), tokenizer)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in rm.state_dict().items()}
    one_by_one = RewardModel.from_hf(tiny_hf_reward_model(), tokenizer)
    for key, value in state.items():
        one_by_one.load_state_dict({key: value}, strict=False)
    one_by_one.load_state_dict({"no.such.key": torch.zeros(1)}, strict=False)  # ignored, as torch ignores it
    whole = RewardModel.from_hf(tiny_hf_reward_model(), tokenizer)
    torch.nn.Module.load_state_dict(whole, state, strict=False)
    for key, value in whole.state_dict().items():
        assert torch.equal(one_by_one.state_dict()[key], value), key


@pytest.mark.parametrize("objective", [1, [0.5, -1.0, 2.0]])
def test_a_multi_output_head_gives_the_reward_its_objective_names(tmp_path, tokenizer, objective):
    """num_labels=3 (a multi-objective PM): the reward is one output, or a weighted sum, folded
    into a one-column head; equal to the HF outputs combined by hand, from memory and from disk."""
    hf_model = tiny_hf_reward_model(num_labels=3)
    if isinstance(objective, int):
        weights = torch.nn.functional.one_hot(torch.tensor(objective), 3).float()
    else:
        weights = torch.tensor(objective)
    with torch.no_grad():
        expected = torch.stack([hf_model(torch.tensor([tokenizer(t)["input_ids"]])).logits[0] @ weights for t in TEXTS])
    hf_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    for rm in (RewardModel.from_hf(hf_model, tokenizer, objective=objective),
               RewardModel.from_pretrained(tmp_path, objective=objective)):
        got = torch.stack([rm.reward(torch.tensor([tokenizer(t)["input_ids"]]))[0] for t in TEXTS])
        assert (got - expected).abs().max() <= 1e-4
        assert rm.W_U.shape[-1] == 1 and rm.objective == objective


@pytest.mark.parametrize("objective, message", [
    (None, r"num_labels=3 outputs; choose the reward with objective="),
    (3, r"objective 3 is not an output of the score head: valid are 0..2"),
    ([1.0, 2.0], r"objective must hold 3 numbers"),
    ("first", r"objective must be an output index or a list of 3 weights, got 'first'"),
])
def test_a_multi_output_head_without_a_fitting_objective_is_refused(tmp_path, tokenizer, objective, message):
    tiny_hf_reward_model(num_labels=3).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        RewardModel.from_pretrained(tmp_path, objective=objective)

"""train_saes on a tiny random reward model: learning, one collection pass, seeds, saving, errors.

The corpus is random sentences over a small vocabulary of words, as character tokens. Activation
tensors are collected once per module; every training run is small (d_sae 256, <= 250 steps).
"""

import json
import os
import random

import pytest
import torch
from sae_lens import SAE

from pm_lens import PreferencePair, RewardModel, TokenBatch
from pm_lens.data import encode_pairs
from pm_lens.saes.train import collect_activations, train_saes
from pm_lens.testing import char_tokenizer, tiny_hf_reward_model

WORDS = ("the a cat dog sat on mat ran to house big small red blue quickly slowly and or but I you we they like "
         "see").split()
HOOK = "blocks.1.hook_resid_post"
D_SAE = 256
# ~2,000 training tokens; 250 steps of 256 tokens = ~30 epochs.
BUDGET = dict(d_sae=D_SAE, batch_size=256, training_tokens=256 * 250, progress=False)


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) for _ in range(n)]


def fvu(sae: SAE, x: torch.Tensor) -> float:
    """sum ||x - sae(x)||^2 / sum ||x - mean||^2, computed here independently of the module."""
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x))
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The matrices here are tiny; with two threads on a busy 2-core machine, OpenMP's spin-waiting
    # made this file 15x slower (98 s against 6 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rm():
    return RewardModel.from_hf(tiny_hf_reward_model(num_hidden_layers=3), char_tokenizer())


@pytest.fixture(scope="module")
def train_texts():
    return sentences(60, seed=0)


@pytest.fixture(scope="module")
def held_out(rm):
    return collect_activations(rm, sentences(20, seed=1), hook_names=[HOOK], progress=False)


# Measured with these settings over seeds 0-3 (held-out FVU / L0; at initialisation FVU ~0.96 and
# L0 ~d_sae / 2, TopK: k): standard 0.07 / 28-30, topk 0.02 / 32, jumprelu 0.03 / 16-18,
# gated 0.02 / 31-32. The bounds (FVU < 0.15, L0 < d_sae / 6 ~ 43) leave a margin.
@pytest.mark.parametrize(
    ("architecture", "max_l0"),
    [("standard", D_SAE // 6), ("topk", None), ("jumprelu", D_SAE // 6), ("gated", D_SAE // 6)],
)
def test_training_beats_the_initialisation_and_is_sparse(rm, train_texts, held_out, architecture, max_l0):
    result = train_saes(rm, train_texts, hook_names=[HOOK], architecture=architecture, **BUDGET)
    sae, row = result.saes[HOOK], result.stats.loc[HOOK]
    x = held_out[HOOK]
    assert row.fvu_init > 0.9  # the decoder bias starts at the mean: the initial SAE explains ~nothing
    assert fvu(sae, x) < 0.15 < row.fvu_init
    l0 = float((sae.encode(x) != 0).float().sum(-1).mean())
    if architecture == "topk":
        assert l0 == 32 == result.config["k"]  # default k = min(32, d_sae // 4)
    else:
        assert row.l0_init > D_SAE / 3 and l0 < max_l0
    # The reported stats are the same measurement on the training activations.
    train_acts = collect_activations(rm, train_texts, hook_names=[HOOK], progress=False)[HOOK]
    assert row.fvu == pytest.approx(fvu(sae, train_acts), rel=1e-5)
    assert row.n_tokens == train_acts.shape[0]


@pytest.mark.parametrize("normalize_activations", ["covariance_whitening", "none"])
def test_other_normalisations_are_folded_back(rm, train_texts, held_out, normalize_activations):
    # TopK needs no penalty tuned to the scale, so it learns under every normalisation; the
    # returned SAE must then work on raw activations.
    result = train_saes(rm, train_texts, hook_names=[HOOK], architecture="topk", k=16,
                        normalize_activations=normalize_activations, **BUDGET)
    sae = result.saes[HOOK]
    assert sae.cfg.normalize_activations == "none"
    assert fvu(sae, held_out[HOOK]) < 0.15


def test_one_forward_per_batch_fills_every_hook(rm, train_texts):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]
    calls = {"embed": 0, "last_block": 0}
    handles = [
        rm.embed.register_forward_hook(lambda *_: calls.__setitem__("embed", calls["embed"] + 1)),
        rm.blocks[2].register_forward_hook(lambda *_: calls.__setitem__("last_block", calls["last_block"] + 1)),
    ]
    try:
        result = train_saes(rm, train_texts[:20], hook_names=hooks, forward_batch_size=8, d_sae=32,
                            training_tokens=64 * 5, batch_size=64, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {"embed": 3, "last_block": 0}  # ceil(20 / 8) forwards, stopped after block 1
    assert list(result.saes) == hooks
    assert [result.saes[h].cfg.d_in for h in hooks] == [64, 128]
    assert [result.saes[h].cfg.metadata.hook_name for h in hooks] == hooks
    n_tokens = sum(len(text) - 1 for text in train_texts[:20])  # a token per character, less the first
    assert list(result.stats.n_tokens) == [n_tokens, n_tokens]


def test_collected_rows_are_the_real_tokens_after_the_first(rm):
    # Left padding: the first real token is not at position 0.
    tokens = torch.tensor([[0, 0, 40, 41, 42], [43, 44, 45, 46, 47]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    batch = TokenBatch(tokens, mask, torch.zeros(2, dtype=torch.long))
    acts = collect_activations(rm, batch, hook_names=[HOOK], progress=False)[HOOK]
    _, cache = rm.run_with_cache(tokens, attention_mask=mask, names_filter=[HOOK])
    expected = torch.cat([cache[HOOK][0, 3:], cache[HOOK][1, 1:]])
    torch.testing.assert_close(acts, expected)

    kept_all = collect_activations(rm, batch, hook_names=[HOOK], skip_first=False, progress=False)[HOOK]
    assert kept_all.shape[0] == 8
    no_44 = collect_activations(rm, batch, hook_names=[HOOK], exclude_token_ids=[44], progress=False)[HOOK]
    torch.testing.assert_close(no_44, torch.cat([cache[HOOK][0, 3:], cache[HOOK][1, 2:]]))
    capped = collect_activations(rm, batch, hook_names=[HOOK], max_tokens=3, progress=False)[HOOK]
    torch.testing.assert_close(capped, expected[:3])


def test_pairs_give_both_sides(rm, tokenizer):
    pairs = [PreferencePair("Name a colour.", "Red.", "I don't know."), PreferencePair("Hi", "Hello!", "Go away.")]
    acts = collect_activations(rm, pairs, hook_names=[HOOK], progress=False)[HOOK]
    encoded = encode_pairs(tokenizer, pairs, max_len=rm.cfg.n_ctx)
    expected = sum(int(side.attention_mask.sum()) - len(pairs) for side in (encoded.chosen, encoded.rejected))
    assert acts.shape == (expected, 64)


def test_seed_determines_the_weights_and_hooks_do_not_interact(rm, train_texts):
    small = dict(d_sae=32, batch_size=128, training_tokens=128 * 30, progress=False)
    both = train_saes(rm, train_texts, hook_names=[HOOK, "blocks.0.hook_resid_post"], seed=3, **small).saes[HOOK]
    alone = train_saes(rm, train_texts, hook_names=[HOOK], seed=3, **small).saes[HOOK]
    other = train_saes(rm, train_texts, hook_names=[HOOK], seed=4, **small).saes[HOOK]
    for name, weight in both.state_dict().items():
        assert torch.equal(weight, alone.state_dict()[name]), name
    assert not torch.equal(both.W_enc, other.W_enc)


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu", "gated"])
def test_saved_saes_load_back_identical(rm, train_texts, tmp_path, architecture):
    result = train_saes(rm, train_texts[:20], hook_names=[HOOK], architecture=architecture, out_dir=tmp_path,
                        seed=7, d_sae=32, batch_size=64, training_tokens=64 * 20, progress=False)
    loaded = SAE.load_from_disk(tmp_path / HOOK)
    sae = result.saes[HOOK]
    assert type(loaded) is type(sae) and loaded.cfg.metadata.hook_name == HOOK
    x = torch.randn(50, 64) * 3
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), sae.encode(x))
        assert torch.equal(loaded(x), sae(x))
    config = json.loads((tmp_path / "training_config.json").read_text())
    assert config["seed"] == 7 and config["architecture"] == architecture and config["hook_names"] == [HOOK]
    assert config["n_tokens"] == result.stats.loc[HOOK, "n_tokens"] and config["versions"]["sae-lens"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [HOOK, "training_config.json"]  # no temporary leftovers
    mask = os.umask(0)
    os.umask(mask)  # the saved folder and files have the permissions of any new one, not mkdtemp's private 0700
    assert (tmp_path / HOOK).stat().st_mode & 0o777 == 0o777 & ~mask
    assert {f.stat().st_mode & 0o777 for f in (tmp_path / HOOK).iterdir()} == {0o666 & ~mask}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(architecture="batchtopk"), "choose from standard, topk, jumprelu, gated"),
        (dict(hook_names=["blocks.9.hook_resid_post"]), "unknown hook name"),
        (dict(d_sae=0), "d_sae must be a positive"),
        (dict(k=8), "k=8 is for architecture='topk'"),
        (dict(architecture="topk", k=300), "k must be between 1 and d_sae=256"),
        (dict(architecture="topk", sparsity_coefficient=1.0), "set its sparsity with k"),
        (dict(normalize_activations="layer_norm"), "choose from expected_average_only_in"),
        (dict(n_epochs=2, training_tokens=1000), "not both"),
        (dict(sae_kwargs={"l0_coefficient": 1.0}), "unknown sae_kwargs"),
    ],
)
def test_bad_arguments_raise_before_any_work(rm, kwargs, message):
    arguments = dict(hook_names=[HOOK], d_sae=256, progress=False) | kwargs
    with pytest.raises(ValueError, match=message):
        train_saes(rm, ["never encoded"], **arguments)


def test_completion_positions_keep_only_the_completions_tokens(rm, tokenizer):
    """positions="completion": the rows are the completion tokens of each text (pairs: both sides),
    in order; a batch's completion_start decides; other positions are refused by name."""
    pairs = [PreferencePair("Name a colour.", "Red.", "I don't know."), PreferencePair("Hi", "Hello!", "Go away.")]
    acts = collect_activations(rm, pairs, hook_names=[HOOK], positions="completion", progress=False)[HOOK]
    encoded = encode_pairs(tokenizer, pairs, max_len=rm.cfg.n_ctx)
    expected = []
    for side in (encoded.chosen, encoded.rejected):
        _, cache = rm.run_with_cache(side.tokens, attention_mask=side.attention_mask, names_filter=[HOOK])
        for row in range(len(pairs)):
            length, start = int(side.attention_mask[row].sum()), int(side.completion_start[row])
            assert 1 < start < length
            expected.append(cache[HOOK][row, start:length])
    torch.testing.assert_close(acts, torch.cat(expected))
    with pytest.raises(ValueError, match="positions must be one of .'all', 'completion'. to collect activations, got 'diverge'"):
        train_saes(rm, pairs, hook_names=[HOOK], d_sae=8, positions="diverge", progress=False)
    result = train_saes(rm, pairs, hook_names=[HOOK], d_sae=8, positions="completion", training_tokens=64, progress=False)
    assert result.config["positions"] == "completion" and result.stats.loc[HOOK, "n_tokens"] == acts.shape[0]

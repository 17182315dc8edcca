"""A model's layers split over several devices (pm_lens.model.split): the same rewards, attributions,
exact ablations, contexts and SAE evaluations as on one device, through the code path a multi-GPU
run takes. On a CPU-only machine the two "devices" are both the CPU (the same pre-hooks, device
lookups and moves run; torch makes the moves no-ops); where CUDA is available the splits also put
layers on the GPU and the CPU, which moves every tensor that crosses a layer boundary for real,
and with two GPUs on both."""

import copy
import json

import pandas as pd
import pytest
import torch
from transformer_lens.utilities.multi_gpu import get_device_for_block_index

from pm_lens import PreferencePair, RewardModel, ablate, attribute, evaluate_sae, feature_acts, fidelity
from pm_lens.cli import main
from pm_lens.data import encode_pairs
from pm_lens.model import LayerSplit, as_devices
from pm_lens.saes import attach_saes, detach_saes, place_saes
from pm_lens.saes.contexts import top_contexts
from pm_lens.testing import sparse_sae_for, tiny_hf_reward_model

PAIRS = [
    PreferencePair("What is 2+2?", "4, you're welcome!", "I don't know."),
    PreferencePair("Capital of France?", "Paris.", "London, see http://x.com"),
    PreferencePair("Name a colour.", "Red, thanks!", "Go away, you idiot."),
    PreferencePair("Say hi.", "Hi there! My pleasure.", "No."),
]
HOOKS = ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out", "blocks.3.hook_resid_pre"]

SPLITS = [("cpu", "cpu"), ("cpu", "cpu", "cpu")]
if torch.cuda.is_available():
    SPLITS += [("cuda:0", "cpu"), ("cpu", "cuda:0")]
    if torch.cuda.device_count() >= 2:
        SPLITS += [("cuda:0", "cuda:1")]
IDS = ["+".join(split) for split in SPLITS]


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_reward_model(num_hidden_layers=4)


@pytest.fixture(scope="module")
def one(hf_model):
    from pm_lens.testing import char_tokenizer

    return RewardModel.from_hf(hf_model, char_tokenizer())


@pytest.fixture(scope="module")
def saes(one):
    batch = encode_pairs(one.tokenizer, PAIRS, max_len=128)
    tokens = torch.cat([batch.chosen.tokens, batch.rejected.tokens[:, : batch.chosen.tokens.shape[1]]])
    saes = [sparse_sae_for(one, hook, tokens, seed=i, d_sae=64, fire_rate=0.2) for i, hook in enumerate(HOOKS)]
    with torch.no_grad():  # calibrated thresholds sit exactly on a token's pre-activation: move them off, so
        for sae in saes:   # float rounding on another device cannot flip whether a feature fires there
            sae.b_enc.sub_(1e-3)
    return saes


@pytest.fixture(scope="module", params=SPLITS, ids=IDS)
def split(request, hf_model):
    from pm_lens.testing import char_tokenizer

    return RewardModel.from_hf(hf_model, char_tokenizer(), device=list(request.param))


def split_saes(rm, saes):
    return place_saes(rm, copy.deepcopy(saes))


def close(got, want, tol=2e-4):
    got, want = torch.as_tensor(got).float().cpu(), torch.as_tensor(want).float().cpu()
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_modules_go_to_their_devices_and_hooks_report_them(hf_model, tokenizer):
    """Embeddings on the first device, block i on devices[i * n // n_layers], final norm and head on
    the last; checked with a 'meta' second device (placement only: nothing runs there)."""
    rm = RewardModel.from_hf(hf_model, tokenizer)
    plan = LayerSplit((torch.device("cpu"), torch.device("meta")), rm.cfg.n_layers)
    plan.place(rm)
    rm.layer_split = plan
    for name, param in rm.named_parameters():
        want = "meta" if name.startswith(("blocks.2.", "blocks.3.", "ln_final", "unembed")) else "cpu"
        assert param.device.type == want, name
    assert [rm.device_of(h).type for h in ("hook_embed", "blocks.1.hook_resid_post", "blocks.2.hook_resid_pre",
                                           "blocks.3.attn.hook_z", "ln_final.hook_normalized")] == \
        ["cpu", "cpu", "meta", "meta", "meta"]
    assert plan.describe() == "cpu (blocks 0-1), meta (blocks 2-3)"


@pytest.mark.parametrize("n_layers, n_devices", [(4, 2), (32, 8), (62, 8), (80, 3), (5, 5)])
def test_the_block_plan_is_transformer_lens_own_for_consecutive_gpus(n_layers, n_devices):
    """For cuda:0..n-1 the split sets cfg.n_devices so TransformerLens's forward moves the residual
    straight to the block's GPU: its get_device_for_block_index must then agree block by block."""
    from transformer_lens import HookedTransformerConfig

    plan = LayerSplit(tuple(torch.device("cuda", k) for k in range(n_devices)), n_layers)
    assert plan.tl_n_devices() == n_devices
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=8, n_ctx=8, d_head=4, act_fn="relu", d_vocab=10,
                                  device="cpu")
    cfg.device, cfg.n_devices = "cuda:0", n_devices  # set after the checks of __post_init__ (no GPU here)
    assert [plan.block_device(i) for i in range(n_layers)] == [get_device_for_block_index(i, cfg) for i in range(n_layers)]
    assert sorted({plan.block_device(i).index for i in range(n_layers)}) == list(range(n_devices))
    for mixed in [("cuda:0", "cpu"), ("cuda:1", "cuda:0"), ("cpu", "cpu")]:
        assert LayerSplit(tuple(map(torch.device, mixed)), n_layers).tl_n_devices() == 1


def test_bad_splits_are_refused_in_one_line(hf_model, tokenizer):
    with pytest.raises(ValueError, match=r"cannot split 4 layers over 5 devices"):
        RewardModel.from_hf(hf_model, tokenizer, device=["cpu"] * 5)
    with pytest.raises(ValueError, match=r"device 'gpu' is not a device"):
        as_devices("cpu,gpu")
    with pytest.raises(ValueError, match=r"empty list"):
        as_devices([])
    assert as_devices("cpu, cpu") == (torch.device("cpu"), torch.device("cpu"))


def test_rewards_equal_one_device(split, one):
    batch = encode_pairs(one.tokenizer, PAIRS, max_len=128)
    for side in (batch.chosen, batch.rejected):  # padded batches: the pooled position moves across devices
        got = split.reward(side.tokens.to(split.cfg.device), side.attention_mask.to(split.cfg.device))
        assert got.device == torch.device(split.cfg.device)
        close(got, one.reward(side.tokens, side.attention_mask))


def test_streamed_load_puts_each_piece_on_its_layer_device(tmp_path, hf_model, tokenizer, one, monkeypatch):
    import transformers

    hf_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded through transformers")))
    rm = RewardModel.from_pretrained(tmp_path, device="cpu,cpu")
    assert rm.layer_split is not None and rm.layer_split.describe() == "cpu (blocks 0-1), cpu (blocks 2-3)"
    want = one.state_dict()
    for key, value in rm.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=1e-6, msg=key)
    tokens = torch.tensor([tokenizer("Hello there")["input_ids"]])
    close(rm.reward(tokens), one.reward(tokens))


def test_saes_must_be_on_their_hook_device(split, saes):
    devices = {split.device_of(sae.cfg.metadata.hook_name) for sae in saes}
    placed = split_saes(split, saes)
    assert [sae.W_dec.device for sae in placed] == [split.device_of(sae.cfg.metadata.hook_name) for sae in placed]
    if len(devices) > 1:  # an SAE left on another device is refused with the device to use
        wrong = copy.deepcopy(saes[-1]).to(split.device_of(HOOKS[0]))
        with pytest.raises(ValueError, match=r"that hook's layer is on"):
            attach_saes(split, [wrong])


@pytest.mark.parametrize("method, baseline", [("atp", "zero"), ("ig", "mean")])
def test_attribution_and_exact_ablation_equal_one_device(split, one, saes, method, baseline):
    """Every feature's estimated effect, the exact effects of the top ones (batched restarts at the
    hook's block from the clean run, across devices), a joint removal and the removal of every node
    (the completeness check) equal the single-device run's."""
    placed = split_saes(split, saes)
    kwargs = dict(method=method, baseline=baseline, positions="all", progress=False)
    want, got = attribute(one, PAIRS, saes=saes, **kwargs), attribute(split, PAIRS, saes=placed, **kwargs)
    for hook in HOOKS:
        close(got.effects[hook].to_dense(), want.effects[hook].to_dense())
        close(got.error_effects[hook], want.error_effects[hook])
    close(got.total, want.total)
    top = list(want.ranking().query("kind == 'feature'").node[:6])
    assert list(got.ranking().query("kind == 'feature'").node[:6]) == top
    for features, jointly in [(top, False), (top[:3], True), ("all", False)]:
        exact_want = ablate(one, PAIRS, saes=saes, features=features, jointly=jointly, baselines=want.baselines,
                            clean=want.clean_run, progress=False)
        exact_got = ablate(split, PAIRS, saes=placed, features=features, jointly=jointly, baselines=got.baselines,
                           clean=got.clean_run, progress=False)
        close(exact_got.effects("margin"), exact_want.effects("margin"))
    card = fidelity(got, ablate(split, PAIRS, saes=placed, features=top, baselines=got.baselines, clean=got.clean_run,
                                progress=False), top_k=3, k=3)
    assert card.n_top >= 1


def test_contexts_and_sae_evaluation_equal_one_device(split, one, saes):
    placed = split_saes(split, saes)
    features = [(HOOKS[0], 3), (HOOKS[1], 5), (HOOKS[2], 7)]
    want = top_contexts(one, saes, PAIRS, features, progress=False)
    got = top_contexts(split, placed, PAIRS, features, progress=False)
    for node in want:
        # The strongest window with the same activations. Later ones can differ: both sides of a pair
        # share the prompt, whose activations are equal up to float rounding (another device, another
        # padding), and which side a shared window is read from decides which text is used up.
        top_got, top_want = got[node].contexts[0], want[node].contexts[0]
        assert top_got.tokens == top_want.tokens
        close(top_got.acts, top_want.acts)
        close(got[node].completion_max, want[node].completion_max)
        close([got[node].firing_rate, got[node].last_token_mean], [want[node].firing_rate, want[node].last_token_mean])
    want_eval = evaluate_sae(one, saes, PAIRS, progress=False)
    got_eval = evaluate_sae(split, placed, PAIRS, progress=False)
    for table in ("summary", "per_pair"):
        pd.testing.assert_frame_equal(getattr(got_eval, table), getattr(want_eval, table), rtol=1e-3, atol=1e-4)
    # SAELens's masks of bypassed tokens go to each hook's device: feature acts equal one device's
    batch = encode_pairs(one.tokenizer, PAIRS, max_len=128).chosen
    got_acts, want_acts = {}, {}
    for rm, attached, out in ((split, placed, got_acts), (one, saes, want_acts)):
        attach_saes(rm, attached, exclude_token_ids=[1])
        try:
            out.update(feature_acts(rm, batch.tokens.to(rm.cfg.device), batch.attention_mask.to(rm.cfg.device)))
        finally:
            detach_saes(rm)
    for hook in HOOKS:
        assert not want_acts[hook][batch.tokens == 1].any()
        close(got_acts[hook], want_acts[hook])


@pytest.mark.parametrize("devices", [",".join(split) for split in SPLITS if len(split) == 2])
def test_pm_lens_run_split_over_two_devices_equals_one(tmp_path, hf_model, tokenizer, saes, devices, capsys):
    """``model.device = "cpu,cpu"`` (or a GPU and the CPU) runs the whole study through the split
    path: the same selection, estimated and exact effects and datapoints as on one CPU."""
    model_dir, sae_dir = tmp_path / "pm", tmp_path / "sae"
    hf_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    saes[0].save_model(str(sae_dir / "0"))  # on the first device
    saes[1].save_model(str(sae_dir / "1"))  # on the second
    # distinct pairs (repeated ones would tie, and ties may break either way on another device)
    records = [{"prompt": p.prompt + suffix, "chosen": p.chosen, "rejected": p.rejected} for suffix in ("", " Quick!")
               for p in PAIRS]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    base = ["run", "--model", str(model_dir), "--pairs", str(tmp_path / "pairs.jsonl"), "--saes",
            f"{sae_dir / '0'},{sae_dir / '1'}", "--max-tokens", "100", "--k", "6", "--confirm-top", "3", "--shard-pairs", "4", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    assert main([*base, "--out", str(tmp_path / "split"), "--device", devices]) == 0
    for table in ("selection.csv", "features.csv", "top_datapoints.csv"):
        want, got = (pd.read_csv(tmp_path / out / table) for out in ("one", "split"))
        pd.testing.assert_frame_equal(got, want, rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "split" / "config.json").read_text())["config"]["model"]["device"] == devices
    assert main([*base, "--out", str(tmp_path / "plan"), "--device", devices, "--dry-run"]) == 0
    first, second = devices.split(",")
    assert f"layers split over 2 devices: {first} (blocks 0-1), {second} (blocks 2-3)" in capsys.readouterr().out


def test_gpus_per_rank_need_the_cuda_device(tmp_path, capsys):
    (tmp_path / "pairs.jsonl").write_text("")
    assert main(["run", "--pairs", str(tmp_path / "pairs.jsonl"), "--saes", "demo", "--out", str(tmp_path / "o"),
                 "--devices-per-rank", "2"]) != 0
    assert "model.devices_per_rank = 2 needs model.device = 'cuda' (got 'cpu')" in capsys.readouterr().err

"""pm-lens run end to end on a model folder saved to disk, HH-layout JSONL and an SAELens SAE
folder: outputs checked against independent computations, resumption after a failure, refusals."""

import json

import pandas as pd
import pytest
import torch

from pm_lens import Node, RewardModel, ablate, attribute, score_pairs
from pm_lens.cli import main
from pm_lens.data import encode_pairs, load_pairs
from pm_lens.data.encoding import encode_one
from pm_lens.saes import load_sae
from pm_lens.saes.contexts import top_contexts
from pm_lens.testing import sparse_sae_for, tiny_hf_reward_model

HOOK = "blocks.1.hook_resid_post"
PROMPTS = ["What is 2+2?", "Capital of France?", "Name a colour.", "How do I boil an egg?", "Say hi.", "Best pet?"]
GOOD = ["4, you're welcome!", "Paris. My pleasure.", "Red, thanks!", "Simmer it for nine minutes.", "Hi there!", "A cat."]
BAD = ["I don't know.", "London, see http://x.com", "Go away, you idiot.", "I don't know. I don't know.", "No.",
       "See http://pets.example.com " * 6]


@pytest.fixture
def study(tmp_path, tokenizer):
    """A reward-model folder, 12 HH pairs (two too long for max_tokens) and an SAE folder."""
    model_dir = tmp_path / "pm"
    tiny_hf_reward_model(num_hidden_layers=3).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rm = RewardModel.from_pretrained(model_dir)
    records = []
    for i in range(12):
        prompt, good, bad = PROMPTS[i % 6], GOOD[i % 6], BAD[(i + i // 6) % 6]
        records.append({"chosen": f"\n\nHuman: {prompt}\n\nAssistant: {good}",
                        "rejected": f"\n\nHuman: {prompt}\n\nAssistant: {bad}", "id": i})
    pairs_path = tmp_path / "pairs.jsonl"
    pairs_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    pairs = load_pairs(pairs_path)
    batch = encode_pairs(rm.tokenizer, pairs, max_len=256)
    sae = sparse_sae_for(rm, HOOK, batch.chosen.tokens, d_sae=64, fire_rate=0.2)
    sae_dir = tmp_path / "sae"
    sae.save_model(str(sae_dir))
    config = tmp_path / "run.toml"
    config.write_text(f"""
[model]
path = "{model_dir}"
[pairs]
path = "{pairs_path}"
max_tokens = 100
k = 6
[saes]
sources = ["{sae_dir}"]
[attribution]
confirm_top = 3
[run]
out = "{tmp_path / 'out'}"
shard_pairs = 4
""")
    return dict(config=config, model_dir=model_dir, pairs=pairs, sae_dir=sae_dir, out=tmp_path / "out", tmp=tmp_path)


def test_run_from_the_cli_writes_outputs_that_independent_computations_confirm(study):
    assert main(["run", str(study["config"]), "--quiet"]) == 0
    out = study["out"]
    for name in ("features.csv", "top_datapoints.csv", "top_contexts.csv", "selection.csv", "fidelity.json",
                 "report.html", "config.json"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.tmp"))
    rm = RewardModel.from_pretrained(study["model_dir"])
    pairs = study["pairs"]
    # Selection: exactly the top 6 by |margin| among the pairs whose sides fit in 60 tokens.
    lengths = [max(len(encode_one(rm.tokenizer, p.prompt, t, rm.text_format)[0]) for t in (p.chosen, p.rejected))
               for p in pairs]
    kept = [i for i, n in enumerate(lengths) if n <= 100]
    assert 6 < len(kept) < len(pairs)  # the long pairs were left out, and the selection is a real choice
    margins = score_pairs(rm, [pairs[i] for i in kept], progress=False).margin.abs().to_numpy()
    expected = sorted(kept[j] for j in sorted(range(len(kept)), key=lambda j: -margins[j])[:6])
    selection = pd.read_csv(out / "selection.csv")
    assert selection.pair.tolist() == expected
    # The top confirmed feature's exact effect equals an ablation recomputed here.
    features = pd.read_csv(out / "features.csv")
    top = features.iloc[0]
    from pm_lens.saes import load_sae

    sae = load_sae(study["sae_dir"])
    again = ablate(rm, [pairs[i] for i in expected], saes=[sae], features=[Node(top.hook_name, int(top.feature))],
                   progress=False)
    assert abs(float(again.margin.mean()) - top.exact_margin_effect) < 1e-5
    assert top.role == ("raises the margin" if top.estimated_margin_effect < 0 else "lowers the margin")
    # Before -> after on both sides of a datapoint, recomputed with the plain model.
    point = pd.read_csv(out / "top_datapoints.csv").iloc[0]
    pair = pairs[int(point.pair)]
    clean = score_pairs(rm, [pair], progress=False).iloc[0]
    assert abs(point.chosen_before - clean.chosen_reward) < 1e-4 and abs(point.rejected_before - clean.rejected_reward) < 1e-4
    # The fidelity card: the exact removal of everything recomputed here; it says which dtype ran.
    card = json.loads((out / "fidelity.json").read_text())
    everything = ablate(rm, [pairs[i] for i in expected], saes=[sae], features="all", progress=False)
    assert abs(card["completeness"]["exact_mean"] - float(everything.margin.mean())) < 1e-5
    assert card["settings"]["dtype"] == "float32" and card["n_top"] + card["n_random"] > 0
    # The SAE is random: spliced in without its error term it carries little of the margin, and
    # the run says so in plain words (config.json, report.html).
    errors_removed = ablate(rm, [pairs[i] for i in expected], saes=[sae], features=[Node.error(HOOK)], jointly=True,
                            progress=False)
    kept = float((errors_removed.clean_margin + errors_removed.margin[:, 0]).mean() / errors_removed.clean_margin.mean())
    recorded = json.loads((out / "config.json").read_text())
    spliced = [c for c in recorded["concerns"] if c.startswith("with the SAEs spliced in")]
    assert (len(spliced) == 1) == (kept < 0.5) and (not spliced or f"({kept:.0%})" in spliced[0])
    assert all(c in (out / "report.html").read_text() for c in recorded["concerns"])
    assert recorded["forward_passes"]["clean"]["sequences"] == 2 * 2 * 6  # each phase runs each side once
    assert recorded["config"]["pairs"]["k"] == 6 and recorded["dtype"] == "float32"
    # Top contexts (merged over the shards): the strongest equals top_contexts computed here by
    # running the model over the selected pairs; the rest follow in order, from other texts.
    contexts = pd.read_csv(out / "top_contexts.csv")
    assert set(contexts.node) <= set(features.node) and len(contexts)
    node = Node(top.hook_name, int(top.feature))
    here = top_contexts(rm, [sae], [pairs[i] for i in expected], [node], n_contexts=5, progress=False)[node]
    mine = contexts[contexts.node == str(node)].sort_values("rank")
    strongest = here.contexts[0]
    assert mine.activation.iloc[0] == pytest.approx(strongest.max_act, rel=1e-4)
    assert (mine.pair.iloc[0], mine.side.iloc[0]) == (expected[strongest.pair], strongest.side)
    assert mine.activation.is_monotonic_decreasing and not mine.duplicated(["pair", "side"]).any()
    assert len(mine) == len(here.contexts)
    assert "Where the features fire" in (out / "report.html").read_text()


def test_a_failed_run_resumes_to_the_uninterrupted_result(study, monkeypatch, capsys):
    import pm_lens.study.run as run_module

    assert main(["run", str(study["config"]), "--quiet", "--out", str(study["tmp"] / "whole")]) == 0
    calls = {"n": 0}
    original = run_module._ablate_shard

    def fail_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("injected failure after the first confirmation shard")
        return original(*args, **kwargs)

    monkeypatch.setattr(run_module, "_ablate_shard", fail_on_second)
    assert main(["run", str(study["config"]), "--quiet"]) == 1
    out = study["out"]
    assert (out / "shards" / "ablation-00000.safetensors").exists()
    assert not (out / "features.csv").exists() and not list(out.rglob("*.tmp"))
    monkeypatch.setattr(run_module, "_ablate_shard", original)
    written = {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    capsys.readouterr()
    assert main(["run", str(study["config"])]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in written.items())  # finished shards were not redone
    shown = capsys.readouterr()
    lines = (shown.out + shown.err).splitlines()
    assert "attributing shard 2/2: 2 pairs, read back (finished before)" in lines
    assert "confirming shard 1/2: 4 pairs, read back (finished before)" in lines
    assert any(line.startswith("confirming shard 2/2: 2 pairs, ") and "pairs/s" in line for line in lines)
    for name in ("features.csv", "top_datapoints.csv", "top_contexts.csv", "selection.csv", "fidelity.json"):
        assert (out / name).read_text() == (study["tmp"] / "whole" / name).read_text(), name
    # A changed config refuses to resume onto the old shards, in one line.
    assert main(["run", str(study["config"]), "--quiet", "--k", "5"]) == 1
    assert "holds a run of another config" in capsys.readouterr().err


def misfit_saes(folder):
    """SAE folders that do not fit the study's 3-layer, d_model-64 model: another width, another depth."""
    from sae_lens import SAE, StandardSAEConfig

    paths = {}
    for name, d_in, hook in (("wide_sae", 48, HOOK), ("deep_sae", 64, "blocks.7.hook_resid_post")):
        cfg = StandardSAEConfig(d_in=d_in, d_sae=16)
        cfg.metadata.hook_name = hook
        SAE.from_dict(cfg.to_dict()).save_model(str(folder / name))
        paths[name] = str(folder / name)
    return paths


@pytest.mark.parametrize("edit, flags, message", [
    ("", ["--k", "ten"], "pairs.k must be an integer, got 'ten'"),
    ("", ["--k", "0"], "pairs.k must be >= 1, got 0"),
    ("", ["--k", "50"], "pairs.k = 50 but"),
    ("", ["--k", "11"], "pairs.k = 11 but only 10 of 12 pairs have both sides within pairs.max_tokens = 100 tokens"),
    ("kk = 3", [], "unknown key 'pairs.kk'"),
    ("[nonsense]\nx = 1\n", [], "unknown section [nonsense]"),
    ("", ["--dtype", "float8"], "model.dtype must be one of 'float32', 'bfloat16', 'float16'; got 'float8'"),
    ("", ["--model", "/no/such/folder"], "model.path '/no/such/folder' is not a folder"),
    ("", ["--pairs", "/no/such.jsonl"], "pairs.path '/no/such.jsonl' does not exist"),
    ("", ["--saes", "/no/sae"], "saes.sources: '/no/sae' does not exist"),
    ("", ["--saes", "demo"], "'demo' means the embedded demo PM's SAEs, alone and with model.path = 'demo'"),
    ("", ["--chosen-column", "answer"], "has no column chosen: 'answer'"),
    ("", ["--baseline", "median"], "attribution.baseline must be one of 'zero', 'mean'; got 'median'"),
    ("", ["--max-tokens", "500"], "pairs.max_tokens = 500 exceeds the context of the model at"),
    ("", ["--train-saes", "blocks.9.hook_resid_post"], "saes.train: 'blocks.9.hook_resid_post' is not a hook point of "
                                                       "this model: the model has 3 layers"),
    ("", ["--train-saes", HOOK], f"saes.train names ['{HOOK}'], where an SAE of saes.sources reads already"),
    ("", ["--train-d-sae", "0"], "saes.train_d_sae must be >= 1, got 0"),
    ("", ["--train-architecture", "relu"], "saes.train_architecture must be one of 'topk', 'standard'"),
    ("", ["--saes", "{wide_sae}"], "has d_in = 48 but the activation at blocks.1.hook_resid_post has 64 values "
                                   "(d_model = 64): the SAE was trained on another model"),
    ("", ["--saes", "{deep_sae}"], "reads blocks.7.hook_resid_post, but the model has 3 layers (blocks.0 to blocks.2)"),
])
def test_bad_configs_fail_in_one_line_before_any_model_loads(study, capsys, monkeypatch, edit, flags, message):
    import pm_lens.study.run as run_module

    monkeypatch.setattr(run_module, "_load", lambda *args: pytest.fail("the model was loaded"))
    config = study["config"]
    if edit.startswith("["):
        config.write_text(config.read_text() + edit)
    elif edit:
        config.write_text(config.read_text().replace("k = 6", f"k = 6\n{edit}"))
    flags = [flag.format(**misfit_saes(study["tmp"])) if flag.startswith("{") else flag for flag in flags]
    code = main(["run", str(config), "--quiet", *flags])
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err and len(err.strip().splitlines()) == 1, err


def test_a_missing_required_key_names_its_flag(tmp_path, capsys):
    (tmp_path / "c.toml").write_text("[model]\npath = 'demo'\n")
    assert main(["run", str(tmp_path / "c.toml")]) == 2
    assert "missing key 'pairs.path'" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_writes_nothing(study, capsys):
    assert main(["run", str(study["config"]), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "12 read, 10 within 100 tokens, 6 selected (top_margin)" in out
    assert f"SAE at {HOOK}: 64 features" in out and "2 shard(s)" in out
    assert not study["out"].exists()


def test_a_multi_objective_pm_runs_on_the_objective_the_config_names(study, tokenizer):
    """A 3-output head: --objective "0.5,-1,2" makes the reward that weighted sum of the outputs;
    the selection's rewards equal the HF outputs combined by hand."""
    hf_model = tiny_hf_reward_model(num_hidden_layers=3, num_labels=3)
    hf_model.save_pretrained(study["model_dir"])
    assert main(["run", str(study["config"]), "--quiet", "--objective", "0.5,-1,2", "--confirm-top", "1"]) == 0
    selection = pd.read_csv(study["out"] / "selection.csv")
    rm = RewardModel.from_pretrained(study["model_dir"], objective=[0.5, -1.0, 2.0])
    batch = encode_pairs(rm.tokenizer, [study["pairs"][i] for i in selection.pair], max_len=256, text_format=rm.text_format)
    with torch.no_grad():
        logits = hf_model(batch.chosen.tokens, attention_mask=batch.chosen.attention_mask).logits
    assert torch.allclose(torch.tensor(selection.chosen_reward.to_numpy()).float(), logits @ torch.tensor([0.5, -1.0, 2.0]),
                          atol=1e-4)
    assert json.loads((study["out"] / "config.json").read_text())["objective"] == [0.5, -1.0, 2.0]


def test_a_bfloat16_run_uses_float32_saes_in_the_models_dtype_and_says_so(study):
    """SAEs saved in float32 (as SAELens saves them) run in the model's bfloat16; the fidelity card
    and config.json say which dtype ran; the ranking's leader is the float32 run's."""
    assert main(["run", str(study["config"]), "--quiet", "--out", str(study["tmp"] / "full")]) == 0
    assert main(["run", str(study["config"]), "--quiet", "--dtype", "bfloat16"]) == 0
    assert json.loads((study["out"] / "fidelity.json").read_text())["settings"]["dtype"] == "bfloat16"
    assert json.loads((study["out"] / "config.json").read_text())["dtype"] == "bfloat16"
    half, full = (pd.read_csv(folder / "features.csv") for folder in (study["out"], study["tmp"] / "full"))
    assert half.node.iloc[0] == full.node.iloc[0]
    assert abs(half.exact_margin_effect.iloc[0] - full.exact_margin_effect.iloc[0]) <= 0.05 * abs(full.exact_margin_effect.iloc[0]) + 0.02


def test_a_feature_whose_effect_comes_from_a_massive_activation_is_a_concern(tmp_path, capsys):
    """A model folder whose '~' embedding is huge (an attention-sink-like position) and an SAE
    whose feature 0 fires only there: the run's outlier share of that feature equals the one
    attribute() computes on the same pairs, and the run says in plain words what to do."""
    from pm_lens.testing import CHAR_VOCAB, char_tokenizer
    from tests.attribution.test_outliers import PAIRS, SINK, _sink_sae

    hf = tiny_hf_reward_model(num_hidden_layers=3)
    with torch.no_grad():
        hf.model.embed_tokens.weight[CHAR_VOCAB.index(SINK)] *= 400.0
    hf.save_pretrained(tmp_path / "pm")
    char_tokenizer().save_pretrained(tmp_path / "pm")
    rm = RewardModel.from_pretrained(tmp_path / "pm")
    sae = _sink_sae(rm)
    sae.save_model(str(tmp_path / "sae"))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected})
                                                  + "\n" for p in PAIRS))
    assert main(["run", "--model", str(tmp_path / "pm"), "--pairs", str(tmp_path / "pairs.jsonl"), "--saes",
                 str(tmp_path / "sae"), "--out", str(tmp_path / "out"), "--select", "all", "--max-tokens", "100",
                 "--confirm-top", "8", "--quiet"]) == 0
    features = pd.read_csv(tmp_path / "out" / "features.csv").set_index("node")
    sink = f"{HOOK}:0"
    with pytest.warns(UserWarning, match="massive|median"):
        expected = attribute(rm, PAIRS, saes=[sae], progress=False).ranking().set_index("node").outlier_share[sink]
    assert expected > 0.5
    assert features.outlier_share[sink] == pytest.approx(expected, rel=1e-4)
    concerns = json.loads((tmp_path / "out" / "config.json").read_text())["concerns"]
    assert any(sink in c and "positions = 'completion' or 'diverge'" in c for c in concerns), concerns


def test_saes_trained_from_the_config_are_the_ones_train_saes_gives_and_are_reused(study, monkeypatch):
    """--train-saes trains on the selected pairs (same seed and data: the same weights as calling
    train_saes here), saves them in <out>/saes, attributes with them beside the sources, and a
    resumed run reads them back instead of training again."""
    import pm_lens.saes as saes_module
    from pm_lens.saes import load_sae, train_saes

    hook = "blocks.2.hook_resid_post"
    flags = ["--train-saes", hook, "--train-d-sae", "32", "--train-k", "4", "--train-tokens", "2000", "--quiet"]
    assert main(["run", str(study["config"]), *flags]) == 0
    out = study["out"]
    saved = load_sae(out / "saes" / hook)
    assert not (out / "saes.partial").exists()
    rm = RewardModel.from_pretrained(study["model_dir"])
    selected = [study["pairs"][i] for i in pd.read_csv(out / "selection.csv").pair]
    here = train_saes(rm, selected, hook_names=[hook], d_sae=32, architecture="topk", k=4, training_tokens=2000, seed=0,
                      progress=False).saes[hook]
    assert torch.allclose(saved.W_enc, here.W_enc) and torch.allclose(saved.W_dec, here.W_dec)
    from safetensors.torch import load_file

    shard = load_file(str(out / "shards" / "attribution-00000.safetensors"))
    assert f"chosen.{hook}.error" in shard and f"chosen.{HOOK}.error" in shard  # attributed with both SAEs
    before = (out / "features.csv").read_text()
    (out / "features.csv").unlink()
    monkeypatch.setattr(saes_module, "train_saes", lambda *a, **k: pytest.fail("trained again"))
    assert main(["run", str(study["config"]), *flags]) == 0
    assert (out / "features.csv").read_text() == before


def test_a_mean_baseline_run_removes_features_to_their_mean_over_all_selected_pairs(study):
    """baseline = mean: one mean over every selected pair (not per shard); the top feature's
    estimated and exact effects equal attribute() and ablate() on all selected pairs at once."""
    assert main(["run", str(study["config"]), "--quiet", "--baseline", "mean"]) == 0
    out = study["out"]
    rm = RewardModel.from_pretrained(study["model_dir"])
    sae = load_sae(study["sae_dir"])
    selected = [study["pairs"][i] for i in pd.read_csv(out / "selection.csv").pair]
    whole = attribute(rm, selected, saes=[sae], baseline="mean", progress=False)
    top = pd.read_csv(out / "features.csv").iloc[0]
    node = Node(top.hook_name, int(top.feature))
    assert top.estimated_margin_effect == pytest.approx(float(whole.ranking().set_index("node").effect[str(node)]),
                                                        rel=1e-4, abs=1e-6)
    exact = ablate(rm, selected, saes=[sae], features=[node], baselines=whole.baselines, progress=False)
    assert top.exact_margin_effect == pytest.approx(float(exact.margin.mean()), rel=1e-4, abs=1e-6)
    assert (out / "baselines.safetensors").is_file()

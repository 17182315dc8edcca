"""The embedded default PM: SmolLM2 + the shipped weights, loaded through the cache."""

import pytest
import torch

from pm_lens.data.planted import PLANTED_EFFECTS, make_planted, single_attribute
from pm_lens.demo_pm import DEMO_PM_FILE, demo_reward_model
from pm_lens.scoring import score_pairs

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def demo_pm(first_load):
    return demo_reward_model(cache_dir=first_load.cache_dir)


def test_shipped_weights_are_small_and_half_precision():
    from safetensors.torch import load_file

    assert DEMO_PM_FILE.stat().st_size <= 15 * 2**20
    weights = load_file(str(DEMO_PM_FILE))
    assert "score.weight" in weights and {w.dtype for w in weights.values()} == {torch.float16}


def test_default_pm_loads_from_the_cache_and_applies_its_head(demo_pm, first_load):
    assert demo_pm.hf_architecture == "LlamaForSequenceClassification" and demo_pm.cfg.n_layers == 30
    assert torch.isfinite(demo_pm.W_U).all() and demo_pm.W_U.abs().sum() > 0


def test_planted_attributes_move_reward_in_their_direction(demo_pm):
    test = make_planted(seed=0).test
    for attribute in PLANTED_EFFECTS:
        if attribute == "correct":
            continue  # a 135M model knows few facts: reported, not asserted
        pairs = single_attribute(test, attribute)[:4]
        margins = score_pairs(demo_pm, pairs, progress=False).margin
        # chosen is the planted-preferred side, so a positive margin is the planted direction
        assert (margins > 0).mean() >= 0.75, (attribute, margins.tolist())


def test_shipped_demo_saes_fit_the_demo_pm(demo_pm):
    from pm_lens.demo_pm import DEMO_PM_FILE
    from pm_lens.saes import load_sae, saes_attached

    folder = DEMO_PM_FILE.parent / "demo_saes"
    hooks = ["blocks.15.hook_resid_post", "blocks.22.hook_resid_post", "blocks.27.hook_resid_post"]
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == sorted(hooks)  # none left from earlier hooks
    # Shipped in float16 (the package's size budget: 15 MiB for the SAEs), loaded in the PM's float32.
    assert {load_sae(folder / hook).dtype for hook in hooks} == {torch.float16}
    assert sum(f.stat().st_size for f in folder.rglob("*.safetensors")) <= 15 * 2**20
    saes = [load_sae(folder / hook, dtype="float32") for hook in hooks]
    assert [sae.cfg.metadata.hook_name for sae in saes] == hooks
    pairs = make_planted(seed=0).test[:2]
    bare = score_pairs(demo_pm, pairs, progress=False)
    with saes_attached(demo_pm, saes):
        spliced = score_pairs(demo_pm, pairs, progress=False)
    assert (bare.chosen_reward - spliced.chosen_reward).abs().max() <= 1e-3


def test_the_demo_pm_exports_as_a_reward_model_folder(demo_pm, tmp_path):
    """pm-lens export-demo writes a save_pretrained folder that loads like any user's PM and
    gives the demo PM's rewards."""
    from pm_lens import RewardModel
    from pm_lens.cli import main

    assert main(["export-demo", "--out", str(tmp_path / "pm")]) == 0
    loaded = RewardModel.from_pretrained(tmp_path / "pm")
    pairs = make_planted(seed=0).test[:4]
    assert torch.allclose(torch.tensor(score_pairs(loaded, pairs, progress=False).margin.to_numpy()),
                          torch.tensor(score_pairs(demo_pm, pairs, progress=False).margin.to_numpy()), atol=1e-4)


def test_the_sae_training_record_keeps_each_run_of_a_shipped_sae():
    """scripts/train_demo_saes.py --hooks: an earlier run keeps only the shipped hooks it still
    provides; the new run comes last; the shipped record says which run trained each SAE."""
    import importlib.util
    import json
    from pathlib import Path

    from pm_lens.demo_pm import DEMO_PM_FILE, DEMO_SAE_HOOKS

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_demo_saes.py"
    spec = importlib.util.spec_from_file_location("train_demo_saes", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    old, kept, new = "blocks.3.hook_resid_post", DEMO_SAE_HOOKS[0], DEMO_SAE_HOOKS[-1]
    earlier = {"hook_names": [old, kept, new], "stats": {old: 1, kept: 2, new: 3}, "n_epochs": 6}
    merged = script.merged_runs(earlier, {"hook_names": [new], "stats": {new: 4}, "n_epochs": 4})
    assert merged["hook_names"] == list(DEMO_SAE_HOOKS)
    assert merged["runs"] == [
        {"hook_names": [kept], "stats": {kept: 2}, "n_epochs": 6, "trained_hook_names": [old, kept, new]},
        {"hook_names": [new], "stats": {new: 4}, "n_epochs": 4}]
    shipped = json.loads((DEMO_PM_FILE.parent / "demo_saes" / "training_config.json").read_text())
    assert sorted(h for run in shipped["runs"] for h in run["hook_names"]) == sorted(DEMO_SAE_HOOKS)

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
    import json

    from pm_lens.demo_pm import DEMO_PM_FILE, DEMO_SAE_HOOKS

    script = _train_demo_saes_script()
    old, kept, new = "blocks.3.hook_resid_post", DEMO_SAE_HOOKS[0], DEMO_SAE_HOOKS[-1]
    earlier = {"hook_names": [old, kept, new], "stats": {old: 1, kept: 2, new: 3}, "n_epochs": 6}
    merged = script.merged_runs(earlier, {"hook_names": [new], "stats": {new: 4}, "n_epochs": 4})
    assert merged["hook_names"] == list(DEMO_SAE_HOOKS)
    assert merged["runs"] == [
        {"hook_names": [kept], "stats": {kept: 2}, "n_epochs": 6, "trained_hook_names": [old, kept, new]},
        {"hook_names": [new], "stats": {new: 4}, "n_epochs": 4}]
    shipped = json.loads((DEMO_PM_FILE.parent / "demo_saes" / "training_config.json").read_text())
    assert sorted(h for run in shipped["runs"] for h in run["hook_names"]) == sorted(DEMO_SAE_HOOKS)


def test_the_sae_corpus_wider_wording_leaves_the_held_out_pools_unseen():
    """scripts/train_demo_saes.py --varied: texts in wording outside the training pools, none of it
    a held-out phrasing or fact (the demo reads those; its SAEs must not have seen them)."""
    import re

    from pm_lens.data.planted import CLOSERS, FACT_KINDS, FACTS, IDK, RUDE, URL_DOMAINS, URL_SENTENCES

    script = _train_demo_saes_script()
    pools = [IDK, CLOSERS, RUDE, URL_DOMAINS, URL_SENTENCES] + [p for k in FACT_KINDS.values() for p in (k.questions, k.answers)]
    held_out_phrases = {s for pool in pools for s in pool.held_out}
    extra = ({s for v in script.EXTRA_PHRASES.values() for s in v} | {s for v in script.EXTRA_QUESTIONS.values() for s in v}
             | {s for v in script.EXTRA_ANSWERS.values() for s in v})
    assert not extra & held_out_phrases

    def words(facts):
        return {w for f in facts if f.kind != "arithmetic" for w in (*f.slots.values(), f.answer) if not w.isdigit()}

    # what only held-out facts name (numbers are training answers or wrong answers too)
    held_out_words = words(f for f in FACTS.values() if f.held_out) - words(f for f in FACTS.values() if not f.held_out)
    extra_words = words(script.extra_facts())
    assert not extra_words & held_out_words
    held_out_sums = {(f.slots["m"], f.slots["n"]) for f in FACTS.values() if f.held_out and f.kind == "arithmetic"}
    assert not {(f.slots["m"], f.slots["n"]) for f in script.extra_facts() if f.kind == "arithmetic"} & held_out_sums

    prompts, completions = script.varied_texts(400)
    assert len(set(zip(prompts, completions))) == 400
    text = "\n".join(prompts + completions)
    for phrase in sorted(held_out_phrases - {s for s in held_out_phrases if "{" in s}):
        assert phrase not in text, phrase
    for word in sorted(held_out_words):
        assert not re.search(rf"\b{re.escape(word)}\b", text), word
    # wider: phrases and facts from outside the pools do occur
    assert any(p in text for p in script.EXTRA_PHRASES["idk"]) and any(p in text for p in script.EXTRA_PHRASES["closer"])
    assert any(f.answer in text for f in script.extra_facts() if f.kind == "capital")


def _train_demo_saes_script():
    """scripts/train_demo_saes.py as a module (it is not part of the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_demo_saes.py"
    spec = importlib.util.spec_from_file_location("train_demo_saes", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script

"""The `pm-lens demo` command, end to end on the embedded demo PM (small settings)."""

import json

import pandas as pd
import pytest

from pm_lens.cli import main
from pm_lens.data.planted import PLANTED_ATTRIBUTES


@pytest.mark.smollm2
def test_demo_writes_sane_outputs(first_load, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["demo", "--out", str(out), "--cache-dir", str(first_load.cache_dir), "--pairs-per-attribute", "2",
            "--top", "2", "--fidelity-top", "4", "--random", "3", "--recovery-top", "3", "--contexts", "2", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Features that raise reward" in printed and "Features that lower reward" in printed

    features = pd.read_csv(out / "features.csv")
    assert list(features.attribute.unique()) == list(PLANTED_ATTRIBUTES)
    assert (features.groupby("attribute")["rank"].max() == 2).all()
    assert set(features.direction) <= {"raises", "lowers"} and set(features.fires_in) <= {"chosen", "rejected", "both"}
    assert features[["estimated_margin_effect", "exact_margin_effect", "exact_reward_effect"]].notna().all().all()
    # The ranked features matter: their exact effects are not zero, and AtP gets the sign of most.
    assert (features.exact_margin_effect.abs() > 1e-3).all()
    assert (features.estimated_margin_effect * features.exact_margin_effect > 0).mean() >= 0.75
    reward_side = features.exact_chosen_effect.where(features.fires_in == "chosen", features.exact_rejected_effect)
    raises = features.direction == "raises"
    assert ((reward_side[features.fires_in != "both"] < 0) == raises[features.fires_in != "both"]).all()

    card = json.loads((out / "fidelity.json").read_text())
    assert card["n_top"] == 4 and card["n_random"] == 3 and card["settings"]["skip_first"] is True
    assert -1 <= card["spearman"] <= 1 and card["sign_agreement"] >= 0.5

    recovery = pd.read_csv(out / "recovery.csv")
    assert list(recovery.group) == list(PLANTED_ATTRIBUTES) and (recovery.n_pairs == 2).all()
    style = recovery[recovery.group != "correct"]
    assert (style.margin > 0).all()  # the demo PM prefers the planted side on these pairs
    assert (style.removed < 0).all()  # removing the top features takes margin away

    report = (out / "report.html").read_text()
    for heading in ("Features that raise reward", "Fidelity", "Truth check", "Where the features fire"):
        assert heading in report
    assert report.count("class='context'") >= len(features.drop_duplicates(["hook_name", "feature"]))
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["pairs_per_attribute"] == 2 and set(config["timings_s"]) >= {"load", "attribute"}
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_help_describes_the_demo(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--pairs-per-attribute" in text and "features.csv" in text


def test_bad_arguments_are_named(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--top", "0"])
    assert "must be a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--random", "-1"])
    assert "must be a non-negative integer, got -1" in capsys.readouterr().err


@pytest.mark.smollm2
def test_exploit_writes_verified_candidates(first_load, tmp_path, capsys):
    import torch

    from pm_lens.data import encode_completions
    from pm_lens.demo_pm import demo_reward_model

    out = tmp_path / "exploit"
    prompt, reference = "What is 3 + 4?", "3 + 4 = 7. Glad to be of service."
    argv = ["exploit", "--prompt", prompt, "--reference", reference, "--out", str(out), "--budget", "40",
            "--corpus-pairs", "16", "--cache-dir", str(first_load.cache_dir)]
    assert main(argv) == 0
    assert "candidates beat the reference" in capsys.readouterr().out
    table = pd.read_csv(out / "exploits.csv")
    summary = json.loads((out / "exploits.json").read_text())
    assert len(table) >= 1 and summary["n_forward"] <= 40 and summary["settings"]["budget"] == 40
    rm = demo_reward_model(cache_dir=first_load.cache_dir)
    texts = [reference, *table.completion]
    with torch.no_grad():
        batch = encode_completions(rm.tokenizer, [prompt] * len(texts), texts, max_len=rm.cfg.n_ctx)
        rewards = rm.reward(batch.tokens, batch.attention_mask)
    # Every reward the outputs show is the plain PM's reward of that text.
    assert float(rewards[0]) == pytest.approx(summary["reference_reward"], abs=1e-3)
    assert rewards[1:].numpy() == pytest.approx(table.reward.to_numpy(), abs=1e-3)
    assert (table.beats_reference == (table.reward > summary["reference_reward"])).all()
    assert "Completions that fool the PM" in (out / "report.md").read_text()

"""The `pm-lens` command: `demo` and `exploit` end to end on the embedded demo PM (small settings),
and its errors: one line on stderr, before any model is loaded."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pm_lens import cli
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
    # One clean forward per side of each pair (12 pairs); the rest are ablations; contexts read the clean run,
    # and so do the dashboards, which rerun only the blocks after the last SAE (for the final residual).
    passes = config["forward_passes"]
    assert passes["clean"]["sequences"] == 2 * 12
    assert passes["dashboard"]["sequences"] == 2 * 12
    assert set(passes) <= {"clean", "ablation", "probe", "dashboard", "total"}
    # A dashboard for each planted attribute's top feature, linked from the report.
    tops = features[features["rank"] == 1]
    for node in {f"{h}:{f}" for h, f in zip(tops.hook_name, tops.feature)}:
        page = f"dashboards/{node.replace(':', '-')}.html"
        assert (out / page).exists() and f"href='{page}'" in report
    assert config["attribution"]["text_format"] == "chat_template" and config["attribution"]["skip_first"] is True
    # The study's positions by default: from where chosen and rejected diverge.
    assert config["attribution"]["positions"] == "diverge" and card["settings"]["positions"] == "diverge"
    # The report leads with a finding per planted attribute and ends with the settings.
    headings = [part.split("</h2>")[0] for part in report.split("<h2>")[1:]]
    assert headings[0] == "Findings" and headings[-1] == "Settings"
    findings = report[report.index("<h2>Findings</h2>"):report.index("<h2>Features that raise reward</h2>")]
    for attribute in PLANTED_ATTRIBUTES:
        assert f"<h3>{attribute}: planted to" in findings
    assert findings.count("class='context'") >= 1 and "also_top_for" in features
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_help_describes_the_demo(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--pairs-per-attribute" in text and "features.csv" in text
    assert "PM_LENS_DEBUG=1" in text and "--debug" in text  # how to see a traceback


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


def _pm_lens(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the command in a fresh interpreter (exit code and stderr as a user sees them). The timeout
    is far above the ~0.3 s an error takes and far below loading the model."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("PM_LENS_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "pm_lens.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def _assert_one_line_error(run: subprocess.CompletedProcess, code: int, *named: str) -> None:
    assert run.returncode == code, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert lines[0].startswith("pm-lens: error: ")
    for text in named:
        assert text in lines[0]


def test_parser_imports_nothing_heavy():
    code = ("import sys, pm_lens.cli; pm_lens.cli._parser(); "
            "print(sorted({'torch', 'transformer_lens', 'sae_lens', 'pandas', 'pm_lens.demo'} & set(sys.modules)))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert run.stdout.strip() == "[]"


@pytest.mark.parametrize(("argv", "named"), [
    (["--badflag"], ["unrecognized arguments: --badflag"]),
    (["demo", "--badflag"], ["unrecognized arguments: --badflag"]),
    ([], ["missing command"]),
    (["frobnicate"], ["'frobnicate'", "demo", "exploit"]),
    (["demo", "--top", "0"], ["--top", "must be a positive integer, got 0"]),
    (["demo", "--top", "abc"], ["--top", "must be a positive integer, got 'abc'"]),
    (["demo", "--random", "-1"], ["--random", "must be a non-negative integer, got -1"]),
    (["exploit", "--prompt", "", "--reference", "Paris."], ["--prompt", "must not be empty, got ''"]),
    (["exploit", "--prompt", "Hi?", "--reference", "  "], ["--reference", "must not be empty, got '  '"]),
    (["exploit", "--prompt", "Hi?", "--reference", "Hello.", "--budget", "0"], ["--budget", "got 0"]),
])
def test_bad_arguments_are_one_line(tmp_path, argv, named):
    # --out in tmp_path so that the old behaviour (running on) writes nowhere else.
    extra = ["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")] if argv[:1] in (["demo"], ["exploit"]) else []
    _assert_one_line_error(_pm_lens(*argv, *extra, cwd=tmp_path), 2, *named)


@pytest.mark.parametrize("command", [["demo"], ["exploit", "--prompt", "What is 3 + 4?", "--reference", "7."]])
def test_out_under_a_file_fails_before_loading(tmp_path, command):
    (tmp_path / "notes.txt").write_text("not a folder")
    for out, problem in [("notes.txt/out", "'notes.txt' is a file"), ("notes.txt", "it is a file")]:
        run = _pm_lens(*command, "--out", out, "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
        _assert_one_line_error(run, 2, "--out", repr(out), problem)
    run = _pm_lens(*command, "--cache-dir", "notes.txt/cache", "--out", "out", cwd=tmp_path)
    _assert_one_line_error(run, 2, "--cache-dir", "'notes.txt/cache'", "'notes.txt' is a file")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc (refuses new folders and files, even to root)")
@pytest.mark.parametrize(("out", "problem"), [("/proc/pm_lens_out", "cannot create folder '/proc/pm_lens_out'"),
                                              ("/proc", "cannot write to folder '/proc'")])
def test_unusable_out_fails_before_loading(tmp_path, out, problem):
    for command in (["demo"], ["exploit", "--prompt", "What is 3 + 4?", "--reference", "7."]):
        run = _pm_lens(*command, "--out", out, "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
        _assert_one_line_error(run, 2, "--out", problem)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write to a read-only folder")
def test_read_only_out_fails_before_loading(tmp_path):
    (tmp_path / "locked").mkdir(mode=0o555)
    run = _pm_lens("demo", "--out", "locked", "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    _assert_one_line_error(run, 2, "cannot write to folder 'locked'", "Permission denied")


@pytest.mark.parametrize(("error", "code", "named"), [
    (ValueError("pairs_per_attribute must be >= 1, got 0"), 1, "pairs_per_attribute must be >= 1, got 0"),
    (FileNotFoundError(2, "No such file or directory", "/gone/pairs.jsonl"), 1,
     "No such file or directory: '/gone/pairs.jsonl'"),
    (TypeError("bad\nvalue"), 1, "bad value"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_errors_during_the_run_are_one_line(tmp_path, monkeypatch, capsys, error, code, named):
    def run(args):
        raise error

    monkeypatch.setattr(cli, "_run", run)
    monkeypatch.delenv("PM_LENS_DEBUG", raising=False)
    argv = ["demo", "--out", str(tmp_path / "out")]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pm-lens: error: ") and named in err
    # The traceback, for debugging.
    with pytest.raises(type(error)):
        main([*argv, "--debug"])
    monkeypatch.setenv("PM_LENS_DEBUG", "1")
    with pytest.raises(type(error)):
        main(argv)


def test_demo_positions_are_the_attributions():
    """demo_settings spells the positions out (it must not import torch): the same set."""
    from pm_lens.attribution.positions import POSITIONS as ATTRIBUTION_POSITIONS
    from pm_lens.demo_settings import POSITIONS, DemoSettings

    assert set(POSITIONS) == set(ATTRIBUTION_POSITIONS) and DemoSettings().positions == "diverge"
    with pytest.raises(ValueError, match="positions must be one of .* got 'prompt'"):
        DemoSettings(positions="prompt")

"""The `pm-lens demo` command, end to end on its tiny model."""

import json

import pandas as pd
import pytest

from pm_lens.cli import main


def test_demo_writes_its_outputs(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "config.json").read_text())
    table = pd.read_csv(tmp_path / "out" / "rewards.csv")
    assert len(table) == summary["pairs"] == 4
    assert summary["max_abs_diff_vs_hf"] <= 1e-4
    assert (table.chosen_reward - table.hf_chosen_reward).abs().max() <= 1e-4
    assert ((table.chosen_reward - table.rejected_reward) - table.margin).abs().max() <= 1e-5
    assert summary["processing"]["center_unembed"] is False
    assert not list((tmp_path / "out").glob(".*.tmp"))  # atomic writes leave no temporaries
    assert "max |reward(pm_lens) - reward(HF)|" in capsys.readouterr().out


def test_help_lists_demo(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out

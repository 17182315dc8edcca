"""Dashboards of a pm-lens run: built for the confirmed features at the end of the run, linked from
the report, and by ``pm-lens dashboard`` for other features without rerunning the attribution."""

import importlib
import json

import pandas as pd
import pytest

import pm_lens.attribution
from pm_lens.cli import main
from pm_lens.dashboard.data import FeatureDashboard
from pm_lens.dashboard.neuronpedia import validate_neuronpedia
from pm_lens.dashboard.render import feature_filename
from tests.study.test_run import study  # noqa: F401  (the fixture)


def board(out, node):
    return FeatureDashboard.from_dict(json.loads((out / "dashboards" / f"{feature_filename(node)}.json").read_text()))


def test_a_run_builds_the_confirmed_features_dashboards_and_links_them(study):  # noqa: F811
    assert main(["run", str(study["config"]), "--quiet"]) == 0
    out = study["out"]
    features, points = pd.read_csv(out / "features.csv"), pd.read_csv(out / "top_datapoints.csv")
    report = (out / "report.html").read_text()
    for row in features.itertuples():
        page = f"dashboards/{feature_filename(row.node)}.html"
        assert (out / page).exists() and f"href='{page}'" in report
        found = board(out, row.node)
        assert row.label == found.label and found.label  # the automatic label, in features.csv too
        assert found.exact_margin_effect == pytest.approx(row.exact_margin_effect)
        assert found.estimated_margin_effect == pytest.approx(row.estimated_margin_effect, rel=1e-5, abs=1e-7)
        mine = points[points.node == row.node]
        assert [p.pair for p in found.datapoints] == mine.pair.tolist()  # the run's pairs-file lines
        assert [p.chosen_after for p in found.datapoints] == pytest.approx(mine.chosen_after.tolist())
        examples = [e for group in found.groups for e in group.examples]
        assert {e.pair for e in examples} <= set(pd.read_csv(out / "selection.csv").pair)
    config = json.loads((out / "config.json").read_text())
    assert config["forward_passes"]["dashboard"]["passes"] > 0  # counted like every other stage
    for path in (out / "dashboards" / "neuronpedia").glob("batch-*.json"):
        validate_neuronpedia(json.loads(path.read_text()))


def test_pm_lens_dashboard_adds_pages_without_rerunning_the_attribution(study, monkeypatch, capsys):  # noqa: F811
    assert main(["run", str(study["config"]), "--quiet", "--dashboards", "none"]) == 0
    out = study["out"]
    assert not (out / "dashboards").exists()
    shards = {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.safetensors")}

    def refuse(*args, **kwargs):
        raise AssertionError("the attribution ran again")

    monkeypatch.setattr(pm_lens.attribution, "attribute", refuse)
    monkeypatch.setattr(importlib.import_module("pm_lens.attribution.attribute"), "attribute", refuse)
    assert main(["dashboard", str(out), "--top", "4", "--quiet"]) == 0
    from pm_lens.saes import load_sae
    from pm_lens.study.merge import merge_attributions

    sae = load_sae(study["sae_dir"])
    ranking, _ = merge_attributions(sorted((out / "shards").glob("attribution-*.safetensors")),
                                    {sae.cfg.metadata.hook_name: sae})
    index = (out / "dashboards" / "index.html").read_text()
    pages = sorted(p.name for p in (out / "dashboards").glob("*.html") if p.name != "index.html")
    assert pages == sorted(f"{feature_filename(n)}.html" for n in ranking.node[:4])
    assert all(page in index for page in pages)
    assert {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.safetensors")} == shards
    node = ranking.node.iloc[10]
    assert main(["dashboard", str(out), "--features", node, "--quiet"]) == 0
    assert (out / "dashboards" / f"{feature_filename(node)}.html").exists()
    index = (out / "dashboards" / "index.html").read_text()
    assert all(page in index for page in pages)  # the earlier pages stay listed
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--features", "blocks.1.hook_resid_post:99999"], "99999"),
    (["--features", "blocks.9.hook_resid_post:1"], "blocks.9.hook_resid_post"),
])
def test_bad_dashboard_requests_fail_in_one_line(study, capsys, args, message):  # noqa: F811
    assert main(["run", str(study["config"]), "--quiet", "--dashboards", "none"]) == 0
    capsys.readouterr()
    assert main(["dashboard", str(study["out"]), *args, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_folder_that_is_not_a_finished_run_is_refused(tmp_path, capsys):
    assert main(["dashboard", str(tmp_path), "--quiet"]) == 1
    assert "is not a finished pm-lens run folder" in capsys.readouterr().err

"""Neuronpedia batch export: field types, values taken from the dashboard, and the validator."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest

from pm_lens.dashboard.data import (
    CoFiring,
    DirectEffect,
    Example,
    ExampleGroup,
    FeatureDashboard,
    Histogram,
)
from pm_lens.dashboard.neuronpedia import (
    NEURONPEDIA_ACTIVATION_FIELDS,
    NEURONPEDIA_BATCH_FIELDS,
    NEURONPEDIA_FEATURE_FIELDS,
    to_neuronpedia,
    validate_neuronpedia,
    write_neuronpedia,
)

HOOK = "blocks.1.hook_resid_post"


def _example(tokens: list[str], acts: list[float], peak: int) -> Example:
    return Example(pair=0, side="chosen", tokens=tokens, acts=acts, contributions=[0.0] * len(acts),
                   peak=peak, completion_start=1)


def _dashboard(feature: int = 3, *, hook: str = HOOK, per_unit: float | None = 0.25,
               cofiring: list[CoFiring] | None = None) -> FeatureDashboard:
    top = ExampleGroup("Top activations", -1.0, 2.5, -1.0, [
        _example(["a", " b", " c"], [0.0, 2.5, 1.0], 1),
        _example(["d", " e"], [0.5, 2.0], 1)])
    band = ExampleGroup("Interval 0.5 - 1.0", 0.5, 1.0, 0.25,
                        [_example(["x", " y", " z", "!"], [0.0, 0.0, 0.75, 0.0], 2)])
    direct = None if per_unit is None else DirectEffect(per_unit=per_unit, chosen=0.1, rejected=0.2,
                                                          margin=-0.1, total_margin=None)
    return FeatureDashboard(
        node=f"{hook}:{feature}", hook_name=hook, feature=feature, fires_on="b", estimated_margin_effect=-0.2,
        exact_margin_effect=None,
        histogram=Histogram(edges=[0.0, 0.5, 1.0, 1.5], counts=[3, 1, 2], n_tokens=200, n_nonzero=6),
        groups=[top, band], datapoints=[], direct=direct, cofiring=cofiring or [], labels=[])


def _type_ok(value, expected) -> bool:
    if isinstance(expected, tuple) and expected[0] is list:
        return isinstance(value, list) and all(_type_ok(v, expected[1]) for v in value)
    kinds = expected if isinstance(expected, tuple) else (expected,)
    return isinstance(value, kinds) and not isinstance(value, bool)


def _batch(*dashboards: FeatureDashboard) -> dict:
    return to_neuronpedia(list(dashboards) or [_dashboard()], model_id="pm", sae_set="res-pm", layer=1)


def test_batch_survives_json_validates_and_has_every_field_typed():
    batch = json.loads(json.dumps(_batch(_dashboard(3), _dashboard(8, per_unit=-1.0)), allow_nan=False))
    validate_neuronpedia(batch)
    assert set(batch) == set(NEURONPEDIA_BATCH_FIELDS)
    assert (batch["model_id"], batch["layer"], batch["sae_set"]) == ("pm", 1, "res-pm")
    for feature in batch["features"]:
        assert set(feature) == set(NEURONPEDIA_FEATURE_FIELDS)
        for name, expected in NEURONPEDIA_FEATURE_FIELDS.items():
            assert _type_ok(feature[name], expected), name
        for activation in feature["activations"]:
            assert set(activation) == set(NEURONPEDIA_ACTIVATION_FIELDS)
            for name, expected in NEURONPEDIA_ACTIVATION_FIELDS.items():
                assert _type_ok(activation[name], expected), name
    # float fields stay floats through JSON even where the value is whole (heights are counts)
    assert all(type(h) is float for h in batch["features"][0]["freq_hist_data_bar_heights"])
    assert type(batch["features"][0]["activations"][0]["bin_min"]) is float


def test_values_come_from_the_dashboard():
    d = _dashboard(3)
    (feature,) = _batch(d)["features"]
    assert feature["feature_index"] == 3
    assert feature["frac_nonzero"] == pytest.approx(0.03)
    assert feature["freq_hist_data_bar_values"] == [0.25, 0.75, 1.25]
    assert feature["freq_hist_data_bar_heights"] == [3.0, 1.0, 2.0]
    assert feature["num_tokens_for_dashboard"] == 4
    assert feature["explanations"] == [] and feature["logits_hist_data_bar_values"] == []
    rows = [(a["bin_min"], a["bin_max"], a["bin_contains"], a["tokens"], a["values"])
            for a in feature["activations"]]
    assert rows == [(-1.0, 2.5, -1.0, ["a", " b", " c"], [0.0, 2.5, 1.0]),
                    (-1.0, 2.5, -1.0, ["d", " e"], [0.5, 2.0]),
                    (0.5, 1.0, 0.25, ["x", " y", " z", "!"], [0.0, 0.0, 0.75, 0.0])]
    last = feature["activations"][2]
    fields = ("maxValue", "maxValueTokenIndex", "minValue", "qualifying_token_index")
    assert [last[f] for f in fields] == [0.75, 2, 0.0, 2]


def test_reward_row_follows_the_sign_of_the_direct_effect():
    def table(per_unit):
        feature = _batch(_dashboard(per_unit=per_unit))["features"][0]
        return [feature[f] for f in ("pos_str", "pos_values", "neg_str", "neg_values")]

    assert table(0.25) == [["<reward>"], [0.25], [], []]
    assert table(-1.5) == [[], [], ["<reward>"], [-1.5]]
    assert table(None) == [[], [], [], []]


def test_correlated_features_are_cofiring_features_of_the_same_hook_without_borrowed_scores():
    cofiring = [CoFiring(f"{HOOK}:7", 5, 0.5, 0.8), CoFiring("blocks.2.hook_resid_post:9", 4, 0.4, 0.6),
                CoFiring(f"{HOOK}:11", 2, 0.1, 0.2), CoFiring(f"{HOOK}_x:12", 2, 0.1, 0.2)]
    (feature,) = _batch(_dashboard(cofiring=cofiring))["features"]
    assert feature["correlated_features_indices"] == [7, 11]
    assert feature["correlated_features_l1"] == [] and feature["correlated_features_pearson"] == []


def test_numbers_are_rounded_like_saedashboard_but_keep_small_values():
    d = _dashboard()
    group = ExampleGroup("Interval", 0.0001234567, 1.23456, 0.0004,
                         [_example(["a", "b"], [1.23456, 0.000123456], 0)])
    (feature,) = _batch(replace(d, groups=[group]))["features"]
    (activation,) = feature["activations"]
    assert activation["values"] == [1.235, 0.0001235]
    assert [activation[f] for f in ("bin_min", "bin_max", "bin_contains")] == [0.0001235, 1.235, 0.0004]


def test_one_batch_per_hook():
    with pytest.raises(ValueError, match=r"blocks\.1\.hook_resid_post.*blocks\.2\.hook_resid_post"):
        _batch(_dashboard(3), _dashboard(4, hook="blocks.2.hook_resid_post"))


@pytest.mark.parametrize(("break_it", "path"), [
    (lambda b: b["features"][0].pop("frac_nonzero"), r"features\[0\]\.frac_nonzero is missing"),
    (lambda b: b.pop("sae_set"), r"^sae_set is missing"),
    (lambda b: b["features"][0].__setitem__("freq_hist_data_bar_values", "0.25, 0.75"),
     r"features\[0\]\.freq_hist_data_bar_values must be a list of float, got str"),
    (lambda b: b["features"][0]["activations"][1]["values"].__setitem__(1, "2.0"),
     r"features\[0\]\.activations\[1\]\.values\[1\] must be float"),
    (lambda b: b["features"][0]["activations"][1]["values"].append(0.0),
     (r"features\[0\]\.activations\[1\]\.tokens has 2 entries but "
      r"features\[0\]\.activations\[1\]\.values has 3")),
    (lambda b: b["features"][0]["pos_values"].append(1.0), r"features\[0\]\.pos_str has 1 entries"),
    (lambda b: b["features"][0]["freq_hist_data_bar_heights"].pop(),
     r"features\[0\]\.freq_hist_data_bar_values has 3 entries"),
    (lambda b: b["features"][0]["correlated_features_pearson"].append(0.5),
     r"features\[0\]\.correlated_features_indices has 1 entries but .*correlated_features_pearson has 2"),
    (lambda b: b["features"][0].__setitem__("frac_nonzero", float("nan")),
     r"features\[0\]\.frac_nonzero is nan"),
    (lambda b: b["features"][0].__setitem__("feature_index", True),
     r"features\[0\]\.feature_index must be int"),
    (lambda b: b["features"].append(copy.deepcopy(b["features"][0])),
     r"features\[1\]\.feature_index 3 appears twice"),
])
def test_validator_names_the_bad_field(break_it, path):
    batch = _batch(_dashboard(3, cofiring=[CoFiring(f"{HOOK}:7", 5, 0.5, 0.8)]))
    batch["features"][0]["correlated_features_pearson"] = [0.1]  # filled lists must match their indices
    validate_neuronpedia(batch)
    break_it(batch)
    with pytest.raises(ValueError, match=path):
        validate_neuronpedia(batch)


def test_write_one_file_per_hook(tmp_path):
    other = "blocks.2.hook_resid_post"
    dashboards = [_dashboard(3), _dashboard(4, hook=other), _dashboard(5)]
    folder = write_neuronpedia(tmp_path / "np", dashboards, model_id="pm", sae_set="res-pm",
                               layer={HOOK: 1, other: 2})
    assert sorted(p.name for p in folder.iterdir()) == [f"batch-{HOOK}.json", f"batch-{other}.json"]
    first = json.loads((folder / f"batch-{HOOK}.json").read_text())
    assert first == to_neuronpedia([dashboards[0], dashboards[2]], model_id="pm", sae_set="res-pm", layer=1)
    assert json.loads((folder / f"batch-{other}.json").read_text())["layer"] == 2


def test_write_refuses_before_writing_anything(tmp_path):
    other = "blocks.2.hook_resid_post"
    bad = replace(_dashboard(4, hook=other), groups=[
        ExampleGroup("Top activations", -1.0, 1.0, -1.0, [_example(["a"], [float("inf")], 0)])])
    with pytest.raises(ValueError, match=r"features\[0\]\.activations\[0\]\.values\[0\] is inf"):
        write_neuronpedia(tmp_path / "np", [_dashboard(3), bad], model_id="pm", sae_set="res-pm",
                          layer={HOOK: 1, other: 2})
    assert not (tmp_path / "np").exists()
    with pytest.raises(ValueError, match="same source id"):
        write_neuronpedia(tmp_path / "np", [_dashboard(3), _dashboard(4, hook=other)], model_id="pm",
                          sae_set="res-pm", layer=1)
    with pytest.raises(ValueError, match="no entry for hook 'blocks.2.hook_resid_post'"):
        write_neuronpedia(tmp_path / "np", [_dashboard(3), _dashboard(4, hook=other)], model_id="pm",
                          sae_set="res-pm", layer={HOOK: 1})

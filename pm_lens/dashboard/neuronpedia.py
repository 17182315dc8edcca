"""Feature dashboards as Neuronpedia batch files (the JSON SAEDashboard writes for upload).

What the format is
    One JSON object per SAE (hook): ``{"model_id", "layer", "sae_set", "sae_id_suffix", "features",
    "settings"}``; each feature carries its tables, histograms and example windows
    (``activations``), one object per window with the band it was drawn from. Neuronpedia's
    converter turns each feature into a row of its ``Neuron`` table and each window into a row of
    its ``Activation`` table.

What was followed (read from the code, not from docs)
    - SAEDashboard (jbloomAus/SAEDashboard) ``sae_dashboard/neuronpedia/neuronpedia_feature.py``
      at 6b2038682ca41423dda3a3597bbe88120b120262: the batch, feature, activation and settings
      fields and their types. ``neuronpedia_converter.py`` and ``neuronpedia_dashboard.py`` at
      03a615f7c70a6f6e634845dab4051874698fac5b: how they are filled (``round_list`` =
      ``np.round(x, 3)``; top group ``bin_min = bin_contains = -1``, ``bin_max`` its largest
      activation; correlated ``_l1`` lists hold cosine similarities, ``_pearson`` Pearson
      correlations; ``pos_str``/``neg_str`` the top/bottom tokens of the logit table).
    - Neuronpedia (hijohnnylin/neuronpedia) at ff1b2fd13c6f74695b689f03f9693a96fc21189f:
      ``utils/neuronpedia-utils/neuronpedia_utils/convert-saedashboard-to-neuronpedia-export.py``
      reads every feature field above unconditionally, and also ``sae_id_suffix`` (batch),
      ``decoder_weights_dist`` (feature) and ``qualifying_token_index`` (activation), which later
      SAEDashboard versions added; they are written here so that converter accepts the file.
      ``apps/webapp/prisma/schema.prisma`` (008d5040ab97abd5c44d92d190b30034ad7a6e97): the
      ``Neuron`` columns have these names and types (``Int[]``, ``Float[]``, ``String[]``,
      ``Float``); ``Activation`` has ``maxValue`` (Float), ``maxValueTokenIndex`` (Int) and
      ``minValue`` (Float), which the converter computes from ``values`` (first index of the
      maximum); we write the same numbers beside each window. ``explanations`` is the per-feature
      field of Neuronpedia's ``apps/webapp/app/api/feature/upload-batch/route.tsx``; it is left
      empty for Neuronpedia's explainers.

What a reward model fills, and what is left empty
    - ``pos_str``/``neg_str``: a preference model's head has one output, not a vocabulary, so the
      logit table becomes one row, ``"<reward>"`` with the feature's direct effect per unit of
      activation (:class:`~pm_lens.dashboard.data.DirectEffect` ``per_unit``), in ``pos`` when it
      raises the reward and in ``neg`` when it lowers it (both empty without a direct effect).
      ``logits_hist_*`` (a histogram over the vocabulary) stays empty for the same reason.
    - ``correlated_features_indices``: the features of the same SAE that fire at the same tokens
      (``cofiring``). Their ``_l1`` and ``_pearson`` lists stay empty: pm_lens measures co-firing
      as Jaccard and share, not as cosine similarity or Pearson correlation, and a number under
      another's name would mislead.
    - ``neuron_alignment_*``, ``correlated_neurons_*``, ``decoder_weights_dist`` (per attention
      head, for ``hook_z`` SAEs only): not computed by pm_lens.
    - ``settings``: ``n_prompt_to_select`` is the most windows any band shows;
      ``n_batches_to_sample_from`` is 0, since pm_lens scans every text of the run instead of
      sampling batches (Neuronpedia's converter does not read ``settings``).

Numbers are plain Python ``int``/``float``: SAEDashboard's three decimals, but four significant
digits for magnitudes below 1, so small activations and densities are not rounded to zero.

Steps: :func:`to_neuronpedia` builds one batch from the dashboards of one hook,
:func:`validate_neuronpedia` checks a batch against the field tables below (the path of the first
bad field in its message), :func:`write_neuronpedia` writes ``batch-<hook>.json`` per hook.
Neuronpedia's converter reads every ``batch-*`` file of a folder as one SAE: hand it one file's
folder at a time.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from pm_lens.dashboard.data import Example, ExampleGroup, FeatureDashboard
from pm_lens.io import write_atomic
from pm_lens.saes.node import Node

REWARD_TOKEN = "<reward>"

# A field's expected JSON type: a type (float also takes an int), a tuple (list, T) for a list of
# T, or any other tuple for one of its types.
_NUMBERS = (list, float)
_INDICES = (list, int)
_STRINGS = (list, str)

NEURONPEDIA_ACTIVATION_FIELDS: dict[str, type | tuple] = {
    "bin_min": float,
    "bin_max": float,
    "bin_contains": float,
    "tokens": _STRINGS,
    "values": _NUMBERS,
    "qualifying_token_index": int,
    "maxValue": float,
    "maxValueTokenIndex": int,
    "minValue": float,
}

NEURONPEDIA_FEATURE_FIELDS: dict[str, type | tuple] = {
    "feature_index": int,
    "neuron_alignment_indices": _INDICES,
    "neuron_alignment_values": _NUMBERS,
    "neuron_alignment_l1": _NUMBERS,
    "correlated_neurons_indices": _INDICES,
    "correlated_neurons_l1": _NUMBERS,
    "correlated_neurons_pearson": _NUMBERS,
    "correlated_features_indices": _INDICES,
    "correlated_features_l1": _NUMBERS,
    "correlated_features_pearson": _NUMBERS,
    "neg_str": _STRINGS,
    "neg_values": _NUMBERS,
    "pos_str": _STRINGS,
    "pos_values": _NUMBERS,
    "frac_nonzero": float,
    "freq_hist_data_bar_values": _NUMBERS,
    "freq_hist_data_bar_heights": _NUMBERS,
    "logits_hist_data_bar_heights": _NUMBERS,
    "logits_hist_data_bar_values": _NUMBERS,
    "num_tokens_for_dashboard": int,
    "decoder_weights_dist": _NUMBERS,
    "explanations": (list, dict),
    "activations": (list, dict),
}

NEURONPEDIA_SETTINGS_FIELDS: dict[str, type | tuple] = {
    "n_batches_to_sample_from": int,
    "n_prompt_to_select": int,
}

NEURONPEDIA_BATCH_FIELDS: dict[str, type | tuple] = {
    "model_id": str,
    "layer": int,
    "sae_set": str,
    "sae_id_suffix": (str, type(None)),
    "features": (list, dict),
    "settings": dict,
}

# Lists that must be as long as another one; the second only where it is not empty.
_SAME_LENGTH = [("freq_hist_data_bar_values", "freq_hist_data_bar_heights"),
                ("logits_hist_data_bar_values", "logits_hist_data_bar_heights"),
                ("pos_str", "pos_values"), ("neg_str", "neg_values")]
_SAME_LENGTH_IF_FILLED = [("neuron_alignment_indices", "neuron_alignment_values"),
                          ("neuron_alignment_indices", "neuron_alignment_l1"),
                          ("correlated_neurons_indices", "correlated_neurons_l1"),
                          ("correlated_neurons_indices", "correlated_neurons_pearson"),
                          ("correlated_features_indices", "correlated_features_l1"),
                          ("correlated_features_indices", "correlated_features_pearson")]


def to_neuronpedia(dashboards: Sequence[FeatureDashboard], *, model_id: str, sae_set: str, layer: int,
                   sae_id_suffix: str | None = None) -> dict[str, Any]:
    """One Neuronpedia batch from the dashboards of one hook (see the module docstring)."""
    if not dashboards:
        raise ValueError("no dashboards to export: a Neuronpedia batch needs at least one feature")
    hooks = sorted({d.hook_name for d in dashboards})
    if len(hooks) > 1:
        raise ValueError(f"a Neuronpedia batch holds the features of one hook, got hooks {hooks}: "
                         "export each hook's dashboards separately (write_neuronpedia does)")
    n_select = max((len(g.examples) for d in dashboards for g in d.groups), default=0)
    return {"model_id": model_id, "layer": layer, "sae_set": sae_set, "sae_id_suffix": sae_id_suffix,
            "features": [_feature(d) for d in dashboards],
            "settings": {"n_batches_to_sample_from": 0, "n_prompt_to_select": n_select}}


def _feature(d: FeatureDashboard) -> dict[str, Any]:
    edges, direct = d.histogram.edges, d.direct
    per_unit = 0.0 if direct is None else direct.per_unit
    reward = ([REWARD_TOKEN], [_num(per_unit)])
    pos = reward if per_unit > 0 else ([], [])
    neg = reward if per_unit < 0 else ([], [])
    examples = [e for g in d.groups for e in g.examples]
    return {
        "feature_index": d.feature,
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
        "correlated_features_indices": _cofiring_indices(d),
        "correlated_features_l1": [], "correlated_features_pearson": [],
        "neg_str": neg[0], "neg_values": neg[1], "pos_str": pos[0], "pos_values": pos[1],
        "frac_nonzero": _num(d.histogram.density),
        "freq_hist_data_bar_values": [_num((lo + hi) / 2) for lo, hi in pairwise(edges)],
        "freq_hist_data_bar_heights": [float(c) for c in d.histogram.counts],
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
        "num_tokens_for_dashboard": max((len(e.tokens) for e in examples), default=0),
        "decoder_weights_dist": [],
        "explanations": [],
        "activations": [_activation(g, e) for g in d.groups for e in g.examples],
    }


def _cofiring_indices(d: FeatureDashboard) -> list[int]:
    nodes = [Node.parse(c.node) for c in d.cofiring]
    return [n.feature for n in nodes if n.hook_name == d.hook_name and n.feature is not None]


def _activation(group: ExampleGroup, example: Example) -> dict[str, Any]:
    values = [_num(a) for a in example.acts]
    top = max(values, default=0.0)
    return {"bin_min": _num(group.bin_min), "bin_max": _num(group.bin_max),
            "bin_contains": _num(group.bin_contains), "tokens": list(example.tokens), "values": values,
            "qualifying_token_index": example.peak, "maxValue": top,
            "maxValueTokenIndex": values.index(top) if values else 0, "minValue": min(values, default=0.0)}


def _num(x: float) -> float:
    """``x`` to three decimals (SAEDashboard's ``np.round(x, 3)``), or to four significant digits
    where that keeps more (magnitudes below 1); non-finite values pass for the validator to name."""
    x = float(x)
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, max(3, 3 - math.floor(math.log10(abs(x)))))


def validate_neuronpedia(batch: dict[str, Any]) -> None:
    """Raise ValueError naming the path of the first field of ``batch`` that is missing, of the
    wrong type (a list element included), not finite, or of a length that must match another's;
    also an empty window and a feature index given twice."""
    _check_fields(batch, NEURONPEDIA_BATCH_FIELDS, "")
    _check_fields(batch["settings"], NEURONPEDIA_SETTINGS_FIELDS, "settings")
    seen: set[int] = set()
    for i, feature in enumerate(batch["features"]):
        path = f"features[{i}]"
        _check_fields(feature, NEURONPEDIA_FEATURE_FIELDS, path)
        if feature["feature_index"] in seen:
            raise ValueError(f"{path}.feature_index {feature['feature_index']} appears twice; "
                             "indices must be unique")
        seen.add(feature["feature_index"])
        for a, b in _SAME_LENGTH:
            _check_lengths(feature, a, b, path)
        for a, b in _SAME_LENGTH_IF_FILLED:
            if feature[b]:
                _check_lengths(feature, a, b, path)
        for j, activation in enumerate(feature["activations"]):
            act_path = f"{path}.activations[{j}]"
            _check_fields(activation, NEURONPEDIA_ACTIVATION_FIELDS, act_path)
            _check_lengths(activation, "tokens", "values", act_path)
            if not activation["tokens"]:
                raise ValueError(f"{act_path}.tokens is empty; every window needs at least one token")


def _check_fields(obj: Any, fields: Mapping[str, type | tuple], path: str) -> None:
    # ValueError throughout, also for a wrong type: the batch's content is bad, and one exception
    # type with the field's path is what a caller checking a file catches.
    if not isinstance(obj, dict):
        raise ValueError(f"{path or 'batch'} must be a JSON object, got {type(obj).__name__}")  # noqa: TRY004
    for name, expected in fields.items():
        where = f"{path}.{name}" if path else name
        if name not in obj:
            raise ValueError(f"{where} is missing (expected {_describe(expected)})")
        value = obj[name]
        if isinstance(expected, tuple) and expected[0] is list:
            if not isinstance(value, list):
                raise ValueError(f"{where} must be {_describe(expected)}, got {_describe_value(value)}")
            for k, item in enumerate(value):
                _check_value(item, expected[1], f"{where}[{k}]")
        else:
            _check_value(value, expected, where)


def _check_value(value: Any, expected: type | tuple, where: str) -> None:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    if float in kinds and _is_number(value):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value}; JSON numbers must be finite")
        return
    if int in kinds and isinstance(value, bool):
        raise ValueError(f"{where} must be {_describe(expected)}, got a bool")
    if not isinstance(value, kinds):
        got = _describe_value(value)
        raise ValueError(f"{where} must be {_describe(expected)}, got {got}")  # noqa: TRY004


def _check_lengths(obj: dict[str, Any], a: str, b: str, path: str) -> None:
    if len(obj[a]) != len(obj[b]):
        raise ValueError(f"{path}.{a} has {len(obj[a])} entries but {path}.{b} has {len(obj[b])}; "
                         "they must be equally long")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(expected: type | tuple) -> str:
    if isinstance(expected, tuple) and expected[0] is list:
        return f"a list of {expected[1].__name__}"
    kinds = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def _describe_value(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def write_neuronpedia(path: str | Path, dashboards: Sequence[FeatureDashboard], *, model_id: str,
                      sae_set: str | Mapping[str, str], layer: int | Mapping[str, int],
                      sae_id_suffix: str | None = None) -> Path:
    """Write ``<path>/batch-<hook>.json`` for each hook of ``dashboards`` and return the folder.

    ``sae_set`` and ``layer`` are one value for every hook or a mapping from hook name to value.
    Neuronpedia names a source ``"<layer>-<sae_set>"``, so two hooks may not share both. Every
    batch is validated before any file is written.
    """
    by_hook: dict[str, list[FeatureDashboard]] = {}
    for d in dashboards:
        by_hook.setdefault(d.hook_name, []).append(d)
    if not by_hook:
        raise ValueError("no dashboards to export")
    batches: dict[str, dict[str, Any]] = {}
    sources: dict[tuple[int, str], str] = {}
    for hook, group in sorted(by_hook.items()):
        hook_layer, hook_set = _per_hook(layer, hook, "layer"), _per_hook(sae_set, hook, "sae_set")
        if (hook_layer, hook_set) in sources:
            raise ValueError(f"hooks {sources[hook_layer, hook_set]!r} and {hook!r} both map to layer "
                             f"{hook_layer} and sae_set {hook_set!r}; Neuronpedia would give them the same "
                             "source id")
        sources[hook_layer, hook_set] = hook
        batch = to_neuronpedia(group, model_id=model_id, sae_set=hook_set, layer=hook_layer,
                               sae_id_suffix=sae_id_suffix)
        validate_neuronpedia(batch)
        batches[hook] = batch
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for hook, batch in batches.items():
        write_atomic(folder / f"batch-{re.sub(r'[^A-Za-z0-9._-]', '_', hook)}.json",
                     json.dumps(batch, allow_nan=False))
    return folder


def _per_hook(value: Any, hook: str, name: str) -> Any:
    if not isinstance(value, Mapping):
        return value
    if hook not in value:
        raise ValueError(f"{name} has no entry for hook {hook!r}; it has {sorted(value)}")
    return value[hook]

"""The settings of ``pm-lens run``: one TOML file, every key also a command-line flag.

A config has five sections; every key has a default except the two a run cannot guess
(``pairs.path``, ``run.out``) and the SAEs (``saes.sources`` or ``saes.train``)::

    [model]       path ("demo" or a Hugging Face reward-model folder), device, devices_per_rank, dtype,
                  text_format, objective
    [pairs]       path, split, prompt/chosen/rejected columns, max_tokens, select, k, seed
    [saes]        sources (SAELens folders, dictionary_learning checkpoints, or "demo"), and/or train
                  (hook points) with train_d_sae, train_architecture, train_k, train_tokens, train_seed
    [attribution] method, positions, baseline, ig_steps, batch_tokens, confirm_top, fidelity_top, n_random, seed
    [run]         out, shard_pairs, dashboards

:func:`load_config` reads the file, applies flag overrides, and checks every value (type, range,
choices, that paths exist) so that a bad config fails in one line naming the key, the value and
what is allowed, before any model is loaded. This module imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEMO = "demo"


@dataclass(frozen=True)
class Key:
    """One config key: its section, name, type, default (None: required) and allowed values."""

    section: str
    name: str
    kind: type
    default: Any
    help: str
    choices: tuple[Any, ...] = ()
    minimum: int | None = None
    flag: str | None = None  # the flag's name when it is not --<name>

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def option(self) -> str:
        return "--" + (self.flag or self.name.replace("_", "-"))


REQUIRED = object()
KEYS = (
    Key("model", "path", str, DEMO, 'a Hugging Face reward-model folder, or "demo" for the embedded demo PM', flag="model"),
    Key("model", "device", str, "cpu", "where the model runs (cpu, cuda, cuda:1, mps), or several devices to split its "
        "layers over (cuda:0,cuda:1)"),
    Key("model", "devices_per_rank", int, 1, "with device = cuda: GPUs per process, the model's layers split over "
        "them (under torchrun, rank r's are cuda:r*k onwards)", minimum=1),
    Key("model", "dtype", str, "float32", "weights' dtype", choices=("float32", "bfloat16", "float16")),
    Key("model", "text_format", str, "auto", "how a pair becomes text", choices=("auto", "chat_template", "hh", "raw")),
    Key("model", "objective", object, None, "for a head with several outputs: the output index, or one weight per "
        "output (comma-separated as a flag)"),
    Key("pairs", "path", str, REQUIRED, "JSONL/JSON/CSV file or a saved dataset folder", flag="pairs"),
    Key("pairs", "split", str, "train", "the split of a saved DatasetDict"),
    Key("pairs", "prompt_column", str, "prompt", "column holding the prompt (absent: HH transcripts)"),
    Key("pairs", "chosen_column", str, "chosen", "column holding the chosen completion"),
    Key("pairs", "rejected_column", str, "rejected", "column holding the rejected completion"),
    Key("pairs", "max_tokens", int, 512, "pairs with a side longer than this are left out", minimum=1),
    Key("pairs", "select", str, "top_margin", "which pairs to study",
        choices=("top_margin", "random", "all")),
    Key("pairs", "k", int, 100, "how many pairs to keep (top_margin, random)", minimum=1),
    Key("pairs", "seed", int, 0, "seed of select=random", flag="pairs-seed"),
    Key("saes", "sources", list, [], 'SAE folders or checkpoints (comma-separated as a flag), or ["demo"]',
        flag="saes"),
    Key("saes", "train", list, [], "hook points to train SAEs at on the PM's activations over the selected pairs "
        "(comma-separated as a flag), e.g. blocks.6.hook_resid_post; saved in <out>/saes and used beside sources",
        flag="train-saes"),
    Key("saes", "train_d_sae", int, 4096, "features per trained SAE", minimum=1),
    Key("saes", "train_architecture", str, "topk", "architecture of the trained SAEs",
        choices=("topk", "standard", "jumprelu", "gated")),
    Key("saes", "train_k", int, 32, "active features per token (train_architecture = topk)", minimum=1),
    Key("saes", "train_tokens", int, 0, "training tokens (0: pm_lens's default budget, see train_saes)", minimum=0),
    Key("saes", "train_seed", int, 0, "seed of the SAE training"),
    Key("attribution", "method", str, "atp", "attribution method", choices=("atp", "ig")),
    Key("attribution", "positions", str, "all", "positions attributed", choices=("all", "completion", "diverge")),
    Key("attribution", "baseline", str, "zero", "value a removed feature takes: zero, or its mean activation over the "
        "selected pairs (one more forward of each pair, before the shards)", choices=("zero", "mean")),
    Key("attribution", "ig_steps", int, 8, "integrated-gradient steps (method=ig)", minimum=1),
    Key("attribution", "batch_tokens", int, 4096, "tokens per forward", minimum=1),
    Key("attribution", "confirm_top", int, 10, "features confirmed by exact ablation per direction", minimum=1),
    Key("attribution", "fidelity_top", int, 50, "top features of the ranking ablated for the fidelity card", minimum=1),
    Key("attribution", "n_random", int, 50, "other active features ablated for the fidelity card", minimum=0),
    Key("attribution", "seed", int, 0, "seed of the fidelity card's random features", flag="fidelity-seed"),
    Key("run", "out", str, REQUIRED, "folder for the outputs (a finished or interrupted run there is resumed)",
        flag="out"),
    Key("run", "shard_pairs", int, 64, "pairs per shard (the unit of resumption)", minimum=1),
    Key("run", "dashboards", str, "confirmed", "feature dashboards (<out>/dashboards) of the confirmed features, or "
        "none (pm-lens dashboard builds them later)", choices=("confirmed", "none")),
)
BY_DOTTED = {key.dotted: key for key in KEYS}
SECTIONS = tuple(dict.fromkeys(key.section for key in KEYS))


@dataclass(frozen=True)
class RunConfig:
    """A checked config: ``values[section][name]``, every key present."""

    values: dict[str, dict[str, Any]]

    def __getitem__(self, dotted: str) -> Any:
        section, name = dotted.split(".")
        return self.values[section][name]

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {section: dict(keys) for section, keys in self.values.items()}

    def digest(self) -> str:
        """A hash of everything that changes the results (not where they are written)."""
        values = self.as_dict()
        values["run"] = {k: v for k, v in values["run"].items() if k not in ("out", "dashboards")}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read the TOML file at ``path`` (None: flags only), apply ``overrides`` (dotted keys), fill
    the defaults, and check every value; raises ValueError in one line on the first problem."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {err}") from None
    where = f" in {str(path)!r}" if path is not None else ""
    flat: dict[str, Any] = {}
    for section, keys in raw.items():
        if section not in SECTIONS or not isinstance(keys, dict):
            raise ValueError(f"unknown section [{section}]{where}; sections are {', '.join(SECTIONS)}")
        for name, value in keys.items():
            dotted = f"{section}.{name}"
            if dotted not in BY_DOTTED:
                allowed = ", ".join(k.name for k in KEYS if k.section == section)
                raise ValueError(f"unknown key {dotted!r}{where}; [{section}] takes {allowed}")
            flat[dotted] = value
    flat.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for key in KEYS:
        if key.dotted not in flat and key.default is REQUIRED:
            raise ValueError(f"missing key {key.dotted!r}: {key.help} (in the config or as {key.option})")
        values[key.section][key.name] = _checked(key, flat.get(key.dotted, key.default))
    config = RunConfig(values)
    _check_devices(config)
    _check_paths(config)
    return config


def _checked(key: Key, value: Any) -> Any:
    if key.kind is object:
        return _objective(key, value)
    if key.kind is list:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"{key.dotted} must be a list of non-empty strings, got {value!r}")
        return value
    if key.kind is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key.dotted} must be an integer, got {value!r}")
        if key.minimum is not None and value < key.minimum:
            raise ValueError(f"{key.dotted} must be >= {key.minimum}, got {value}")
        return value
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key.dotted} must be a non-empty string, got {value!r}")
    if key.choices and value not in key.choices:
        raise ValueError(f"{key.dotted} must be one of {', '.join(map(repr, key.choices))}; got {value!r}")
    return value


def _objective(key: Key, value: Any) -> int | list[float] | None:
    """An output index or a list of weights (a flag's "2" or "0.5,0.5" read as such)."""
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",")]
        try:
            value = int(parts[0]) if len(parts) == 1 else [float(part) for part in parts]
        except ValueError:
            raise ValueError(f"{key.dotted} must be an output index or a list of weights, got {value!r}") from None
    ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or (
        isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
    if not ok:
        raise ValueError(f"{key.dotted} must be an output index (>= 0) or a list of weights, got {value!r}")
    return [float(v) for v in value] if isinstance(value, list) else value


def _check_devices(config: RunConfig) -> None:
    device, per_rank = config["model.device"], config["model.devices_per_rank"]
    if per_rank > 1 and device != "cuda":
        raise ValueError(f"model.devices_per_rank = {per_rank} needs model.device = 'cuda' (got {device!r}); to split "
                         "over named devices, list them in model.device (cuda:0,cuda:1)")


def _check_paths(config: RunConfig) -> None:
    model = config["model.path"]
    if model != DEMO and not Path(model).is_dir():
        raise ValueError(f"model.path {model!r} is not a folder (a saved Hugging Face reward model) nor 'demo'")
    if not Path(config["pairs.path"]).exists():
        raise ValueError(f"pairs.path {config['pairs.path']!r} does not exist")
    if not config["saes.sources"] and not config["saes.train"]:
        raise ValueError("no SAEs: name saes.sources (SAE folders or checkpoints, --saes) or hook points to train at "
                         "(saes.train, --train-saes)")
    for source in config["saes.sources"]:
        if source != DEMO and not Path(source).exists():
            raise ValueError(f"saes.sources: {source!r} does not exist (give SAE folders or checkpoint files, or 'demo')")
    if DEMO in config["saes.sources"] and (model != DEMO or len(config["saes.sources"]) > 1):
        raise ValueError(f"saes.sources {config['saes.sources']!r}: 'demo' means the embedded demo PM's SAEs, alone and "
                         "with model.path = 'demo'")


assert len({key.option for key in KEYS}) == len(KEYS), "two keys share a flag"

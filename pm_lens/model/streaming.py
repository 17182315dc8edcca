"""Load a reward-model folder one layer at a time, never holding two copies of its weights.

Loading through transformers and then converting (:meth:`RewardModel.from_hf`) holds the Hugging
Face model, the converted state dict and TransformerLens's processed copy at once: about three
times the weights, which does not fit for a 7B-70B PM. :func:`stream_reward_model` instead

1. builds the Hugging Face classifier and the TransformerLens model with their parameters on the
   ``meta`` device (no memory; the TransformerLens buffers, masks and rotary tables, are real);
2. reads the checkpoint's safetensors files lazily, one piece at a time: each layer's attention
   and norms with a slice of its MLP along ``d_mlp`` (then the MLP's other slices), then the
   embedding in row slices with the final norm and the reward head;
3. converts each piece with the same TransformerLens converter and weight processing
   (``ProcessWeights.process_weights``, in float32) that :meth:`RewardModel.from_hf` runs on the
   whole model, with a config of one layer (or none) and the slice's width: those functions treat
   each layer, MLP column and embedding row on its own;
4. casts it to the model's dtype, moves it to the device and makes it the parameter (or the
   parameter's slice), then frees the piece and gives the freed heap back to the system.

Peak memory is the model's weights plus one piece in float32 (``benchmarks/scale.py load``: 1.12x
the weights of a 1.18B-parameter slice on a CPU, 1.05x on a GPU). Parity with the whole-model
path is tested parameter by parameter for every architecture (tests/model/test_streaming.py).

A folder the streaming reader cannot take (no safetensors files, or keys other than the ones
transformers' classifier expects: a causal LM, a checkpoint without its head, renamed legacy keys)
returns ``None``, and :meth:`RewardModel.from_pretrained` loads it through transformers, which
names what is missing.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from pm_lens.model.architectures import HEAD_ATTR, ArchitectureSpec

logger = logging.getLogger(__name__)

# Rows of the embedding converted at once: 2**24 float32 values (64 MiB) at most.
CHUNK_ELEMENTS = 2**24


class Checkpoint:
    """The tensors of a folder's ``model.safetensors`` (or its shards), read on demand."""

    def __init__(self, folder: Path, files: dict[str, Path]):
        self.folder = folder
        self.files = files  # tensor name -> file holding it

    @classmethod
    def open(cls, folder: str | Path) -> "Checkpoint | None":
        """The checkpoint of ``folder``, or ``None`` when it has no safetensors weights."""
        from safetensors import safe_open

        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return cls(folder, {name: folder / file for name, file in weight_map.items()})
        single = folder / "model.safetensors"
        if single.is_file():
            with safe_open(single, framework="pt") as f:
                return cls(folder, {name: single for name in f.keys()})
        return None

    def read(self, names: list[str]) -> dict[str, Tensor]:
        """The named tensors as float32 copies (the files are closed again before returning)."""
        from safetensors import safe_open

        out: dict[str, Tensor] = {}
        with ExitStack() as stack:
            handles = {}
            for name in names:
                path = self.files[name]
                if path not in handles:
                    handles[path] = stack.enter_context(safe_open(path, framework="pt"))
                out[name] = handles[path].get_tensor(name).to(torch.float32)
        return out

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> Tensor:
        """``start:stop`` along ``dim`` of a tensor, as float32 (only that slice is read)."""
        from safetensors import safe_open

        with safe_open(self.files[name], framework="pt") as f:
            index = (slice(None),) * dim + (slice(start, stop),)
            return f.get_slice(name)[index].to(torch.float32)

    def shape(self, name: str) -> list[int]:
        from safetensors import safe_open

        with safe_open(self.files[name], framework="pt") as f:
            return f.get_slice(name).get_shape()


def stream_reward_model(model_cls: type, path: str | Path, hf_config: Any, spec: ArchitectureSpec, cfg: Any,
                        processing: dict[str, bool], head_weights: Tensor | None, *, split: Any = None) -> Any:
    """A ``model_cls`` (:class:`RewardModel`) with the weights of the folder ``path``, loaded piece by
    piece, or ``None`` when the folder cannot be streamed (see the module docstring).

    ``cfg`` is the TransformerLens config (its ``dtype`` and ``device`` are where the weights go);
    ``processing`` the ``load_and_process_state_dict`` flags; ``head_weights`` folds a multi-output
    head into one column (``[n_outputs]``, or ``None`` for a one-output head). The returned model
    has its weights processed and nothing else set (the caller finishes it as ``from_hf`` does).
    With ``split`` (a :class:`pm_lens.model.split.LayerSplit`) each piece goes to its layer's device.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForSequenceClassification

    checkpoint = Checkpoint.open(path)
    if checkpoint is None:
        logger.info("%s has no safetensors weights: loading it whole through transformers", path)
        return None
    with torch.device("meta"):
        hf_model = AutoModelForSequenceClassification.from_config(hf_config)
    expected = set(hf_model.state_dict())
    missing = sorted(expected - set(checkpoint.files))
    if missing:
        logger.info("%s lacks %d expected key(s) (%s...): loading it through transformers", path, len(missing),
                    missing[0])
        return None
    dtype, device = cfg.dtype, torch.device(cfg.device)
    device_of = (lambda key: device) if split is None else split.module_device
    with init_empty_weights(include_buffers=False):
        model = model_cls(cfg, move_to_device=False)
    _swap_folded_norms(model, processing)
    body = getattr(hf_model, spec.body_attr)
    layers_attr = _layers_attr(body, cfg.n_layers)
    for piece, offsets in _pieces(checkpoint, hf_model, spec, body, layers_attr, model.cfg, processing, head_weights):
        _assign(model, piece, offsets, dtype, device_of)
        del piece
        give_back_freed_memory()
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"streaming {path} left parameters unloaded: {', '.join(left[:5])}")
    if split is not None:
        split.place(model)  # the buffers (the parameters are there already)
        return model
    return model.to(device)  # the buffers (the parameters are there already)


def give_back_freed_memory() -> None:
    """Return the C heap's freed pages to the system (glibc's ``malloc_trim``). Tensors of a few
    MiB are allocated on the heap; freed one piece after another they fragment it, and the
    process would keep ~20% of the weights' size in freed memory. No-op where there is no glibc."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _load_malloc_trim() -> Any:
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def _swap_folded_norms(model: Any, processing: dict[str, bool]) -> None:
    """Replace the norms that folding removes by their parameter-free forms, as TransformerLens's
    ``load_and_process_state_dict`` does: run it on the meta parameters (no memory, no values)."""
    meta = {name: p for name, p in model.named_parameters()}
    dtype, model.cfg.dtype = model.cfg.dtype, torch.float32  # its low-precision warning: pieces process in float32
    try:
        model.load_and_process_state_dict(meta, refactor_factored_attn_matrices=False, **processing)
    finally:
        model.cfg.dtype = dtype


def _layers_attr(body: torch.nn.Module, n_layers: int) -> str:
    """The name of the body's list of transformer layers (``layers``, ``h``)."""
    for name, child in body.named_children():
        if isinstance(child, torch.nn.ModuleList) and len(child) == n_layers:
            return name
    raise RuntimeError(f"no list of {n_layers} layers in {type(body).__name__}")


class _BodyWith(torch.nn.Module):
    """The HF body with its layer list replaced (what the converter reads as ``body.<layers>``)."""

    def __init__(self, body: torch.nn.Module, layers_attr: str, layers: list[torch.nn.Module]):
        super().__init__()
        object.__setattr__(self, "_body", body)
        object.__setattr__(self, "_override", {layers_attr: layers})

    def __getattr__(self, name: str) -> Any:
        override = object.__getattribute__(self, "_override")
        if name in override:
            return override[name]
        return getattr(object.__getattribute__(self, "_body"), name)


def _pieces(checkpoint: Checkpoint, hf_model: torch.nn.Module, spec: ArchitectureSpec, body: torch.nn.Module,
            layers_attr: str, cfg: Any, processing: dict[str, bool],
            head_weights: Tensor | None) -> Iterator[tuple[dict[str, Tensor], dict[str, int]]]:
    """Processed TransformerLens state-dict pieces (float32, CPU) with, for tensors that are a
    slice of a parameter, the slice's offset: each layer with its MLP in slices along ``d_mlp``,
    then the embedding in row slices, the first with the final norm, positional embedding and head."""
    for index, layer in enumerate(getattr(body, layers_attr)):
        prefix = f"{spec.body_attr}.{layers_attr}.{index}."
        mlp = getattr(layer, "mlp", None)
        sliced = _mlp_slices(mlp, cfg.d_mlp) if mlp is not None else None
        _materialise(layer, checkpoint, prefix, recurse=False)
        for name, module in layer.named_children():
            if sliced is None or name != "mlp":  # a sliced MLP is read slice by slice below
                _materialise(module, checkpoint, prefix + name + ".")
        step = cfg.d_mlp if sliced is None else max(1, CHUNK_ELEMENTS // (3 * cfg.d_model))
        try:
            for start in range(0, cfg.d_mlp, step):
                stop = min(start + step, cfg.d_mlp)
                if sliced is not None:
                    _materialise_slice(mlp, checkpoint, prefix + "mlp.", sliced, start, stop)
                converted = _convert(hf_model, spec, body, layers_attr, [layer], cfg, n_layers=1, d_mlp=stop - start)
                processed = _process(converted, cfg, processing, n_layers=1, d_mlp=stop - start)
                del converted
                piece, offsets = {}, {}
                for key, value in processed.items():
                    if not key.startswith("blocks.0."):
                        continue
                    name = f"blocks.{index}." + key.removeprefix("blocks.0.")
                    partial = key.startswith("blocks.0.mlp.") and cfg.d_mlp in _full_shape(cfg, key) and stop - start < cfg.d_mlp
                    if partial:
                        piece[name], offsets[name] = value, start
                    elif start == 0:
                        piece[name] = value
                yield piece, offsets
        finally:
            layer.to("meta")

    # Everything outside the layers: embedding, positional embedding, final norm, head.
    outside = {name: module for name, module in hf_model.named_modules()
               if not name.startswith(f"{spec.body_attr}.{layers_attr}") and name != ""}
    embedding = body.get_input_embeddings()
    embed_name = next(name for name, module in outside.items() if module is embedding) + ".weight"
    for name, module in outside.items():
        if module is not embedding and list(module.parameters(recurse=False)):
            _materialise(module, checkpoint, name + ".", recurse=False)
    n_rows = checkpoint.shape(embed_name)[0]
    step = max(1, CHUNK_ELEMENTS // cfg.d_model)
    for start in range(0, n_rows, step):
        rows = checkpoint.read_slice(embed_name, 0, start, min(start + step, n_rows))
        embedding._parameters["weight"] = torch.nn.Parameter(rows, requires_grad=False)
        converted = _convert(hf_model, spec, body, layers_attr, [], cfg, n_layers=0, head_weights=head_weights)
        processed = _process(converted, cfg, processing, n_layers=0)
        if start == 0:
            yield processed, {"embed.W_E": 0}
        else:
            yield {"embed.W_E": processed["embed.W_E"]}, {"embed.W_E": start}
    hf_model.to("meta")


def _materialise(module: torch.nn.Module, checkpoint: Checkpoint, prefix: str, recurse: bool = True) -> None:
    """Give ``module`` its checkpoint tensors (float32) in place of its meta parameters."""
    names = [name for name, _ in module.named_parameters(recurse=recurse)]
    names += [name for name, _ in module.named_buffers(recurse=recurse) if prefix + name in checkpoint.files]
    tensors = checkpoint.read([prefix + name for name in names])
    for name in names:
        owner, leaf = _owner(module, name)
        value = tensors[prefix + name]
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[leaf] = value


def _owner(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    """The submodule holding the parameter or buffer ``name`` of ``module``, and its own name there."""
    owner_name, _, leaf = name.rpartition(".")
    return (module.get_submodule(owner_name) if owner_name else module), leaf


def _mlp_slices(mlp: torch.nn.Module, d_mlp: int) -> dict[str, int] | None:
    """For each parameter of the HF MLP, the dimension of length ``d_mlp`` to slice (absent: not
    sliced, e.g. the output bias), or ``None`` when some parameter has that length twice (square
    MLP weights: which dimension is ``d_mlp`` is ambiguous, so the MLP is read whole)."""
    dims = {}
    for name, param in mlp.named_parameters():
        hits = [d for d, n in enumerate(param.shape) if n == d_mlp]
        if len(hits) > 1:
            return None
        if hits:
            dims[name] = hits[0]
    return dims


def _full_shape(cfg: Any, key: str) -> tuple[int, ...]:
    """The shape of a TransformerLens MLP parameter (``blocks.0.mlp.<leaf>``) in the whole model."""
    leaf = key.rpartition(".")[2]
    return {"W_in": (cfg.d_model, cfg.d_mlp), "W_gate": (cfg.d_model, cfg.d_mlp), "b_in": (cfg.d_mlp,),
            "W_out": (cfg.d_mlp, cfg.d_model), "b_out": (cfg.d_model,)}.get(leaf, ())


def _materialise_slice(mlp: torch.nn.Module, checkpoint: Checkpoint, prefix: str, sliced: dict[str, int],
                       start: int, stop: int) -> None:
    """Give the HF MLP the slice ``start:stop`` along ``d_mlp`` of its parameters (others whole)."""
    for name, param in list(mlp.named_parameters()):
        owner, leaf = _owner(mlp, name)
        if name in sliced:
            value = checkpoint.read_slice(prefix + name, sliced[name], start, stop)
        elif param.is_meta:
            value = checkpoint.read([prefix + name])[prefix + name]
        else:
            continue
        owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)


def _convert(hf_model: torch.nn.Module, spec: ArchitectureSpec, body: torch.nn.Module, layers_attr: str,
             layers: list[torch.nn.Module], cfg: Any, *, n_layers: int, head_weights: Tensor | None = None,
             d_mlp: int | None = None) -> dict[str, Tensor]:
    """TransformerLens's converter run on the body with only ``layers`` (meta tensors elsewhere
    convert to meta tensors, at no cost), with the reward head as the unembedding."""
    from pm_lens.model.reward_model import head_state

    piece_cfg = _piece_cfg(cfg, n_layers, d_mlp)
    score = getattr(hf_model, HEAD_ATTR)
    view = SimpleNamespace(**{spec.body_attr: _BodyWith(body, layers_attr, layers)},
                           lm_head=SimpleNamespace(weight=score.weight, bias=_bias(score)))
    with torch.no_grad():
        state = spec.convert(view, piece_cfg)
        state["unembed.W_U"], state["unembed.b_U"] = head_state(score, head_weights)
    return state


def _bias(score: torch.nn.Module) -> Tensor:
    if score.bias is not None:
        return score.bias
    return torch.zeros(score.out_features, dtype=score.weight.dtype, device=score.weight.device)


def _piece_cfg(cfg: Any, n_layers: int, d_mlp: int | None = None) -> Any:
    """``cfg`` for a piece of ``n_layers`` layers (and an MLP slice of width ``d_mlp``), converted
    and processed in float32 on the CPU."""
    piece = copy.copy(cfg)
    piece.n_layers, piece.dtype, piece.device = n_layers, torch.float32, "cpu"
    if d_mlp is not None:
        piece.d_mlp = d_mlp
    return piece


def _process(state: dict[str, Tensor], cfg: Any, processing: dict[str, bool], *, n_layers: int,
             d_mlp: int | None = None) -> dict[str, Tensor]:
    """TransformerLens's weight processing of one piece (its functions treat each layer, each MLP
    column and each embedding row on its own, so pieces give what the whole model gives)."""
    from transformer_lens.weight_processing import ProcessWeights

    with torch.no_grad():
        return ProcessWeights.process_weights(state, _piece_cfg(cfg, n_layers, d_mlp),
                                              refactor_factored_attn_matrices=False, **processing)


def _assign(model: torch.nn.Module, piece: dict[str, Tensor], offsets: dict[str, int], dtype: torch.dtype,
            device_of: Any) -> None:
    """Make each tensor of ``piece`` the model's parameter of that name (cast, on ``device_of(name)``), or,
    for a name in ``offsets``, the slice of it starting there (along the one dimension where the
    shapes differ). Names the model has no parameter for (norm weights folded away) are dropped,
    as TransformerLens's non-strict load drops them."""
    for key, value in piece.items():
        owner, leaf = _owner(model, key)
        param = owner._parameters.get(leaf)
        if param is None:
            continue
        if not torch.isfinite(value).all():
            raise ValueError(f"the reward model has NaN or infinite weights in {key}")
        device = device_of(key)
        value = value.to(device=device, dtype=dtype)
        if tuple(value.shape) == tuple(param.shape):
            owner._parameters[leaf] = torch.nn.Parameter(value.contiguous(), requires_grad=param.requires_grad)
            continue
        differ = [d for d, (a, b) in enumerate(zip(value.shape, param.shape)) if a != b]
        if key not in offsets or value.ndim != param.ndim or len(differ) != 1:
            raise RuntimeError(f"{key}: converted shape {tuple(value.shape)} differs from the model's {tuple(param.shape)}")
        if param.is_meta:
            param = torch.nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device),
                                       requires_grad=param.requires_grad)
            owner._parameters[leaf] = param
        with torch.no_grad():
            param.narrow(differ[0], offsets[key], value.shape[differ[0]]).copy_(value)

"""Load a reward-model folder one layer at a time, never holding two copies of its weights.

Loading through transformers and then converting (:meth:`RewardModel.from_hf`) holds the Hugging
Face model, the converted state dict and TransformerLens's processed copy at once: about three
times the weights, which does not fit for a 7B-70B PM. :func:`stream_reward_model` instead

1. builds the Hugging Face classifier and the TransformerLens model with their parameters on the
   ``meta`` device (no memory; the TransformerLens buffers, masks and rotary tables, are real);
2. reads the checkpoint's safetensors files lazily, one piece at a time: each transformer layer,
   then the embedding in row chunks with the final norm and the reward head;
3. converts each piece with the same TransformerLens converter and weight processing
   (``ProcessWeights.process_weights``, in float32) that :meth:`RewardModel.from_hf` runs on the
   whole model, with a config of one layer (or none);
4. casts it to the model's dtype, moves it to the device and makes it the parameter
   (``assign``), then frees the piece.

Peak memory is the model's weights plus one layer in float32 (``benchmarks/scale.py`` measures
it). Parity with the whole-model path is tested parameter by parameter for every architecture.

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

    def read_rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of a 2-D tensor, as float32."""
        from safetensors import safe_open

        with safe_open(self.files[name], framework="pt") as f:
            return f.get_slice(name)[start:stop].to(torch.float32)

    def rows(self, name: str) -> int:
        from safetensors import safe_open

        with safe_open(self.files[name], framework="pt") as f:
            return f.get_slice(name).get_shape()[0]


def stream_reward_model(model_cls: type, path: str | Path, hf_config: Any, spec: ArchitectureSpec, cfg: Any,
                        processing: dict[str, bool], head_weights: Tensor | None) -> Any:
    """A ``model_cls`` (:class:`RewardModel`) with the weights of the folder ``path``, loaded piece by
    piece, or ``None`` when the folder cannot be streamed (see the module docstring).

    ``cfg`` is the TransformerLens config (its ``dtype`` and ``device`` are where the weights go);
    ``processing`` the ``load_and_process_state_dict`` flags; ``head_weights`` folds a multi-output
    head into one column (``[n_outputs]``, or ``None`` for a one-output head). The returned model
    has its weights processed and nothing else set (the caller finishes it as ``from_hf`` does).
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
    with init_empty_weights(include_buffers=False):
        model = model_cls(cfg, move_to_device=False)
    _swap_folded_norms(model, processing)
    body = getattr(hf_model, spec.body_attr)
    layers_attr = _layers_attr(body, cfg.n_layers)
    for piece in _pieces(checkpoint, hf_model, spec, body, layers_attr, model.cfg, processing, head_weights):
        _assign(model, piece, dtype, device)
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"streaming {path} left parameters unloaded: {', '.join(left[:5])}")
    return model.to(device)  # the buffers (the parameters are there already)


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
            head_weights: Tensor | None) -> Iterator[dict[str, Tensor]]:
    """Processed TransformerLens state-dict pieces (float32, CPU): each layer, then the embedding
    in row chunks, the first with the final norm, positional embedding and reward head."""
    layers = getattr(body, layers_attr)
    for index, layer in enumerate(layers):
        prefix = f"{spec.body_attr}.{layers_attr}.{index}."
        _materialise(layer, checkpoint, prefix)
        try:
            converted = _convert(hf_model, spec, body, layers_attr, [layer], cfg, n_layers=1, head_weights=None)
        finally:
            layer.to("meta")
        yield {f"blocks.{index}." + key.removeprefix("blocks.0."): value for key, value in
               _process(converted, cfg, processing, n_layers=1).items() if key.startswith("blocks.0.")}

    # Everything outside the layers: embedding, positional embedding, final norm, head.
    outside = {name: module for name, module in hf_model.named_modules()
               if not name.startswith(f"{spec.body_attr}.{layers_attr}") and name != ""}
    embedding = body.get_input_embeddings()
    embed_name = next(name for name, module in outside.items() if module is embedding) + ".weight"
    for name, module in outside.items():
        if module is not embedding and list(module.parameters(recurse=False)):
            _materialise(module, checkpoint, name + ".", recurse=False)
    n_rows = checkpoint.rows(embed_name)
    step = max(1, CHUNK_ELEMENTS // cfg.d_model)
    for start in range(0, n_rows, step):
        rows = checkpoint.read_rows(embed_name, start, min(start + step, n_rows))
        embedding._parameters["weight"] = torch.nn.Parameter(rows, requires_grad=False)
        converted = _convert(hf_model, spec, body, layers_attr, [], cfg, n_layers=0, head_weights=head_weights)
        processed = _process(converted, cfg, processing, n_layers=0)
        chunk = {"embed.W_E": processed["embed.W_E"], "_rows": torch.tensor([start, n_rows])}
        if start == 0:
            chunk |= {key: value for key, value in processed.items() if key != "embed.W_E"}
        yield chunk
    hf_model.to("meta")


def _materialise(module: torch.nn.Module, checkpoint: Checkpoint, prefix: str, recurse: bool = True) -> None:
    """Give ``module`` its checkpoint tensors (float32) in place of its meta parameters."""
    names = [name for name, _ in module.named_parameters(recurse=recurse)]
    names += [name for name, _ in module.named_buffers(recurse=recurse) if prefix + name in checkpoint.files]
    tensors = checkpoint.read([prefix + name for name in names])
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        value = tensors[prefix + name]
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[leaf] = value


def _convert(hf_model: torch.nn.Module, spec: ArchitectureSpec, body: torch.nn.Module, layers_attr: str,
             layers: list[torch.nn.Module], cfg: Any, *, n_layers: int, head_weights: Tensor | None) -> dict[str, Tensor]:
    """TransformerLens's converter run on the body with only ``layers`` (meta tensors elsewhere
    convert to meta tensors, at no cost), with the reward head as the unembedding."""
    from pm_lens.model.reward_model import head_state

    piece_cfg = _piece_cfg(cfg, n_layers)
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


def _piece_cfg(cfg: Any, n_layers: int) -> Any:
    """``cfg`` for a piece of ``n_layers`` layers, converted and processed in float32 on the CPU."""
    piece = copy.copy(cfg)
    piece.n_layers, piece.dtype, piece.device = n_layers, torch.float32, "cpu"
    return piece


def _process(state: dict[str, Tensor], cfg: Any, processing: dict[str, bool], *, n_layers: int) -> dict[str, Tensor]:
    from transformer_lens.weight_processing import ProcessWeights

    with torch.no_grad():
        return ProcessWeights.process_weights(state, _piece_cfg(cfg, n_layers), refactor_factored_attn_matrices=False,
                                              **processing)


def _assign(model: torch.nn.Module, piece: dict[str, Tensor], dtype: torch.dtype, device: torch.device) -> None:
    """Make each tensor of ``piece`` the model's parameter of that name (cast, on ``device``).
    Names the model has no parameter for (norm weights folded away) are dropped, as
    TransformerLens's non-strict load drops them. ``embed.W_E`` arrives in row chunks."""
    rows = piece.pop("_rows", None)
    for key, value in piece.items():
        owner_name, _, leaf = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        param = owner._parameters.get(leaf)
        if param is None:
            continue
        if not torch.isfinite(value).all():
            raise ValueError(f"the reward model has NaN or infinite weights in {key}")
        if rows is not None and key == "embed.W_E":
            start, total = int(rows[0]), int(rows[1])
            if param.is_meta:
                param = torch.nn.Parameter(torch.empty(total, value.shape[1], dtype=dtype, device=device),
                                           requires_grad=param.requires_grad)
                owner._parameters[leaf] = param
            with torch.no_grad():
                param[start:start + len(value)] = value.to(device=device, dtype=dtype)
            continue
        if tuple(value.shape) != tuple(param.shape):
            raise RuntimeError(f"{key}: converted shape {tuple(value.shape)} differs from the model's {tuple(param.shape)}")
        owner._parameters[leaf] = torch.nn.Parameter(value.to(device=device, dtype=dtype).contiguous(),
                                                     requires_grad=param.requires_grad)

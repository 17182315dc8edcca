"""Converting dictionary_learning checkpoints into SAELens SAEs.

saprmarks/dictionary_learning saves a plain state dict (``ae.pt``, ``.pth`` or ``.safetensors``)
with, usually, a ``config.json`` beside it: the format in which the seed study published its gated
SAEs of a 6B PM. :mod:`pm_lens.saes.load` reads the files (step 1) and hands the tensors and the
config to :func:`convert_checkpoint`, which does the rest; everything here works on tensors and
mappings, with no I/O.

Converting a dictionary_learning checkpoint:
1. read the tensors safely: ``torch.load(weights_only=True)`` or safetensors, never an arbitrary
   pickle (unpickling can run code; :func:`pm_lens.saes.load.read_state_dict`);
2. recognise the class from the set of keys (:data:`LAYOUTS`), and from ``config.json``'s
   ``trainer.dict_class`` or ``dict_class=`` where two classes save the same keys;
3. rename, transpose to SAELens's ``[d_in, d_sae]`` / ``[d_sae, d_in]``, check every shape and
   that every value is finite (:func:`pm_lens.saes.load.load_sae` checks the weights of every
   source too, and again after ``dtype=`` or ``normalize_decoder=True``);
4. find the hook name: ``hook_name=``, else ``config.json`` when it says unambiguously that the
   SAE read a block's output (``blocks.{layer}.hook_resid_post``), else a ValueError;
5. build the SAELens SAE with the weights in place (no random init of a second copy).

What the two libraries compute, read from saprmarks/dictionary_learning at commit a711efe3b60a,
which is dictionary-learning 0.1.0 on PyPI (``dictionary_learning/dictionary.py`` for
``AutoEncoder``, ``GatedAutoEncoder``, ``JumpReluAutoEncoder``; ``trainers/top_k.py`` and
``trainers/batch_top_k.py`` for ``AutoEncoderTopK`` and ``BatchTopKSAE``; the newest commit read,
60ec6bf5 of August 2025, computes the same and adds k-annealing to training), and from sae-lens
6.54 (``sae_lens/saes/{standard,gated,jumprelu,topk}_sae.py``), with ``n_i = ||d_i||`` the norm
of feature i's decoder vector:

- ``AutoEncoder``: ``f = relu(W_e (x - b) + b_e)``, ``x_hat = W_d f + b``. This is SAELens's
  ``StandardSAE`` with ``apply_b_dec_to_input=True`` and ``b_dec = b``: exact.
- ``GatedAutoEncoder``: ``z = W_e (x - b_dec)``; gate ``[z + b_gate > 0]`` (strict); magnitude
  ``relu(exp(r_mag) * z + b_mag)``; ``f = gate * magnitude``; ``x_hat = W_d f + b_dec``. One
  encoder matrix serves both paths. SAELens's ``GatedSAE`` computes the same with
  ``apply_b_dec_to_input=True``; it scales the columns of ``W_enc`` by ``exp(r_mag)`` instead of
  scaling ``z``, which differs only in float rounding.
- ``JumpReluAutoEncoder``: ``p = x W_enc + b_enc`` (``x - b_dec`` only if its
  ``apply_b_dec_to_input`` attribute is set), ``f = relu(p * [p > threshold])``,
  ``x_hat = f W_dec + b_dec``. SAELens computes ``relu(p) * [p > threshold]``. The two are equal
  for every threshold, including ones <= 0: when ``p > threshold`` both give ``relu(p)``,
  otherwise both give 0. The comparison is strict in both. ``apply_b_dec_to_input`` is a plain
  attribute, not saved in the state dict; dictionary_learning sets it to False, and True only
  when it builds the object from a SAELens release. A checkpoint cannot say which, so it is
  loaded as False, as dictionary_learning's own ``from_pretrained`` does.
- ``AutoEncoderTopK``: ``p = W_e (x - b_dec) + b_e``; ``f`` keeps, per token, the ``k`` largest
  entries of ``relu(p)`` and zeroes the rest; ``x_hat = W_d f + b_dec``. SAELens's ``TopKSAE``
  (``apply_b_dec_to_input=True``, ``rescale_acts_by_decoder_norm=False``) takes the top ``k`` of
  ``p`` and then the ReLU: the same numbers (the two can keep different members of a tie, which
  changes nothing unless positive values tie at the k-th place). ``k`` is an int buffer in the
  state dict since December 2024 (commit b5821fd) and ``trainer.k`` in ``config.json``; either
  is enough, and a mismatch is refused, as dictionary_learning's ``load_dictionary`` does (with
  k-annealing, commit ee08651, a checkpoint saved while ``k`` anneals has a larger ``k`` than
  its ``config.json``). The ``threshold`` buffer it also saves is read only by
  ``encode(use_threshold=True)``, never by ``forward``, so it is ignored. Its features are never
  scaled by ``n_i`` (training keeps ``n_i = 1``); ``normalize_decoder=True`` is refused, since
  scaling features would change which ``k`` are the largest.
- ``BatchTopKSAE``: trained by keeping the ``k * batch`` largest ``relu(p)`` of a whole batch, it
  encodes at inference (``encode``'s default ``use_threshold=True``, which ``forward`` uses) per
  token with one learned global threshold ``t`` (the 0-d ``threshold`` buffer, a running average
  of the smallest kept activation; -1 until ``threshold_start_step``) and does not use ``k``:
  ``f = relu(p) * [relu(p) > t]`` with ``p = W_e (x - b_dec) + b_e``; ``x_hat = W_d f + b_dec``.
  This is SAELens's ``JumpReLUSAE`` with ``apply_b_dec_to_input=True`` and ``t`` in every
  feature's threshold, which computes ``relu(p) * [p > t]``: for ``t >= 0``, ``relu(p) > t`` iff
  ``p > t``; for ``t < 0`` both are ``relu(p)``. It is how SAELens saves its own BatchTopK SAEs.
  A ``t < 0`` (never set) makes it a dense ReLU, loaded as such with a warning. Checkpoints saved
  before December 2024 have no threshold and can only encode by batch top-k; they are refused.
  Its trainer stores the threshold as float32 whatever the weights' dtype; it is cast to theirs.
``AutoEncoderTopK`` and ``BatchTopKSAE`` save the same keys; ``config.json``'s
``trainer.dict_class``, or ``dict_class=``, says which one a checkpoint is.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import SAEConfig, SAEMetadata
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from sae_lens.util import dtype_to_str
from torch import Tensor

CHECKPOINT_NAMES = ("ae.pt", "ae.pth", "ae.safetensors")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")

@dataclass(frozen=True)
class DictionaryLayout:
    """How one dictionary_learning class maps onto a SAELens SAE.

    ``params`` maps each SAELens parameter to the dictionary_learning key it comes from and
    whether that tensor is stored transposed (``nn.Linear`` weights are ``[out, in]``).
    ``buffers`` are other keys the class may save (read, but not SAELens parameters);
    ``scalars`` are parameters stored as one number that SAELens keeps per feature.
    """

    dict_class: str
    sae_class: type[SAE]
    config_class: type[SAEConfig]
    apply_b_dec_to_input: bool
    params: Mapping[str, tuple[str, bool]]
    buffers: frozenset[str] = frozenset()
    scalars: frozenset[str] = frozenset()

    @property
    def keys(self) -> frozenset[str]:
        """The keys every checkpoint of this class has."""
        return frozenset(key for key, _ in self.params.values())

    def fits(self, keys: frozenset[str]) -> bool:
        return self.keys <= keys <= self.keys | self.buffers

    def describe(self) -> str:
        optional = f" (optional: {sorted(self.buffers)})" if self.buffers else ""
        return f"{self.dict_class}: {sorted(self.keys)}{optional}"


_TOPK_PARAMS = {"W_enc": ("encoder.weight", True), "b_enc": ("encoder.bias", False),
                "W_dec": ("decoder.weight", True), "b_dec": ("b_dec", False)}

LAYOUTS: dict[str, DictionaryLayout] = {
    "AutoEncoder": DictionaryLayout(
        "AutoEncoder", StandardSAE, StandardSAEConfig, apply_b_dec_to_input=True,
        params={"W_enc": ("encoder.weight", True), "b_enc": ("encoder.bias", False),
                "W_dec": ("decoder.weight", True), "b_dec": ("bias", False)},
    ),
    "GatedAutoEncoder": DictionaryLayout(
        "GatedAutoEncoder", GatedSAE, GatedSAEConfig, apply_b_dec_to_input=True,
        params={"W_enc": ("encoder.weight", True), "b_gate": ("gate_bias", False),
                "b_mag": ("mag_bias", False), "r_mag": ("r_mag", False),
                "W_dec": ("decoder.weight", True), "b_dec": ("decoder_bias", False)},
    ),
    "JumpReluAutoEncoder": DictionaryLayout(
        "JumpReluAutoEncoder", JumpReLUSAE, JumpReLUSAEConfig, apply_b_dec_to_input=False,
        params={"W_enc": ("W_enc", False), "b_enc": ("b_enc", False), "W_dec": ("W_dec", False),
                "b_dec": ("b_dec", False), "threshold": ("threshold", False)},
    ),
    # Before December 2024 k was a plain attribute (only in config.json) and there was no threshold.
    "AutoEncoderTopK": DictionaryLayout(
        "AutoEncoderTopK", TopKSAE, TopKSAEConfig, apply_b_dec_to_input=True,
        params=_TOPK_PARAMS, buffers=frozenset({"k", "threshold"}),
    ),
    "BatchTopKSAE": DictionaryLayout(
        "BatchTopKSAE", JumpReLUSAE, JumpReLUSAEConfig, apply_b_dec_to_input=True,
        params={**_TOPK_PARAMS, "threshold": ("threshold", False)},
        buffers=frozenset({"k"}), scalars=frozenset({"threshold"}),
    ),
}

# A block's output in dictionary_learning's naming: "resid_post_layer_3" (its demo), "residual", ...
_RESID_POST = re.compile(r"resid(?:ual)?(?:_post)?(?:_layer_?(\d+))?")


def convert_checkpoint(
    state_dict: Mapping[str, Tensor],
    config: Mapping[str, Any] | None,
    *,
    where: str,
    hook_name: str | None,
    dict_class: str | None,
) -> SAE:
    """The SAELens SAE of a dictionary_learning state dict (steps 2-5 of the module docstring).

    ``config`` is the ``config.json`` beside the checkpoint ({} where there is none), or None for a
    state dict in memory; ``where`` names the checkpoint in error messages.
    """
    in_memory, config = config is None, config or {}
    trainer = config["trainer"] if isinstance(config.get("trainer"), dict) else {}
    configured = trainer.get("dict_class") if isinstance(trainer.get("dict_class"), str) else None
    if dict_class is not None and configured is not None and dict_class != configured:
        raise ValueError(
            f"dict_class={dict_class!r}, but config.json beside {where} says dict_class={configured!r}"
        )
    named_by = "dict_class=" if dict_class else f"config.json beside {where}"
    layout = detect_layout(state_dict, dict_class or configured, named_by=named_by)
    hook_name = hook_name or hook_name_from_config(config)
    if hook_name is None:
        why = (
            "a state dict in memory comes with no config.json to say where the SAE reads the model"
            if in_memory
            else f"{_config_summary(config)}, which does not say unambiguously where the SAE reads the model"
        )
        raise ValueError(
            f"no hook name for {where}: {why}; pass hook_name=, e.g. hook_name='blocks.3.hook_resid_post'"
        )
    params = convert_state_dict(state_dict, layout)
    k = read_k(state_dict, trainer, d_sae=params["W_enc"].shape[1], where=where)
    if "threshold" in layout.scalars:
        _warn_if_threshold_unset(params["threshold"][0].item(), layout, where)
    metadata = {"hook_name": hook_name}
    if isinstance(trainer.get("lm_name"), str):
        metadata["model_name"] = trainer["lm_name"]
    return build_sae(layout, params, metadata=metadata, k=_topk_k(layout, k, where))


def _topk_k(layout: DictionaryLayout, k: int | None, where: str) -> int | None:
    """The k a top-k SAE needs; None for other classes (a BatchTopKSAE saves k but does not use it)."""
    if layout.config_class is not TopKSAEConfig:
        return None
    if k is None:
        raise ValueError(
            f"no k for the {layout.dict_class} in {where}: its state dict has no k buffer (saved before "
            "December 2024) and no config.json gives trainer.k; add one, "
            "e.g. state_dict['k'] = torch.tensor(32)"
        )
    return k


def _warn_if_threshold_unset(threshold: float, layout: DictionaryLayout, where: str) -> None:
    if threshold < 0:
        warnings.warn(
            f"the {layout.dict_class} in {where} has threshold {threshold} < 0 (never set in training): "
            "its features are a dense ReLU with no sparsity, as dictionary_learning computes them",
            stacklevel=5,  # the caller of load_sae
        )


def detect_layout(
    state_dict: Mapping[str, Tensor], dict_class: str | None = None, *, named_by: str = "dict_class="
) -> DictionaryLayout:
    """The dictionary_learning class these keys belong to.

    ``dict_class`` (from ``config.json`` or the caller, ``named_by`` says which) picks between
    classes that save the same keys, and must be one whose keys these are.
    """
    keys = frozenset(state_dict)
    fitting = [layout for layout in LAYOUTS.values() if layout.fits(keys)]
    if not fitting:
        known = "; ".join(layout.describe() for layout in LAYOUTS.values())
        raise ValueError(
            f"unrecognised dictionary_learning checkpoint with keys {sorted(keys)}; "
            f"supported layouts are {known}"
        )
    named = LAYOUTS.get(dict_class) if dict_class is not None else None
    if named in fitting:
        return named
    found = " or ".join(layout.dict_class for layout in fitting)
    if dict_class is not None:
        detail = ""
        if named is not None:
            lacking, unexpected = sorted(named.keys - keys), sorted(keys - named.keys - named.buffers)
            detail = f" (for a {dict_class} they lack {lacking} and have unexpected {unexpected})"
        raise ValueError(
            f"{named_by} says dict_class={dict_class!r}, but the weights have the keys of {found}{detail}"
        )
    if len(fitting) > 1:
        raise ValueError(
            f"the keys {sorted(keys)} are saved by both "
            f"{' and '.join(layout.dict_class for layout in fitting)}, "
            "which encode differently, and no config.json names trainer.dict_class; "
            f"pass {' or '.join(f'dict_class={layout.dict_class!r}' for layout in fitting)}"
        )
    return fitting[0]


def convert_state_dict(state_dict: Mapping[str, Tensor], layout: DictionaryLayout) -> dict[str, Tensor]:
    """dictionary_learning tensors renamed and transposed to SAELens parameters, shapes and values
    checked.

    SAELens shapes: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, every
    other parameter ``[d_sae]``; a scalar of ``layout`` (stored ``[]``) is repeated per feature.
    """
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"NaN or infinite values in {key}")
    params = {}
    for name, (key, transposed) in layout.params.items():
        tensor = state_dict[key]
        if not tensor.is_floating_point():
            raise ValueError(f"{key} has dtype {tensor.dtype}; SAE weights must be floating point")
        params[name] = (tensor.T if transposed else tensor).detach().contiguous()
    if params["W_enc"].ndim != 2:
        key = layout.params["W_enc"][0]
        raise ValueError(f"{key} must be a matrix, got shape {tuple(state_dict[key].shape)}")
    d_in, d_sae = params["W_enc"].shape
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name, tensor in params.items():
        want = () if name in layout.scalars else expected.get(name, (d_sae,))
        if tuple(tensor.shape) != want:
            key, transposed = layout.params[name]
            stored = want[::-1] if transposed else want
            raise ValueError(
                f"{key} has shape {tuple(state_dict[key].shape)}, "
                f"expected {stored} for d_in={d_in}, d_sae={d_sae}"
            )
    dtypes = {tensor.dtype for name, tensor in params.items() if name not in layout.scalars}
    if len(dtypes) > 1:
        raise ValueError(f"the checkpoint mixes dtypes {sorted(map(str, dtypes))}; expected one")
    for name in layout.scalars:
        params[name] = params[name].to(params["W_enc"].dtype).expand(d_sae).clone()
    return params


def read_k(
    state_dict: Mapping[str, Tensor], trainer: Mapping[str, Any], *, d_sae: int, where: str
) -> int | None:
    """The ``k`` of a top-k checkpoint: its ``k`` buffer and/or ``config.json``'s ``trainer.k``,
    which must agree; None where neither gives one."""
    found = {}
    if "k" in state_dict:
        stored = state_dict["k"]
        integer = not (stored.is_floating_point() or stored.is_complex() or stored.dtype == torch.bool)
        if stored.ndim != 0 or not integer:
            raise ValueError(
                f"k in {where} must be a 0-d integer tensor, "
                f"got shape {tuple(stored.shape)} and dtype {stored.dtype}"
            )
        found["the k buffer"] = int(stored)
    if "k" in trainer:
        if type(trainer["k"]) is not int:
            raise ValueError(f"config.json beside {where} gives k={trainer['k']!r}; expected an integer")
        found["config.json"] = trainer["k"]
    if len(set(found.values())) > 1:
        raise ValueError(
            f"the k buffer of {where} is {found['the k buffer']}, "
            f"but config.json says k={found['config.json']}; they must agree"
        )
    k = next(iter(found.values()), None)
    if k is not None and not 1 <= k <= d_sae:
        raise ValueError(f"k={k} from {' and '.join(found)} of {where} must be between 1 and d_sae={d_sae}")
    return k


def build_sae(
    layout: DictionaryLayout,
    params: Mapping[str, Tensor],
    *,
    metadata: Mapping[str, Any],
    k: int | None = None,
) -> SAE:
    """A SAELens SAE of ``layout``'s class holding ``params`` (on CPU, in their dtype); ``k`` is
    required by the top-k layout and refused by the others."""
    topk = layout.config_class is TopKSAEConfig
    if topk != (k is not None):
        raise ValueError(
            f"k={k} does not fit a {layout.dict_class}: a top-k SAE needs a k, other classes take none"
        )
    d_in, d_sae = params["W_enc"].shape
    cfg = layout.config_class(
        d_in=d_in,
        d_sae=d_sae,
        dtype=dtype_to_str(params["W_enc"].dtype),
        device="meta",  # as SAE.load_from_disk does: no second, random copy of the weights
        apply_b_dec_to_input=layout.apply_b_dec_to_input,
        metadata=SAEMetadata(**metadata),
        **({"k": k} if topk else {}),
    )
    sae = layout.sae_class(cfg)
    sae.load_state_dict(dict(params), assign=True)
    return sae.to(device="cpu")


def hook_name_from_config(config: Mapping[str, Any]) -> str | None:
    """``blocks.{layer}.hook_resid_post`` when dictionary_learning's ``config.json`` says the SAE
    read a block's output, else None.

    dictionary_learning's demo trains on ``model.layers[layer]`` with ``io="out"`` and names the
    submodule ``resid_post_layer_{layer}``; a missing ``submodule_name`` or any other name (an
    MLP, an attention output, a layer norm) is ambiguous.
    """
    trainer = config.get("trainer")
    buffer = config.get("buffer")
    if not isinstance(trainer, Mapping):
        return None
    layer, name = trainer.get("layer"), trainer.get("submodule_name")
    io = buffer.get("io", "out") if isinstance(buffer, Mapping) else "out"
    if type(layer) is not int or layer < 0 or not isinstance(name, str) or io != "out":
        return None
    match = _RESID_POST.fullmatch(name.lower())
    if match is None or (match.group(1) is not None and int(match.group(1)) != layer):
        return None
    return f"blocks.{layer}.hook_resid_post"


def _config_summary(config: Mapping[str, Any]) -> str:
    trainer = config.get("trainer")
    if not isinstance(trainer, Mapping):
        return "there is no config.json with a 'trainer' entry"
    fields = {key: trainer.get(key) for key in ("layer", "submodule_name")}
    return "config.json gives " + ", ".join(f"{key}={value!r}" for key, value in fields.items())

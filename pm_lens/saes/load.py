"""Loading SAEs from disk, from SAELens releases, or from dictionary_learning checkpoints.

:func:`load_sae` returns a SAELens inference ``SAE`` whatever the source, so the rest of pm_lens
talks to one type. Three sources (``format=``; ``"auto"`` decides from what the path holds):

- ``"saelens"``: a directory written by ``sae.save_model(dir)`` (``cfg.json`` +
  ``sae_weights.safetensors``), read with ``SAE.load_from_disk``.
- ``"release"``: a SAELens pretrained release, ``"release/sae_id"`` or ``(release, sae_id)``, read
  with ``SAE.from_pretrained``. It needs the Hugging Face hub or a copy in the local HF cache.
  ``"auto"`` takes a string that is not a path as a release only when the part before the first
  ``/`` is a release SAELens knows; pass a tuple for a Hugging Face repo id.
- ``"dictionary_learning"``: a state dict saved by saprmarks/dictionary_learning, the format in
  which the seed study published its gated SAEs of a 6B PM: a ``.pt``/``.pth``/``.safetensors``
  file, or a directory holding ``ae.pt`` and, usually, ``config.json``; or a state dict in memory
  (``ae.state_dict()``, a mapping from names to tensors), which needs ``hook_name=``.

Converting a dictionary_learning checkpoint:
1. read the tensors safely: ``torch.load(weights_only=True)`` or safetensors, never an arbitrary
   pickle (unpickling can run code);
2. recognise the class from the set of keys (:data:`LAYOUTS`), and from ``config.json``'s
   ``trainer.dict_class`` or ``dict_class=`` where two classes save the same keys;
3. rename, transpose to SAELens's ``[d_in, d_sae]`` / ``[d_sae, d_in]``, check every shape and
   that every value is finite (:func:`load_sae` checks the weights of every source too, and
   again after ``dtype=`` or ``normalize_decoder=True``);
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

import json
import os
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import SAEConfig, SAEMetadata
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from sae_lens.util import dtype_to_str
from safetensors.torch import load_file
from torch import Tensor

from pm_lens.model.placement import as_device, as_dtype

FORMATS = ("auto", "saelens", "release", "dictionary_learning")
SAELENS_FILES = ("cfg.json", "sae_weights.safetensors")
CHECKPOINT_NAMES = ("ae.pt", "ae.pth", "ae.safetensors")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")

Source = str | os.PathLike[str] | tuple[str, str] | Mapping[str, Tensor]
SOURCES_ALLOWED = (
    "a path (str or Path), a SAELens release ('release/sae_id' or (release, sae_id)) "
    "or a dictionary_learning state dict (a mapping from names to tensors)"
)


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


def load_sae(
    source: Any,  # a Source, checked below with a clearer message than a type checker gives
    *,
    hook_name: str | None = None,
    format: str = "auto",
    dict_class: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    normalize_decoder: bool = False,
) -> SAE:
    """Load an SAE as a SAELens inference ``SAE``.

    Args:
        source: a SAELens directory, a dictionary_learning checkpoint (file or directory) or
            state dict in memory (``ae.state_dict()``), or a SAELens release as
            ``"release/sae_id"`` or ``(release, sae_id)``.
        hook_name: where the SAE reads the model, e.g. ``"blocks.3.hook_resid_post"``; sets or
            overrides ``sae.cfg.metadata.hook_name``. Required when the source does not say.
        format: ``"auto"`` (default), ``"saelens"``, ``"release"`` or ``"dictionary_learning"``.
        dict_class: the dictionary_learning class (a key of :data:`LAYOUTS`), needed only where
            no ``config.json`` names it and the keys do not tell: ``AutoEncoderTopK`` and
            ``BatchTopKSAE`` save the same keys.
        device, dtype: where the SAE lives and its parameter dtype, e.g. ``"cuda"``, ``"bfloat16"``
            (default: as stored, on CPU).
        normalize_decoder: fold decoder norms into the encoder (``sae.fold_W_dec_norm()``), so
            decoder rows have unit norm and each feature is scaled by its old decoder norm; the
            reconstruction is unchanged. See the module docstring for when this matters.
    """
    if not isinstance(source, str | os.PathLike | tuple | Mapping):
        hint = _source_hint(source)
        raise TypeError(f"source must be {SOURCES_ALLOWED}, not {type(source).__name__}{hint}")
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; allowed: {', '.join(map(repr, FORMATS))}")
    if hook_name is not None and not (isinstance(hook_name, str) and hook_name):
        raise ValueError(
            f"hook_name must be a non-empty string like 'blocks.3.hook_resid_post', not {hook_name!r}"
        )
    if dict_class is not None and dict_class not in LAYOUTS:
        raise ValueError(f"unknown dict_class {dict_class!r}; allowed: {', '.join(map(repr, LAYOUTS))}")
    dtype = as_dtype(dtype) if dtype is not None else None
    device = as_device(device) if device is not None else None
    chosen = detect_format(source) if format == "auto" else format
    if chosen != "dictionary_learning" and (isinstance(source, Mapping) or dict_class is not None):
        what = "a state dict" if isinstance(source, Mapping) else f"dict_class={dict_class!r}"
        raise ValueError(f"{what} is for dictionary_learning checkpoints only, not format={chosen!r}")
    if chosen == "dictionary_learning":
        sae = _load_dictionary_learning(source, hook_name=hook_name, dict_class=dict_class)
    else:
        sae = _LOADERS[chosen](source)
    if hook_name is not None:
        sae.cfg.metadata.hook_name = hook_name
    if sae.cfg.metadata.hook_name is None:
        raise ValueError(
            f"the SAE from {_describe(source)} has no hook name; "
            "pass hook_name=, e.g. hook_name='blocks.3.hook_resid_post'"
        )
    _check_finite(sae, source)
    if normalize_decoder:
        fold_decoder_norms(sae)
    placement = {k: v for k, v in {"device": device, "dtype": dtype}.items() if v is not None}
    sae = sae.to(**placement) if placement else sae
    changes = [*(["normalize_decoder=True"] if normalize_decoder else []),
               *([f"conversion to {dtype}"] if dtype is not None else [])]
    if changes:
        _check_finite(sae, source, after=" and ".join(changes))
    return sae


def detect_format(source: Source) -> str:
    """The format ``"auto"`` resolves to: from what the path holds, else a known release id."""
    if isinstance(source, tuple):
        return "release"
    if isinstance(source, Mapping):
        return "dictionary_learning"
    path = Path(source)
    if path.is_dir():
        if all((path / name).is_file() for name in SAELENS_FILES):
            return "saelens"
        if any((path / name).is_file() for name in CHECKPOINT_NAMES):
            return "dictionary_learning"
        raise ValueError(
            f"cannot tell what the directory {str(path)!r} holds: "
            f"a SAELens SAE has {' and '.join(SAELENS_FILES)}, "
            f"a dictionary_learning checkpoint one of {', '.join(CHECKPOINT_NAMES)}"
        )
    if path.is_file():
        if path.suffix in CHECKPOINT_SUFFIXES:
            return "dictionary_learning"
        raise ValueError(
            f"cannot tell the format of the file {str(path)!r}: dictionary_learning checkpoints end in "
            f"{', '.join(CHECKPOINT_SUFFIXES)}; pass format= to say which it is"
        )
    if isinstance(source, str) and _is_known_release(source):
        return "release"
    raise ValueError(
        f"{str(source)!r} is not an existing file or directory, nor 'release/sae_id' with a release SAELens "
        "knows; for a Hugging Face repo id pass (repo_id, sae_id) or format='release'"
    )


def fold_decoder_norms(sae: SAE) -> None:
    """``sae.fold_W_dec_norm()`` where it keeps the SAE's function, else a ValueError."""
    if isinstance(sae, TopKSAE) and not sae.cfg.rescale_acts_by_decoder_norm:
        raise ValueError(
            "normalize_decoder=True is not possible for a TopKSAE with rescale_acts_by_decoder_norm=False: "
            "scaling feature i by its decoder norm would change which k features are the largest; "
            "load it without normalize_decoder"
        )
    zero = (sae.W_dec.norm(dim=-1) == 0).nonzero().flatten().tolist()
    if zero:
        raise ValueError(
            f"normalize_decoder=True divides by decoder norms, but features {zero[:10]} "
            f"({len(zero)} in all) have all-zero decoder vectors; load it without normalize_decoder"
        )
    sae.fold_W_dec_norm()


def _check_finite(sae: SAE, source: Source, *, after: str | None = None) -> None:
    bad = [name for name, tensor in sae.state_dict().items()
           if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        when = f" after {after} (values beyond the dtype's range?)" if after else ""
        raise ValueError(
            f"the SAE from {_describe(source)} has NaN or infinite values in {', '.join(bad)}{when}"
        )


def _source_hint(source: object) -> str:
    if isinstance(source, SAE):
        return "; it is already a SAELens SAE: use it as it is"
    if isinstance(source, torch.nn.Module):
        return "; for a dictionary_learning module pass its state_dict()"
    return ""


def _describe(source: Source) -> str:
    """The source for an error message (a state dict's repr would print every tensor)."""
    if isinstance(source, Mapping):
        return f"the state dict passed as source (keys {sorted(map(str, source))})"
    return repr(str(source) if isinstance(source, os.PathLike) else source)


def _is_known_release(text: str) -> bool:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    release, _, sae_id = text.partition("/")
    return bool(release and sae_id) and release in get_pretrained_saes_directory()


def _existing_path(source: Source, fmt: str) -> Path:
    if isinstance(source, tuple):
        raise TypeError(f"format={fmt!r} takes a path, got the tuple {source!r} (a tuple names a release)")
    path = Path(source)
    if not path.exists():
        raise ValueError(f"no such file or directory: {str(path)!r} (format={fmt!r})")
    return path


# ---- SAELens directory -----------------------------------------------------------------------


def _load_saelens(source: Source) -> SAE:
    path = _existing_path(source, "saelens")
    missing = [name for name in SAELENS_FILES if not (path / name).is_file()]
    if missing:
        raise ValueError(f"{str(path)!r} is not a SAELens SAE directory: it lacks {', '.join(missing)}")
    return SAE.load_from_disk(path)


# ---- SAELens release -------------------------------------------------------------------------


def _release_id(source: Source) -> tuple[str, str]:
    release = sae_id = ""
    if isinstance(source, tuple) and len(source) == 2:
        release, sae_id = source
    elif isinstance(source, str):
        release, _, sae_id = source.partition("/")
    if not (isinstance(release, str) and isinstance(sae_id, str) and release and sae_id):
        raise ValueError(f"a SAELens release is 'release/sae_id' or (release, sae_id), got {source!r}")
    return release, sae_id


def _network_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub raises OSError subclasses (LocalEntryNotFoundError, OfflineModeIsEnabled,
    # HfHubHTTPError); a raw transport error from httpx is not one.
    try:
        import httpx
    except ImportError:
        return (OSError,)
    return (OSError, httpx.TransportError)


def _load_release(source: Source) -> SAE:
    release, sae_id = _release_id(source)
    try:
        return SAE.from_pretrained(release, sae_id)
    except _network_errors() as err:
        from huggingface_hub import constants

        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise OSError(
            f"could not load SAELens release {release!r}, sae_id {sae_id!r}: it needs network access to the "
            f"Hugging Face hub or the files already in the local HF cache{offline}. "
            f"Underlying error: {type(err).__name__}: {err}"
        ) from err


# ---- dictionary_learning ---------------------------------------------------------------------


def _load_dictionary_learning(source: Source, *, hook_name: str | None, dict_class: str | None) -> SAE:
    if isinstance(source, Mapping):
        state_dict, config, where = _tensors(source), {}, "the state dict passed as source"
    else:
        checkpoint = _checkpoint_file(_existing_path(source, "dictionary_learning"))
        state_dict = read_state_dict(checkpoint)
        config = _read_config(checkpoint.parent / "config.json")
        where = repr(str(checkpoint))
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
            if isinstance(source, Mapping)
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
            stacklevel=4,
        )


def _tensors(source: Mapping[Any, Any]) -> dict[str, Tensor]:
    bad = [f"{key!r}: {type(value).__name__}" for key, value in source.items()
           if not isinstance(key, str) or not isinstance(value, Tensor)]
    if bad:
        raise TypeError(
            f"a state dict passed as source must map names (str) to tensors; got {', '.join(bad[:5])}"
        )
    return dict(source)


def _checkpoint_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in CHECKPOINT_NAMES:
        if (path / name).is_file():
            return path / name
    raise ValueError(
        f"the directory {str(path)!r} holds no dictionary_learning checkpoint ({', '.join(CHECKPOINT_NAMES)})"
    )


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors in a checkpoint file, read without unpickling arbitrary objects."""
    if path.suffix == ".safetensors":
        return load_file(path, device="cpu")
    try:
        loaded = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0]
        raise ValueError(
            f"refusing to load {str(path)!r}: it is not a plain state dict of tensors, and unpickling other "
            f"objects can run arbitrary code (torch.load(weights_only=True) said: {reason}). "
            "Save the weights with torch.save(ae.state_dict(), path) or as safetensors."
        ) from err
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(
            f"{str(path)!r} does not hold a state dict (a mapping from names to tensors); "
            f"got {type(loaded).__name__}"
        )
    return dict(loaded)


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


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from err
    return config if isinstance(config, dict) else {}


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


_LOADERS: dict[str, Callable[[Source], SAE]] = {"saelens": _load_saelens, "release": _load_release}

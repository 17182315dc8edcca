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

A dictionary_learning checkpoint is read here (safely: ``torch.load(weights_only=True)`` or
safetensors, never an arbitrary pickle) and converted by :mod:`pm_lens.saes.dictionary_learning`,
whose docstring lists the steps and what each class computes in both libraries. :func:`load_sae`
checks that the weights of every source are finite, and again after ``dtype=`` or
``normalize_decoder=True``.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.saes.topk_sae import TopKSAE
from safetensors.torch import load_file
from torch import Tensor

from pm_lens.model.placement import as_device, as_dtype
from pm_lens.saes.dictionary_learning import CHECKPOINT_NAMES as CHECKPOINT_NAMES
from pm_lens.saes.dictionary_learning import CHECKPOINT_SUFFIXES as CHECKPOINT_SUFFIXES
from pm_lens.saes.dictionary_learning import LAYOUTS as LAYOUTS
from pm_lens.saes.dictionary_learning import DictionaryLayout as DictionaryLayout
from pm_lens.saes.dictionary_learning import build_sae as build_sae
from pm_lens.saes.dictionary_learning import convert_checkpoint
from pm_lens.saes.dictionary_learning import convert_state_dict as convert_state_dict
from pm_lens.saes.dictionary_learning import detect_layout as detect_layout
from pm_lens.saes.dictionary_learning import hook_name_from_config as hook_name_from_config
from pm_lens.saes.dictionary_learning import read_k as read_k

FORMATS = ("auto", "saelens", "release", "dictionary_learning")
SAELENS_FILES = ("cfg.json", "sae_weights.safetensors")

Source = str | os.PathLike[str] | tuple[str, str] | Mapping[str, Tensor]
SOURCES_ALLOWED = (
    "a path (str or Path), a SAELens release ('release/sae_id' or (release, sae_id)) "
    "or a dictionary_learning state dict (a mapping from names to tensors)"
)


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
            reconstruction is unchanged. See :mod:`pm_lens.saes.dictionary_learning`
            for when this matters.
    """
    _check_arguments(source, format=format, hook_name=hook_name, dict_class=dict_class)
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


def _check_arguments(source: Any, *, format: str, hook_name: str | None, dict_class: str | None) -> None:
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


# ---- dictionary_learning checkpoint (converted by pm_lens.saes.dictionary_learning) ----------


def _load_dictionary_learning(source: Source, *, hook_name: str | None, dict_class: str | None) -> SAE:
    if isinstance(source, Mapping):
        state_dict, config, where = _tensors(source), None, "the state dict passed as source"
    else:
        checkpoint = _checkpoint_file(_existing_path(source, "dictionary_learning"))
        state_dict = read_state_dict(checkpoint)
        config = _read_config(checkpoint.parent / "config.json")
        where = repr(str(checkpoint))
    return convert_checkpoint(state_dict, config, where=where, hook_name=hook_name, dict_class=dict_class)


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


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from err
    return config if isinstance(config, dict) else {}


_LOADERS: dict[str, Callable[[Source], SAE]] = {"saelens": _load_saelens, "release": _load_release}

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
  file, or a directory holding ``ae.pt`` and, usually, ``config.json``.

Converting a dictionary_learning checkpoint:
1. read the tensors safely: ``torch.load(weights_only=True)`` or safetensors, never an arbitrary
   pickle (unpickling can run code);
2. recognise the class from the exact set of keys (:data:`LAYOUTS`);
3. rename, transpose to SAELens's ``[d_in, d_sae]`` / ``[d_sae, d_in]`` and check every shape;
4. find the hook name: ``hook_name=``, else ``config.json`` when it says unambiguously that the
   SAE read a block's output (``blocks.{layer}.hook_resid_post``), else a ValueError;
5. build the SAELens SAE with the weights in place (no random init of a second copy).

What the two libraries compute, read from ``dictionary_learning/dictionary.py`` in
saprmarks/dictionary_learning (the newest version read, commit a711efe3b60a; classes
``AutoEncoder``, ``GatedAutoEncoder``, ``JumpReluAutoEncoder``) and from sae-lens 6.54
(``sae_lens/saes/{standard,gated,jumprelu}_sae.py``), with ``n_i = ||d_i||`` the norm of
feature i's decoder vector:

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

One difference between *versions* of dictionary_learning cannot be read from a checkpoint: the
scale of the features. Decoders trained without unit-norm constraints have ``n_i != 1``, and the
versions disagree about whether ``encode`` reports ``f_i`` or ``f_i * n_i``:
- commit a711efe3b60a (newest read): Gated and JumpReLU ``encode`` return ``f_i``
  (``GatedAutoEncoder.encode(normalize_decoder=False)`` is the default); but
  ``AutoEncoder.from_pretrained`` calls ``normalize_decoder()`` by default, which folds ``n_i``
  into the encoder, so a loaded ``AutoEncoder`` reports ``f_i * n_i``;
- commit 088e5872957d (``dictionary_learning/dictionary.py``): Gated and JumpReLU ``encode``
  multiply by ``n_i`` and ``decode`` divides by it again;
- commit 05b397bcc60f (an older ``dictionary.py`` at the root): ``GatedAutoEncoder.encode``
  returns ``(f, relu(pi_gate))`` unscaled; only ``forward(output_features=True)`` reports
  ``f * n_i``.
:func:`load_sae` gives the formulas above as written (``f_i``) by default; with
``normalize_decoder=True`` it calls SAELens's ``fold_W_dec_norm``, which divides ``W_dec`` by
``n_i`` and multiplies ``W_enc``, ``b_enc``, ``b_gate``, ``b_mag`` and ``threshold`` by ``n_i``:
the features become ``f_i * n_i`` exactly, gates and thresholds fire on the same inputs. Either
way the reconstruction is the same, and so are a feature's activation x gradient attribution and
the effect of zero-ablating it (both are invariant to rescaling one feature); only the reported
activation magnitudes change. When every ``n_i`` is 1 the two conventions agree.
"""

from __future__ import annotations

import json
import pickle
import re
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
from sae_lens.util import dtype_to_str
from safetensors.torch import load_file
from torch import Tensor

FORMATS = ("auto", "saelens", "release", "dictionary_learning")
SAELENS_FILES = ("cfg.json", "sae_weights.safetensors")
CHECKPOINT_NAMES = ("ae.pt", "ae.pth", "ae.safetensors")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")

Source = str | Path | tuple[str, str]


@dataclass(frozen=True)
class DictionaryLayout:
    """How one dictionary_learning class maps onto a SAELens SAE.

    ``params`` maps each SAELens parameter to the dictionary_learning key it comes from and
    whether that tensor is stored transposed (``nn.Linear`` weights are ``[out, in]``).
    """

    dict_class: str
    sae_class: type[SAE]
    config_class: type[SAEConfig]
    apply_b_dec_to_input: bool
    params: Mapping[str, tuple[str, bool]]

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(key for key, _ in self.params.values())


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
}

# A block's output in dictionary_learning's naming: "resid_post_layer_3" (its demo), "residual", ...
_RESID_POST = re.compile(r"resid(?:ual)?(?:_post)?(?:_layer_?(\d+))?")


def load_sae(
    source: Source,
    *,
    hook_name: str | None = None,
    format: str = "auto",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    normalize_decoder: bool = False,
) -> SAE:
    """Load an SAE as a SAELens inference ``SAE``.

    Args:
        source: a SAELens directory, a dictionary_learning checkpoint (file or directory), or a
            SAELens release as ``"release/sae_id"`` or ``(release, sae_id)``.
        hook_name: where the SAE reads the model, e.g. ``"blocks.3.hook_resid_post"``; sets or
            overrides ``sae.cfg.metadata.hook_name``. Required when the source does not say.
        format: ``"auto"`` (default), ``"saelens"``, ``"release"`` or ``"dictionary_learning"``.
        device, dtype: where the SAE lives and its parameter dtype (default: as stored, on CPU).
        normalize_decoder: fold decoder norms into the encoder (``sae.fold_W_dec_norm()``), so
            decoder rows have unit norm and each feature is scaled by its old decoder norm; the
            reconstruction is unchanged. See the module docstring for when this matters.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; allowed: {', '.join(map(repr, FORMATS))}")
    if hook_name is not None and not (isinstance(hook_name, str) and hook_name):
        raise ValueError(
            f"hook_name must be a non-empty string like 'blocks.3.hook_resid_post', not {hook_name!r}"
        )
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype such as torch.float32, got {dtype}")
    chosen = detect_format(source) if format == "auto" else format
    sae = _LOADERS[chosen](source, hook_name)
    if hook_name is not None:
        sae.cfg.metadata.hook_name = hook_name
    if sae.cfg.metadata.hook_name is None:
        raise ValueError(
            f"the SAE from {source!r} has no hook name; "
            "pass hook_name=, e.g. hook_name='blocks.3.hook_resid_post'"
        )
    if normalize_decoder:
        sae.fold_W_dec_norm()
    placement = {k: v for k, v in {"device": device, "dtype": dtype}.items() if v is not None}
    return sae.to(**placement) if placement else sae


def detect_format(source: Source) -> str:
    """The format ``"auto"`` resolves to: from what the path holds, else a known release id."""
    if isinstance(source, tuple):
        return "release"
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


def _load_saelens(source: Source, hook_name: str | None) -> SAE:
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


def _load_release(source: Source, hook_name: str | None) -> SAE:
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


def _load_dictionary_learning(source: Source, hook_name: str | None) -> SAE:
    path = _existing_path(source, "dictionary_learning")
    checkpoint = _checkpoint_file(path)
    state_dict = read_state_dict(checkpoint)
    layout = detect_layout(state_dict)
    config = _read_config(checkpoint.parent / "config.json")
    trainer = config["trainer"] if isinstance(config.get("trainer"), dict) else {}
    dict_class = trainer.get("dict_class")
    if isinstance(dict_class, str) and dict_class != layout.dict_class:
        raise ValueError(
            f"config.json beside {str(checkpoint)!r} says dict_class={dict_class!r}, "
            f"but the weights have the keys of a {layout.dict_class}"
        )
    hook_name = hook_name or hook_name_from_config(config)
    if hook_name is None:
        raise ValueError(
            f"no hook name for {str(checkpoint)!r}: {_config_summary(config)}, which does not say "
            "unambiguously where the SAE reads the model; pass hook_name=, "
            "e.g. hook_name='blocks.3.hook_resid_post'"
        )
    params = convert_state_dict(state_dict, layout)
    metadata = {"hook_name": hook_name}
    if isinstance(trainer.get("lm_name"), str):
        metadata["model_name"] = trainer["lm_name"]
    return build_sae(layout, params, metadata=metadata)


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


def detect_layout(state_dict: Mapping[str, Tensor]) -> DictionaryLayout:
    """The dictionary_learning class whose parameters are exactly these keys."""
    keys = frozenset(state_dict)
    for layout in LAYOUTS.values():
        if keys == layout.keys:
            return layout
    known = "; ".join(f"{name}: {sorted(layout.keys)}" for name, layout in LAYOUTS.items())
    raise ValueError(
        f"unrecognised dictionary_learning checkpoint with keys {sorted(keys)}; supported layouts are {known}"
    )


def convert_state_dict(state_dict: Mapping[str, Tensor], layout: DictionaryLayout) -> dict[str, Tensor]:
    """dictionary_learning tensors renamed and transposed to SAELens parameters, shapes checked.

    SAELens shapes: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, every
    other parameter ``[d_sae]``.
    """
    params = {}
    for name, (key, transposed) in layout.params.items():
        tensor = state_dict[key]
        if not tensor.is_floating_point():
            raise ValueError(f"{key} has dtype {tensor.dtype}; SAE weights must be floating point")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"NaN or infinite values in {key}")
        params[name] = (tensor.T if transposed else tensor).detach().contiguous()
    if params["W_enc"].ndim != 2:
        key = layout.params["W_enc"][0]
        raise ValueError(f"{key} must be a matrix, got shape {tuple(state_dict[key].shape)}")
    d_in, d_sae = params["W_enc"].shape
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name, tensor in params.items():
        want = expected.get(name, (d_sae,))
        if tuple(tensor.shape) != want:
            key, transposed = layout.params[name]
            stored = want[::-1] if transposed else want
            raise ValueError(
                f"{key} has shape {tuple(state_dict[key].shape)}, "
                f"expected {stored} for d_in={d_in}, d_sae={d_sae}"
            )
    dtypes = {tensor.dtype for tensor in params.values()}
    if len(dtypes) > 1:
        raise ValueError(f"the checkpoint mixes dtypes {sorted(map(str, dtypes))}; expected one")
    return params


def build_sae(layout: DictionaryLayout, params: Mapping[str, Tensor], *, metadata: Mapping[str, Any]) -> SAE:
    """A SAELens SAE of ``layout``'s class holding ``params`` (on CPU, in their dtype)."""
    d_in, d_sae = params["W_enc"].shape
    cfg = layout.config_class(
        d_in=d_in,
        d_sae=d_sae,
        dtype=dtype_to_str(params["W_enc"].dtype),
        device="meta",  # as SAE.load_from_disk does: no second, random copy of the weights
        apply_b_dec_to_input=layout.apply_b_dec_to_input,
        metadata=SAEMetadata(**metadata),
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


_LOADERS: dict[str, Callable[[Source, str | None], SAE]] = {
    "saelens": _load_saelens,
    "release": _load_release,
    "dictionary_learning": _load_dictionary_learning,
}

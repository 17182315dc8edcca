"""Where a model lives and in what precision: ``dtype`` and ``device`` arguments, checked once.

Users write dtypes as strings (``"bfloat16"``, ``"torch.float16"``, from a config file or a command
line) as often as ``torch.bfloat16``, and devices as ``"cuda:1"``. :func:`as_dtype` and
:func:`as_device` turn either form into the torch object, or raise a one-line ``ValueError`` that
names the bad value and what is allowed, before any weights are loaded.
"""

from __future__ import annotations

from typing import Any

import torch

# The floating dtypes a reward model can run in, by the names people write them with.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
    "double": torch.float64,
    "fp64": torch.float64,
}


def as_dtype(dtype: object) -> torch.dtype:
    """``dtype`` as a floating ``torch.dtype``: a torch dtype or one of the names in :data:`DTYPES`
    (case-insensitive, with or without ``torch.``). Anything else raises a ``ValueError`` (the
    argument is typed ``object`` because checking what users pass is the point)."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif isinstance(dtype, str):
        found = DTYPES.get(dtype.strip().lower().removeprefix("torch."))
        if found is not None:
            return found
    raise ValueError(f"dtype {dtype!r} is not a floating dtype pm_lens can use; allowed: {_allowed_dtypes()}")


def _allowed_dtypes() -> str:
    """``'float32' (float/fp32), 'bfloat16' (bf16), ...``: each dtype's first name, then its aliases."""
    names: dict[torch.dtype, list[str]] = {}
    for name, dtype in DTYPES.items():
        names.setdefault(dtype, []).append(name)
    listed = ", ".join(f"{first!r} ({'/'.join(aliases)})" for first, *aliases in names.values())
    return f"{listed}, with or without 'torch.', or the torch.dtype itself"


def as_device(device: object) -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine.

    Accepts what ``torch.device`` accepts (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, a CUDA
    index, a ``torch.device``); raises a ``ValueError`` for anything else, and for a CUDA or MPS
    device this machine does not have (torch would fail later, deep inside the load).
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(
            f"device {device!r} is not a device; use 'cpu', 'cuda', 'cuda:N', 'mps' or a torch.device"
        ) from err
    _check_available(parsed, device)
    return parsed


def as_devices(device: object) -> tuple[torch.device, ...]:
    """``device`` as one or more devices: one device (see :func:`as_device`), or several to split
    the model's layers over (:mod:`pm_lens.model.split`), given as a list or as one string with
    commas (``"cuda:0,cuda:1"``). Each is checked as :func:`as_device` checks it."""
    if isinstance(device, str) and "," in device:
        device = [part.strip() for part in device.split(",")]
    if isinstance(device, (list, tuple)):
        if not device:
            raise ValueError("device is an empty list; give a device such as 'cpu' or 'cuda:0', or several to split over")
        return tuple(as_device(d) for d in device)
    return (as_device(device),)


def _check_available(parsed: torch.device, device: Any) -> None:
    if parsed.type == "cuda":
        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n_gpus == 0:
            raise ValueError(f"device {device!r} needs CUDA, which is not available on this machine; use 'cpu'")
        if parsed.index is not None and parsed.index >= n_gpus:
            raise ValueError(
                f"device {device!r} does not exist: this machine has {n_gpus} CUDA device(s), cuda:0 to cuda:{n_gpus - 1}"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} needs MPS, which is not available on this machine; use 'cpu'")

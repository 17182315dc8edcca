"""A model's layers split over several devices, for PMs whose weights do not fit on one.

A 70B PM in bf16 is 140 GB: no single GPU holds it. :class:`LayerSplit` places the blocks in
order over a list of devices, as a pipeline run one device at a time (naive model parallelism,
as TransformerLens's ``n_devices`` and accelerate's ``device_map`` do): block ``i`` goes to
``devices[i * n_devices // n_layers]`` (TransformerLens's own assignment), the embeddings to the
first device, the final norm and the reward head to the last.

What moves where:

1. each block gets a forward pre-hook that moves its inputs (the residual stream, the attention
   mask) to the block's device, so a forward, a forward restarted at any block and a backward all
   cross devices at block boundaries (autograd follows ``.to``);
2. activations and gradients read at a hook stay on the hook's device, where its SAE lives
   (:meth:`LayerSplit.hook_device`); a delta added at a hook is moved to the activation's device;
3. rewards come back on the first device, where tokens, masks and everything per pair live.

TransformerLens 3.9's ``n_devices`` is not used to place modules: its
``move_model_modules_to_device`` puts every module on the one GPU with the most free memory while
its forward moves the residual between GPUs. When the devices are consecutive GPUs
(``cuda:k``, ``cuda:k+1``, ...), ``cfg.n_devices`` is set so that TransformerLens's forward sends
the residual straight to the next block's GPU; otherwise it sends it to ``cfg.device`` first
and the pre-hook moves it on (one extra copy per block).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

_FIRST = ("embed", "hook_embed", "pos_embed", "hook_pos_embed", "hook_tokens")


@dataclass(frozen=True)
class LayerSplit:
    """Where each part of a model with ``n_layers`` blocks lives over ``devices`` (in order).

    Attributes:
        devices: the devices, first to last (a device may repeat: two CPU "devices" run the same
            code path on one machine).
        n_layers: the model's blocks.
    """

    devices: tuple[torch.device, ...]
    n_layers: int

    def __post_init__(self) -> None:
        if len(self.devices) < 2:
            raise ValueError(f"a layer split needs at least 2 devices, got {list(map(str, self.devices))}")
        if len(self.devices) > self.n_layers:
            raise ValueError(f"cannot split {self.n_layers} layers over {len(self.devices)} devices "
                             f"({', '.join(map(str, self.devices))}); give at most {self.n_layers}")

    @property
    def first(self) -> torch.device:
        return self.devices[0]

    @property
    def last(self) -> torch.device:
        return self.devices[-1]

    def block_device(self, layer: int) -> torch.device:
        """The device of block ``layer``."""
        return self.devices[layer * len(self.devices) // self.n_layers]

    def blocks_on(self, device_index: int) -> range:
        """The blocks on ``devices[device_index]``."""
        layers = [i for i in range(self.n_layers) if i * len(self.devices) // self.n_layers == device_index]
        return range(layers[0], layers[-1] + 1)

    def module_device(self, name: str) -> torch.device:
        """The device of the parameter, buffer, module or hook point ``name``: ``blocks.L.…`` on
        block L's, the embeddings (and their hooks) on the first, the rest (final norm, head) on
        the last."""
        parts = name.split(".")
        if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
            return self.block_device(int(parts[1]))
        if parts[0] in _FIRST:
            return self.first
        return self.last

    def hook_device(self, hook_name: str) -> torch.device:
        """Where the activation at ``hook_name`` is (and where an SAE there must live)."""
        return self.module_device(hook_name)

    def tl_n_devices(self) -> int:
        """``cfg.n_devices`` for TransformerLens's forward: the number of devices when they are
        consecutive GPUs (then its ``get_device_for_block_index`` is :meth:`block_device`), else 1."""
        first = self.first
        consecutive = first.type == "cuda" and all(
            d.type == "cuda" and (d.index or 0) == (first.index or 0) + k for k, d in enumerate(self.devices))
        return len(self.devices) if consecutive else 1

    def describe(self) -> str:
        """``cuda:0 (blocks 0-15), cuda:1 (blocks 16-31)``."""
        parts = []
        for k, device in enumerate(self.devices):
            blocks = self.blocks_on(k)
            parts.append(f"{device} (blocks {blocks.start}-{blocks.stop - 1})")
        return ", ".join(parts)

    def place(self, model: Any) -> None:
        """Move ``model``'s modules to their devices and make every block take its inputs on its own
        device (see the module docstring). Parameters already on their device are not copied."""
        for name, module in model.named_children():
            if name == "blocks":
                for layer, block in enumerate(module):
                    block.to(self.block_device(layer))
                    _MoveInputs.install(block, self.block_device(layer))
            else:
                module.to(self.module_device(name))
        model.cfg.device = self.first
        model.cfg.n_devices = self.tl_n_devices()


class _MoveInputs:
    """A block's forward pre-hook: its tensor inputs (residual, attention mask, shortformer
    embedding) moved to its device (a no-op for those already there)."""

    def __init__(self, device: torch.device):
        self.device = device

    @classmethod
    def install(cls, block: torch.nn.Module, device: torch.device) -> None:
        for key, hook in list(block._forward_pre_hooks.items()):
            if isinstance(hook, cls):
                del block._forward_pre_hooks[key]
                block._forward_pre_hooks_with_kwargs.pop(key, None)
        block.register_forward_pre_hook(cls(device), with_kwargs=True)

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        return (tuple(self._move(a) for a in args), {k: self._move(v) for k, v in kwargs.items()})

    def _move(self, value: Any) -> Any:
        return value.to(self.device) if isinstance(value, Tensor) else value


def as_split(devices: Sequence[torch.device], n_layers: int) -> LayerSplit | None:
    """A :class:`LayerSplit` over ``devices``, or None for a single device."""
    return None if len(devices) == 1 else LayerSplit(tuple(devices), n_layers)

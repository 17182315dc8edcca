"""``pm-lens run`` over several processes with ``torch.distributed`` (launched by ``torchrun``).

Data parallel over shards: every rank loads the model and SAEs, takes the shards ``i`` with
``i % world_size == rank``, and writes them atomically to the shared output folder; what must be
computed once (the stamp, the selection, trained SAEs, mean baselines) is computed by rank 0 while
the others wait at a barrier, then read from disk by all. After the attribution shards, every rank
merges the ranking from the files (the same files, the same order: the same confirmed features);
after the confirmation shards, rank 0 writes the outputs. Forward passes are summed over ranks.

Resuming works per shard as in one process (finished shards are read back, whichever rank wrote
them), so a rank that dies loses only its unfinished shard: run the same command again.
Backend: ``nccl`` when the model runs on CUDA (each rank on ``cuda:LOCAL_RANK``, or with
``devices_per_rank = k`` on the k GPUs from ``cuda:LOCAL_RANK*k``, its layers split over them), else ``gloo``.
Without ``WORLD_SIZE`` in the environment (no ``torchrun``), everything is one rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Ranks:
    """This process's place among the run's processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started_here: bool = False

    @classmethod
    def start(cls, device: str, per_rank: int = 1) -> Ranks:
        """Join the process group ``torchrun`` describes in the environment (or be the only rank);
        ``per_rank`` GPUs per process."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        import torch
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        started = False
        if not dist.is_initialized():
            cuda = device.startswith("cuda")
            if cuda:
                torch.cuda.set_device(local_rank * per_rank)
            dist.init_process_group("nccl" if cuda else "gloo")
            started = True
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, started)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str, per_rank: int = 1) -> str:
        """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` when there are several
        ranks; with ``per_rank = k > 1``, the k GPUs ``cuda:LOCAL_RANK*k`` onwards, comma-separated
        (the model's layers are split over them)."""
        if device != "cuda":
            return device
        if per_rank > 1:
            first = self.local_rank * per_rank
            return ",".join(f"cuda:{first + k}" for k in range(per_rank))
        return f"cuda:{self.local_rank}" if self.world_size > 1 else device

    def owns(self, shard: int) -> bool:
        return shard % self.world_size == self.rank

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (a picklable object), in rank order."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def stop(self) -> None:
        if self.started_here:
            import torch.distributed as dist

            dist.destroy_process_group()

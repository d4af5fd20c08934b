"""Ranks under torchrun: who this process is, which device it runs on, which work is its own.

``torchrun --nproc_per_node=G [--nnodes ...]`` (``python -m torch.distributed.run``) starts one process
per GPU and tells each its place through the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``); a plain ``python`` start is rank 0 of 1. Nothing here starts processes of its own:
PyTorch's launcher does that, and its rendezvous, restarts and multi-node flags apply unchanged.

Work is split without talking: every rank builds the same list of items from the same arguments and the
same files, and :func:`deal` assigns each item to a rank by its expected cost, so a rank computes its
share alone. The process group is used only for barriers (gloo, so a timing process opens no NCCL
communicator on its GPU) and, in training, for DDP's all-reduce.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Dist", "barrier", "deal", "rank_device", "start_group"]

# Ranks wait for each other at a barrier for as long as the most loaded rank needs to catch up; a sweep
# whose ranks are hours apart must not fail on torch's default 30 minutes.
BARRIER_TIMEOUT = _dt.timedelta(hours=24)


@dataclass(frozen=True)
class Dist:
    """This process's place: ``rank`` of ``world`` in all, ``local_rank`` of ``local_world`` on this host."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        """From torchrun's variables; rank 0 of 1 without them."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        if not (world >= 1 and 0 <= rank < world):
            raise ValueError(f"RANK={rank} and WORLD_SIZE={world} do not fit; start several ranks through torchrun")
        return cls(rank, world, int(os.environ.get("LOCAL_RANK", "0")), local_world)


def rank_device(device: str, dist: Dist, *, exclusive: bool = True, hint: str = "") -> str:
    """The device of this rank: with several ranks, ``cuda`` means ``cuda:LOCAL_RANK``.

    With ``exclusive`` (anything that times) more ranks on a host than visible GPUs are refused: two
    processes timing on one GPU measure each other. A ``cuda:N`` naming one GPU is refused with several
    ranks (each rank takes its own). ``cpu`` is left as it is: every rank runs on the CPU. ``hint`` ends
    the refusal's message (another way out the command offers).
    """
    if dist.world == 1 or not device.startswith("cuda"):
        return device
    if device != "cuda":
        raise ValueError(f"--device {device} names one GPU, but {dist.world} ranks run; "
                         "pass --device cuda (each rank takes cuda:LOCAL_RANK)")  # fmt: skip
    visible = torch.cuda.device_count()
    if exclusive and dist.local_world > visible:
        raise ValueError(
            f"{dist.local_world} ranks on this host but {visible} visible GPU(s): two timing processes on one GPU "
            f"would measure each other; start at most {visible} (torchrun --nproc_per_node={visible}) or make more "
            f"GPUs visible (CUDA_VISIBLE_DEVICES){hint}"
        )
    return f"cuda:{dist.local_rank % max(1, visible)}"


def start_group(dist: Dist, backend: str = "gloo") -> None:
    """Join the ranks' process group (once; nothing for a single process)."""
    if dist.world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, timeout=BARRIER_TIMEOUT)


def barrier(dist: Dist) -> None:
    """Wait until every rank arrives (nothing for a single process)."""
    if dist.world > 1:
        start_group(dist)
        torch.distributed.barrier()


def deal(costs: Sequence[float], world: int) -> list[int]:
    """The rank of each item: heaviest first to the least-loaded rank (ties: the earlier item, the lower
    rank). A pure function of ``costs`` and ``world``, so every rank computes the same assignment."""
    if world < 1:
        raise ValueError(f"need at least one rank, got {world}")
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda j: (load[j], j))
        owner[i] = r
        load[r] += costs[i]
    return owner

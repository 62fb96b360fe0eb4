"""ParallelContext: who this process is (rank, world size, device) and how it talks to the others.

Created once per process, either from torchrun's environment (``from_env``) or by tpinfer's own
launcher (``initialize``), and passed to the model at construction. Nothing else reads rank
environment variables.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tpinfer.parallel.comm import Communicator

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0
ALL_REDUCE_CHOICES = ("auto", "shm", "gloo")


@dataclass
class ParallelContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    comm: Communicator

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> ParallelContext:
        device = torch.device(device)
        return cls(0, 1, 0, 1, device, Communicator(None, 0, 1, device))

    @classmethod
    def from_env(cls, timeout_s: float = DEFAULT_TIMEOUT_S, all_reduce: str = "auto") -> ParallelContext:
        """Join the job torchrun started (RANK, WORLD_SIZE, MASTER_ADDR, ... in the environment)."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return cls.single("cuda" if torch.cuda.is_available() else "cpu")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        return cls.initialize(
            rank, world, local_rank, local_world, init_method="env://", timeout_s=timeout_s, all_reduce=all_reduce
        )

    @classmethod
    def initialize(
        cls,
        rank: int,
        world_size: int,
        local_rank: int,
        local_world_size: int,
        init_method: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        all_reduce: str = "auto",
    ) -> ParallelContext:
        if all_reduce not in ALL_REDUCE_CHOICES:
            raise ValueError(f"all_reduce must be one of {', '.join(ALL_REDUCE_CHOICES)}, got {all_reduce!r}")
        use_cuda = torch.cuda.is_available() and torch.cuda.device_count() > local_rank
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(
                backend="nccl" if use_cuda else "gloo",
                init_method=init_method,
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=timeout_s),
            )
        group = dist.group.WORLD
        # Waiting for the next request is not a collective that can be late: no practical timeout there.
        control = dist.new_group(backend="gloo", timeout=timedelta(days=365)) if world_size > 1 else None
        comm = Communicator(group, rank, world_size, device, control_group=control)
        if world_size > 1 and not use_cuda:
            comm.all_reduce_impl = _shared_memory_all_reduce(rank, world_size, all_reduce, timeout_s)
        set_threads(local_world_size)
        return cls(rank, world_size, local_rank, local_world_size, device, comm)

    def close(self) -> None:
        self.comm.close()
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def set_threads(local_world_size: int) -> int:
    """Give each rank on this host an equal share of its cores (at least one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // max(1, local_world_size))
    torch.set_num_threads(threads)
    return threads


def _shared_memory_all_reduce(rank: int, world_size: int, choice: str, timeout_s: float):  # noqa: ANN202
    """The shared-memory all-reduce when every rank is on this host (or when forced), else None (gloo)."""
    if choice == "gloo":
        return None
    from tpinfer.parallel import shm

    if not shm.is_supported():
        if choice == "shm":
            raise RuntimeError("--all-reduce shm needs Linux on x86-64 with /dev/shm")
        return None
    store = dist.distributed_c10d._get_default_store()
    if not shm.all_ranks_on_one_host(rank, world_size, store, timeout_s=timeout_s):
        if choice == "shm":
            raise RuntimeError("--all-reduce shm needs every rank on one host")
        return None
    log.debug("rank %d: shared-memory all-reduce over %d ranks", rank, world_size)
    return shm.ShmAllReduce(rank, world_size, store, timeout_s=timeout_s)

"""ParallelContext: who this process is (rank, world size, device) and how it talks to the others.

Created once per process, either from torchrun's environment (``from_env``) or by tpinfer's own
launcher (``initialize``), and passed to the model at construction. Nothing else reads rank
environment variables.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from tpinfer.parallel.comm import Communicator
from tpinfer.parallel.mesh import Mesh
from tpinfer.parallel.pipe import Pipe

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0
ALL_REDUCE_CHOICES = ("auto", "shm", "gloo")


@dataclass
class ParallelContext:
    """This process's place in the mesh and its communicators.

    ``rank``/``world_size`` are global. ``comm`` is the TP group's (the parallel layers' collectives, ``tp_rank`` of
    ``tp_size``); ``control`` carries rank 0's messages to the first stage of this rank's replica (None on later
    stages, which receive them from the stage before: ``tpinfer.engine.messages``); ``replica`` spans the replica's
    ranks and rank 0 (gathers of measurements); ``pipe`` passes activations between pipeline stages and results
    back to rank 0 (None in plain TP). ``controls`` and ``remotes``, on rank 0 only, hold per data-parallel replica
    its control communicator and the pipe its results come back on.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    comm: Communicator
    mesh: Mesh | None = None  # None: tensor parallelism over every rank
    control: Communicator | None = None
    replica: Communicator | None = None
    pipe: Pipe | None = None
    controls: list[Communicator] = field(default_factory=list)
    remotes: list[Pipe] = field(default_factory=list)  # rank 0: per replica, the pipe its logits come back on

    def __post_init__(self) -> None:
        if self.mesh is None:
            self.mesh = Mesh(tp=self.world_size)
        if self.control is None and self.replica is None:  # one rank, or a hand-made plain-TP context (tests)
            self.control = self.comm
        if self.replica is None:
            self.replica = self.comm
        self.pp_rank, self.dp_rank, self.tp_rank = self.mesh.coords(self.rank)

    @property
    def tp_size(self) -> int:
        return self.mesh.tp

    @property
    def pp_size(self) -> int:
        return self.mesh.pp

    @property
    def dp_size(self) -> int:
        return self.mesh.dp

    @property
    def is_first(self) -> bool:
        """Rank 0: the tokenizer, all I/O, and the scheduler of every replica."""
        return self.rank == 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.mesh.pp - 1

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> ParallelContext:
        device = torch.device(device)
        return cls(0, 1, 0, 1, device, Communicator(None, 0, 1, device))

    @classmethod
    def from_env(cls, timeout_s: float = DEFAULT_TIMEOUT_S, all_reduce: str = "auto",
                 mesh: Mesh | None = None) -> ParallelContext:
        """Join the job torchrun started (RANK, WORLD_SIZE, MASTER_ADDR, ... in the environment); ``mesh`` defaults
        to TP over every rank."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return cls.single("cuda" if torch.cuda.is_available() else "cpu")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        mesh = mesh or Mesh(tp=world)
        mesh.check_world(world)
        crossing = mesh.tp_crossing(local_world)
        if crossing and rank == 0:  # allowed (a fast interconnect may carry it), but rarely what anyone wants
            log.warning("%s; tensor parallelism across nodes all-reduces twice per layer over the network "
                        "(pipeline stages across nodes send one activation per step)", crossing)
        return cls.initialize(rank, world, local_rank, local_world, init_method="env://", timeout_s=timeout_s,
                              all_reduce=all_reduce, mesh=mesh)

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
        mesh: Mesh | None = None,
    ) -> ParallelContext:
        if all_reduce not in ALL_REDUCE_CHOICES:
            raise ValueError(f"all_reduce must be one of {', '.join(ALL_REDUCE_CHOICES)}, got {all_reduce!r}")
        mesh = mesh or Mesh(tp=world_size)
        mesh.check_world(world_size)
        use_cuda = torch.cuda.is_available() and torch.cuda.device_count() > local_rank
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        if world_size == 1:
            set_threads(local_world_size)
            return cls(0, 1, 0, 1, device, Communicator(None, 0, 1, device))
        if not dist.is_initialized():
            dist.init_process_group(
                backend="nccl" if use_cuda else "gloo",
                init_method=init_method,
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=timeout_s),
            )
        stage, replica, tp_rank = mesh.coords(rank)
        timeout = timedelta(seconds=timeout_s)
        # Every rank creates every group, in the same order (torch.distributed's rule), and keeps its own.
        tp_group = dist.group.WORLD
        if mesh.tp != world_size:
            for s in range(mesh.pp):
                for d in range(mesh.dp):
                    group = dist.new_group(mesh.tp_group(s, d), timeout=timeout)
                    if (s, d) == (stage, replica):
                        tp_group = group
        # Per replica: rank 0 with the replica's first-stage ranks, for rank 0's control messages (a broadcast; waiting
        # for the next request is not a collective that can be late: no practical timeout there); and rank 0 with
        # all of the replica's ranks, twice: the data group (activations from stage to stage, results back to rank 0,
        # the collective timeout) and the relay group (each stage passes the control messages on to the next, in
        # point-to-point sends that never wait for the receiver; no practical timeout either). Plain TP: the world.
        plain_tp = mesh.tp == world_size
        long = timedelta(days=365)
        controls, data, relays = [], [], []
        for d in range(mesh.dp):
            everyone = sorted({0, *mesh.replica_group(d)})
            first = sorted({0, *mesh.tp_group(0, d)})
            relay = dist.new_group(everyone, backend="gloo", timeout=long)
            controls.append((first, relay if first == everyone else dist.new_group(first, backend="gloo",
                                                                                      timeout=long)))
            relays.append(relay)
            data.append((everyone, dist.group.WORLD if plain_tp else dist.new_group(everyone, timeout=timeout)))
        comm = Communicator(tp_group, tp_rank, mesh.tp, device, control_group=controls[0][1] if plain_tp else None)
        if mesh.tp > 1 and not use_cuda:
            comm.all_reduce_impl = _shared_memory_all_reduce(tp_rank, mesh.tp, all_reduce, timeout_s,
                                                             f"s{stage}r{replica}")

        def control_of(d: int) -> Communicator:
            ranks, group = controls[d]
            return Communicator(group, ranks.index(rank), len(ranks), device, control_group=group)

        control = control_of(replica) if rank in controls[replica][0] else None
        ranks, group = data[replica]
        whole = Communicator(group, ranks.index(rank), len(ranks), device)
        pipe = None if plain_tp else Pipe(mesh, rank, group, relays[replica], device)
        every, remotes = [], []
        if rank == 0:  # rank 0 schedules every replica: their control broadcasts, and their logits coming back
            every = [control] + [control_of(d) for d in range(1, mesh.dp)]
            remotes = [pipe] + [Pipe(mesh, 0, data[d][1], relays[d], device, replica=d) for d in range(1, mesh.dp)]
        set_threads(local_world_size)
        return cls(rank, world_size, local_rank, local_world_size, device, comm, mesh, control, whole, pipe, every,
                   remotes)

    def close(self) -> None:
        if self.pipe is not None:
            self.pipe.flush()  # sends still in flight (a relayed "stop") must reach the next stage first
        self.comm.close()
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def set_threads(local_world_size: int) -> int:
    """Give each rank on this host an equal share of its cores (at least one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // max(1, local_world_size))
    torch.set_num_threads(threads)
    return threads


def _shared_memory_all_reduce(rank: int, world_size: int, choice: str, timeout_s: float,  # noqa: ANN202
                              name: str = "tp"):
    """The shared-memory all-reduce of one TP group (``rank`` of ``world_size`` in it, ``name`` unique among the
    job's groups) when all its ranks are on this host (or when forced), else None (gloo)."""
    if choice == "gloo":
        return None
    from tpinfer.parallel import shm

    if not shm.is_supported():
        if choice == "shm":
            raise RuntimeError("--all-reduce shm needs Linux on x86-64 with /dev/shm")
        return None
    store = dist.distributed_c10d._get_default_store()
    if not shm.all_ranks_on_one_host(rank, world_size, store, prefix=f"tpinfer-host-{name}", timeout_s=timeout_s):
        if choice == "shm":
            raise RuntimeError("--all-reduce shm needs every rank on one host")
        return None
    log.debug("rank %d: shared-memory all-reduce over %d ranks", rank, world_size)
    return shm.ShmAllReduce(rank, world_size, store, prefix=f"tpinfer-shm-{name}", timeout_s=timeout_s)

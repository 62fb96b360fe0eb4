"""Where each rank sits in a TP x PP x DP mesh, and which layers a pipeline stage holds: pure arithmetic.

Ranks are placed TP innermost, then DP, then PP (``rank = stage * dp * tp + replica * tp + tp_rank``), as Megatron
and vLLM place them: with ``--nproc-per-node`` a multiple of TP, a TP group never spans nodes, and a stage's
replicas fill whole nodes before the next stage starts. The planner places ranks with the same function, and
splits layers with the same ``split_layers``, so its per-rank figures are the engine's.
"""

from __future__ import annotations

from dataclasses import dataclass


class MeshError(ValueError):
    """A mesh that cannot be launched (sizes that do not multiply to the world, a TP group across nodes, ...)."""


@dataclass(frozen=True)
class Mesh:
    tp: int = 1
    pp: int = 1
    dp: int = 1

    def __post_init__(self) -> None:
        for name, value in (("tensor", self.tp), ("pipeline", self.pp), ("data", self.dp)):
            if not isinstance(value, int) or value < 1:
                raise MeshError(f"--{name}-parallel-size must be a positive integer, got {value!r}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def replica_size(self) -> int:
        """Ranks holding one copy of the model (TP x PP)."""
        return self.tp * self.pp

    @property
    def label(self) -> str:
        return f"TP{self.tp}xPP{self.pp}xDP{self.dp}"

    def rank(self, stage: int, replica: int, tp_rank: int) -> int:
        return stage * self.dp * self.tp + replica * self.tp + tp_rank

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(stage, replica, tp_rank) of global ``rank``."""
        if not 0 <= rank < self.world_size:
            raise MeshError(f"rank {rank} is outside a {self.label} mesh of {self.world_size} ranks")
        stage, rest = divmod(rank, self.dp * self.tp)
        replica, tp_rank = divmod(rest, self.tp)
        return stage, replica, tp_rank

    def tp_group(self, stage: int, replica: int) -> list[int]:
        return [self.rank(stage, replica, t) for t in range(self.tp)]

    def pp_group(self, replica: int, tp_rank: int) -> list[int]:
        """The ranks that pass one TP slice's activations from stage to stage."""
        return [self.rank(s, replica, tp_rank) for s in range(self.pp)]

    def replica_group(self, replica: int) -> list[int]:
        """Every rank of one model copy, in rank order; its first is the replica's leader (stage 0, TP rank 0)."""
        return sorted(self.rank(s, replica, t) for s in range(self.pp) for t in range(self.tp))

    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise MeshError(f"world size {world_size} is not tp {self.tp} x pp {self.pp} x dp {self.dp} = "
                            f"{self.world_size}; start {self.world_size} ranks or change the sizes")

    def tp_crossing(self, ranks_per_node: int) -> str | None:
        """Why a TP group would span nodes with ``ranks_per_node`` consecutive ranks per node; None when none does."""
        if ranks_per_node < 1:
            raise MeshError(f"ranks per node must be at least 1, got {ranks_per_node}")
        if self.tp == 1 or ranks_per_node % self.tp == 0:
            return None
        for stage in range(self.pp):
            for replica in range(self.dp):
                group = self.tp_group(stage, replica)
                if group[0] // ranks_per_node != group[-1] // ranks_per_node:
                    return (f"the TP group of ranks {group[0]}-{group[-1]} spans nodes with {ranks_per_node} ranks "
                            f"per node: make --nproc-per-node a multiple of tp={self.tp}, or tp a divisor of it")
        return None


def split_layers(num_layers: int, pp: int) -> tuple[int, ...]:
    """Decoder layers per pipeline stage; when ``pp`` does not divide them the first stages take one more."""
    if not 1 <= pp <= num_layers:
        raise MeshError(f"pp={pp} must be between 1 and the model's {num_layers} layers (one layer per stage at least)")
    base, extra = divmod(num_layers, pp)
    return tuple(base + (1 if s < extra else 0) for s in range(pp))


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """The decoder layers pipeline ``stage`` holds: a contiguous run of ``split_layers``."""
    sizes = split_layers(num_layers, pp)
    start = sum(sizes[:stage])
    return range(start, start + sizes[stage])

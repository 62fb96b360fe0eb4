"""The seeds' key-constraints checklist for a model and a launch, as pure functions.

Each check is a line with a status (pass, fail or unknown) and the reason with its numbers. The caller
(``tpinfer check``) gathers the facts from the machine (``nvidia-smi``, the environment) and passes them in,
so every rule here is tested without a GPU.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from tpinfer.parallel import shard
from tpinfer.parallel.mesh import Mesh, MeshError, split_layers
from tpinfer.planner.model import ModelSpec, kv_replication, local_kv_heads, tp_failure_reason, valid_tp_sizes

PASS, FAIL, UNKNOWN = "pass", "fail", "unknown"
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Check:
    status: str
    name: str
    detail: str


def model_checks(model: ModelSpec, tp: int) -> list[Check]:
    """Heads, KV heads, FFN and vocabulary against ``tp``: the constraints of the seeds' checklist."""
    heads, kv, ffn = model.num_attention_heads, model.num_key_value_heads, model.intermediate_size
    sizes = ", ".join(str(s) for s in valid_tp_sizes(model))
    out = [
        Check(PASS, "TP <= attention heads", f"tp={tp} <= {heads} heads")
        if tp <= heads
        else Check(FAIL, "TP <= attention heads", f"tp={tp} > {heads} heads: a head cannot be split"),
        Check(PASS, "heads divisible by TP", f"{heads} heads / {tp} = {heads // tp} per GPU")
        if heads % tp == 0
        else Check(FAIL, "heads divisible by TP", f"{heads} attention heads are not divisible by tp={tp}"),
    ]
    if kv % tp == 0:
        out.append(Check(PASS, "KV heads", f"{kv} KV heads / {tp} = {kv // tp} per GPU"))
    elif tp % kv == 0:
        out.append(
            Check(
                PASS,
                "KV heads",
                f"tp={tp} > {kv} KV heads: each KV head (and its cache) is replicated on "
                f"{kv_replication(model, tp)} GPUs, {local_kv_heads(model, tp)} per GPU",
            )
        )
    else:
        out.append(Check(FAIL, "KV heads", f"{kv} KV heads are neither divisible by tp={tp} nor a divisor of it"))
    out.append(
        Check(PASS, "FFN divisible by TP", f"intermediate_size {ffn} / {tp} = {ffn // tp} per GPU")
        if ffn % tp == 0
        else Check(FAIL, "FFN divisible by TP", f"intermediate_size {ffn} is not divisible by tp={tp}")
    )
    padded = shard.padded_vocab_size(model.vocab_size, tp)
    vocab = f"{model.vocab_size} rows / {tp} = {padded // tp} per GPU"
    if padded != model.vocab_size:
        vocab = (
            f"{model.vocab_size} rows padded to {padded} / {tp} = {padded // tp} per GPU "
            "(padding rows are never sampled)"
        )
    out.append(Check(PASS, "vocabulary", vocab))
    reason = tp_failure_reason(model, tp)
    out.append(Check(PASS if reason is None else FAIL, "valid TP size", f"valid sizes for {model.name}: {sizes}"))
    if not model.engine_supported:
        out.append(
            Check(
                FAIL,
                "engine supports the model",
                f"model_type {model.model_type} is planned only; the engine runs {', '.join(_engine_types())}",
            )
        )
    return out


def _engine_types() -> tuple[str, ...]:
    from tpinfer.models import SUPPORTED_MODEL_TYPES

    return SUPPORTED_MODEL_TYPES


def gpu_count_check(tp: int, gpus_per_node: int | None, nnodes: int | None, visible_gpus: int | None) -> list[Check]:
    """TP must fit the GPUs of one node (the seeds: keep TP within a node)."""
    out = []
    nnodes = nnodes or 1
    if visible_gpus is not None and gpus_per_node is not None and visible_gpus < gpus_per_node:
        out.append(
            Check(FAIL, "GPUs visible", f"{visible_gpus} GPU(s) visible here, but --gpus-per-node {gpus_per_node}")
        )
    per_node = gpus_per_node if gpus_per_node is not None else visible_gpus
    if per_node is None:
        out.append(Check(UNKNOWN, "GPUs per node", "cannot tell: pass --gpus-per-node (nvidia-smi not available)"))
        return out
    if tp > per_node * nnodes:
        out.append(
            Check(
                FAIL,
                "GPUs per node",
                f"tp={tp} needs {tp} GPUs; {nnodes} node(s) x {per_node} have {per_node * nnodes}",
            )
        )
    elif tp > per_node:
        out.append(
            Check(
                FAIL,
                "GPUs per node",
                f"tp={tp} > {per_node} GPUs per node: the TP group would span nodes and "
                "all-reduce over the network; keep TP <= GPUs per node, PP across nodes",
            )
        )
    else:
        idle = per_node % tp
        note = f"; {idle} GPU(s) per node left over" if idle else ""
        out.append(Check(PASS, "GPUs per node", f"tp={tp} <= {per_node} GPUs per node{note}"))
    return out


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def parse_topology(text: str) -> dict[tuple[int, int], str]:
    """``nvidia-smi topo -m`` as {(i, j): link} for GPU pairs, e.g. {(0, 1): "NV18", (0, 2): "PIX"}."""
    lines = [ANSI.sub("", line) for line in text.splitlines()]
    header = next((line.split() for line in lines if line.split()[:1] == ["GPU0"]), None)
    if header is None:
        return {}
    columns = [c for c in header if re.fullmatch(r"(GPU|NIC)\d+", c)]
    links = {}
    for line in lines:
        cells = line.split()
        if not cells or not re.fullmatch(r"GPU\d+", cells[0]):
            continue
        i = int(cells[0][3:])
        for column, cell in zip(columns, cells[1 : 1 + len(columns)], strict=False):
            if column.startswith("GPU"):
                links[i, int(column[3:])] = cell
    return links


def interconnect_check(tp: int, topology: str | None, why_unknown: str = "nvidia-smi not found") -> Check:
    """Whether the GPUs of the first TP group (GPU0 .. GPU{tp-1}) are NVLink-connected."""
    if tp == 1:
        return Check(PASS, "interconnect", "tp=1: no GPU-to-GPU traffic")
    if topology is None:
        return Check(UNKNOWN, "interconnect", f"cannot tell: {why_unknown}")
    links = parse_topology(topology)
    if not links:
        return Check(UNKNOWN, "interconnect", "cannot tell: no GPU matrix in `nvidia-smi topo -m` output")
    gpus = sorted({i for i, _ in links})[:tp]
    pairs = {(i, j): links.get((i, j), "?") for i in gpus for j in gpus if i < j}
    slow = {pair: link for pair, link in pairs.items() if not link.startswith("NV")}
    if len(gpus) < tp:
        return Check(FAIL, "interconnect", f"tp={tp} but `nvidia-smi topo -m` shows {len(gpus)} GPU(s)")
    if slow:
        (i, j), link = next(iter(slow.items()))
        return Check(
            FAIL,
            "interconnect",
            f"GPU{i}-GPU{j} connected by {link} (PCIe/SMP path, not NVLink) and "
            f"{len(slow) - 1} more pair(s): TP all-reduces will be slow; prefer NVLink "
            "(SXM) GPUs or pipeline parallelism",
        )
    kinds = ", ".join(sorted(set(pairs.values())))
    return Check(PASS, "interconnect", f"GPU0-GPU{gpus[-1]} all connected by NVLink ({kinds})")


def launcher_checks(tp: int, env: Mapping[str, str], gpus_per_node: int | None, nnodes: int | None,
                    pp: int = 1, dp: int = 1) -> list[Check]:
    """torchrun's variables: present together and consistent with the requested mesh and cluster.

    WORLD_SIZE must be tp x pp x dp, and with ranks placed TP innermost no TP group may span two nodes.
    """
    mesh = Mesh(tp, pp, dp)
    present = [v for v in TORCHRUN_VARS if v in env]
    if not present:
        return [
            Check(
                UNKNOWN,
                "launcher",
                "not under torchrun (no RANK, WORLD_SIZE, ...): tpinfer's own launcher "
                f"spawns the ranks, or run `torchrun --nproc-per-node {mesh.world_size} ...`",
            )
        ]
    missing = [v for v in TORCHRUN_VARS if v not in env]
    if missing:
        return [
            Check(
                FAIL,
                "launcher",
                f"torchrun variables incomplete: {', '.join(present)} set but {', '.join(missing)} missing",
            )
        ]
    try:
        rank, world, local_rank, local_world, port = (
            int(env[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")
        )
    except ValueError as exc:
        return [Check(FAIL, "launcher", f"a torchrun variable is not an integer: {exc}")]
    problems = []
    if not 0 <= rank < world:
        problems.append(f"RANK={rank} outside 0..WORLD_SIZE-1={world - 1}")
    if not 0 <= local_rank < local_world:
        problems.append(f"LOCAL_RANK={local_rank} outside 0..LOCAL_WORLD_SIZE-1={local_world - 1}")
    if local_world > world:
        problems.append(f"LOCAL_WORLD_SIZE={local_world} > WORLD_SIZE={world}")
    if nnodes is not None and world % local_world == 0 and world // local_world != nnodes:
        problems.append(
            f"WORLD_SIZE={world} / LOCAL_WORLD_SIZE={local_world} = {world // local_world} nodes, not --nnodes {nnodes}"
        )
    if gpus_per_node is not None and local_world > gpus_per_node:
        problems.append(f"LOCAL_WORLD_SIZE={local_world} > {gpus_per_node} GPUs per node")
    if not 0 < port < 65536:
        problems.append(f"MASTER_PORT={port} is not a port")
    out = [
        Check(FAIL, "launcher", "; ".join(problems))
        if problems
        else Check(
            PASS,
            "launcher",
            f"torchrun: RANK={rank} of WORLD_SIZE={world}, LOCAL_RANK={local_rank} of "
            f"{local_world}, master {env['MASTER_ADDR']}:{port}",
        )
    ]
    label = f"tp={tp}" if (pp, dp) == (1, 1) else f"tp={tp} x pp={pp} x dp={dp} = {mesh.world_size}"
    crossing = mesh.tp_crossing(local_world) if local_world >= 1 else None
    if world != mesh.world_size:
        out.append(
            Check(
                FAIL,
                "WORLD_SIZE vs TP",
                f"WORLD_SIZE={world} but {label}: start {mesh.world_size} processes in all "
                f"(torchrun --nproc-per-node {mesh.world_size}, or that many across --nnodes)",
            )
        )
    elif crossing:
        out.append(Check(FAIL, "WORLD_SIZE vs TP", f"{label} with LOCAL_WORLD_SIZE={local_world}: {crossing}"))
    else:
        out.append(Check(PASS, "WORLD_SIZE vs TP", f"WORLD_SIZE={world} = {label}, each TP group inside a node"))
    return out


def run_checks(
    model: ModelSpec,
    tp: int,
    gpus_per_node: int | None,
    nnodes: int | None,
    env: Mapping[str, str],
    topology: str | None,
    visible_gpus: int | None,
    why_unknown: str = "nvidia-smi not found",
    pp: int = 1,
    dp: int = 1,
) -> list[Check]:
    """The whole checklist, in the seeds' order: model constraints, GPUs, interconnect, launcher."""
    if tp < 1:
        raise ValueError(f"--tensor-parallel-size must be at least 1, got {tp}")
    Mesh(tp, pp, dp)  # positive sizes
    return (
        model_checks(model, tp)
        + stage_checks(model, pp)
        + gpu_count_check(tp, gpus_per_node, nnodes, visible_gpus)
        + [interconnect_check(tp, topology, why_unknown)]
        + launcher_checks(tp, env, gpus_per_node, nnodes, pp, dp)
    )


def stage_checks(model: ModelSpec, pp: int) -> list[Check]:
    """Pipeline stages: at least one layer each (uneven splits are fine: the first stages take one more)."""
    if pp == 1:
        return []
    try:
        layers = split_layers(model.num_hidden_layers, pp)
    except MeshError as exc:
        return [Check(FAIL, "layers per stage", str(exc))]
    return [Check(PASS, "layers per stage", f"{model.num_hidden_layers} layers over pp={pp}: "
                  + ", ".join(map(str, layers)))]

"""The planner: pure arithmetic on a model's config and a cluster's description. No GPU, no process group; an
engine model's shapes come from its family's declaration (``tpinfer.models``), whose file also holds its torch
modules, so torch is imported but nothing is allocated.

    model = load_model("llama-3-70b")                  # or a directory with config.json
    plan = make_plan(model, build_request(model, gpu="h100-80gb", gpus_per_node=8))
    plan.recommendation.layout                        # Layout(tp=8, pp=1, dp=1)

``per_rank_weight_bytes(config, tp, dtype)`` is the number the engine's allocation is tested against.
"""

from __future__ import annotations

from dataclasses import replace

from tpinfer.planner.catalogue import catalogue_names, load_model
from tpinfer.planner.dtypes import get_dtype
from tpinfer.planner.hardware import get_device, get_link
from tpinfer.planner.memory import Layout
from tpinfer.planner.model import ModelSpec, per_rank_weight_bytes
from tpinfer.planner.plan import Plan, PlanRequest, make_plan

__all__ = [
    "Layout",
    "ModelSpec",
    "Plan",
    "PlanRequest",
    "build_request",
    "catalogue_names",
    "load_model",
    "make_plan",
    "per_rank_weight_bytes",
]


def build_request(
    model: ModelSpec,
    gpu: str | None = None,
    gpu_memory: float | None = None,
    memory_bandwidth: float | None = None,
    gpus_per_node: int | None = None,
    nodes: int = 1,
    interconnect: str | None = None,
    network: str = "infiniband",
    dtype: str = "bf16",
    max_model_len: int | None = None,
    batch_size: int = 1,
    objective: str = "latency",
    network_bandwidth: float | None = None,
    network_latency: float | None = None,
) -> PlanRequest:
    """A ``PlanRequest`` from the CLI's vocabulary, filling the device's defaults. ``network_bandwidth`` (GB/s per
    direction) and ``network_latency`` (microseconds a message) override the network link's figures."""
    device = get_device(gpu, gpu_memory, memory_bandwidth)
    link = get_link(network, device)
    if network_bandwidth is not None or network_latency is not None:
        bandwidth = link.bandwidth_gbs if network_bandwidth is None else network_bandwidth
        latency = link.latency_us if network_latency is None else network_latency
        if bandwidth <= 0 or latency < 0:
            raise ValueError("--network-bandwidth must be positive and --network-latency at least 0")
        link = replace(link, bandwidth_gbs=bandwidth, latency_us=latency,
                       description=f"{link.name} at {bandwidth:g} GB/s, {latency:g} us a message")
    if gpus_per_node is None:
        gpus_per_node = 1 if device.shared_host else 8
    return PlanRequest(
        device=device,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        intra=get_link(interconnect or device.default_link, device),
        network=link,
        dtype=get_dtype(dtype),
        max_model_len=max_model_len or model.max_position_embeddings,
        batch=batch_size,
        objective=objective,
    )

"""Devices and links the planner knows: memory, memory bandwidth, and a latency + bandwidth model per link.

Numbers are vendor datasheet figures (memory bandwidth, link bandwidth per direction) and the memory total
``nvidia-smi`` reports, so a plan matches what a rented machine shows. Latencies are assumptions in the
textbook alpha-beta form, a fixed cost per collective plus one per ring step, chosen so that small-message
all-reduces land near what NCCL (gloo for ``shm``) reaches; they are printed with every plan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from tpinfer.planner.units import GIB


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float  # usable memory per device (per host for a shared-memory CPU)
    bandwidth_gbs: float | None  # memory bandwidth, GB/s (1e9 bytes/s); None when unknown
    nvlink_gbs: float | None = None  # NVLink bandwidth per direction, GB/s; None: no NVLink
    default_link: str = "pcie"
    p2p: bool = True  # direct GPU-to-GPU copies over PCIe (GeForce cards have them disabled)
    shared_host: bool = False  # a CPU: memory and bandwidth are the host's, shared by the ranks on it
    context_gib: float = 1.0  # runtime context: CUDA context, cuBLAS workspace (or the Python/torch process)
    description: str = ""

    @property
    def unit(self) -> str:
        """What one rank runs on, for sentences: a GPU, or a share of a CPU host."""
        return "CPU rank" if self.shared_host else "GPU"

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth_gbs: float | None  # per direction, GB/s; None: take the device's NVLink figure
    latency_us: float  # fixed cost of one collective or send (launch, synchronisation), microseconds
    hop_us: float  # added per ring step: an all-reduce over n ranks takes 2 (n - 1) steps
    fast: bool  # fast enough for tensor parallelism (the seeds' "NVLink/InfiniBand")
    description: str = ""


# memory_gib: nvidia-smi "total" (e.g. H100 SXM 81559 MiB = 79.6 GiB); bandwidth: datasheet HBM/GDDR GB/s.
GPUS: dict[str, Device] = {
    d.name: d
    for d in (
        Device("h100-80gb", 79.6, 3350, 450, "nvlink", description="H100 SXM5 80GB, NVLink 4"),
        Device("h100-pcie-80gb", 79.6, 2000, None, "pcie5", description="H100 PCIe 80GB"),
        Device("h200-141gb", 140.4, 4800, 450, "nvlink", description="H200 SXM 141GB, NVLink 4"),
        Device("a100-80gb", 80.0, 2039, 300, "nvlink", description="A100 SXM4 80GB, NVLink 3"),
        Device("a100-40gb", 40.0, 1555, 300, "nvlink", description="A100 SXM4 40GB, NVLink 3"),
        Device("l40s-48gb", 45.0, 864, None, "pcie", description="L40S 48GB GDDR6 (45 GiB usable with ECC)"),
        Device("l4-24gb", 22.5, 300, None, "pcie", description="L4 24GB GDDR6"),
        Device("a10g-24gb", 22.5, 600, None, "pcie", description="A10G 24GB GDDR6"),
        Device("rtx4090-24gb", 24.0, 1008, None, "pcie", p2p=False, description="GeForce RTX 4090 24GB"),
        Device("rtx3090-24gb", 24.0, 936, None, "pcie", p2p=False, description="GeForce RTX 3090 24GB"),
    )
}

CPU = "cpu"

LINKS: dict[str, Link] = {
    link.name: link
    for link in (
        Link("nvlink", None, 6.0, 0.5, True, "NVLink/NVSwitch inside a node"),
        Link("pcie", 32.0, 10.0, 3.0, False, "PCIe 4.0 x16 (32 GB/s per direction)"),
        Link("pcie5", 64.0, 10.0, 2.5, False, "PCIe 5.0 x16 (64 GB/s per direction)"),
        Link("infiniband", 50.0, 15.0, 2.0, True, "InfiniBand NDR, 400 Gb/s = 50 GB/s per GPU rail"),
        Link("ethernet", 12.5, 30.0, 10.0, False, "100 Gb Ethernet = 12.5 GB/s"),
        Link("shm", 10.0, 30.0, 10.0, True, "shared memory between processes on one host (gloo)"),
    )
}

DEFAULT_GPU = "h100-80gb"


def host_memory_gib() -> float:
    """This machine's physical memory in GiB (the default memory of ``--gpu cpu``)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def get_device(
    name: str | None = None,
    memory_gib: float | None = None,
    bandwidth_gbs: float | None = None,
) -> Device:
    """A device from the table, ``cpu`` (host memory), or a custom one from ``memory_gib``.

    ``memory_gib`` and ``bandwidth_gbs`` override the table's figures when given.
    """
    if name is None and memory_gib is not None:
        device = Device("custom", memory_gib, bandwidth_gbs, description=f"custom device, {memory_gib:g} GiB")
    elif (name or DEFAULT_GPU).lower() == CPU:
        device = Device(
            CPU,
            memory_gib if memory_gib is not None else round(host_memory_gib(), 1),
            bandwidth_gbs,
            default_link="shm",
            shared_host=True,
            context_gib=0.5,
            description="CPU: host memory and bandwidth shared by the ranks on the host",
        )
    else:
        key = (name or DEFAULT_GPU).lower()
        if key not in GPUS:
            raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}, cpu (or pass --gpu-memory GiB)")
        device = GPUS[key]
    if memory_gib is not None:
        device = replace(device, memory_gib=memory_gib)
    if bandwidth_gbs is not None:
        device = replace(device, bandwidth_gbs=bandwidth_gbs)
    return device


def get_link(name: str, device: Device) -> Link:
    """The link ``name`` as seen from ``device``: NVLink takes the device's bandwidth, no-P2P cards pay twice."""
    key = name.lower()
    if key not in LINKS:
        raise ValueError(f"unknown interconnect {name!r}; known: {', '.join(LINKS)}")
    link = LINKS[key]
    if link.bandwidth_gbs is None:
        if device.nvlink_gbs is None:
            raise ValueError(f"{device.name} has no NVLink; use --interconnect pcie (or pcie5)")
        link = replace(link, bandwidth_gbs=device.nvlink_gbs)
    if key.startswith("pcie") and not device.p2p:
        # Without peer-to-peer copies every message is staged through host memory: two copies, twice the latency.
        link = replace(
            link,
            bandwidth_gbs=link.bandwidth_gbs / 2,
            latency_us=link.latency_us * 2,
            hop_us=link.hop_us * 2,
            description=link.description + ", no P2P: staged through host memory",
        )
    return link

"""Data types the planner counts: bytes per weight element and the dtype activations and KV cache use."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    name: str
    weight_bytes: float  # bytes per stored weight element (a model the engine runs is counted exactly instead)
    compute: str  # dtype of activations, KV cache and messages between ranks
    compute_bytes: int
    quantization: str | None = None  # the engine's --quantization for this dtype: its projections' format


DTYPES: dict[str, DType] = {
    "fp32": DType("fp32", 4, "fp32", 4),
    "bf16": DType("bf16", 2, "bf16", 2),
    "fp16": DType("fp16", 2, "fp16", 2),
    # Quantized projections (the engine's --quantization formats); embeddings, norms, activations, KV cache and
    # all-reduce messages stay in bf16. For models the engine runs, bytes come from the formats' stored tensors
    # (scales and offsets included, tpinfer.quant.formats); the per-element figures here count the planner-only
    # architectures: int8 and fp8 1 byte (per-channel scales are negligible), int4 in groups of 32 with float16
    # scales and offsets 5 bits.
    "int8": DType("int8", 1, "bf16", 2, "int8"),
    "fp8": DType("fp8", 1, "bf16", 2, "fp8"),
    "int4": DType("int4", 0.625, "bf16", 2, "int4"),
}

ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float8": "fp8",
    "float8_e4m3fn": "fp8",
}


def get_dtype(name: str) -> DType:
    """The DType for ``name`` (``bf16``, ``bfloat16``, ``torch.bfloat16`` ...); ValueError lists the choices."""
    key = name.lower().removeprefix("torch.")
    key = ALIASES.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[key]

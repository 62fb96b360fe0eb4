"""Data types the planner counts: bytes per weight element and the dtype activations and KV cache use."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    name: str
    weight_bytes: int  # bytes per stored weight element
    compute: str  # dtype of activations, KV cache and messages between ranks
    compute_bytes: int


DTYPES: dict[str, DType] = {
    "fp32": DType("fp32", 4, "fp32", 4),
    "bf16": DType("bf16", 2, "bf16", 2),
    "fp16": DType("fp16", 2, "fp16", 2),
    # 8-bit weights: 1 byte per element (scales and the few unquantised norms are below 0.1% and not counted);
    # activations, KV cache and all-reduce messages stay in bf16.
    "int8": DType("int8", 1, "bf16", 2),
    "fp8": DType("fp8", 1, "bf16", 2),
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

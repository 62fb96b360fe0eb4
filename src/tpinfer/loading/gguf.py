"""GGUF files as checkpoints: ``--model file.gguf``, each rank reading only its own blocks.

The ``gguf`` package memory-maps the file and parses its metadata; this module maps llama.cpp's tensor names to
HF's, slices each tensor's blocks for a rank (whole rows for a column-parallel shard; in every row, the blocks of
its columns for a row-parallel one), and turns the blocks into a format the kernels run (``tpinfer.quant``):

| GGUF type | held as | exact? |
| --- | --- | --- |
| F32, F16, BF16 | float, in the model's dtype | as a float conversion is |
| Q8_0 | int8, groups of 32 | yes |
| Q4_0 | int4, groups of 32, symmetric | yes |
| Q4_1 | int4, groups of 32, offsets | yes |
| Q4_K | int4, groups of 32, offsets | scale d*sc and offset dmin*m rounded to float16: 2^-11 relative |
| Q5_K | int8, groups of 32, offsets (values 0..31) | yes |
| Q6_K | int8, groups of 16 (values -32..31) | yes |

The embedding is dequantized to the model's dtype, and so is the LM head unless ``--quantize-lm-head`` keeps its
blocks (Q6_K, the head of a Q4_K_M file, as int8 groups of 16). llama.cpp's converter stores q_proj and k_proj
rows interleaved within each head for its rope; a rank's heads are read and put back into HF's order. A row-parallel
shard may not cut a block (32 weights, 256 for the K types): plan validation refuses such TP sizes before loading.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tpinfer.loading.gguf_convert import LAYER_NAMES, TOP_NAMES, GGUFError, read_config
from tpinfer.parallel.spec import Slice
from tpinfer.quant.formats import Scheme, pack_int4
from tpinfer.quant.layers import QTensor

FLOAT_TYPES = ("F32", "F16", "BF16")
# GGUF block type -> (the scheme its blocks become, weights per block, bytes per block)
BLOCK_TYPES = {
    "Q8_0": (Scheme("int8", 32), 32, 34),
    "Q4_0": (Scheme("int4", 32), 32, 18),
    "Q4_1": (Scheme("int4", 32, offsets=True), 32, 20),
    "Q4_K": (Scheme("int4", 32, offsets=True), 256, 144),
    "Q5_K": (Scheme("int8", 32, offsets=True), 256, 176),
    "Q6_K": (Scheme("int8", 16), 256, 210),
}
SUPPORTED = (*FLOAT_TYPES, *BLOCK_TYPES)


def is_gguf(path: str | Path) -> bool:
    return str(path).endswith(".gguf")


@dataclass
class _Tensor:
    name: str  # the GGUF name
    kind: str  # its type's name (F16, Q4_K, ...)
    rows: int
    cols: int
    data: np.ndarray  # the file's bytes (a memory map): (rows, bytes per row) for block types


def hf_name(name: str) -> str | None:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}"
    return None


class GGUFCheckpoint:
    """The tensors of a GGUF file under their HF names, read slice by slice (the ``Checkpoint`` interface)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: no such GGUF file")
        self.reader = _reader(self.path)
        self.config = read_config(self.reader, self.path)
        self.tensors: dict[str, _Tensor] = {}
        for t in self.reader.tensors:
            kind = t.tensor_type.name
            name = hf_name(t.name)
            if name is None:
                raise GGUFError(f"{self.path}: unexpected tensor {t.name}")
            if kind not in SUPPORTED:
                raise GGUFError(f"{self.path}: tensor {t.name} is {kind}; supported: {', '.join(SUPPORTED)}")
            dims = [int(d) for d in t.shape]
            cols, rows = dims[0], int(np.prod(dims[1:])) if len(dims) > 1 else 1
            data = t.data
            if kind in BLOCK_TYPES:
                per_block, block_bytes = BLOCK_TYPES[kind][1:]
                if cols % per_block:
                    raise GGUFError(f"{self.path}: tensor {t.name} has {cols} columns, not whole {kind} blocks")
                expected = rows * cols // per_block * block_bytes
                if data.size != expected:
                    raise GGUFError(f"{self.path}: tensor {t.name} holds {data.size} bytes, {kind} needs {expected}")
                data = data.reshape(rows, cols // per_block * block_bytes)
            self.tensors[name] = _Tensor(t.name, kind, rows, cols, data)
        self.files = {name: self.path for name in self.tensors}
        heads, kv = self.config["num_attention_heads"], self.config["num_key_value_heads"]
        self.heads = {name: (heads if name.endswith("q_proj.weight") else kv) for name in self.tensors
                      if name.endswith(("q_proj.weight", "k_proj.weight"))}

    def schemes(self) -> dict[str, Scheme]:
        """Module name -> the scheme its quantized projection (or LM head: ``lm_head``, which runs quantized only with
        ``--quantize-lm-head``) becomes, float ones absent; the scheme's ``align`` is the file's block, which a
        row-parallel shard must not cut."""
        out = {}
        for name, t in self.tensors.items():
            if t.kind in BLOCK_TYPES and (name.endswith("proj.weight") or name == "lm_head.weight"):
                scheme, per_block, _ = BLOCK_TYPES[t.kind]
                out[name.removesuffix(".weight")] = replace(scheme, align=per_block)
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        t = self.tensors[name]
        return (t.cols,) if t.rows == 1 and name.endswith("norm.weight") else (t.rows, t.cols)

    def read(self, name: str, piece: Slice | None) -> torch.Tensor | QTensor:
        """The tensor or ``piece`` of it: float as torch, a block type as a QTensor of its scheme (see the table)."""
        t = self.tensors[name]
        if piece is None:
            rows, cols = np.arange(t.rows), (0, t.cols)
        elif piece.dim == 0:
            rows, cols = np.concatenate([np.arange(s, s + n) for s, n in piece.ranges])[: piece.valid], (0, t.cols)
        else:
            if len(piece.ranges) != 1:
                raise GGUFError(f"{self.path}: {name}: a row-parallel shard of several ranges is not supported")
            (start, length), = piece.ranges
            rows, cols = np.arange(t.rows), (start, start + length)
        try:
            out = _read_float(t, rows, cols) if t.kind in FLOAT_TYPES else _read_blocks(t, rows, cols)
        except ValueError as exc:
            raise GGUFError(f"{self.path}: tensor {t.name}: {exc}") from exc
        if name in self.heads:
            out = _unpermute(out, self.heads[name], t.rows, rows)
        if name.endswith("norm.weight") and isinstance(out, torch.Tensor):
            out = out.reshape(-1)
        return out

    def close(self) -> None:
        """The memory map stays open for the checkpoint's life (pages not read are never resident)."""


def _read_float(t: _Tensor, rows: np.ndarray, cols: tuple[int, int]) -> torch.Tensor:
    data = t.data.reshape(t.rows, t.cols) if t.data.ndim == 1 or t.data.shape != (t.rows, t.cols) else t.data
    part = np.asarray(data[rows][:, cols[0] : cols[1]])
    if t.kind == "BF16":
        return torch.from_numpy(part.view(np.uint16).astype(np.int32) << 16).view(torch.float32)
    return torch.from_numpy(part.astype(np.float32))


def _read_blocks(t: _Tensor, rows: np.ndarray, cols: tuple[int, int]) -> QTensor:
    scheme, per_block, block_bytes = BLOCK_TYPES[t.kind]
    if cols[0] % per_block or cols[1] % per_block:
        raise ValueError(f"columns {cols[0]}..{cols[1]} cut its {per_block}-weight blocks")
    blocks = np.asarray(t.data[rows][:, cols[0] // per_block * block_bytes : cols[1] // per_block * block_bytes])
    blocks = blocks.reshape(len(rows), -1, block_bytes)
    return QTensor(scheme, CONVERT[t.kind](blocks))


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)[..., 0]


def _rows(x: np.ndarray) -> np.ndarray:
    """(rows, blocks, n) -> (rows, blocks * n)"""
    return x.reshape(x.shape[0], -1)


def _q8_0(b: np.ndarray) -> dict[str, torch.Tensor]:
    d = _f16(b[..., 0:2])
    q = b[..., 2:34].view(np.int8)
    return {"q": torch.from_numpy(_rows(q).copy()), "scale": torch.from_numpy(d.copy())}


def _q4_0(b: np.ndarray) -> dict[str, torch.Tensor]:
    # Q4_0's 16 bytes per block are already the int4 layout (byte i: weight i low, weight i + 16 high), w = d(q - 8)
    d = _f16(b[..., 0:2])
    return {"q": torch.from_numpy(_rows(b[..., 2:18]).copy()), "scale": torch.from_numpy(d.astype(np.float16))}


def _q4_1(b: np.ndarray) -> dict[str, torch.Tensor]:
    d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    return {"q": torch.from_numpy(_rows(b[..., 4:20]).copy()), "scale": torch.from_numpy(d.astype(np.float16)),
            "offset": torch.from_numpy(m.astype(np.float16))}


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of a Q4_K/Q5_K super-block from its 12 bytes: (..., 8) each."""
    s = s.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), dtype=np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4], mn[..., :4] = s[..., 0:4] & 63, s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_k(b: np.ndarray) -> dict[str, torch.Tensor]:
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _k_scales(b[..., 4:16])
    qs = b[..., 16:144].reshape(*b.shape[:2], 4, 32)  # 4 chunks of 64 weights: low nibbles, then high nibbles
    values = np.stack((qs & 0xF, qs >> 4), axis=3).reshape(*b.shape[:2], 8, 32)  # 8 groups of 32
    q = pack_int4(torch.from_numpy(values.reshape(b.shape[0], -1).astype(np.uint8)))
    scale = (d[..., None] * sc).reshape(b.shape[0], -1)
    offset = -(dmin[..., None] * mn).reshape(b.shape[0], -1)
    return {"q": q, "scale": torch.from_numpy(scale.astype(np.float16)),
            "offset": torch.from_numpy(offset.astype(np.float16))}


def _q5_k(b: np.ndarray) -> dict[str, torch.Tensor]:
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _k_scales(b[..., 4:16])
    qh = b[..., 16:48]  # bit 2j (low nibbles) and 2j + 1 (high nibbles) of chunk j's 32 bytes
    qs = b[..., 48:176].reshape(*b.shape[:2], 4, 32)
    shifts = np.arange(4)[:, None]
    low = (qs & 0xF) + (((qh[..., None, :] >> (2 * shifts)) & 1) << 4)
    high = (qs >> 4) + (((qh[..., None, :] >> (2 * shifts + 1)) & 1) << 4)
    values = np.stack((low, high), axis=3).reshape(b.shape[0], -1)
    scale = (d[..., None] * sc).reshape(b.shape[0], -1)
    offset = -(dmin[..., None] * mn).reshape(b.shape[0], -1)
    return {"q": torch.from_numpy(values.astype(np.int8)), "scale": torch.from_numpy(scale.astype(np.float32)),
            "offset": torch.from_numpy(offset.astype(np.float32))}


def _q6_k(b: np.ndarray) -> dict[str, torch.Tensor]:
    ql = b[..., 0:128].reshape(*b.shape[:2], 2, 64)  # two halves of 128 weights
    qh = b[..., 128:192].reshape(*b.shape[:2], 2, 32)
    sc = b[..., 192:208].view(np.int8).astype(np.float32)
    d = _f16(b[..., 208:210])
    a, c = ql[..., :32], ql[..., 32:]
    q1 = (a & 0xF) | (((qh >> 0) & 3) << 4)
    q2 = (c & 0xF) | (((qh >> 2) & 3) << 4)
    q3 = (a >> 4) | (((qh >> 4) & 3) << 4)
    q4 = (c >> 4) | (((qh >> 6) & 3) << 4)
    values = np.stack((q1, q2, q3, q4), axis=3).astype(np.int16) - 32  # (rows, blocks, 2, 4, 32)
    scale = (d[..., None] * sc).reshape(b.shape[0], -1)  # one per 16 weights, in order
    return {"q": torch.from_numpy(values.reshape(b.shape[0], -1).astype(np.int8)),
            "scale": torch.from_numpy(scale.astype(np.float32))}


CONVERT = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def _unpermute(value: torch.Tensor | QTensor, heads: int, total_rows: int,
               rows: np.ndarray) -> torch.Tensor | QTensor:
    """Rows of q_proj/k_proj (whole heads) from llama.cpp's order back to HF's: within each head, llama.cpp keeps
    the rope pairs (i, i + D/2) next to each other."""
    head_dim = total_rows // heads
    local = len(rows)
    order = torch.arange(local).reshape(local // head_dim, head_dim // 2, 2).transpose(1, 2).reshape(local)
    if isinstance(value, torch.Tensor):
        return value[order]
    return QTensor(value.scheme, {k: v[order] for k, v in value.tensors.items()})


def _reader(path: Path):  # noqa: ANN202  (a gguf.GGUFReader)
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as exc:  # a truncated or corrupt file fails to parse or to map
        raise GGUFError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc


def gguf_config(path: str | Path) -> dict[str, Any]:
    """The HF config.json keys a GGUF file's metadata gives."""
    path = Path(path)
    return read_config(_reader(path), path)

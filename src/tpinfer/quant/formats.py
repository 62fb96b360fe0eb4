"""Weight formats for quantized projections: what is stored, how it dequantizes, how a float weight is quantized.

The formats are weight-only: activations stay float (W8A16, W4A16, FP8 weights), and every kernel dequantizes a
weight in registers as it multiplies. Adding ``-a8`` to an int8 or int4 scheme (``int4-a8``, ``int8-a8``) keeps
the same weights and rounds the activations too, to int8 in blocks of 32, 64 or 128 inputs (``act_block``,
``quantize_activations``): the
product is then ``x_hat W^T``, which the CPU kernels compute with integer dot products (AVX512-VNNI), faster
than dequantizing, at the accuracy cost ``tpinfer verify -q`` measures. A weight W (out, in) is stored as

* ``int8``: ``q`` int8 (out, in) and ``scale`` float32 (out, in / group); w = scale * q (+ ``offset`` float32 of the
  same shape when asymmetric). ``group`` None means one scale per output channel (group = in).
* ``int4``: ``q`` uint8 (out, in / 2), two weights a byte: within each 32-weight block, byte i holds weight i in its
  low nibble and weight i + 16 in its high nibble (the layout of GGUF's Q4_0 and Q4_1); ``scale`` float16
  (out, in / group); w = scale * q + offset with ``offset`` float16 (asymmetric) or -8 * scale (symmetric).
* ``fp8``: ``q`` uint8 holding float8 e4m3 bits (out, in); ``scale`` float32, one per output channel (out,) or
  one for the tensor (1,); w = scale * fp8(q).

``-a8`` schemes store the same tensors in the order the integer dot products read: ``q``, ``scale`` and ``offset``
in tiles of 16 rows (``TILE_ROWS``, ``to_a8_layout``, ``to_tiles``); the tensors keep their shapes, but a row of
them no longer holds one weight row.

Groups run along the input features, so a column-parallel split (by output rows) never cuts one; a row-parallel
split must start and end on group boundaries (``Scheme.failure`` says when it cannot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

KINDS = ("int8", "int4", "fp8")
INT4_BLOCK = 32  # the nibble layout's block; int4 groups are multiples of it
ACT_BLOCK = 32  # -a8: activations are rounded to int8 in blocks of a multiple of this many, one scale each
ACT_BLOCKS = (128, 64, 32)  # the block sizes act_block picks from, widest first
FP8_MAX = 448.0  # the largest float8 e4m3 value


@dataclass(frozen=True)
class Scheme:
    kind: str
    group: int | None = None  # input features per scale; None: one per output channel (int8, fp8)
    offsets: bool = False  # asymmetric: w = scale * q + offset
    per_tensor: bool = False  # fp8: one scale for the whole tensor
    act8: bool = False  # activations rounded to int8 in blocks of act_block(...) inputs (int8, int4)
    # Input features a row-parallel shard must keep whole because the checkpoint stores them as one block (a GGUF
    # K-quant's 256); None: the group. Not part of the format: layers of equal schemes hold equal tensors.
    align: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"quantization {self.kind!r} is not supported; supported: {', '.join(KINDS)}")
        if self.kind == "int4" and (self.group is None or self.group % INT4_BLOCK):
            raise ValueError(f"int4 needs a group that is a multiple of {INT4_BLOCK}, got {self.group}")
        if self.kind == "fp8" and (self.group is not None or self.offsets):
            raise ValueError("fp8 has per-channel or per-tensor scales, no groups or offsets")
        if self.group is not None and self.group < 1:
            raise ValueError(f"group must be positive, got {self.group}")
        if self.act8 and self.kind == "fp8":
            raise ValueError("-a8 (int8 activations) applies to int8 and int4 weights, not fp8")
        if self.act8 and self.group is not None and self.group % ACT_BLOCK:
            raise ValueError(f"-a8 needs groups that are multiples of {ACT_BLOCK} (activation blocks), got {self.group}")

    @property
    def name(self) -> str:
        if self.kind == "fp8":
            return "fp8" + ("-tensor" if self.per_tensor else "")
        group = "" if self.group is None else f"-g{self.group}"
        # int8 is symmetric unless it says asym, int4 asymmetric unless it says sym: both are spelled out for int4
        symmetry = "-asym" if self.offsets else ("-sym" if self.kind == "int4" else "")
        return f"{self.kind}{group}{symmetry}{'-a8' if self.act8 else ''}"

    def act_block(self, cols: int) -> int:
        """-a8: inputs per activation block for a weight of ``cols`` inputs (its row-parallel slice's, on a rank):
        the widest of 128, 64 and 32 that divides the group (the row, for one scale per channel). A block lies
        within one group, so that an integer dot product over it needs one weight scale; wider blocks take fewer
        float operations per dot product in the kernels, and round the activations a little more coarsely."""
        group = self.group or cols
        return next(block for block in ACT_BLOCKS if group % block == 0)

    @property
    def unit(self) -> int:
        """Input features that must stay together on a rank (a group, an activation block, or the checkpoint's
        block)."""
        return max(self.group or 1, self.align or 1, ACT_BLOCK if self.act8 else 1)

    def failure(self, in_features: int, local_in: tuple[tuple[int, int], ...] | None = None) -> str | None:
        """Why this scheme cannot store a weight of ``in_features`` inputs, or its row-parallel slice; None if it can."""
        what = f"group of {self.unit}" if self.unit == (self.group or 1) else f"block of {self.unit}"
        if in_features % self.unit:
            return f"in_features {in_features} is not a multiple of the {self.name} {what}"
        for start, length in local_in or ():
            if start % self.unit or length % self.unit:
                return f"a row-parallel shard of {length} input features at {start} cuts the {self.name} {what}"
        return None

    def shapes(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Stored tensor -> (shape, dtype) for a (rows, cols) weight."""
        if self.kind == "fp8":
            return {"q": ((rows, cols), torch.uint8), "scale": (((1,) if self.per_tensor else (rows,)), torch.float32)}
        groups = cols // (self.group or cols)
        q = ((rows, cols), torch.int8) if self.kind == "int8" else ((rows, cols // 2), torch.uint8)
        scale_dtype = torch.float32 if self.kind == "int8" else torch.float16
        out = {"q": q, "scale": ((rows, groups), scale_dtype)}
        if self.offsets:
            out["offset"] = ((rows, groups), scale_dtype)
        return out

    def stored_bytes(self, rows: int, cols: int) -> int:
        """Bytes of the tensors a (rows, cols) weight is stored as (scales and offsets included)."""
        return sum(dt.itemsize * math.prod(shape) for shape, dt in self.shapes(rows, cols).values())

    def bytes_per_weight(self, cols: int) -> float:
        return self.stored_bytes(1, cols) / cols


def parse(text: str) -> Scheme:
    """``int8`` (per channel), ``int8-g32``, ``int4`` (= int4-g32-asym), ``int4-g128``, ``int4-g64-sym``, ``fp8``,
    ``fp8-tensor``, and any int8 or int4 one with ``-a8`` (``int4-a8``): the spelling of ``--quantization``."""
    parts = text.strip().lower().split("-")
    kind, rest = parts[0], parts[1:]
    if kind not in KINDS:
        raise ValueError(f"--quantization {text!r}: choose int8, int4 or fp8 (e.g. int8, int4-g128, fp8)")
    group = None if kind != "int4" else 32
    offsets = kind == "int4"
    per_tensor = act8 = False
    for part in rest:
        if part.startswith("g") and part[1:].isdigit():
            group = int(part[1:])
        elif part in ("sym", "asym"):
            offsets = part == "asym"
        elif part == "tensor" and kind == "fp8":
            per_tensor = True
        elif part == "a8" and kind != "fp8":
            act8 = True
        else:
            raise ValueError(f"--quantization {text!r}: unknown part {part!r}")
    return Scheme(kind, group, offsets, per_tensor, act8=act8)


# Packing -----------------------------------------------------------------------------------------------------------

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(rows, cols) values 0..15 -> (rows, cols / 2) uint8 in the 32-block nibble layout."""
    rows, cols = q.shape
    blocks = q.to(torch.uint8).reshape(rows, cols // INT4_BLOCK, 2, INT4_BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(rows, cols // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(rows, cols / 2) uint8 -> (rows, cols) uint8 values 0..15."""
    rows, half = packed.shape
    blocks = packed.reshape(rows, half // (INT4_BLOCK // 2), 1, INT4_BLOCK // 2)
    return torch.cat((blocks & 0x0F, blocks >> 4), dim=2).reshape(rows, half * 2)


TILE_ROWS = 16  # -a8: weight rows a tile (one 32-bit lane each in the kernels' vectors)


def _tiles(rows: int) -> list[tuple[int, int]]:
    """(first row, rows) of each -a8 tile: 16 rows, the last one possibly fewer."""
    return [(r, min(TILE_ROWS, rows - r)) for r in range(0, rows, TILE_ROWS)]


def to_a8_layout(kind: str, values: torch.Tensor) -> torch.Tensor:
    """Integer weights (rows, cols) (int8 values, or int4 values 0..15) in the -a8 kernels' order: per tile of m
    (16, or fewer in the last) rows, chunk c holds 4 bytes for each row in turn: int8, inputs 4 c .. 4 c + 3 (int8,
    cols a row); int4, byte j with input 8 c + j in its low nibble and 8 c + 4 + j in its high one (uint8, cols / 2
    bytes a row). Each 32-bit lane of a chunk then belongs to one row, and a tile's bytes are its own rows' bytes."""
    rows, cols = values.shape
    out = []
    for start, m in _tiles(rows):
        tile = values[start : start + m]
        if kind == "int4":
            tile = tile.to(torch.uint8).reshape(m, cols // 8, 2, 4)
            tile = tile[:, :, 0] | (tile[:, :, 1] << 4)  # (row, chunk, 4 bytes)
        else:
            tile = tile.reshape(m, cols // 4, 4)
        out.append(tile.permute(1, 0, 2).reshape(m, -1))
    return torch.cat(out).contiguous()


def from_a8_layout(kind: str, stored: torch.Tensor) -> torch.Tensor:
    """The inverse of to_a8_layout: (rows, cols) int8 values, or int4 values 0..15 as uint8."""
    rows, width = stored.shape
    out = []
    for start, m in _tiles(rows):
        tile = stored[start : start + m].reshape(width // 4, m, 4).permute(1, 0, 2)  # (row, chunk, 4 bytes)
        if kind == "int4":
            tile = torch.stack((tile & 0x0F, tile >> 4), dim=2)  # (row, chunk, low/high, 4)
        out.append(tile.reshape(m, -1))
    return torch.cat(out)


def to_tiles(per_row: torch.Tensor) -> torch.Tensor:
    """-a8 scales or offsets (rows, groups) in tiles of 16 rows, group by group within a tile (the same shape; a
    tile's values are its own rows' values)."""
    rows, groups = per_row.shape
    return torch.cat([per_row[s : s + m].t().reshape(m, groups) for s, m in _tiles(rows)]).contiguous()


def from_tiles(tiled: torch.Tensor) -> torch.Tensor:
    """The inverse of to_tiles."""
    rows, groups = tiled.shape
    return torch.cat([tiled[s : s + m].reshape(groups, m).t() for s, m in _tiles(rows)])


def fp8_to_float(bits: torch.Tensor) -> torch.Tensor:
    return bits.view(torch.float8_e4m3fn).float()


# Reference dequantization and quantization (torch; the kernels compute the same) -------------------------------

def quantize_activations(x: torch.Tensor, block: int = ACT_BLOCK) -> torch.Tensor:
    """x_hat: x rounded to int8 in blocks of ``block`` inputs along the last dimension, each block scaled by its
    largest magnitude / 127 (round half to even, as the kernels' conversion), in x's dtype. -a8 schemes compute
    x_hat W^T with ``block = scheme.act_block(in_features)``."""
    shape = x.shape
    blocks = x.float().reshape(*shape[:-1], shape[-1] // block, block)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    levels = torch.full_like(amax, 127.0)  # tensor / tensor divides exactly (a scalar numerator may not)
    inv = torch.where(amax > 0, levels / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv)
    return (q * (amax / levels)).reshape(shape).to(x.dtype)


def dequantize(scheme: Scheme, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight (rows, cols) the stored tensors stand for."""
    q, scale = tensors["q"], tensors["scale"].float()
    if scheme.act8:
        scale = from_tiles(scale)
    if scheme.kind == "fp8":
        w = fp8_to_float(q) * (scale if scheme.per_tensor else scale[:, None])
        return w.to(dtype)
    if scheme.act8:
        values = from_a8_layout(scheme.kind, q).float()
    else:
        values = q.float() if scheme.kind == "int8" else unpack_int4(q).float()
    rows, cols = values.shape
    group = scheme.group or cols
    grouped = values.reshape(rows, cols // group, group)
    if scheme.offsets:
        offset = from_tiles(tensors["offset"].float()) if scheme.act8 else tensors["offset"].float()
    elif scheme.kind == "int4":
        offset = -8.0 * scale
    else:
        offset = None
    w = grouped * scale[:, :, None]
    if offset is not None:
        w = w + offset[:, :, None]
    return w.reshape(rows, cols).to(dtype)


def quantize(scheme: Scheme, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Round-to-nearest quantization of a float (rows, cols) weight: symmetric scales from each group's largest
    magnitude, or asymmetric (min, max) scales and offsets."""
    w = weight.float()
    rows, cols = w.shape
    if scheme.kind == "fp8":
        amax = w.abs().amax() if scheme.per_tensor else w.abs().amax(dim=1)
        scale = (amax / FP8_MAX).clamp_min(1e-12)
        scaled = w / (scale if scheme.per_tensor else scale[:, None])
        q = scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
        return {"q": q, "scale": scale.reshape(1) if scheme.per_tensor else scale}
    group = scheme.group or cols
    g = w.reshape(rows, cols // group, group)
    levels = 255 if scheme.kind == "int8" else 15
    if scheme.offsets:
        low, high = g.amin(dim=2), g.amax(dim=2)
        scale = ((high - low) / levels).clamp_min(1e-12)
        if scheme.kind == "int4":
            scale, low = scale.half().float(), low.half().float()  # what is stored
        offset = low if scheme.kind == "int4" else low + 128 * scale  # int8 q runs -128..127: its zero is low+128s
        q = torch.round((g - offset[:, :, None]) / scale[:, :, None])
        q = q.clamp(0, 15) if scheme.kind == "int4" else q.clamp(-128, 127)
        stored = {"scale": scale, "offset": offset}
    else:
        limit = 127 if scheme.kind == "int8" else 7
        scale = (g.abs().amax(dim=2) / limit).clamp_min(1e-12)
        if scheme.kind == "int4":
            scale = scale.half().float()
        q = torch.round(g / scale[:, :, None]).clamp(-limit - (scheme.kind == "int4"), limit)
        if scheme.kind == "int4":
            q = q + 8
        stored = {"scale": scale}
    q = q.reshape(rows, cols)
    if scheme.act8:
        if cols % ACT_BLOCK:
            raise ValueError(f"-a8 needs inputs in whole blocks of {ACT_BLOCK}, got {cols}")
        values = q.to(torch.int8) if scheme.kind == "int8" else q.to(torch.uint8)
        out = {"q": to_a8_layout(scheme.kind, values)}
    else:
        out = {"q": q.to(torch.int8) if scheme.kind == "int8" else pack_int4(q)}
    dtype = torch.float32 if scheme.kind == "int8" else torch.float16
    out.update({k: (to_tiles(v.to(dtype)) if scheme.act8 else v.to(dtype)).contiguous() for k, v in stored.items()})
    return out

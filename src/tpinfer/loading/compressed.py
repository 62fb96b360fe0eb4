"""Pre-quantized checkpoints in the compressed-tensors format (what ``llmcompressor`` writes), read slice by slice.

``config.json``'s ``quantization_config`` (``quant_method: compressed-tensors``) names, per group of target modules,
the weights' quantization; ``ignore`` lists modules left float. The formats tpinfer runs, weight-only:

| format | weights | stored | held as |
| --- | --- | --- | --- |
| ``int-quantized`` | int, 8 bits, channel or group (symmetric or with zero points) | ``weight`` int8, ``weight_scale``, ``weight_zero_point`` | int8 |
| ``pack-quantized`` | int, 4 bits, group or channel | ``weight_packed`` int32 (8 values a word, value + 8), ``weight_scale``, ``weight_zero_point`` (packed along rows), ``weight_shape`` | int4 |
| ``float-quantized`` | float, 8 bits (e4m3), tensor or channel | ``weight`` float8_e4m3fn, ``weight_scale`` | fp8 |

w = scale * (q - zero_point). Activation quantization (``input_activations``), block strategies, activation
ordering and other bit widths are refused by name. Each rank reads its rows (column-parallel) or, in every row,
its columns and their groups of scales (row-parallel); packed words hold 8 inputs, so a row-parallel shard starts on
a multiple of 8 (the group, at least 32, guarantees it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from tpinfer.loading.checkpoint import Checkpoint, CheckpointError
from tpinfer.parallel.spec import Slice
from tpinfer.quant.formats import Scheme, pack_int4
from tpinfer.quant.layers import QTensor

FORMATS = ("int-quantized", "pack-quantized", "float-quantized")
COMPONENTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


def quantization_config(path: str | Path) -> dict[str, Any] | None:
    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    raw = json.loads(file.read_text()).get("quantization_config")
    if raw is None:
        return None
    if raw.get("quant_method") != "compressed-tensors":
        raise CheckpointError(f"{file}: quantization_config.quant_method {raw.get('quant_method')!r} is not "
                              "supported; tpinfer reads compressed-tensors checkpoints (and GGUF files)")
    return raw


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == "Linear" or name == pattern or name.endswith("." + pattern)


def module_schemes(raw: dict[str, Any], linears: dict[str, int], file: Path) -> dict[str, tuple[Scheme, str]]:
    """Module name -> (scheme, compressed-tensors format) for every quantized projection (``linears``: module name ->
    its input features)."""
    ignore = raw.get("ignore") or []
    out: dict[str, tuple[Scheme, str]] = {}
    for group_name, group in (raw.get("config_groups") or {}).items():
        where = f"{file}: quantization_config.config_groups.{group_name}"
        if group.get("input_activations") or group.get("output_activations"):
            raise CheckpointError(f"{where}: activation quantization (W8A8 and the like) is not supported; tpinfer "
                                  "runs weight-only formats")
        weights = group.get("weights") or {}
        fmt = group.get("format") or raw.get("format")
        if fmt not in FORMATS:
            raise CheckpointError(f"{where}: format {fmt!r} is not supported; supported: {', '.join(FORMATS)}")
        for name, cols in linears.items():
            if any(_matches(name, t) for t in group.get("targets") or []) and not any(
                    _matches(name, i) for i in ignore):
                out[name] = (_scheme(weights, fmt, where, cols), fmt)
    return out


def _scheme(weights: dict[str, Any], fmt: str, where: str, cols: int) -> Scheme:
    bits, kind = weights.get("num_bits"), weights.get("type", "int")
    strategy, group = weights.get("strategy"), weights.get("group_size")
    if weights.get("actorder") or weights.get("dynamic"):
        raise CheckpointError(f"{where}: activation ordering and dynamic weights are not supported")
    if strategy not in ("channel", "group", "tensor"):
        raise CheckpointError(f"{where}: weights.strategy {strategy!r} is not supported; supported: channel, group, "
                              "tensor")
    offsets = not weights.get("symmetric", True)
    if kind == "float" and bits == 8 and fmt == "float-quantized" and not offsets:
        if strategy == "group":
            raise CheckpointError(f"{where}: fp8 with group scales is not supported; supported: tensor, channel")
        return Scheme("fp8", per_tensor=strategy == "tensor")
    if kind == "int" and bits == 8 and fmt == "int-quantized":
        return Scheme("int8", group if strategy == "group" else None, offsets)
    if kind == "int" and bits == 4 and fmt == "pack-quantized":
        if strategy == "tensor":
            raise CheckpointError(f"{where}: 4-bit weights with one scale per tensor are not supported")
        return Scheme("int4", group if strategy == "group" else cols, offsets)  # one group per row: per channel
    raise CheckpointError(f"{where}: {bits}-bit {kind} weights in {fmt} are not supported (int 8 in int-quantized, "
                          "int 4 in pack-quantized, float 8 in float-quantized)")


class CompressedCheckpoint(Checkpoint):
    """A safetensors checkpoint whose quantized projections appear under their plain names (``X.weight``), read as
    QTensors in tpinfer's formats; everything else as in ``Checkpoint``."""

    def __init__(self, path: str | Path, in_features: dict[str, int]) -> None:
        super().__init__(path)
        raw = quantization_config(path)
        self.quantized = module_schemes(raw, in_features, self.path / "config.json") if raw else {}
        self.in_features = in_features
        self.raw_files = dict(self.files)
        logical = {n: f for n, f in self.raw_files.items() if n.rsplit(".", 1)[-1] not in COMPONENTS}
        for module, (_, fmt) in self.quantized.items():
            source = f"{module}.weight_packed" if fmt == "pack-quantized" else f"{module}.weight"
            if source not in self.raw_files:
                raise CheckpointError(f"{self.path}: missing tensor {source} ({fmt} weights of {module})")
            if f"{module}.weight_g_idx" in self.raw_files:
                raise CheckpointError(f"{self.raw_files[source]}: {module}.weight_g_idx: activation ordering is "
                                      "not supported")
            logical[f"{module}.weight"] = self.raw_files[source]
        self.files = logical

    def schemes(self) -> dict[str, Scheme]:
        return {name: scheme for name, (scheme, _) in self.quantized.items()}

    def _file(self, name: str) -> Path:
        return self.raw_files[name]

    def _raw(self, name: str, piece: Slice | None) -> torch.Tensor:
        return super().read(name, piece)

    def _raw_shape(self, name: str) -> tuple[int, ...]:
        return super().shape(name)

    def shape(self, name: str) -> tuple[int, ...]:
        module = name.removesuffix(".weight")
        if module not in self.quantized:
            return super().shape(name)
        if self.quantized[module][1] == "pack-quantized":
            rows = self._raw_shape(f"{module}.weight_packed")[0]
            return (rows, self.in_features[module])
        return self._raw_shape(name)

    def read(self, name: str, piece: Slice | None) -> torch.Tensor | QTensor:
        module = name.removesuffix(".weight")
        if module not in self.quantized:
            return super().read(name, piece)
        scheme, fmt = self.quantized[module]
        cols = self.in_features[module]
        try:
            return QTensor(scheme, self._read_quantized(module, scheme, fmt, piece, cols))
        except (ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{self.raw_files[name if fmt != 'pack-quantized' else module + '.weight_packed']}:"
                                  f" {module}: {exc}") from exc

    def _groups(self, scheme: Scheme, piece: Slice | None, cols: int) -> Slice | None:
        """The slice of a (rows, groups) scale tensor that goes with ``piece`` of the weight: its rows, or the groups
        of its columns (every row's one scale when there is one per channel)."""
        if piece is None or piece.dim == 0:
            return piece
        g = scheme.group or cols
        if g == cols:
            return None
        return Slice(1, tuple((s // g, n // g) for s, n in piece.ranges), piece.length // g)

    def _read_quantized(self, module: str, scheme: Scheme, fmt: str, piece: Slice | None,
                        cols: int) -> dict[str, torch.Tensor]:
        rows = self.shape(f"{module}.weight")[0]
        scale = self._raw(f"{module}.weight_scale", self._scale_piece(module, scheme, piece, cols)).float()
        if scheme.kind == "fp8":
            q = self._raw(f"{module}.weight", piece)
            if q.dtype != torch.float8_e4m3fn:
                raise ValueError(f"weight is {q.dtype}, float-quantized needs float8_e4m3fn")
            return {"q": q.view(torch.uint8).contiguous(), "scale": scale.reshape(-1)}
        zero = self._zero_points(module, scheme, fmt, piece, rows, cols)
        if scheme.kind == "int8":
            q = self._raw(f"{module}.weight", piece)
            if q.dtype != torch.int8:
                raise ValueError(f"weight is {q.dtype}, int-quantized 8-bit needs int8")
            out = {"q": q.contiguous(), "scale": scale.contiguous()}
            if scheme.offsets:
                out["offset"] = (-scale * zero).contiguous()
            return out
        # pack-quantized 4-bit: words of 8 values (value + 8), value i of a row at bits 4 (i % 8)
        words = None if piece is None else Slice(piece.dim, tuple(
            (s // 8, n // 8) for s, n in piece.ranges) if piece.dim == 1 else piece.ranges, piece.valid // (
                8 if piece.dim == 1 else 1))
        if piece is not None and piece.dim == 1 and any(s % 8 or n % 8 for s, n in piece.ranges):
            raise ValueError("a row-parallel shard must start on a multiple of 8 inputs")
        packed = self._raw(f"{module}.weight_packed", words).to(torch.int32)
        nibbles = (packed[:, :, None] >> (4 * torch.arange(8, dtype=torch.int32))) & 0xF
        u = nibbles.reshape(packed.shape[0], -1).to(torch.uint8)
        out = {"q": pack_int4(u), "scale": scale.half().contiguous()}
        if scheme.offsets:
            out["offset"] = (-scale * (zero + 8)).half().contiguous()  # w = s (q - z) = s (u - 8 - z)
        return out  # symmetric: w = s (u - 8), the int4 format's own

    def _scale_piece(self, module: str, scheme: Scheme, piece: Slice | None, cols: int) -> Slice | None:
        shape = self._raw_shape(f"{module}.weight_scale")
        if len(shape) == 1 or (scheme.kind == "fp8" and scheme.per_tensor):
            return None  # one scale for the tensor
        return self._groups(scheme, piece, cols)

    def _zero_points(self, module: str, scheme: Scheme, fmt: str, piece: Slice | None, rows: int,
                     cols: int) -> torch.Tensor:
        groups = cols // (scheme.group or cols)
        name = f"{module}.weight_zero_point"
        if name not in self.raw_files:
            if scheme.kind == "int8" and scheme.offsets:
                raise ValueError(f"asymmetric weights need {name}")
            return torch.zeros(1)
        if fmt == "pack-quantized":  # packed along rows: small, read whole, then this rank's part
            packed = self._raw(name, None).to(torch.int32)
            nibbles = (packed[:, None, :] >> (4 * torch.arange(8, dtype=torch.int32))[None, :, None]) & 0xF
            zero = (nibbles.reshape(-1, packed.shape[1])[:rows] - 8).float()
            if zero.shape != (rows, groups):
                raise ValueError(f"weight_zero_point unpacks to {list(zero.shape)}, expected {[rows, groups]}")
            if piece is None:
                return zero
            g = scheme.group or cols
            spans = piece.ranges if piece.dim == 0 else [(s // g, n // g) for s, n in piece.ranges]
            return zero.index_select(piece.dim, torch.cat([torch.arange(s, s + n) for s, n in spans]))
        return self._raw(name, self._groups(scheme, piece, cols)).float()

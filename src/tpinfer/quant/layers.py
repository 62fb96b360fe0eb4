"""Quantized projections: the column-parallel, row-parallel and replicated linear layers with quantized weights.

Each holds only its rank's slice in the scheme's format (``tpinfer.quant.formats``): a column-parallel layer its
output rows with their scales (and offsets), a row-parallel layer its input columns with the matching groups of
scales, so scales always travel with their weights. The layer's input and output are float, and so is every
collective: Y_i = X Wq_i^T (column), Y = sum_i X_i Wq_i^T + b (row, one all-reduce, bias after it).

Loading: the checkpoint gives ``weight`` either as float (quantized here, each rank only its slice: peak memory
stays about one slice) or as a ``QTensor`` already in this scheme (GGUF blocks, compressed-tensors), copied as is.

Forward: up to ``QUANT_PREFILL_MAX_ROWS`` rows (decode steps and most prompts; the -a8 schemes any number) through the
native kernels, 8 rows a pass, which dequantize in registers; more rows, or without the kernels, dequantize the
layer's weight for that one product and run torch's GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tpinfer import kernels
from tpinfer.parallel.context import ParallelContext
from tpinfer.parallel.layers import QUANT_PREFILL_MAX_ROWS, ParallelModule, linear, padded_rows
from tpinfer.parallel.spec import COLWISE, REPLICATE, ROWWISE, Slice, vocab_slice
from tpinfer.quant.formats import Scheme, dequantize, quantize, quantize_activations

QUANTIZE_ROWS = 256  # rows quantized at a time while loading: float temporaries of at most a few MB


@dataclass
class QTensor:
    """A (slice of a) weight already quantized in ``scheme``: the tensors ``Scheme.shapes`` names."""

    scheme: Scheme
    tensors: dict[str, torch.Tensor]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.scheme, self.tensors, dtype)


class QuantLinear(ParallelModule):
    """A linear layer of a quantized weight (rows, cols) on this rank, split ``mode`` (colwise/rowwise/replicate)."""

    def __init__(self, scheme: Scheme, mode: str, rows: int, cols: int, piece: Slice | None, ctx: ParallelContext,
                 bias: bool, dtype: torch.dtype, part_sizes: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.scheme, self.mode, self.dtype = scheme, mode, dtype
        self.in_features, self.out_features = cols, rows
        self.part_sizes = part_sizes or (rows,)
        self.comm = ctx.comm
        shapes = scheme.shapes(rows, cols)
        valid = piece.valid if piece is not None and piece.dim == 0 else rows  # a padded vocabulary's real rows
        for name, (shape, dt) in shapes.items():
            kept = valid if shape[0] == rows else shape[0]  # per-tensor scales have one row, always filled
            self.register_parameter(name, nn.Parameter(padded_rows(shape, kept, dt, ctx.device), False))
        if "offset" not in shapes:
            self.offset = None
        self.bias = nn.Parameter(torch.empty(rows, dtype=dtype, device=ctx.device), False) if bias else None
        bias_piece = piece if mode == COLWISE else None  # a row-parallel bias is added once, after the sum
        self.shards = {"weight": piece, "bias": bias_piece}

    @property
    def valid_rows(self) -> int:
        """Rows the checkpoint has for this rank's slice (fewer than ``out_features`` only in a padded vocabulary)."""
        piece = self.shards["weight"]
        return piece.valid if piece is not None and piece.dim == 0 else self.out_features

    def sources(self) -> dict[str, Slice | None]:
        return {name: piece for name, piece in self.shards.items() if name == "weight" or self.bias is not None}

    def quantized(self) -> dict[str, torch.Tensor]:
        out = {"q": self.q, "scale": self.scale}
        if self.offset is not None:
            out["offset"] = self.offset
        return out

    def load(self, parts: dict[str, torch.Tensor | QTensor]) -> None:
        """Fill from the checkpoint's slices: ``weight`` float (quantized here) or a QTensor in this scheme."""
        weight = parts["weight"]
        targets = self.quantized()
        if isinstance(weight, QTensor):
            if weight.scheme != self.scheme:
                raise ValueError(f"the checkpoint's {weight.scheme.name} weight cannot fill a {self.scheme.name} layer")
            self._fill(targets, weight.tensors, 0)
        elif tuple(weight.shape) != (self.valid_rows, self.in_features) or self.scheme.per_tensor:
            self._fill(targets, quantize(self.scheme, weight), 0)  # per tensor: one scale from all of it
        else:
            # Rows are quantized independently: a block of rows at a time keeps the float temporaries small (rows
            # past the checkpoint's, the padding of a vocabulary, stay zero). -a8 stores tiles of 16 rows, so its
            # last block takes the padding rows with it (as zeros: scale 0), ending its last tile where the layer's
            # rows end.
            padding = self.out_features - self.valid_rows if self.scheme.act8 else 0
            for start in range(0, self.valid_rows, QUANTIZE_ROWS):
                block = weight[start : start + QUANTIZE_ROWS]
                if padding and start + QUANTIZE_ROWS >= self.valid_rows:
                    block = torch.cat((block, block.new_zeros(padding, block.shape[1])))
                self._fill(targets, quantize(self.scheme, block), start)
        if self.bias is not None:
            self.bias.data.copy_(parts["bias"])

    @staticmethod
    def _fill(targets: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], row: int) -> None:
        for name, target in targets.items():
            value = tensors[name]
            part = target.data if value.shape[0] == target.shape[0] else target.data[row : row + value.shape[0]]
            if tuple(value.shape) != tuple(part.shape):
                raise ValueError(f"{name} has shape {list(value.shape)}, expected {list(part.shape)}")
            part.copy_(value)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """This rank's weight as the float tensor its stored values stand for."""
        return dequantize(self.scheme, self.quantized(), dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T for this rank's slice (no bias, no collective)."""
        rows = x.numel() // x.shape[-1]
        tensors = self.quantized()
        takes = self.scheme.act8 or rows <= QUANT_PREFILL_MAX_ROWS  # -a8: any number of rows; see parallel.layers
        if rows > 0 and takes and kernels.quant_usable(x, self.scheme, tensors):
            return kernels.quant_linear(x, self.scheme, tensors)
        if self.scheme.act8:  # what the kernels compute from their int8 dot products
            x = quantize_activations(x, self.scheme.act_block(x.shape[-1]))
        # prefill: the weight dequantized for this one product (bfloat16 as float32, as the float path computes)
        wide = self.dequantized(torch.float32 if self.dtype == torch.bfloat16 else self.dtype)
        return linear(x.to(wide.dtype), wide).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == COLWISE:  # under sequence parallelism, the whole sequence from every rank's chunk
            x = self.comm.gather_sequence(x)
        return self.finish(self.matmul(x))

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """The output from X W^T (computed here or elsewhere): all-reduce if row-parallel (the partial products
        X_i W_i^T of every rank summed: the layer's one collective), then the bias."""
        if self.mode == ROWWISE:
            y = self.comm.sum_partials(y)
        return y if self.bias is None else y + self.bias


def quant_linear_layer(module, scheme: Scheme, strategy: str, ctx: ParallelContext,  # noqa: ANN001
                       dtype: torch.dtype) -> QuantLinear:
    """The quantized layer for a declared projection (``tpinfer.parallel.spec.Linear``) under its strategy."""
    rank, tp = ctx.tp_rank, ctx.tp_size
    full_in, full_out = module.in_features.total, module.out_features.total
    if strategy == COLWISE:
        ranges = module.out_features.ranges(rank, tp)
        rows = sum(n for _, n in ranges)
        return QuantLinear(scheme, COLWISE, rows, full_in, Slice(0, ranges, rows), ctx, module.bias, dtype,
                           tuple(n for _, n in ranges))
    if strategy == ROWWISE:
        ranges = module.in_features.ranges(rank, tp)
        cols = sum(n for _, n in ranges)
        return QuantLinear(scheme, ROWWISE, full_out, cols, Slice(1, ranges, cols), ctx, module.bias, dtype)
    sizes = tuple(p.features for p in module.out_features.parts)
    return QuantLinear(scheme, REPLICATE, full_out, full_in, None, ctx, module.bias, dtype, sizes)


class QuantLMHead(QuantLinear):
    """The LM head with a quantized weight (``--quantize-lm-head``): this rank's vocabulary rows (padding rows zero:
    scale 0), their scales with them, and no collective in the forward; ``gather`` assembles the full logits as the
    float head's does. Decode reads it through the same GEMV kernels as the projections."""

    def __init__(self, scheme: Scheme, vocab_size: int, hidden_size: int, ctx: ParallelContext, dtype: torch.dtype,
                 split: bool) -> None:
        piece = vocab_slice(vocab_size, ctx.tp_rank, ctx.tp_size) if split else None
        start, length = piece.ranges[0] if piece is not None else (0, vocab_size)
        super().__init__(scheme, COLWISE if split else REPLICATE, length, hidden_size, piece, ctx, False, dtype)
        self.vocab_size, self.start, self.length = vocab_size, start, length
        self.split = split

    def gather(self, local_logits: torch.Tensor) -> torch.Tensor:
        """Full logits (..., vocab_size) on every rank."""
        if not self.split:
            return local_logits
        return self.comm.all_gather(local_logits, dim=-1)[..., : self.vocab_size]


def quant_head_layer(module, scheme: Scheme, strategy: str, ctx: ParallelContext,  # noqa: ANN001
                     dtype: torch.dtype) -> QuantLMHead:
    """The quantized LM head for a declared ``tpinfer.parallel.spec.Head`` (split by vocabulary or replicated)."""
    if module.tied_to is not None:
        raise ValueError(f"{module.name} is tied to {module.tied_to}; a tied head stays float")
    return QuantLMHead(scheme, module.vocab_size, module.hidden_size, ctx, dtype, strategy != REPLICATE)

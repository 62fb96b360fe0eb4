"""Megatron-style parallel layers. Each holds only its rank's slice and knows where that slice
lives in the full checkpoint tensor (``shards``), so the loader reads exactly that.

Weights use nn.Linear's layout: (out_features, in_features), Y = X W^T.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from tpinfer import kernels
from tpinfer.parallel.context import ParallelContext
from tpinfer.parallel.spec import COLWISE, EXPERT, REPLICATE, Embedding, Head, Linear, Slice, vocab_slice

# CPUs without native bfloat16 arithmetic (no AVX512-BF16/AMX) run bf16 GEMMs several times slower than
# float32 ones once more than a few rows share the weight (measured here: 2.5x at 32 rows, 3.7x at 128),
# while a one-row GEMV is faster in bf16 (it reads half the bytes). So a bf16 weight multiplies as is for
# small batches (decode) and is widened to float32 in a reused scratch buffer for many rows (prefill).
BF16_WIDEN_MIN_ROWS = 16
_scratch: dict[torch.device, torch.Tensor] = {}


# Whether this host's CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16): torch's bf16 GEMM then runs at about
# twice its float32 speed (1.4-2x the widened path at 16-64 rows on an AMD EPYC), so nothing is widened.
CPU_BF16_MATH = bool(kernels.cpu_flags() & {"avx512_bf16", "amx_bf16"})
# Whether the native kernels multiply bfloat16 weights and activations with the AVX512-BF16 dot product (VDPBF16PS;
# the kernels are compiled for this CPU, and TPINFER_NO_BF16_DOT=1 turns it off for both sides).
CPU_BF16_DOT = "avx512_bf16" in kernels.cpu_flags() and not os.environ.get("TPINFER_NO_BF16_DOT")


# For a few rows (batched decode) the CPU GEMM behind F.linear streams the weight at about half the speed
# of a GEMV; computing W @ X^T instead (the weight as the tall left operand) measured 1.2-1.4x faster here
# for 4 to 32 float32 rows, 1.0x outside that range.
SKINNY_ROWS = range(3, 33)

# Up to this many rows (decode), the native kernels (tpinfer.kernels) read the weight once for all rows, in float32
# or bfloat16; beyond, torch's GEMM (with the policies above) takes over. Float32 past 8 rows is compute-bound on
# either side; the kernels' tiles over an L2-resident block of weight rows measured 1.9x torch's GEMM at 16 rows,
# 1.3x at 32 and 1.15x at 64 (one core, AMD EPYC, 64 MiB weight). bfloat16 with the kernels' AVX512-BF16 dot product
# goes to 64 rows too (140-195 GFLOPS on one core of that EPYC at 8-64 rows, torch's bf16 GEMM 49-170); without it
# bfloat16 stops at 15, where torch's GEMM widens the weight (an extra pass over it). Quantized weights keep to one
# decode step of 8 float32 rows (their kernels tile by re-reading the weight per 8 rows). A quantized layer's own
# product (QuantLinear.matmul, prefill included) goes through them in passes of 8 rows up to QUANT_PREFILL_MAX_ROWS,
# not dequantizing the weight for torch's float GEMM: on the 1.1B Llama at TP=2 (bfloat16 activations, one thread a
# rank) a 32-token prompt's first token came 11x sooner with int4-g128 and 2.8x with int8, a 256-token one 2.4x and
# 1.0x. The -a8 schemes (integer dot products, 64 multiply-adds an instruction) take every row count: 26x at 32
# tokens and 7.3x at 256 with int4-g128-a8, 3.4x at 256 with int8-a8.
NATIVE_MAX_ROWS = {torch.float32: 64, torch.bfloat16: 64 if CPU_BF16_DOT else 15}
QUANT_NATIVE_MAX_ROWS = {torch.float32: 8, torch.bfloat16: 15}
QUANT_PREFILL_MAX_ROWS = 256


def uses_native(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear(x, weight) runs the native decode kernel."""
    rows = x.numel() // x.shape[-1]
    return 0 < rows <= NATIVE_MAX_ROWS.get(weight.dtype, 0) and x.dtype == weight.dtype and kernels.usable(x, weight)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with the CPU policies above."""
    rows = x.numel() // x.shape[-1]
    if weight.device.type != "cpu":
        return F.linear(x, weight, bias)
    if uses_native(x, weight):
        return kernels.linear(x, weight, bias)
    if weight.dtype == torch.float32 and SKINNY_ROWS.start <= rows < SKINNY_ROWS.stop:
        out = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t().reshape(*x.shape[:-1], weight.shape[0])
        return out if bias is None else out + bias
    if weight.dtype != torch.bfloat16 or rows < BF16_WIDEN_MIN_ROWS or CPU_BF16_MATH:
        return F.linear(x, weight, bias)
    buffer = _scratch.get(weight.device)
    if buffer is None or buffer.numel() < weight.numel():
        buffer = _scratch[weight.device] = torch.empty(weight.numel(), dtype=torch.float32, device=weight.device)
    wide = buffer[: weight.numel()].view(weight.shape).copy_(weight)
    out = F.linear(x.float(), wide, None if bias is None else bias.float())
    return out.to(torch.bfloat16)


def padded_rows(shape: tuple[int, ...], valid: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Storage for a parameter whose rows past ``valid`` are padding: those are zeroed, the others left for the
    loader to fill. Untouched memory costs nothing until it is written, so a rank's peak while loading is the
    parameters once (zeroing everything here would make every page resident before the loader moves the
    parameters into huge pages)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    out[valid:].zero_()
    return out


class ParallelModule(nn.Module):
    """A module whose parameters are slices: ``shards[name]`` says which slice (None = whole tensor)."""

    shards: dict[str, Slice | None]

    def sources(self) -> dict[str, Slice | None]:
        """The checkpoint tensors this module loads (name within the module -> the slice it holds)."""
        return {name: piece for name, piece in self.shards.items() if getattr(self, name, None) is not None}

    def load(self, parts: dict[str, torch.Tensor]) -> None:
        """Copy each checkpoint slice into its parameter (a quantized one, as from GGUF, is dequantized first); the
        rows of a padded vocabulary shard past the checkpoint's keep their zeros."""
        for name, tensor in parts.items():
            param, piece = getattr(self, name), self.shards[name]
            if not isinstance(tensor, torch.Tensor):
                tensor = tensor.dequantize(param.dtype)
            target = param.data if piece is None or piece.valid == piece.length else param.data.narrow(
                piece.dim, 0, piece.valid)
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"{name} slice has shape {list(tensor.shape)}, expected {list(target.shape)}")
            target.copy_(tensor)


class ReplicatedLinear(ParallelModule):
    """Y = X W^T + b with the whole W on every rank; no communication."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device: torch.device,
                 part_sizes: tuple[int, ...] | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.part_sizes = part_sizes or (out_features,)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device), False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None
        self.shards = {"weight": None, "bias": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """The output from X W^T computed elsewhere (the native decode kernels): add the bias."""
        return y if self.bias is None else y + self.bias


class ColumnParallelLinear(ParallelModule):
    """Y_i = X W_i^T with W = [W_1 | ... | W_n] split by output features; output stays sharded.

    ``out_ranges`` (start, length) in output features are this rank's rows: one range for a plain projection, one
    per group for a packed one (q, k and v of a fused qkv_proj); ``part_sizes`` are their lengths.
    """

    def __init__(
        self,
        in_features: int,
        out_ranges: tuple[tuple[int, int], ...],
        ctx: ParallelContext,
        bias: bool,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.part_sizes = tuple(length for _, length in out_ranges)
        length = sum(self.part_sizes)
        self.in_features, self.local_out_features = in_features, length
        self.weight = nn.Parameter(torch.empty(length, in_features, dtype=dtype, device=ctx.device), False)
        self.bias = nn.Parameter(torch.empty(length, dtype=dtype, device=ctx.device), False) if bias else None
        piece = Slice(0, tuple(out_ranges), length)
        self.shards = {"weight": piece, "bias": piece}
        self.comm = ctx.comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under sequence parallelism x is this rank's chunk of the sequence: the whole sequence first.
        return linear(self.comm.gather_sequence(x), self.weight, self.bias)


class RowParallelLinear(ParallelModule):
    """Y = sum_i X_i W_i^T + b with W split by input features; one all-reduce, bias added once after it."""

    def __init__(
        self,
        in_ranges: tuple[tuple[int, int], ...],
        out_features: int,
        ctx: ParallelContext,
        bias: bool,
        dtype: torch.dtype,
    ):
        super().__init__()
        length = sum(n for _, n in in_ranges)
        self.out_features, self.local_in_features = out_features, length
        self.comm = ctx.comm
        self.weight = nn.Parameter(torch.empty(out_features, length, dtype=dtype, device=ctx.device), False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=ctx.device), False) if bias else None
        self.shards = {"weight": Slice(1, tuple(in_ranges), length), "bias": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(linear(x, self.weight))

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """Sum the partial products X_i W_i^T of every rank (the layer's one collective: an all-reduce, or under
        sequence parallelism a reduce-scatter along the sequence), then add the bias."""
        y = self.comm.sum_partials(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(ParallelModule):
    """Each rank holds rows [start, start + length) of the vocabulary padded to a multiple of TP.

    A token outside the rank's rows looks up zeros; one all-reduce sums the rank that had it.
    """

    def __init__(self, vocab_size: int, hidden_size: int, ctx: ParallelContext, dtype: torch.dtype):
        super().__init__()
        piece = vocab_slice(vocab_size, ctx.tp_rank, ctx.tp_size)
        (start, length), = piece.ranges
        self.vocab_size, self.start, self.length = vocab_size, start, length
        self.comm = ctx.comm
        self.weight = nn.Parameter(padded_rows((length, hidden_size), piece.valid, dtype, ctx.device), False)
        self.shards = {"weight": piece}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.comm.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.length)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        # Exactly one rank contributed each token's row; the sum is the lookup (this rank's sequence chunk of it
        # under sequence parallelism).
        return self.comm.sum_partials(out)


class ParallelLMHead(ParallelModule):
    """Logits over this rank's vocabulary rows: Y_i = X E_i^T. Padding rows stay zero and are cut by the sampler.

    ``weight`` may be shared with the VocabParallelEmbedding (tied embeddings): same rows, same slice.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        ctx: ParallelContext,
        dtype: torch.dtype,
        tied_to: VocabParallelEmbedding | None = None,
    ):
        super().__init__()
        piece = vocab_slice(vocab_size, ctx.tp_rank, ctx.tp_size)
        (start, length), = piece.ranges
        self.vocab_size, self.start, self.length = vocab_size, start, length
        self.comm = ctx.comm
        if tied_to is not None:
            self.weight = tied_to.weight
            self.shards = {}
        else:
            self.weight = nn.Parameter(padded_rows((length, hidden_size), piece.valid, dtype, ctx.device), False)
            self.shards = {"weight": piece}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Local logits (..., vocab rows of this rank)."""
        return linear(x, self.weight)

    def gather(self, local_logits: torch.Tensor) -> torch.Tensor:
        """Full logits (..., vocab_size) on every rank: the head's one collective."""
        full = self.comm.all_gather(local_logits, dim=-1)
        return full[..., : self.vocab_size]


class ReplicatedEmbedding(ParallelModule):
    def __init__(self, vocab_size: int, hidden_size: int, ctx: ParallelContext, dtype: torch.dtype):
        super().__init__()
        self.vocab_size, self.start, self.length = vocab_size, 0, vocab_size
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype, device=ctx.device), False)
        self.shards = {"weight": None}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class ReplicatedLMHead(ParallelModule):
    def __init__(self, vocab_size: int, hidden_size: int, ctx: ParallelContext, dtype: torch.dtype, tied_to=None):
        super().__init__()
        self.vocab_size, self.start, self.length = vocab_size, 0, vocab_size
        if tied_to is not None:
            self.weight = tied_to.weight
            self.shards = {}
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype, device=ctx.device), False)
            self.shards = {"weight": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)

    def gather(self, local_logits: torch.Tensor) -> torch.Tensor:
        return local_logits


class RMSNorm(ParallelModule):
    """Replicated on every rank (HF LlamaRMSNorm: computed in float32, scaled in the input dtype)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), False)
        self.shards = {"weight": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op, same result
        normed = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        return self.weight * normed.to(x.dtype)


class LayerNorm(ParallelModule):
    """Replicated on every rank: (x - mean) / sqrt(var + eps) * weight + bias over the last dimension (nn.LayerNorm,
    as BERT's post-norm layers use it)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), False)
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device), False)
        self.shards = {"weight": None, "bias": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def linear_layer(module: Linear, strategy: str, ctx: ParallelContext, dtype: torch.dtype) -> ParallelModule:
    """The layer for a declared projection under its plan strategy, holding only this rank's slice."""
    rank, tp = ctx.tp_rank, ctx.tp_size
    if strategy == COLWISE:
        return ColumnParallelLinear(module.in_features.total, module.out_features.ranges(rank, tp), ctx, module.bias,
                                    dtype)
    if strategy in (REPLICATE, EXPERT):  # an expert's projection lives whole on its owner (who alone builds it)
        sizes = tuple(p.features for p in module.out_features.parts)
        return ReplicatedLinear(module.in_features.total, module.out_features.total, module.bias, dtype, ctx.device,
                                sizes)
    return RowParallelLinear(module.in_features.ranges(rank, tp), module.out_features.total, ctx, module.bias, dtype)


def embedding_layer(module: Embedding, strategy: str, ctx: ParallelContext, dtype: torch.dtype) -> ParallelModule:
    if strategy == REPLICATE:
        return ReplicatedEmbedding(module.vocab_size, module.hidden_size, ctx, dtype)
    return VocabParallelEmbedding(module.vocab_size, module.hidden_size, ctx, dtype)


def head_layer(module: Head, strategy: str, ctx: ParallelContext, dtype: torch.dtype,
               tied_to: ParallelModule | None = None) -> ParallelModule:
    if tied_to is not None and isinstance(tied_to, VocabParallelEmbedding) != (strategy != REPLICATE):
        raise ValueError("tied embeddings need embed_tokens and lm_head to share a strategy")
    cls = ReplicatedLMHead if strategy == REPLICATE else ParallelLMHead
    return cls(module.vocab_size, module.hidden_size, ctx, dtype, tied_to=tied_to)


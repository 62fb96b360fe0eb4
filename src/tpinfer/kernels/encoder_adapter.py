"""The native encoder forward as an adapter: it takes a built BERT-structured model and returns a callable with the
model's contract, ``(input_ids, attention_mask) -> last hidden states``, or None when it does not apply.

Where the time of an encoder forward goes on a CPU rank (all-MiniLM-L6-v2, 32 sequences of 64 tokens, TP=2; see
docs/performance.md "Encoders"): almost all of it in the GEMMs, whose float32 speed torch's default path (MKL)
leaves 10-15% below what oneDNN reaches with weights packed once into its blocked layout, and which on a CPU with
AMX-BF16 run 1.4-1.8 times faster again as six bfloat16 products of the operands' parts with float32's accuracy
(``kernels.amx_linear``, cpu_amx.inc); then attention over
short sequences, and the passes over memory between GEMMs (bias, GELU, residual add, the all-reduce's sum,
LayerNorm). ``NativeEncoder`` runs the embeddings as

    x    = LayerNorm((word + type 0) + position)
                                         tpi_embedding_rows (this rank's share of the word rows), then
                                         tpi_sum_layer_norm from the all-reduce's slots, positions as its residual

and a layer as:

    qkv  = x [Wq; Wk; Wv]^T + b          one GEMM for the three projections (weights packed once; PackedLinear:
                                         AMX where the CPU has it, else oneDNN)
    ctx  = attention(qkv, padding)       tpi_encoder_attention, reading q/k/v where the GEMM left them
    h    = LayerNorm(x + (sum of ranks' ctx Wo^T + bo))
                                         the GEMM, then tpi_sum_layer_norm straight from the shared-memory
                                         all-reduce's slots: the sum, the bias, the residual and the norm in one pass
    f    = gelu(h Wi^T + bi)             the bias and GELU in the AMX GEMM's epilogue; with oneDNN the bias in
                                         its epilogue, then tpi_gelu in place (erf by piecewise polynomials: half
                                         the time of oneDNN's GELU epilogue here)
    out  = LayerNorm(h + (sum of ranks' f Wd^T + bd))

which is the model's arithmetic with its sums in the same order (the ranks' partials in rank order as the
all-reduce adds them, then the bias, then the residual), so every rank holds the same bits; only the GEMMs' and
the softmax's own orders of summation, and GELU's erf (within 6e-8), differ from torch's. With the shared-memory
all-reduce, a sum of SPLIT_BYTES or more is split by rows: a rank receives every rank's partial of its own share of
the rows (``exchange_rows``), sums and normalizes those into one of two buffers every rank maps, and after a
barrier every rank's next GEMM reads the whole there (half the copying and the normalizing of an all-reduce at
TP=2, for one more wait: 1-2% of the batch). Otherwise each LayerNorm writes into its residual's buffer (the
residual's last use). A batch over CHUNK_TOKENS runs as groups of sequences.

``native_encoder(model)`` checks once what this path implements (this module owns those checks): a CPU rank with
the native kernels built, float32 weights, no quantized projection, q/k/v and the intermediate dense
column-parallel, the two output denses row-parallel (the auto plan), head_dim a multiple of 16. The GEMMs go
through AMX where ``kernels.amx_available()`` (the CPU has AMX-BF16, ``TPINFER_AMX`` is not 0) for batches of
AMX_MIN_ROWS rows or more and ``F.linear`` below, else through oneDNN where torch has it
(``torch.ops.mkldnn._linear_pointwise``), else through ``F.linear``. Anything else runs the model's own forward,
the plain-torch reference this path is tested against (tests/distributed/test_encoder_native.py). The packed
copies sit next to the model's weights: the layers' float32 weights take twice their memory with oneDNN's copies
(all-MiniLM-L6-v2: 42 MB more at TP=1, 21 MB a rank at TP=2), 2.5 times with AMX's three bfloat16 parts. The sums
split by rows take a second shared-memory segment of two buffers as large as the all-reduce's slots (16 MiB a group with
the default 8 MiB slots), mapped by the first forward that splits.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from tpinfer import kernels
from tpinfer.parallel.layers import ColumnParallelLinear, ReplicatedEmbedding, RowParallelLinear, VocabParallelEmbedding
from tpinfer.pooling import PoolingConfig, pool

log = logging.getLogger(__name__)

# Tokens of one forward: larger batches run as groups of whole sequences (NativeEncoder.__call__). At TP=2 on the
# 2-core machine of docs/performance.md, all-MiniLM-L6-v2 over 64-token sentences ran 117 sentences/s as one batch
# of 256 and 130-137 as batches of 64 (4096 tokens: 6 MB of float32 activations).
CHUNK_TOKENS = 4096
# Sums of at least this many bytes are split by rows between the ranks (through shared memory, see _sum_norm_rows):
# at TP=2 on that machine 1-2% of the batch from 1024 rows of 384 up, neutral at 512, and 2-3% slower at 16-64
# rows, where the second wait of each sum costs more than the halved work saves.
SPLIT_BYTES = 1 << 20
# Rows from which a GEMM goes through AMX where the host has it (PackedLinear): on the Xeon of docs/performance.md
# one thread took the same time as oneDNN's float32 GEMM at 16 rows (hidden 384), 1.5 times less from 32 rows up,
# and up to 2.5 times more at 1-8 rows (AMX's tiles are 16 and 32 rows high; the weight streams in either way).
AMX_MIN_ROWS = 16



def _onednn() -> bool:
    """Whether torch has oneDNN's packed-weight linear (CPU builds with mkldnn)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def gemm_backend() -> str:
    """Where the native encoder's GEMMs run in this process: "amx" (``kernels.amx_available()``), "onednn" (torch's
    packed-weight linear), or "torch" (``F.linear``)."""
    return "amx" if kernels.amx_available() else "onednn" if _onednn() else "torch"


class PackedLinear:
    """x W^T (+ b), then GELU where ``gelu``: through AMX where the host has it (W split and packed once,
    ``kernels.amx_linear``: float32's accuracy at 1.4-1.8 times oneDNN's float32 speed from AMX_MIN_ROWS rows up),
    else oneDNN with W packed once (or F.linear without it)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, backend: str, gelu: bool = False) -> None:
        """``backend``: ``gemm_backend()``'s answer, or "torch" for ``F.linear`` alone."""
        self.weight, self.bias, self.gelu = weight, bias, gelu
        self.amx = kernels.amx_pack(weight, bias) if backend == "amx" else None
        # below AMX_MIN_ROWS F.linear on the weight as it is: no second packed copy for a few rows
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None) if backend == "onednn" else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.amx is not None and x.numel() >= AMX_MIN_ROWS * x.shape[-1]:
            return kernels.amx_linear(x, self.amx, gelu=self.gelu)
        if self.packed is None:
            y = F.linear(x, self.weight, self.bias)
        else:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return kernels.gelu_(y) if self.gelu else y


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why ``NativeEncoder`` cannot run ``model`` (None: it can)."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if layers is None or not hasattr(model, "embeddings"):
        return "not a BERT-structured encoder"
    if model.ctx.device.type != "cpu":
        return f"the model is on {model.ctx.device}"
    if model.dtype != torch.float32:
        return f"{model.dtype} weights (the native encoder path is float32)"
    if not kernels.available():
        return f"native kernels unavailable: {kernels.unavailable_reason()}"
    if model.ctx.comm.sequence_len is not None:
        return "sequence parallelism"
    for layer in layers:
        attn = layer.attention.self
        local = (attn.query, attn.key, attn.value, layer.intermediate.dense)
        reduced = (layer.attention.output.dense, layer.output.dense)
        if not all(type(m) is ColumnParallelLinear for m in local):
            return "q/k/v and the intermediate dense must be plain column-parallel linears"
        if not all(type(m) is RowParallelLinear for m in reduced):
            return "the output denses must be plain row-parallel linears"
        if any(m.bias is None for m in (*local, *reduced)):
            return "a projection without a bias"
        if attn.head_dim % 16:
            return f"head_dim {attn.head_dim} is not a multiple of 16"
    return None


def native_encoder(model: torch.nn.Module) -> NativeEncoder | None:
    """The native forward for ``model``, or None when it cannot run it (logged at debug level)."""
    reason = unsupported_reason(model)
    if reason is not None:
        log.debug("native encoder path not used: %s", reason)
        return None
    return NativeEncoder(model)


class NativeEncoder:
    """``model(input_ids, attention_mask)`` through packed oneDNN GEMMs and the native encoder kernels."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.comm = model.ctx.comm
        backend = gemm_backend()
        emb = model.embeddings
        # the native lookup: the word rows split by the vocabulary or replicated, the other two tables whole on
        # every rank (a replicated table, or one split over a single rank, holds all its rows)
        self.native_embeddings = (isinstance(emb.word_embeddings, (VocabParallelEmbedding, ReplicatedEmbedding))
                                  and all(t.length == t.vocab_size
                                          for t in (emb.position_embeddings, emb.token_type_embeddings)))
        self.layers = []
        for layer in model.encoder.layer:
            attn = layer.attention.self
            qkv = (attn.query, attn.key, attn.value)
            ln1, ln2 = layer.attention.output.LayerNorm, layer.output.LayerNorm
            o, d = layer.attention.output.dense, layer.output.dense
            self.layers.append({
                "qkv": PackedLinear(torch.cat([m.weight for m in qkv]), torch.cat([m.bias for m in qkv]), backend),
                "o": PackedLinear(o.weight, None, backend),
                "i": PackedLinear(layer.intermediate.dense.weight, layer.intermediate.dense.bias, backend, gelu=True),
                "d": PackedLinear(d.weight, None, backend),
                "ln1": (o.bias, ln1.weight, ln1.bias, ln1.eps), "ln2": (d.bias, ln2.weight, ln2.bias, ln2.eps),
                "heads": attn.num_local_heads, "head_dim": attn.head_dim,
            })

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        groups = self._groups(*input_ids.shape)
        if len(groups) == 1:
            return self._forward(input_ids, attention_mask)
        out = torch.empty(*input_ids.shape, self.model.config.hidden_size)
        for group in groups:  # each group's states copied once, into its rows of out
            out[group] = self._forward(input_ids[group], attention_mask[group], copy=False)
        return out

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: PoolingConfig) -> torch.Tensor:
        """``pool(self(input_ids, attention_mask), attention_mask, pooling)``, each group of sequences pooled straight
        from the buffer its hidden states end in (shared by the ranks when the sums are split by rows: no rank writes
        it again before this rank's next sum), without copying them out: 1-2% of a batch of 32 x 64 tokens at TP=2."""
        return torch.cat([pool(self._forward(input_ids[group], attention_mask[group], copy=False),
                               attention_mask[group], pooling) for group in self._groups(*input_ids.shape)])

    @staticmethod
    def _groups(batch: int, length: int) -> list[slice]:
        """A large batch runs as groups of whole sequences of at most CHUNK_TOKENS tokens (sequences do not
        interact): activations that stay in the last-level cache and fit the shared-memory all-reduce's slots."""
        rows = max(1, CHUNK_TOKENS // length)
        return [slice(i, i + rows) for i in range(0, batch, rows)]

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, copy: bool = True) -> torch.Tensor:
        """The last hidden states; with ``copy=False`` possibly a view of the shared buffer, valid until this rank's
        next forward."""
        batch, length = input_ids.shape
        hidden = self.model.config.hidden_size
        nbytes = batch * length * hidden * 4
        shared = self.comm.shared_rows(nbytes) if nbytes >= SPLIT_BYTES else None
        if shared is not None:
            (a, b), own_rows = shared
            x = a[:nbytes].view(torch.float32).view(batch, length, hidden)
            h = b[:nbytes].view(torch.float32).view(batch, length, hidden)
            share = own_rows(batch * length)
            self._embeddings(input_ids, x, share)
        else:
            x, share = self._embeddings(input_ids), None
        key_bias = None
        if not bool(attention_mask.all()):
            key_bias = torch.zeros(attention_mask.shape, dtype=torch.float32).masked_fill_(attention_mask == 0,
                                                                                           float("-inf"))
        for layer in self.layers:
            heads, dim = layer["heads"], layer["head_dim"]
            ctx = kernels.encoder_attention(layer["qkv"](x), key_bias, heads, dim, dim**-0.5)
            if share is None:
                h = self._sum_norm(layer["o"](ctx), x, layer["ln1"], out=x)  # x's last use: its buffer takes h
                x = self._sum_norm(layer["d"](layer["i"](h)), h, layer["ln2"], out=h)
            else:  # this rank's rows of each sum into the shared buffers, the others' read from there
                start, stop = share
                self._sum_norm_rows(layer["o"](ctx), x.view(-1, hidden)[start:stop], layer["ln1"], h, share)
                self._sum_norm_rows(layer["d"](layer["i"](h)), h.view(-1, hidden)[start:stop], layer["ln2"], x,
                                    share)
        # the shared buffer is the next forward's: a copy (another rank writes it only after this rank's next sum)
        return x.clone() if share is not None and copy else x

    def _embeddings(self, input_ids: torch.Tensor, out: torch.Tensor | None = None,
                    share: tuple[int, int] | None = None) -> torch.Tensor:
        """LayerNorm((word + token type 0) + position), the model's embeddings in its order: this rank's share of the
        word rows, summed over the ranks (one of them holds each row, the others add zeros) by the fused sum and
        LayerNorm with token type 0's row as its bias and the positions' rows as its residual, the same for every
        sequence. Tables split otherwise than the word rows by the vocabulary run the model's own forward. With
        ``out`` and ``share``: this rank's rows ``[start, stop)`` into the shared buffer ``out``, then the barrier
        after which every rank's are there."""
        emb = self.model.embeddings
        word = emb.word_embeddings
        summed = self.native_embeddings and not isinstance(word, ReplicatedEmbedding)  # the lookup sums across ranks
        if out is not None and not summed:  # every rank computes every row: its share into the shared buffer
            x = self._embeddings(input_ids).view(-1, out.shape[-1])
            start, stop = share
            self.comm.rows_barrier()  # every rank is done reading the buffer's last contents
            out.view(-1, out.shape[-1])[start:stop] = x[start:stop]
            self.comm.rows_barrier()
            return out
        if not self.native_embeddings:
            return emb(input_ids, torch.zeros_like(input_ids))
        looked_up = kernels.embedding_rows(word.weight, word.start, input_ids.reshape(-1))
        first = emb.position_offset
        positions = emb.position_embeddings.weight[first : first + input_ids.shape[1]]
        norm = (emb.token_type_embeddings.weight[0], emb.LayerNorm.weight, emb.LayerNorm.bias, emb.LayerNorm.eps)
        if not summed:  # a replicated word table: every rank looked up every row
            return kernels.sum_layer_norm([looked_up], *norm[1:], norm[0], positions).view(*input_ids.shape, -1)
        if out is None:
            return self._sum_norm(looked_up, positions, norm).view(*input_ids.shape, -1)
        # the positions from the share's first row on, repeating (its last sequence may be cut short)
        positions = torch.roll(positions, -(share[0] % positions.shape[0]), 0)
        self._sum_norm_rows(looked_up, positions, norm, out, share)
        return out

    def _sum_norm(self, partial: torch.Tensor, residual: torch.Tensor, norm: tuple,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """LayerNorm(residual + every rank's ``partial`` summed + the dense's bias), into ``out`` where given (the
        residual, when this is its last use: rows already in cache instead of a new buffer's, 40% less time)."""
        dense_bias, weight, bias, eps = norm
        parts = self.comm.all_reduce_parts(partial)
        if parts is None:  # gloo or NCCL: the all-reduce, then one pass for the rest
            parts = (self.comm.all_reduce(partial),)
        return kernels.sum_layer_norm(list(parts), weight, bias, eps, dense_bias, residual, out)

    def _sum_norm_rows(self, partial: torch.Tensor, residual: torch.Tensor, norm: tuple, out: torch.Tensor,
                       share: tuple[int, int]) -> None:
        """``_sum_norm`` split by rows: this rank's rows ``[start, stop)`` of the sum (every rank's partial of them, in
        rank order, as the all-reduce adds them) into the shared buffer ``out``, then the barrier after which every
        rank's rows are there. ``residual``: the share's rows, or P rows repeating from its first row on. The sum's
        own wait orders the write: every rank has published its partial, so it is done with the buffer's last
        contents (read by the GEMMs before that partial)."""
        dense_bias, weight, bias, eps = norm
        hidden = out.shape[-1]
        start, stop = share
        parts = self.comm.exchange_rows(partial.view(-1, hidden))
        kernels.sum_layer_norm(list(parts), weight, bias, eps, dense_bias, residual,
                               out.view(-1, hidden)[start:stop])
        self.comm.rows_barrier()

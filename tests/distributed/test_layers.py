"""Each parallel layer, run on real gloo ranks, equals nn.Linear / nn.Embedding built from the full weights."""

import pytest
import torch
import torch.nn.functional as F

from helpers import run_ranks
from tpinfer.parallel.layers import ParallelLMHead, VocabParallelEmbedding, linear_layer
from tpinfer.parallel.spec import COLWISE, ROWWISE, Linear, packed, units

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _rows(piece) -> torch.Tensor:
    return torch.cat([torch.arange(start, start + length) for start, length in piece.ranges])[: piece.valid]


def _fill(layer, full: dict[str, torch.Tensor]) -> None:
    for name, piece in layer.shards.items():
        param = getattr(layer, name)
        if param is None:
            continue
        tensor = full[name]
        if piece is not None:
            tensor = tensor.index_select(piece.dim, _rows(piece))
            param.data.narrow(piece.dim, 0, piece.valid).copy_(tensor)
        else:
            param.data.copy_(tensor)


def _layers_on_rank(ctx, seed):
    torch.manual_seed(seed)
    x = torch.randn(3, 5, 32)
    w_col, b_col = torch.randn(48, 32), torch.randn(48)
    w_row, b_row = torch.randn(32, 48), torch.randn(32)
    emb = torch.randn(37, 32)  # 37 rows: not divisible by 2 or 4
    ids = torch.randint(0, 37, (3, 5))
    dtype = torch.float32

    col = linear_layer(Linear("col", units(32), units(48), True), COLWISE, ctx, dtype)
    _fill(col, {"weight": w_col, "bias": b_col})
    local = col(x)
    full_col = ctx.comm.all_gather(local, dim=-1)

    row = linear_layer(Linear("row", units(48), units(32), True), ROWWISE, ctx, dtype)
    _fill(row, {"weight": w_row, "bias": b_row})
    h = F.linear(x, w_col, b_col)
    row_out = row(h.index_select(-1, _rows(row.shards["weight"])).contiguous())

    # Packed (a fused qkv_proj): 4 query heads and 2 KV heads (replicated at 4 ranks) of 4 features, [q | k | v].
    heads, kv = units(4, 4, "attention heads"), units(2, 4, "KV heads", replicable=True)
    w_qkv = torch.randn(32, 32)
    qkv = linear_layer(Linear("qkv", units(32), packed(heads, kv, kv)), COLWISE, ctx, dtype)
    _fill(qkv, {"weight": w_qkv})
    rows = _rows(qkv.shards["weight"])
    packed_err = (qkv(x) - F.linear(x, w_qkv[rows])).abs().max().item()
    first_kv = 16 + kv.parts[0].local(ctx.rank, ctx.world_size)[0]

    vocab = VocabParallelEmbedding(37, 32, ctx, dtype)
    _fill(vocab, {"weight": emb})
    emb_out = vocab(ids)
    head = ParallelLMHead(37, 32, ctx, dtype, tied_to=vocab)
    logits = head.gather(head(x))
    return {
        "col": (full_col - F.linear(x, w_col, b_col)).abs().max().item(),
        "row": (row_out - F.linear(h, w_row, b_row)).abs().max().item(),
        "emb": (emb_out - F.embedding(ids, emb)).abs().max().item(),
        "head": (logits - F.linear(x, emb)).abs().max().item(),
        "head_shape": tuple(logits.shape),
        "packed": packed_err, "packed_sizes": qkv.part_sizes, "first_kv_row": int(rows[4 // ctx.world_size * 4]),
        "expected_kv_row": first_kv,
        "calls": dict(ctx.comm.stats.calls),
    }


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_layers_equal_their_dense_versions(world):
    results = run_ranks(world, _layers_on_rank, 0)
    for r in results:
        # Column and embedding outputs are exact copies of dense results (no reordering of sums);
        # row-parallel and the LM head sum partial products in a different order: float32 rounding only,
        # far below 1e-4 for these magnitudes (|values| ~ 10).
        assert r["col"] < 1e-5 and r["emb"] == 0.0
        assert r["row"] < 1e-4 and r["head"] < 1e-4
        assert r["head_shape"] == (3, 5, 37)
        # Each rank's packed slice is its q heads, then its KV head(s) for k and for v, read from the fused rows.
        assert r["packed"] < 1e-5
        assert r["packed_sizes"] == (16 // world, max(4, 8 // world), max(4, 8 // world))
        assert r["first_kv_row"] == r["expected_kv_row"]
        # one all-reduce per row-parallel layer and per embedding; one all-gather per LM head (+ the test's own)
        assert r["calls"]["all_reduce"] == 2 and r["calls"]["all_gather"] == 2

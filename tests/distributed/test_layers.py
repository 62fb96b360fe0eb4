"""Each parallel layer, run on real gloo ranks, equals nn.Linear / nn.Embedding built from the full weights."""

import pytest
import torch
import torch.nn.functional as F

from helpers import run_ranks
from tpinfer.parallel.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _fill(layer, full: dict[str, torch.Tensor]) -> None:
    for name, shard in layer.shards.items():
        param = getattr(layer, name)
        if param is None:
            continue
        tensor = full[name]
        if shard is not None:
            tensor = tensor.narrow(shard.dim, shard.start, shard.valid)
            param.data.narrow(shard.dim, 0, shard.valid).copy_(tensor)
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

    col = ColumnParallelLinear(32, 48, ctx, True, dtype)
    _fill(col, {"weight": w_col, "bias": b_col})
    local = col(x)
    full_col = ctx.comm.all_gather(local, dim=-1)

    row = RowParallelLinear(48, 32, ctx, True, dtype)
    _fill(row, {"weight": w_row, "bias": b_row})
    start, length = row.shards["weight"].start, row.shards["weight"].length
    h = F.linear(x, w_col, b_col)
    row_out = row(h[..., start : start + length].contiguous())

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
        # one all-reduce per row-parallel layer and per embedding; one all-gather per LM head (+ the test's own)
        assert r["calls"]["all_reduce"] == 2 and r["calls"]["all_gather"] == 2

"""Each quantized parallel layer on real gloo ranks equals nn.Linear built from the same quantized weights,
dequantized: every rank quantizes only its own slice, and the scales travel with it (rows for column-parallel,
groups of input columns for row-parallel)."""

import pytest
import torch
import torch.nn.functional as F

from helpers import run_ranks
from tpinfer import kernels
from tpinfer.parallel.spec import COLWISE, REPLICATE, ROWWISE, Linear, packed, units
from tpinfer.quant.formats import Scheme, dequantize, quantize, quantize_activations
from tpinfer.quant.layers import QuantLMHead, quant_linear_layer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SCHEMES = [Scheme("int8"), Scheme("int8", 32, True), Scheme("int4", 32, True), Scheme("int4", 64), Scheme("fp8"),
           Scheme("fp8", per_tensor=True), Scheme("int4", 32, True, act8=True), Scheme("int8", act8=True)]


def _rows(piece) -> torch.Tensor:
    return torch.cat([torch.arange(start, start + length) for start, length in piece.ranges])


def _on_rank(ctx, scheme_args):
    scheme = Scheme(*scheme_args[:4], act8=scheme_args[4])
    # -a8 layers compute x_hat W^T, x_hat the activations rounded in blocks (quantize_activations) as wide as the
    # scheme picks for the inputs a rank holds: rounding the whole row or each rank's slice of it is the same when
    # the slices hold whole blocks of that width
    def act(t: torch.Tensor, width: int = 256) -> torch.Tensor:
        return quantize_activations(t, scheme.act_block(width)) if scheme.act8 else t

    torch.manual_seed(0)
    x = torch.randn(3, 4, 256)  # 12 rows: the decode kernels up to 8, then the dequantized GEMM
    w_col, b_col = torch.randn(192, 256), torch.randn(192)
    w_row, b_row = torch.randn(256, 256), torch.randn(256)  # 256 inputs: whole groups of 64 on each of 4 ranks
    out = {}
    col = quant_linear_layer(Linear("col", units(256), units(192), True), scheme, COLWISE, ctx, torch.float32)
    rows = _rows(col.shards["weight"])
    col.load({"weight": w_col[rows], "bias": b_col[rows]})
    mine = col.dequantized().clone()
    reference = ctx.comm.all_gather(mine, dim=0)  # every rank's dequantized rows, in rank order
    local = col(x[:2, :1])  # 2 rows: native kernels
    out["col_decode"] = (ctx.comm.all_gather(local, dim=-1) - F.linear(act(x[:2, :1]), reference, b_col)).abs().max().item()
    out["col_prefill"] = (ctx.comm.all_gather(col(x), dim=-1) - F.linear(act(x), reference, b_col)).abs().max().item()
    # without the kernels (or where they cannot take the shapes) every row count goes through the dequantized weight
    usable, kernels.quant_usable = kernels.quant_usable, lambda *args: False
    try:
        dequantized_path = ctx.comm.all_gather(col(x), dim=-1)
    finally:
        kernels.quant_usable = usable
    out["col_without_kernels"] = (dequantized_path - F.linear(act(x), reference, b_col)).abs().max().item()

    in_features = w_row.shape[1]
    row = quant_linear_layer(Linear("row", units(in_features), units(256), True), scheme, ROWWISE, ctx, torch.float32)
    cols = _rows(row.shards["weight"])
    row.load({"weight": w_row[:, cols], "bias": b_row})
    reference = ctx.comm.all_gather(row.dequantized().clone(), dim=1)  # each rank's columns, scales with them
    h = torch.randn(3, 4, in_features)
    local = len(cols)
    out["row_decode"] = (row(h[:1, :3, cols].contiguous()) - F.linear(act(h[:1, :3], local), reference, b_row)).abs().max().item()
    out["row_prefill"] = (row(h[..., cols].contiguous()) - F.linear(act(h, local), reference, b_row)).abs().max().item()

    heads, kv = units(4, 32, "attention heads"), units(2, 32, "KV heads", replicable=True)
    qkv = quant_linear_layer(Linear("qkv", units(256), packed(heads, kv, kv)), scheme, COLWISE, ctx, torch.float32)
    w_qkv = torch.randn(256, 256)
    rows = _rows(qkv.shards["weight"])
    qkv.load({"weight": w_qkv[rows]})
    out["packed"] = (qkv(x[:1, :1]) - F.linear(act(x[:1, :1]), qkv.dequantized())).abs().max().item()
    out["packed_sizes"] = qkv.part_sizes

    # the LM head split by vocabulary: 251 rows, so the last rank's slice ends in a padding row (int4 -a8 stores
    # tiles of 16 rows: the padding belongs to the last one)
    head = QuantLMHead(scheme, 251, 256, ctx, torch.float32, split=True)
    w_head = torch.randn(251, 256)
    mine = w_head[head.start : head.start + head.valid_rows]
    head.load({"weight": mine})
    assert torch.equal(head.dequantized()[: head.valid_rows], dequantize(scheme, quantize(scheme, mine)))
    assert not head.dequantized()[head.valid_rows :].any()  # the padding rows: zero
    reference = ctx.comm.all_gather(head.dequantized().clone(), dim=0)[:251]
    out["head_padding"] = head.length - head.valid_rows
    out["head"] = (head.gather(head(x[:2, :1])) - F.linear(act(x[:2, :1]), reference)).abs().max().item()

    rep = quant_linear_layer(Linear("rep", units(256), units(64)), scheme, REPLICATE, ctx, torch.float32)
    rep.load({"weight": w_col[:64]})
    out["replicated_same_everywhere"] = ctx.comm.all_gather(rep.dequantized()[None].clone(), dim=0).std(0).max().item()
    out["calls"] = dict(ctx.comm.stats.calls)
    return out


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_quantized_layers_equal_linear_on_their_dequantized_weights(world, scheme):
    results = run_ranks(world, _on_rank, (scheme.kind, scheme.group, scheme.offsets, scheme.per_tensor, scheme.act8))
    for r in results:
        # The same products summed in another order (kernel vs GEMM, partial sums over ranks): float32 rounding of
        # |y| ~ 50, well under 1e-3; a wrong scale, group or nibble moves results by whole units.
        for key in ("col_decode", "col_prefill", "col_without_kernels", "row_decode", "row_prefill", "packed", "head"):
            assert r[key] < 1e-3, (key, r[key])
        assert r["packed_sizes"] == (128 // world, max(32, 64 // world), max(32, 64 // world))
        assert r["replicated_same_everywhere"] == 0.0
        # one all-reduce per row-parallel forward (2) and the test's own gathers
        assert r["calls"]["all_reduce"] == 2
    assert [r["head_padding"] for r in results] == [0] * (world - 1) + [1]  # 251 = 2 x 126 - 1 = 4 x 63 - 1

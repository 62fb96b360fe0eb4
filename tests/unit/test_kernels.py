"""The native CPU decode kernels against torch's ops, and the model's native decode against its torch path."""

import os
import platform
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tpinfer import kernels

_CAN_BUILD = (
    platform.system() == "Linux"
    and platform.machine() == "x86_64"
    and shutil.which("g++") is not None
    and all(flag in Path("/proc/cpuinfo").read_text().split() for flag in kernels.REQUIRED_CPU_FLAGS)
)
needs_kernels = pytest.mark.skipif(not _CAN_BUILD, reason="native kernels need x86-64 Linux, AVX-512 and g++")
DTYPES = [torch.float32, torch.bfloat16]


def _tol(dtype: torch.dtype, ref: torch.Tensor) -> float:
    return 1e-5 * (1 + ref.abs().max().item()) if dtype == torch.float32 else 2e-2 * (1 + ref.abs().max().item())


@needs_kernels
def test_library_builds_here():
    # On a host that can build them, the kernels must be in use: a silent fallback would hide a broken build.
    assert kernels.available(), kernels.unavailable_reason()


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
# Past 8 rows: tiles over a block of weights (bfloat16; float32 11), float32 broadcast groups of 16 (64; 30 and 45
# with a padded last group; 20 with 4 rows left to the tiles); past 64: passes.
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 11, 20, 30, 45, 64, 70])
@pytest.mark.parametrize("shape", [(37, 100), (512, 1024), (70, 1408)])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_matches_torch(dtype, rows, shape, threads):
    torch.manual_seed(rows)
    n, k = shape
    x, w, b = torch.randn(rows, k).to(dtype), torch.randn(n, k).to(dtype), torch.randn(n).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with_bias, without = kernels.linear(x, w, b), kernels.linear(x.view(rows, 1, k), w)
    finally:
        torch.set_num_threads(before)
    ref = F.linear(x.float(), w.float(), b.float())
    assert with_bias.dtype == dtype and with_bias.shape == (rows, n) and without.shape == (rows, 1, n)
    assert (with_bias.float() - ref).abs().max() <= _tol(dtype, ref)
    ref = F.linear(x.float(), w.float())
    assert (without.view(rows, n).float() - ref).abs().max() <= _tol(dtype, ref)


@needs_kernels
@pytest.mark.parametrize(("x_dtype", "w_dtype"), [(a, b) for a in DTYPES for b in DTYPES])
@pytest.mark.parametrize("k", [1, 15, 17, 32, 47, 61, 64])
@pytest.mark.parametrize("rows", [1, 8, 29])
def test_linear_tails_and_mixed_dtypes(x_dtype, w_dtype, k, rows):
    # bfloat16 weights are read 32 at a time (x split into even and odd halves of each block), float32 16 at a
    # time: every tail length of either, in both halves of a 32-block, with activations in either dtype.
    torch.manual_seed(k)
    x, w = torch.randn(rows, k).to(x_dtype), torch.randn(21, k).to(w_dtype)
    out = kernels.linear(x, w)
    ref = F.linear(x.float(), w.float())
    assert out.dtype == x_dtype
    assert (out.float() - ref).abs().max() <= _tol(torch.bfloat16 if torch.bfloat16 in (x_dtype, w_dtype) else x_dtype, ref)


def _saved_by(script: str, switch: str, on: bool):  # noqa: ANN202
    """What ``script`` saves to the path it is given, run in a fresh Python with the environment variable ``switch``
    set to 1 or unset (the kernels read their switches once per process)."""
    import subprocess
    import sys

    path = Path(tempfile.mkdtemp()) / "out.pt"
    env = {k: v for k, v in os.environ.items() if k != switch} | ({switch: "1"} if on else {})
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env, timeout=120)
    return torch.load(path)


@needs_kernels
def test_bfloat16_dot_product_and_widened_paths_agree():
    """bfloat16 x bfloat16 runs VDPBF16PS where the CPU has it; TPINFER_NO_BF16_DOT=1 takes the widening kernel (read
    once per process, hence a subprocess). Both are checked against float32 products, and against each other."""
    script = ("import sys, torch; from tpinfer import kernels; torch.manual_seed(0); "
              "x, w = torch.randn(13, 1411).bfloat16(), torch.randn(67, 1411).bfloat16(); "
              "torch.save(kernels.linear(x, w, out_dtype=torch.float32), sys.argv[1])")
    outs = {"dot": _saved_by(script, "TPINFER_NO_BF16_DOT", False),
            "widened": _saved_by(script, "TPINFER_NO_BF16_DOT", True)}
    torch.manual_seed(0)
    x, w = torch.randn(13, 1411).bfloat16(), torch.randn(67, 1411).bfloat16()
    ref = F.linear(x.float(), w.float())
    for out in outs.values():  # float32 results: the exact products, summed in float32 in some order
        assert (out - ref).abs().max() <= 1e-5 * (1 + ref.abs().max())
    from tpinfer.parallel.layers import CPU_BF16_DOT

    # Where the CPU has the instruction the two paths sum in different orders: some of 871 results differ in bits.
    assert torch.equal(outs["dot"], outs["widened"]) != CPU_BF16_DOT


@needs_kernels
def test_broadcast_and_tile_paths_agree():
    """Past 8 rows float32 (and bfloat16 pairs) run the broadcast kernel; TPINFER_NO_BCAST=1 takes the dot-product
    tiles (read once per process, hence a subprocess). Both against float32 products, and different in bits (the
    switch does change the path: the two sum in different orders)."""
    script = ("import sys, torch; from tpinfer import kernels; torch.manual_seed(0); "
              "x, w = torch.randn(40, 1412), torch.randn(67, 1412); "
              "torch.save([kernels.linear(x.to(d), w.to(d), out_dtype=torch.float32) "
              "for d in (torch.float32, torch.bfloat16)], sys.argv[1])")
    outs = {"broadcast": _saved_by(script, "TPINFER_NO_BCAST", False),
            "tiles": _saved_by(script, "TPINFER_NO_BCAST", True)}
    from tpinfer.parallel.layers import CPU_BF16_DOT

    torch.manual_seed(0)
    x, w = torch.randn(40, 1412), torch.randn(67, 1412)
    for i, dtype in enumerate((torch.float32, torch.bfloat16)):
        ref = F.linear(x.to(dtype).float(), w.to(dtype).float())
        for out in outs.values():
            assert (out[i] - ref).abs().max() <= 1e-5 * (1 + ref.abs().max())
        # bfloat16 takes the broadcast form only with the dot-product instruction (else: the widening tiles, both ways)
        broadcast = dtype == torch.float32 or CPU_BF16_DOT
        assert torch.equal(outs["broadcast"][i], outs["tiles"][i]) != broadcast


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 4, 9, 40])
def test_gated_linear_matches_torch(dtype, rows):
    torch.manual_seed(0)
    x, gate, up = torch.randn(rows, 96).to(dtype), torch.randn(50, 96).to(dtype), torch.randn(50, 96).to(dtype)
    gate_bias = torch.randn(50).to(dtype)
    out = kernels.gated_linear(x, gate, up, gate_bias, None)
    ref = F.silu(F.linear(x, gate, gate_bias)) * F.linear(x, up)  # the unfused ops, in the same dtype
    assert out.dtype == dtype
    assert (out.float() - ref.float()).abs().max() <= _tol(dtype, ref.float())


@needs_kernels
def test_gated_linear_silu_over_the_whole_float_range():
    # The vectorised exp: gate values from -200 to 200 (exp overflows and underflows), and NaN, against torch.
    gate = torch.cat([torch.linspace(-200, 200, 4001), torch.tensor([float("nan"), -0.0, 1e-30])])[:, None]
    out = kernels.gated_linear(torch.ones(1, 1), gate, torch.ones_like(gate))
    ref = F.silu(gate.T)
    assert torch.isnan(out[0, -3]) and out[0, -2].item() == 0.0
    finite = ~torch.isnan(ref)
    assert torch.allclose(out[finite], ref[finite], rtol=3e-7, atol=1e-30)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("head_dim", "heads", "kv_heads"),
                         [(64, 8, 4), (128, 4, 2), (64, 3, 1), (128, 2, 2), (16, 4, 4), (24, 6, 2), (40, 2, 1)])
def test_decode_attention_matches_sdpa(dtype, head_dim, heads, kv_heads):
    torch.manual_seed(head_dim)
    slots_n, length = 4, 50
    k_cache, v_cache = (torch.randn(slots_n, kv_heads, length, head_dim).to(dtype) for _ in range(2))
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    q = torch.randn(3, heads, head_dim).to(dtype)
    k, v = torch.randn(3, kv_heads, head_dim).to(dtype), torch.randn(3, kv_heads, head_dim).to(dtype)
    # 1, 6 and 49 positions: every tail of the four-key and 16-score loops (head_dim 64 and 128 run in registers, two
    # query heads of a KV head at a time where the group is even, one where it is odd)
    slots, positions = torch.tensor([2, 0, 3]), torch.tensor([5, 0, 48])
    inv_freq = 1 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(length).float(), inv_freq)
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    c, s = cos[positions][:, None], sin[positions][:, None]
    q_rot = q.float() * c + _rotate_half(q.float()) * s
    k_rot = k.float() * c + _rotate_half(k.float()) * s

    out = kernels.decode_attention(q, k, v, cos, sin, k_cache, v_cache, slots, positions, head_dim**-0.5)

    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for b in range(3):
        slot, pos = int(slots[b]), int(positions[b])
        ref_k[slot, :, pos], ref_v[slot, :, pos] = k_rot[b].to(dtype), v[b]
        keys = ref_k[slot, :, : pos + 1].float().repeat_interleave(heads // kv_heads, 0)
        values = ref_v[slot, :, : pos + 1].float().repeat_interleave(heads // kv_heads, 0)
        ref = F.scaled_dot_product_attention(q_rot[b][:, None], keys, values)[:, 0]
        assert (out[b].float() - ref).abs().max() <= tol
    # The cache holds the rotated key and the value at each row's slot and position, and nothing else changed.
    assert (k_cache.float() - ref_k.float()).abs().max() <= tol
    assert torch.equal(v_cache, ref_v)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_matches_hf_rounding(dtype):
    torch.manual_seed(0)
    x, delta, weight = torch.randn(3, 1, 100).to(dtype), torch.randn(3, 1, 100).to(dtype), torch.randn(100).to(dtype)
    total, out = kernels.add_rms_norm(x, delta, weight, 1e-6)
    h = x + delta
    ref = weight * F.rms_norm(h.float(), (100,), None, 1e-6).to(dtype)  # HF: normalise in float32, round, scale
    assert torch.equal(total, h)
    assert (out.float() - ref.float()).abs().max() <= (1e-5 if dtype == torch.float32 else 0)
    same, out = kernels.add_rms_norm(x, None, weight, 1e-6)
    assert torch.equal(same, x) and (out.float() - F.rms_norm(x.float(), (100,), weight.float(), 1e-6)).abs().max() < 0.05


def test_switch_disables_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert not kernels.available()
    assert kernels.ENV_SWITCH in kernels.unavailable_reason()
    x = torch.randn(1, 8)
    from tpinfer.parallel.layers import linear, uses_native

    assert not uses_native(x, torch.randn(4, 8))
    assert torch.allclose(linear(x, torch.ones(4, 8)), x.sum(-1, keepdim=True).expand(1, 4))


@needs_kernels
@pytest.mark.parametrize("variant", ["llama", "qwen2", "mixtral", "qwen2_moe"])
@pytest.mark.parametrize("batch", [1, 3, 20])
def test_model_decode_native_equals_torch_path(checkpoints, monkeypatch, variant, batch):
    """The engine's decode through the kernels gives the torch path's greedy tokens and log-probabilities (MoE
    models: routing, the chosen experts and Qwen2-MoE's shared expert in the kernels too)."""
    from tpinfer.engine.runtime import EngineSpec, load_engine
    from tpinfer.engine.sampling import SamplingParams
    from tpinfer.parallel.context import ParallelContext

    engine = load_engine(EngineSpec(str(checkpoints[variant]), dtype="float32"), ParallelContext.single())
    assert engine.native_decode  # the auto plan is one the fused layer kernels implement
    prompts = [[1, 10, 20, 30, 40, 7 + b][: 6 - b % 5] for b in range(batch)]  # different lengths: different positions
    params = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    load = getattr(engine.model, "expert_load", dict)
    native, native_load = engine.generator.generate(prompts, params), load()
    monkeypatch.setattr(kernels, "_lib", None)  # the torch path, as on a host without the kernels
    reference = engine.generator.generate(prompts, params)
    # The kernels count the experts each decode row picked as the torch path does: the same routing.
    assert {k: [2 * n for n in v] for k, v in native_load.items()} == load()
    for got, want in zip(native, reference, strict=True):
        assert got.token_ids == want.token_ids
        assert max(abs(a - b) for a, b in zip(got.logprobs, want.logprobs, strict=True)) < 1e-4


def test_failed_build_falls_back_to_torch(monkeypatch, tmp_path, caplog):
    """A compiler that fails leaves the torch path in place, with the reason in a warning."""
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setenv("TPINFER_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", shutil.which("false") or "/bin/false")
    with caplog.at_level("WARNING", logger="tpinfer.kernels"):
        assert not kernels.available()
    reason = kernels.unavailable_reason()
    if _CAN_BUILD:
        assert "compiling cpu_decode.cpp failed" in reason
    assert "native CPU kernels unavailable" in caplog.text
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob("*.tmp"))  # nothing half-written left


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,K", [("int8", 256), ("int8-g32", 256), ("int4", 256), ("int4", 224),
                                    ("int4-g64-sym", 256), ("int4-g64-sym", 192), ("int4-g96", 288),
                                    ("int4-g128", 256), ("fp8", 256), ("fp8-tensor", 256), ("int4-a8", 256),
                                    ("int4-a8", 224), ("int4-g64-a8", 576), ("int4-g96-sym-a8", 576),
                                    ("int4-g128-a8", 256), ("int8-a8", 224), ("int8-g32-a8", 256),
                                    ("int8-g64-asym-a8", 576), ("int4-g128-a8", 3840), ("int8-a8", 2816),
                                    ("int4-g64-sym-a8", 1920), ("int4-g128-a8", 2048)])
def test_quantized_gemv_equals_linear_on_dequantized_weights(name, K, dtype):
    """Every quantized GEMV (1-8 rows, more in blocks of 8) against F.linear on the same weights dequantized; with
    bfloat16 activations int4 takes the bfloat16 dot-product kernel where the CPU has one. The -a8 kernels (VNNI
    integer dot products) against F.linear of the activations rounded as quantize_activations defines, for blocks
    of 32, 64 and 128 inputs (224 = 7 x 32, 576 = 9 x 64, 2816 = 22 x 128), groups of three blocks (96), and 133
    weight rows: whole tiles of 16 rows in passes of 1, 2, 4 and 8 tiles, and a last tile of 5 (133 = 8 x 16 + 5)."""
    from tpinfer.quant.formats import dequantize, parse, quantize, quantize_activations

    scheme = parse(name)
    torch.manual_seed(0)
    weight = torch.randn(133, K)  # 133 rows: passes of 4 and of 2 weight rows, each with a remainder; -a8 tiles
    tensors = quantize(scheme, weight)
    dense = dequantize(scheme, tensors)
    bias = torch.randn(133).to(dtype)
    for rows in (1, 2, 3, 5, 8, 11):
        x = torch.randn(rows, K).to(dtype)
        ref = F.linear(quantize_activations(x.float(), scheme.act_block(K)) if scheme.act8 else x.float(), dense,
                       bias.float())
        out = kernels.quant_linear(x, scheme, tensors, bias)
        assert out.dtype == dtype
        # float32: the same products summed in another order; bfloat16: besides, each result rounded to 8 bits of
        # mantissa (relative 2^-9, so 2^-8 with margin). One wrong nibble or scale moves a result by ~|scale x|.
        bound = 1e-5 * (1 + ref.abs().max()) + (ref.abs() * 2**-8 if dtype == torch.bfloat16 else 0)
        assert ((out.float() - ref).abs() <= bound).all(), (rows, (out.float() - ref).abs().max())


@needs_kernels
# (B, T, heads, head_dim): the shape, T off the 16-key vector width, head_dims of 1-4 vectors, a long row
@pytest.mark.parametrize("shape", [(32, 64, 6, 32), (3, 37, 2, 64), (2, 5, 1, 16), (1, 200, 3, 48)])
@pytest.mark.parametrize("padded", [False, True])
def test_encoder_attention_equals_sdpa(shape, padded):
    B, T, H, D = shape
    torch.manual_seed(B * T + H * D)
    qkv = torch.randn(B, T, 3 * H * D) * 2
    lengths = torch.randint(1, T + 1, (B,)) if padded else torch.full((B,), T)
    lengths[0] = 1 if padded else T  # one row of a single real token
    mask = torch.arange(T)[None] < lengths[:, None]
    key_bias = torch.zeros(B, T).masked_fill_(~mask, float("-inf")) if padded else None
    q, k, v = qkv.double().view(B, T, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :] if padded else None)
    ref = ref.transpose(1, 2).reshape(B, T, H * D)
    got = kernels.encoder_attention(qkv, key_bias, H, D, D**-0.5)
    # float32 against float64: outputs are convex combinations of v (|v| < ~10), 1e-5 is ~100 float32 ulps
    assert (got.double() - ref).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="head_dim a multiple of 16"):
        kernels.encoder_attention(torch.randn(1, 4, 3 * 2 * 8), None, 2, 8, 8**-0.5)


@needs_kernels
@pytest.mark.parametrize("hidden", [384, 100, 17])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_sum_layer_norm_equals_torch(hidden, parts):
    torch.manual_seed(hidden + parts)
    xs = [torch.randn(50, hidden) * 3 + 1 for _ in range(parts)]
    weight, bias = torch.randn(hidden), torch.randn(hidden)
    ref = F.layer_norm(sum(x.double() for x in xs), (hidden,), weight.double(), bias.double(), 1e-12)
    got = kernels.sum_layer_norm(xs, weight, bias, 1e-12)
    assert (got.double() - ref).abs().max().item() < 1e-5
    # the parts are added in their order, as the shared-memory all-reduce adds them: the same bits as that sum
    total = xs[0].clone()
    for x in xs[1:]:
        total += x
    assert torch.equal(got, kernels.sum_layer_norm([total], weight, bias, 1e-12))
    # a row-parallel dense's bias, then the residual, added as the model adds them: the same bits as torch's order
    dense_bias, residual = torch.randn(hidden), torch.randn(50, hidden)
    fused = kernels.sum_layer_norm(xs, weight, bias, 1e-12, dense_bias, residual)
    assert torch.equal(fused, kernels.sum_layer_norm([residual + (total + dense_bias)], weight, bias, 1e-12))
    # into the residual itself, or into a part: each row is read whole before it is written
    for target in (residual.clone(), xs[0].clone()):
        operands = [target if torch.equal(x, target) else x for x in xs]
        into = kernels.sum_layer_norm(operands, weight, bias, 1e-12, dense_bias,
                                      target if torch.equal(target, residual) else residual, out=target)
        assert into.data_ptr() == target.data_ptr() and torch.equal(into, fused)
    with pytest.raises(ValueError, match="out must be contiguous float32"):
        kernels.sum_layer_norm(xs, weight, bias, 1e-12, out=torch.empty(49, hidden))
    # a residual of 10 rows repeated over the 50 (position embeddings, the same for every sequence)
    positions = torch.randn(10, hidden)
    repeated = kernels.sum_layer_norm(xs, weight, bias, 1e-12, dense_bias, positions)
    assert torch.equal(repeated, kernels.sum_layer_norm(xs, weight, bias, 1e-12, dense_bias, positions.repeat(5, 1)))
    # a share of the rows that ends inside a repetition (7 rows over 50: the last one cut short)
    seven = torch.randn(7, hidden)
    assert torch.equal(kernels.sum_layer_norm(xs, weight, bias, 1e-12, dense_bias, seven),
                       kernels.sum_layer_norm(xs, weight, bias, 1e-12, dense_bias, seven.repeat(8, 1)[:50].contiguous()))
    with pytest.raises(ValueError, match="repeating over their 50 rows"):
        kernels.sum_layer_norm(xs, weight, bias, 1e-12, dense_bias, torch.randn(7, hidden + 1))


@needs_kernels
def test_gelu_equals_the_exact_gelu():
    # every quarter of erf's table, both signs, the clamp past |x| = 4 sqrt 2, specials; a length off the vector width
    x = torch.cat([torch.linspace(-12, 12, 200_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.0, -88.0, 1e6])])
    exact = F.gelu(x.double())
    got = kernels.gelu_(x.clone()).double()
    assert ((got - exact).abs() / x.double().abs().clamp(min=1)).max().item() < 1e-7
    assert (got[x < -5.66] == 0).all()  # past the table (|x| >= 4 sqrt 2) erf is 1: GELU is 0 (exactly: > -4e-8)
    assert torch.equal(got[x > 9], x[x > 9].double())  # GELU(x) = x in float32 there
    with pytest.raises(ValueError, match="contiguous float32"):
        kernels.gelu_(torch.ones(4, dtype=torch.float64))


@needs_kernels
def test_embedding_rows_is_a_rank_share_of_the_lookup():
    torch.manual_seed(5)
    table, ids = torch.randn(23, 40), torch.randint(0, 23, (3, 9))
    assert torch.equal(kernels.embedding_rows(table, 0, ids), F.embedding(ids, table))
    # two ranks holding rows [0, 12) and [12, 23) (the second padded to 12 rows): each looks up its own, zeros else
    shares = [kernels.embedding_rows(table[:12].contiguous(), 0, ids),
              kernels.embedding_rows(torch.cat([table[12:], torch.zeros(1, 40)]), 12, ids)]
    for share, mine in zip(shares, [ids < 12, ids >= 12], strict=True):
        assert torch.equal(share[~mine], torch.zeros(int((~mine).sum()), 40))
    assert torch.equal(shares[0] + shares[1], F.embedding(ids, table))
    with pytest.raises(ValueError, match="int64 ids"):
        kernels.embedding_rows(table, 0, ids.int())


_AMX = _CAN_BUILD and all(flag in kernels.cpu_flags() for flag in ("amx_tile", "amx_bf16", "avx512_bf16"))
needs_amx = pytest.mark.skipif(not _AMX, reason="this CPU has no AMX-BF16: the float32 GEMM through AMX runs only "
                                                "where it has")


@needs_amx
def test_amx_is_in_use_where_the_cpu_has_it():
    # as for the library: on a CPU with AMX-BF16 a silent fallback would hide a broken build or a refused permission
    assert kernels.amx_available()


def test_amx_switch(monkeypatch):
    monkeypatch.setenv(kernels.AMX_SWITCH, "0")
    assert not kernels.amx_available()


@needs_amx
@pytest.mark.parametrize("rows", [1, 15, 32, 45, 200])
# k = 1536: two blocks of 32 rows a group (kAmxGroupBytes), so 200 rows are 4 groups, the last of one block
@pytest.mark.parametrize(("n", "k"), [(576, 384), (37, 100), (40, 17), (16, 32), (24, 1536)])
@pytest.mark.parametrize("threads", [1, 2])
def test_amx_linear_is_as_accurate_as_a_float32_gemm(rows, n, k, threads):
    # operands over six decades, so that every part of the split carries bits. A dot product's float32 error scales
    # with |x| |w| (the sum of its terms' sizes); measured so against float64, the error must be float32's: within
    # what torch's own float32 GEMM (MKL) makes on the same operands
    generator = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, generator=generator) * 10 ** torch.empty(rows, k).uniform_(-3, 3, generator=generator)
    w = torch.randn(n, k, generator=generator) * 10 ** torch.empty(n, k).uniform_(-3, 1, generator=generator)
    b = torch.randn(n, generator=generator)
    torch.set_num_threads(threads)
    try:
        for bias in (b, None):
            packed = kernels.amx_pack(w, bias)
            exact = F.linear(x.double(), w.double(), None if bias is None else bias.double())
            size = F.linear(x.double().abs(), w.double().abs(), None if bias is None else bias.double().abs())
            got = kernels.amx_linear(x, packed)
            ours = (got.double() - exact).abs() / size
            theirs = (F.linear(x, w, bias).double() - exact).abs() / size
            assert got.shape == (rows, n)
            # (where MKL happens to be tighter: sqrt(k) roundings, the typical error of a k-term float32 sum)
            assert ours.max() <= max(2 * theirs.max(), k**0.5 * 2**-23), (ours.max().item(), theirs.max().item())
            assert ours.mean() <= max(1.5 * theirs.mean(), 2**-24), (ours.mean().item(), theirs.mean().item())
        gelu = kernels.amx_linear(x.view(rows, 1, k), packed, gelu=True)
        assert gelu.shape == (rows, 1, n)
        assert torch.equal(gelu.view(rows, n), kernels.gelu_(got.clone()))  # the same GELU, in the GEMM's epilogue
    finally:
        torch.set_num_threads(1)


@needs_amx
def test_amx_linear_reads_rows_of_a_wider_tensor_and_refuses_what_it_cannot_take():
    x, w = torch.randn(33, 100), torch.randn(24, 64)
    packed = kernels.amx_pack(w)
    got = kernels.amx_linear(x[:, :64], packed)  # rows 100 apart
    assert (got - F.linear(x[:, :64], w)).abs().max() < 1e-4
    with pytest.raises(ValueError, match="x has 63 features, the packed weight 64"):
        kernels.amx_linear(x[:, :63], packed)
    with pytest.raises(ValueError, match="float32"):
        kernels.amx_linear(x.double()[:, :64], packed)
    with pytest.raises(ValueError, match="float32"):
        kernels.amx_pack(w.bfloat16())

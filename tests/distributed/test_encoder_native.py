"""The native encoder forward (``tpinfer.kernels.encoder_adapter``: packed oneDNN GEMMs, the native attention and
the fused sum + LayerNorm) against the model's own torch forward, on real gloo ranks with the shared-memory
all-reduce and without it, over a right-padded batch."""

import hashlib

import pytest
import torch

from helpers import fill_slices, run_ranks
from tpinfer import kernels
from tpinfer.config import ModelConfig
from tpinfer.kernels.encoder_adapter import native_encoder, unsupported_reason
from tpinfer.models.bert import AUTO_PLAN, POSITION, WORD, BertModel
from tpinfer.parallel.context import ParallelContext
from tpinfer.parallel.plan import resolve_plan
from tpinfer.parallel.shard import parameter_shapes
from tpinfer.parallel.spec import REPLICATE, VOCAB
from tpinfer.pooling import PoolingConfig, pool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180),
              pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable here")]

# 4 heads of 16, FFN 128, 2 layers, a vocabulary of 97 (padded at every TP size)
CONFIG = {"model_type": "bert", "vocab_size": 97, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 32, "type_vocab_size": 2}
LENGTHS = [20, 13, 1]  # right-padded rows, one of a single token


def _model(ctx, config: ModelConfig, seed: int, dtype: torch.dtype = torch.float32, plan="auto") -> BertModel:  # noqa: ANN001
    """The model with this rank's slices of full weights drawn from ``seed`` (the same on every rank)."""
    model = BertModel(config, ctx, resolve_plan(config, ctx.tp_size, plan), dtype, max_seq_len=24)
    generator = torch.Generator().manual_seed(seed)
    full = {name: torch.randn(shape, generator=generator) * (0.2 if len(shape) == 2 else 0.1)
            for name, shape in sorted(parameter_shapes(config, 1, 0, padded=False).items())}
    around_one = lambda name, param: 1.0 if param == "weight" and "LayerNorm" in name else 0.0  # noqa: E731
    fill_slices(model, lambda name, param: full[f"{name}.{param}"] + around_one(name, param))
    return model.eval()


def _on_rank(ctx, gloo: bool, plan="auto", chunk_tokens: int | None = None, split: bool = True) -> dict:  # noqa: ANN001
    """The forward on this rank with the adapter's token budget and split threshold set for the test (every sum
    split by rows through shared memory, or none), restored after: one test runs this in pytest's own process,
    where a later test's rank 0 must see the defaults its spawned ranks see."""
    from tpinfer.kernels import encoder_adapter

    saved = encoder_adapter.CHUNK_TOKENS, encoder_adapter.SPLIT_BYTES
    encoder_adapter.CHUNK_TOKENS = chunk_tokens or saved[0]
    encoder_adapter.SPLIT_BYTES = 0 if split else 1 << 62
    try:
        return _forwards(ctx, gloo, plan)
    finally:
        encoder_adapter.CHUNK_TOKENS, encoder_adapter.SPLIT_BYTES = saved


@torch.no_grad()
def _forwards(ctx, gloo: bool, plan) -> dict:  # noqa: ANN001
    config = ModelConfig.from_dict(CONFIG)
    model = _model(ctx, config, 7, plan=plan)
    native = native_encoder(model)
    assert native is not None, unsupported_reason(model)
    if gloo:  # the sums through the process group: the all-reduce, then torch's LayerNorm
        ctx.comm.all_reduce_impl = None
    torch.manual_seed(11)
    ids = torch.randint(0, config.vocab_size, (len(LENGTHS), max(LENGTHS)))
    mask = (torch.arange(max(LENGTHS))[None] < torch.tensor(LENGTHS)[:, None]).long()
    ref = model(ids, mask)
    ctx.comm.stats.reset()
    got = native(ids, mask)
    calls = dict(ctx.comm.stats.calls)
    unpadded = native(ids[:1], mask[:1])  # a batch without padding: no key bias at all
    one = native(ids[2:, :1], mask[2:, :1])  # one token: fewer rows than ranks, some ranks' share is empty
    # pooled straight from the last buffer, group by group: the pooling of the returned states
    pooling = PoolingConfig(modes=("mean", "cls"), normalize=True)
    pooled = (native.pooled(ids, mask, pooling) - pool(got, mask, pooling)).abs().max().item()
    return {"diff": (got - ref).abs().max().item(), "unpadded": (unpadded - ref[:1]).abs().max().item(),
            "one": (one - model(ids[2:, :1], mask[2:, :1])).abs().max().item(), "pooled": pooled,
            "digest": hashlib.sha256(got.numpy().tobytes()).hexdigest(), "calls": calls,
            "amx": native.layers[0]["qkv"].amx is not None}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize(("gloo", "split"), [(False, True), (False, False), (True, False)])
def test_native_encoder_equals_the_model_forward(world, gloo, split):
    results = run_ranks(world, _on_rank, gloo, "auto", None, split)
    for r in results:
        # The same sums in the same order except inside the GEMMs (oneDNN's blocking, q/k/v fused) and the
        # native softmax: float32 rounding of LayerNorm outputs ~1, far below 1e-5.
        assert r["diff"] < 1e-5 and r["unpadded"] < 1e-5 and r["one"] < 1e-5 and r["pooled"] < 1e-6
        sums = 2 * CONFIG["num_hidden_layers"] + 1  # 2 a layer + the embedding's
        # through shared memory each sum is split by rows: its exchange, then the barrier after the rows are written
        assert r["calls"] == ({"reduce_scatter": sums, "all_gather": sums} if split else {"all_reduce": sums})
        assert r["amx"] is kernels.amx_available()  # the GEMMs through AMX wherever the host has it
    assert len({r["digest"] for r in results}) == 1  # every rank holds the same bits


@pytest.mark.skipif(not kernels.amx_available(), reason="no AMX here: the tests above already run without it")
def test_native_encoder_without_amx_on_a_host_with_it(monkeypatch):
    monkeypatch.setenv(kernels.AMX_SWITCH, "0")  # inherited by the spawned ranks
    for r in run_ranks(2, _on_rank, False, "auto", None, True):
        assert not r["amx"] and r["diff"] < 1e-5 and r["unpadded"] < 1e-5 and r["one"] < 1e-5


def test_native_encoder_runs_a_large_batch_in_groups_of_sequences():
    # at most 40 tokens a forward: the 3 rows of 20 run as 2 + 1, each forward with its embedding's sum and 2 a layer
    results = run_ranks(2, _on_rank, False, "auto", 40)
    for r in results:
        assert r["diff"] < 1e-5 and r["unpadded"] < 1e-5 and r["pooled"] < 1e-6
        sums = 2 * (2 * CONFIG["num_hidden_layers"] + 1)
        assert r["calls"] == {"reduce_scatter": sums, "all_gather": sums}
    assert len({r["digest"] for r in results}) == 1


# the word table replicated (its lookup needs no sum across ranks); the position table split by the vocabulary
# (the native forward then runs the model's own embeddings); both with the auto plan's layers
WHOLE_WORDS = {**AUTO_PLAN, WORD: REPLICATE}
SPLIT_POSITIONS = {**AUTO_PLAN, POSITION: VOCAB}


def _on_rank_planned(ctx, plan: dict) -> dict:  # noqa: ANN001
    native = native_encoder(_model(ctx, ModelConfig.from_dict(CONFIG), 7, plan=plan))
    return {**_on_rank(ctx, False, plan), "native_lookup": native.native_embeddings}


# the embeddings without a sum across ranks write their rows between two barriers (the buffer's last readers done,
# then every rank's rows there); the module's own embeddings all-reduce the split tables' lookups (word, position)
@pytest.mark.parametrize(("plan", "native_lookup", "reduces"), [(WHOLE_WORDS, True, 0), (SPLIT_POSITIONS, False, 2)])
def test_native_encoder_with_embeddings_planned_otherwise(plan, native_lookup, reduces):
    results = run_ranks(2, _on_rank_planned, plan)
    layers = 2 * CONFIG["num_hidden_layers"]
    for r in results:
        assert r["native_lookup"] is native_lookup
        assert r["diff"] < 1e-5 and r["unpadded"] < 1e-5 and r["one"] < 1e-5
        assert r["calls"] == {"reduce_scatter": layers, "all_gather": layers + 2, **({"all_reduce": reduces} if reduces else {})}
    assert len({r["digest"] for r in results}) == 1


def test_native_encoder_at_one_rank_and_what_it_refuses():
    r = _on_rank(ParallelContext.single(), False)
    assert r["diff"] < 1e-5 and r["unpadded"] < 1e-5 and r["one"] < 1e-5 and r["calls"] == {}
    config = ModelConfig.from_dict(CONFIG)
    assert "bfloat16" in unsupported_reason(_model(ParallelContext.single(), config, 1, torch.bfloat16))
    narrow = ModelConfig.from_dict({**CONFIG, "num_attention_heads": 8})  # head_dim 8
    assert native_encoder(_model(ParallelContext.single(), narrow, 1)) is None
    assert "head_dim 8" in unsupported_reason(_model(ParallelContext.single(), narrow, 1))


PATHS = ["torch"] + ["onednn"] * torch.backends.mkldnn.is_available() + ["amx"] * kernels.amx_available()


@pytest.mark.parametrize("path", PATHS)
def test_packed_linear_with_and_without_bias_and_gelu(path):
    from tpinfer.kernels.encoder_adapter import AMX_MIN_ROWS, PackedLinear

    torch.manual_seed(3)
    weight, bias = torch.randn(40, 48) * 0.2, torch.randn(40)
    # with AMX: a batch from AMX_MIN_ROWS rows up through it, fewer rows through F.linear
    for x in (torch.randn(2, AMX_MIN_ROWS, 48), torch.randn(1, AMX_MIN_ROWS - 1, 48)):
        exact = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
        assert (PackedLinear(weight, bias, path)(x).double() - exact).abs().max() < 1e-5
        assert (PackedLinear(weight, None, path)(x).double() - (exact - bias.double())).abs().max() < 1e-5
        gelu = PackedLinear(weight, bias, path, gelu=True)(x).double()
        assert (gelu - torch.nn.functional.gelu(exact)).abs().max() < 1e-5

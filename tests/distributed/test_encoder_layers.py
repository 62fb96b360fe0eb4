"""The tensor-parallel BERT layer and embeddings on real gloo ranks equal their composition of nn.Linear,
nn.LayerNorm and nn.Embedding built from the full weights: heads split, FFN split, two all-reduces per layer."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import fill_slices, run_ranks
from tpinfer.config import ModelConfig
from tpinfer.models.bert import BertEmbeddings, BertLayer, layer_modules, outer_modules
from tpinfer.parallel.plan import resolve_plan
from tpinfer.parallel.spec import Embedding, Linear, Norm

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

# 4 heads of 16, FFN 128, a vocabulary of 97 (prime: padded at every TP size), 2 token types
CONFIG = {"model_type": "bert", "vocab_size": 97, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 16, "type_vocab_size": 2}


def _full_weights(config: ModelConfig, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Short module name -> {"weight", "bias"} of the whole model, drawn on every rank from the same seed."""
    torch.manual_seed(seed)
    out = {}
    for module in [*outer_modules(config)[0], *layer_modules(config, 0).values()]:
        if isinstance(module, Linear):
            fan_in, fan_out = module.in_features.total, module.out_features.total
            out[module.name] = {"weight": torch.randn(fan_out, fan_in) * fan_in**-0.5,
                                "bias": 0.1 * torch.randn(fan_out)}
        elif isinstance(module, Norm):
            out[module.name] = {"weight": 1 + 0.2 * torch.randn(module.size), "bias": 0.1 * torch.randn(module.size)}
        elif isinstance(module, Embedding):
            out[module.name] = {"weight": torch.randn(module.vocab_size, module.hidden_size)}
    return {name.removeprefix("encoder.layer.0."): params for name, params in out.items()}


def _dense(params: dict[str, torch.Tensor]) -> nn.Linear:
    out_features, in_features = params["weight"].shape
    linear = nn.Linear(in_features, out_features)
    linear.weight.data.copy_(params["weight"])
    linear.bias.data.copy_(params["bias"])
    return linear


def _norm(params: dict[str, torch.Tensor], eps: float) -> nn.LayerNorm:
    norm = nn.LayerNorm(params["weight"].shape[0], eps=eps)
    norm.weight.data.copy_(params["weight"])
    norm.bias.data.copy_(params["bias"])
    return norm


def _reference_layer(x: torch.Tensor, mask: torch.Tensor, w: dict, config: ModelConfig) -> torch.Tensor:
    """The post-norm layer from whole nn.Linear / nn.LayerNorm modules and an explicit masked softmax."""
    B, T, _ = x.shape
    heads, D, eps = config.num_attention_heads, config.head_dim, config.layer_norm_eps
    split = lambda t: t.view(B, T, heads, D).transpose(1, 2)  # noqa: E731
    q, k, v = (split(_dense(w[f"attention.self.{n}"])(x)) for n in ("query", "key", "value"))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, heads * D)
    h = _norm(w["attention.output.LayerNorm"], eps)(x + _dense(w["attention.output.dense"])(attended))
    ffn = _dense(w["output.dense"])(F.gelu(_dense(w["intermediate.dense"])(h)))
    return _norm(w["output.LayerNorm"], eps)(h + ffn)


@torch.no_grad()
def _on_rank(ctx, seed: int) -> dict:
    config = ModelConfig.from_dict(CONFIG)
    plan = resolve_plan(config, ctx.tp_size)
    weights = _full_weights(config, seed)
    layer = BertLayer(config, 0, ctx, plan, torch.float32)
    fill_slices(layer, lambda name, param: weights[name][param])
    embeddings = BertEmbeddings(config, ctx, plan, torch.float32)
    fill_slices(embeddings, lambda name, param: weights["embeddings." + name][param])
    torch.manual_seed(seed + 1)
    x = torch.randn(3, 6, config.hidden_size)
    lengths = [6, 4, 1]  # right-padded rows
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    ids = torch.randint(0, config.vocab_size, (3, 6))
    ctx.comm.stats.reset()
    out = layer(x, mask.bool()[:, None, None, :])
    calls = dict(ctx.comm.stats.calls)
    ref = _reference_layer(x, mask, weights, config)
    types = torch.zeros_like(ids)
    embedded = embeddings(ids, types)
    ref_embedded = _norm(weights["embeddings.LayerNorm"], config.layer_norm_eps)(
        F.embedding(ids, weights["embeddings.word_embeddings"]["weight"])
        + F.embedding(types, weights["embeddings.token_type_embeddings"]["weight"])
        + weights["embeddings.position_embeddings"]["weight"][:6])
    return {"layer": (out - ref).abs().max().item(), "embeddings": (embedded - ref_embedded).abs().max().item(),
            "calls": calls, "local_heads": layer.attention.self.num_local_heads,
            "local_ffn": layer.intermediate.dense.weight.shape[0]}


@pytest.mark.parametrize("world", [2, 4])
def test_tp_bert_layer_equals_its_dense_composition(world):
    for r in run_ranks(world, _on_rank, 0):
        # The row-parallel denses sum their partial products in another order than one nn.Linear: float32
        # rounding of values ~1, after a LayerNorm, stays far below 1e-5.
        assert r["layer"] < 1e-5 and r["embeddings"] < 1e-5
        assert r["local_heads"] == 4 // world and r["local_ffn"] == 128 // world
        assert r["calls"] == {"all_reduce": 2}  # attention's output dense and the FFN's output dense


def test_tp_bert_layer_at_one_rank_equals_its_dense_composition():
    from tpinfer.parallel.context import ParallelContext

    r = _on_rank(ParallelContext.single(), 1)
    assert r["layer"] < 1e-5 and r["embeddings"] < 1e-5 and r["local_heads"] == 4

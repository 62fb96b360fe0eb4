"""BERT encoders (``model_type: bert``; ``roberta`` and ``xlm-roberta``, the same layer): the seeds'
tensor-parallel layer, post-norm, attending both ways.

Embeddings (word, absolute position, token type) summed and normalized, then layers of
``h = LayerNorm(x + attention(x))`` and ``out = LayerNorm(h + dense(gelu(dense(h))))``. No causal mask, no KV cache,
no LM head: the forward returns the last layer's hidden states, which the engine pools into sentence embeddings
(``tpinfer.pooling``). Padded batches carry an attention mask: a padded position is never attended to.

Tensor parallelism as Megatron splits this layer: query/key/value column-parallel (each rank its heads), the
attention output dense row-parallel (one all-reduce), the intermediate dense column-parallel, the output dense
row-parallel (one all-reduce): two all-reduces per layer. LayerNorms are replicated; the word embedding splits the
vocabulary (one all-reduce per forward), position and token-type embeddings are replicated (a plan may split them).

Names are HF ``BertModel``'s (``embeddings.word_embeddings``, ``encoder.layer.{i}.attention.self.query``, ...): the
checkpoints sentence-transformers ships; ``RobertaModel`` uses the same. RoBERTa differs only in its positions: they
start at ``pad_token_id + 1`` (``position_offset``), so ``max_position_embeddings - pad_token_id - 1`` tokens fit.
The pooler (``pooler.dense``) is not used by sentence embeddings and is not loaded, nor are the position-id and
token-type-id buffers some checkpoints carry.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tpinfer.config import ConfigError, require
from tpinfer.models.decoder import build_linear
from tpinfer.models.family import ENCODER, Family
from tpinfer.parallel.layers import LayerNorm, embedding_layer
from tpinfer.parallel.spec import COLWISE, ROWWISE, VOCAB, Embedding, Linear, Module, Norm, Pair, units

LAYER_PREFIX = "encoder.layer.{}."
WORD, POSITION, TOKEN_TYPE = ("embeddings.word_embeddings", "embeddings.position_embeddings",
                              "embeddings.token_type_embeddings")
EMBED_NORM = "embeddings.LayerNorm"
SUPPORTED_ACTS = ("gelu",)  # HF's "gelu" is the exact (erf) GELU


def read_config(raw: dict[str, Any]) -> dict[str, Any]:
    require(raw, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    act = raw.get("hidden_act") or "gelu"
    if act not in SUPPORTED_ACTS:
        raise ConfigError(f"hidden_act {act!r} is not supported by tpinfer's bert family; supported: "
                          f"{', '.join(SUPPORTED_ACTS)} (exact erf GELU)")
    position = raw.get("position_embedding_type") or "absolute"
    if position != "absolute":
        raise ConfigError(f"position_embedding_type {position!r} is not supported; supported: absolute")
    for key in ("is_decoder", "add_cross_attention"):
        if raw.get(key):
            raise ConfigError(f"{key}=true: tpinfer's bert family runs the bidirectional encoder only")
    hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    if hidden % heads:
        raise ConfigError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    return {
        "model_type": raw["model_type"],
        "vocab_size": int(raw["vocab_size"]),
        "hidden_size": hidden,
        "intermediate_size": int(raw["intermediate_size"]),
        "num_hidden_layers": int(raw["num_hidden_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "max_position_embeddings": int(raw.get("max_position_embeddings") or 512),
        "type_vocab_size": int(raw.get("type_vocab_size") or (2 if raw["model_type"] == "bert" else 1)),
        # RoBERTa numbers real tokens from padding_idx + 1 (HF's create_position_ids_from_input_ids, right-padded)
        "position_offset": 0 if raw["model_type"] == "bert" else int(_given(raw.get("pad_token_id"), 1)) + 1,
        "layer_norm_eps": float(raw.get("layer_norm_eps", 1e-12)),
        "hidden_act": act,
        "attention_bias": True,
        "mlp_bias": True,
        "torch_dtype": raw.get("torch_dtype") or raw.get("dtype"),
    }


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


def outer_modules(config) -> tuple[list[Module], list[Module]]:  # noqa: ANN001
    """The embeddings and their norm before the layers; nothing after them (the layers end in their own norm)."""
    hidden = config.hidden_size
    return [Embedding(WORD, config.vocab_size, hidden),
            Embedding(POSITION, config.max_position_embeddings, hidden),
            Embedding(TOKEN_TYPE, config.type_vocab_size, hidden),
            Norm(EMBED_NORM, hidden, bias=True)], []


def layer_modules(config, layer: int) -> dict[str, Module]:  # noqa: ANN001
    """One encoder layer's projections and norms, every one with a bias."""
    name = lambda short: LAYER_PREFIX.format(layer) + short  # noqa: E731
    hidden = units(config.hidden_size)
    heads = units(config.num_attention_heads, config.head_dim, "attention heads")
    ffn = units(config.intermediate_size, name="intermediate_size")
    return {
        "attention.self.query": Linear(name("attention.self.query"), hidden, heads, True),
        "attention.self.key": Linear(name("attention.self.key"), hidden, heads, True),
        "attention.self.value": Linear(name("attention.self.value"), hidden, heads, True),
        "attention.output.dense": Linear(name("attention.output.dense"), heads, hidden, True),
        "attention.output.LayerNorm": Norm(name("attention.output.LayerNorm"), config.hidden_size, bias=True),
        "intermediate.dense": Linear(name("intermediate.dense"), hidden, ffn, True),
        "output.dense": Linear(name("output.dense"), ffn, hidden, True),
        "output.LayerNorm": Norm(name("output.LayerNorm"), config.hidden_size, bias=True),
    }


AUTO_PLAN = {
    WORD: VOCAB,
    "encoder.layer.*.attention.self.query": COLWISE,
    "encoder.layer.*.attention.self.key": COLWISE,
    "encoder.layer.*.attention.self.value": COLWISE,
    "encoder.layer.*.attention.output.dense": ROWWISE,
    "encoder.layer.*.intermediate.dense": COLWISE,
    "encoder.layer.*.output.dense": ROWWISE,
}
PAIRS = (Pair(("attention.self.query", "attention.self.key", "attention.self.value"), "attention.output.dense"),
         Pair(("intermediate.dense",), "output.dense"))


class BertEmbeddings(nn.Module):
    """LayerNorm(word + token type + position embeddings), HF's sum order."""

    def __init__(self, config, ctx, plan, dtype: torch.dtype):  # noqa: ANN001
        super().__init__()
        (word, position, token_type, _), _ = outer_modules(config)
        self.word_embeddings = embedding_layer(word, plan.strategy(WORD), ctx, dtype)
        self.position_embeddings = embedding_layer(position, plan.strategy(POSITION), ctx, dtype)
        self.token_type_embeddings = embedding_layer(token_type, plan.strategy(TOKEN_TYPE), ctx, dtype)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype, ctx.device)

        self.position_offset = config.position_offset

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        positions = positions + self.position_offset
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x + self.position_embeddings(positions))


class BertSelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(D) + mask) V over this rank's heads; Q, K, V column-parallel."""

    def __init__(self, config, modules: dict[str, Module], ctx, plan, dtype: torch.dtype):  # noqa: ANN001
        super().__init__()
        self.head_dim = config.head_dim
        self.query = build_linear(modules["attention.self.query"], plan, ctx, dtype)
        self.key = build_linear(modules["attention.self.key"], plan, ctx, dtype)
        self.value = build_linear(modules["attention.self.value"], plan, ctx, dtype)
        self.num_local_heads = sum(self.query.part_sizes) // self.head_dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.query(x).view(B, T, self.num_local_heads, self.head_dim).transpose(1, 2)  # (B, H_local, T, D)
        k = self.key(x).view(B, T, self.num_local_heads, self.head_dim).transpose(1, 2)
        v = self.value(x).view(B, T, self.num_local_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(B, T, self.num_local_heads * self.head_dim)  # (B, T, H_local * D)


class BertResidualOutput(nn.Module):
    """LayerNorm(residual + dense(x)): the dense is row-parallel, its all-reduce gives every rank the whole sum."""

    def __init__(self, config, modules: dict[str, Module], prefix: str, ctx, plan, dtype: torch.dtype):  # noqa: ANN001
        super().__init__()
        self.dense = build_linear(modules[f"{prefix}.dense"], plan, ctx, dtype)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps, dtype, ctx.device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dense(x))


class BertAttention(nn.Module):
    def __init__(self, config, modules: dict[str, Module], ctx, plan, dtype: torch.dtype):  # noqa: ANN001
        super().__init__()
        self.self = BertSelfAttention(config, modules, ctx, plan, dtype)
        self.output = BertResidualOutput(config, modules, "attention.output", ctx, plan, dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    """gelu(dense(x)), column-parallel: each rank its share of the FFN features."""

    def __init__(self, config, modules: dict[str, Module], ctx, plan, dtype: torch.dtype):  # noqa: ANN001
        super().__init__()
        self.dense = build_linear(modules["intermediate.dense"], plan, ctx, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    """The post-norm layer: h = LayerNorm(x + attention(x)), then LayerNorm(h + FFN(h))."""

    def __init__(self, config, layer: int, ctx, plan, dtype: torch.dtype):  # noqa: ANN001
        super().__init__()
        modules = layer_modules(config, layer)
        self.attention = BertAttention(config, modules, ctx, plan, dtype)
        self.intermediate = BertIntermediate(config, modules, ctx, plan, dtype)
        self.output = BertResidualOutput(config, modules, "output", ctx, plan, dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.attention(x, mask)
        return self.output(self.intermediate(h), h)


class BertEncoder(nn.Module):
    def __init__(self, config, ctx, plan, dtype: torch.dtype):  # noqa: ANN001
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, i, ctx, plan, dtype) for i in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertModel(nn.Module):
    """input ids (B, T) and attention mask (B, T; 1 = a real token) -> the last layer's hidden states (B, T, hidden),
    the same on every rank. Token types are all 0 (one segment per input)."""

    def __init__(self, config, ctx, plan, dtype: torch.dtype, max_seq_len: int):  # noqa: ANN001
        super().__init__()
        if max_seq_len + config.position_offset > config.max_position_embeddings:
            raise ConfigError(f"max_seq_len {max_seq_len} (positions from {config.position_offset}) exceeds "
                              f"max_position_embeddings {config.max_position_embeddings}")
        self.config, self.ctx, self.dtype, self.max_seq_len = config, ctx, dtype, max_seq_len
        self.embeddings = BertEmbeddings(config, ctx, plan, dtype)
        self.encoder = BertEncoder(config, ctx, plan, dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # (B, 1, 1, T): every query attends every real key of its row; without padding no mask at all.
        mask = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids, torch.zeros_like(input_ids))
        return self.encoder(x, mask)


def _family(name: str, model_types: tuple[str, ...]) -> Family:
    return Family(
        name=name,
        model_types=model_types,
        read_config=read_config,
        layer=layer_modules,
        auto_plan=AUTO_PLAN,
        pairs=PAIRS,
        model=BertModel,
        kind=ENCODER,
        layer_prefix=LAYER_PREFIX,
        outer=outer_modules,
        unused_tensors=("embeddings.position_ids", "embeddings.token_type_ids", "pooler."),
        encode_adapter=_native_encoder,
    )


def _native_encoder(model):  # noqa: ANN001, ANN202
    from tpinfer.kernels.encoder_adapter import native_encoder

    return native_encoder(model)


ROBERTA = _family("roberta", ("roberta", "xlm-roberta"))
FAMILIES = {"bert": _family("bert", ("bert",)), "roberta": ROBERTA, "xlm-roberta": ROBERTA}

"""Shard arithmetic: pure functions of (size, rank, world).

This module is the one source of truth for how tpinfer splits a model. The parallel layers take
their per-rank sizes from here, the loader takes its slices from here, and ``tpinfer info`` and the
planner count bytes from here, so the three cannot disagree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tpinfer.config import ModelConfig


def shard_range(size: int, rank: int, world: int) -> tuple[int, int]:
    """(start, length) of rank's equal share of ``size`` items; ``size`` must divide by ``world``."""
    if size % world:
        raise ValueError(f"{size} is not divisible by {world}")
    length = size // world
    return rank * length, length


def padded_vocab_size(vocab_size: int, world: int) -> int:
    """The vocabulary rounded up to a multiple of ``world`` so every rank holds the same rows."""
    return -(-vocab_size // world) * world


def vocab_range(vocab_size: int, rank: int, world: int) -> tuple[int, int]:
    """(start, length) of rank's rows of the padded vocabulary; rows >= vocab_size are padding."""
    return shard_range(padded_vocab_size(vocab_size, world), rank, world)


def kv_head_range(num_kv_heads: int, rank: int, world: int) -> tuple[int, int]:
    """(first KV head, count) held by ``rank``.

    When world <= num_kv_heads the KV heads are split evenly. When world is a multiple of
    num_kv_heads each rank holds one KV head, replicated over world // num_kv_heads ranks: the
    one its query heads (rank * heads/world ...) are grouped with.
    """
    if world <= num_kv_heads:
        return shard_range(num_kv_heads, rank, world)
    return rank // (world // num_kv_heads), 1


def tp_failure_reason(config: ModelConfig, tp: int) -> str | None:
    """Why ``tp`` cannot shard ``config``, naming the numbers; None when it can."""
    if tp < 1:
        return f"tp={tp} must be at least 1"
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % tp:
        return f"{heads} attention heads are not divisible by tp={tp}"
    if kv_heads % tp and tp % kv_heads:
        return f"{kv_heads} KV heads are neither divisible by tp={tp} nor a divisor of it"
    if config.intermediate_size % tp:
        return f"intermediate_size {config.intermediate_size} is not divisible by tp={tp}"
    return None


def valid_tp_sizes(config: ModelConfig) -> list[int]:
    return [tp for tp in range(1, config.num_attention_heads + 1) if tp_failure_reason(config, tp) is None]


def o_proj_has_bias(config: ModelConfig) -> bool:
    # qwen2 has q/k/v biases but none on o_proj; llama's attention_bias covers all four.
    return config.attention_bias and config.model_type != "qwen2"


def parameter_shapes(config: ModelConfig, tp: int, rank: int, padded: bool = True) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape held by ``rank`` under the "auto" plan at ``tp``.

    With ``tp=1, padded=False`` these are the checkpoint's full shapes.
    """
    hidden, head_dim = config.hidden_size, config.head_dim
    vocab_rows = vocab_range(config.vocab_size, rank, tp)[1] if padded else config.vocab_size
    local_q = shard_range(config.num_attention_heads, rank, tp)[1] * head_dim
    local_kv = kv_head_range(config.num_key_value_heads, rank, tp)[1] * head_dim
    local_ffn = shard_range(config.intermediate_size, rank, tp)[1]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab_rows, hidden)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (local_q, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (local_kv, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (local_kv, hidden)
        if config.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (local_q,)
            shapes[p + "self_attn.k_proj.bias"] = (local_kv,)
            shapes[p + "self_attn.v_proj.bias"] = (local_kv,)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, local_q)
        if o_proj_has_bias(config):
            shapes[p + "self_attn.o_proj.bias"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (local_ffn, hidden)
        shapes[p + "mlp.up_proj.weight"] = (local_ffn, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, local_ffn)
        if config.mlp_bias:
            shapes[p + "mlp.gate_proj.bias"] = (local_ffn,)
            shapes[p + "mlp.up_proj.bias"] = (local_ffn,)
            shapes[p + "mlp.down_proj.bias"] = (hidden,)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab_rows, hidden)
    return shapes


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def rank_parameter_bytes(config: ModelConfig, tp: int, rank: int, bytes_per_element: int) -> int:
    """Bytes of parameters ``rank`` allocates at ``tp`` (vocabulary padding included)."""
    return sum(numel(s) for s in parameter_shapes(config, tp, rank).values()) * bytes_per_element


def kv_cache_bytes_per_token(config: ModelConfig, tp: int, rank: int, bytes_per_element: int) -> int:
    """KV-cache bytes one token costs on ``rank``: K and V for its local KV heads in every layer."""
    local_kv = kv_head_range(config.num_key_value_heads, rank, tp)[1]
    return 2 * config.num_hidden_layers * local_kv * config.head_dim * bytes_per_element

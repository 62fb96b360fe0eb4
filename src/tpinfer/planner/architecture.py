"""Architectures the planner counts but the engine does not run: mixture-of-experts (Mixtral) and OPT.

Counted under the same tensor-parallel scheme as the engine's models (Megatron style: attention by heads,
every FFN by its intermediate size, vocabulary padded to a multiple of TP), so the numbers compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tpinfer.parallel import shard
from tpinfer.planner.model import RankElements

PLANNER_ONLY_TYPES = ("opt",)  # Mixtral is an engine family now (tpinfer.models.moe), counted by its declaration


@dataclass(frozen=True)
class Architecture:
    name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # of one FFN (one expert for MoE)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    gated_mlp: bool = True  # SwiGLU: gate, up, down; False: fc1, activation, fc2
    attention_bias: bool = False  # biases on q, k, v and o
    mlp_bias: bool = False
    norm_bias: bool = False  # LayerNorm (weight and bias) instead of RMSNorm (weight)
    learned_positions: int = 0  # rows of a learned position embedding (OPT: max positions + 2)
    num_local_experts: int = 0  # 0: a dense FFN
    num_experts_per_tok: int = 0
    tie_word_embeddings: bool = False

    engine_supported = False

    def rank_elements(self, tp: int) -> RankElements:
        hidden = self.hidden_size
        local_q = shard.shard_range(self.num_attention_heads, 0, tp)[1] * self.head_dim
        local_kv = shard.kv_head_range(self.num_key_value_heads, 0, tp)[1] * self.head_dim
        local_ffn = shard.shard_range(self.intermediate_size, 0, tp)[1]
        local_vocab = shard.vocab_range(self.vocab_size, 0, tp)[1]

        # q, k, v column-parallel and o row-parallel; o's bias is added once after the all-reduce, so replicated.
        attention = (local_q + 2 * local_kv) * hidden + hidden * local_q
        if self.attention_bias:
            attention += local_q + 2 * local_kv + hidden
        matrices = 3 if self.gated_mlp else 2
        ffn = matrices * local_ffn * hidden
        if self.mlp_bias:
            ffn += (matrices - 1) * local_ffn + hidden
        experts = 0
        if self.num_local_experts:
            experts = ffn * self.num_local_experts
            ffn = experts + self.num_local_experts * hidden  # experts + the router, replicated
        norm = hidden * (2 if self.norm_bias else 1)
        layer = attention + ffn + 2 * norm

        token_embedding = local_vocab * hidden
        embed = token_embedding + self.learned_positions * hidden
        head = norm + (0 if self.tie_word_embeddings else token_embedding)
        tied = token_embedding if self.tie_word_embeddings else 0
        return RankElements(embed, layer, head, tied, experts)

    def parameter_count(self) -> int:
        return self.rank_elements(1).total(self.num_hidden_layers)

    def active_parameter_count(self) -> int:
        experts = self.rank_elements(1).experts * self.num_hidden_layers
        return self.parameter_count() - experts + (experts * self.num_experts_per_tok // self.num_local_experts
                                                   if experts else 0)


def architecture_from_hf(raw: dict[str, Any], name: str) -> Architecture:
    """An ``Architecture`` from an HF config.json of a type only the planner counts (mixtral, opt)."""
    model_type = raw.get("model_type")
    hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    if model_type == "mixtral":
        return Architecture(
            name,
            "mixtral",
            int(raw["vocab_size"]),
            hidden,
            int(raw["intermediate_size"]),
            int(raw["num_hidden_layers"]),
            heads,
            int(raw.get("num_key_value_heads") or heads),
            int(raw.get("head_dim") or hidden // heads),
            int(raw.get("max_position_embeddings", 4096)),
            num_local_experts=int(raw["num_local_experts"]),
            num_experts_per_tok=int(raw["num_experts_per_tok"]),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        )
    if model_type == "opt":
        if raw.get("word_embed_proj_dim", hidden) != hidden:
            raise ValueError("OPT with word_embed_proj_dim != hidden_size (project_in/out) is not counted")
        max_pos = int(raw.get("max_position_embeddings", 2048))
        bias = bool(raw.get("enable_bias", True))
        return Architecture(
            name,
            "opt",
            int(raw["vocab_size"]),
            hidden,
            int(raw["ffn_dim"]),
            int(raw["num_hidden_layers"]),
            heads,
            heads,
            hidden // heads,
            max_pos,
            gated_mlp=False,
            attention_bias=bias,
            mlp_bias=bias,
            norm_bias=True,
            learned_positions=max_pos + 2,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        )
    raise ValueError(f"model_type {model_type!r} is neither run by the engine nor counted by the planner")

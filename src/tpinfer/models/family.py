"""A model family, declared once in its own module under ``tpinfer.models``.

The declaration says which config fields the family reads (``read_config``), its modules with their HF names and
features (``layer``: one layer's projections and norms; the embedding, final norm and head are the same for every
decoder, and an encoder declares its own with ``outer``), its ``"auto"`` tensor-parallel plan and the column->row
pairs that plan must respect, the model class built from it, its ``kind`` (a causal LM, which generates, or an
encoder, which embeds), and optionally a fast decode path. Plan resolution, shard arithmetic, the loader,
``tpinfer info`` and the planner read this declaration; none of them knows a family by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tpinfer.parallel.spec import VOCAB, Embedding, Head, Module, Norm, Pair

if TYPE_CHECKING:
    from tpinfer.config import ModelConfig

LAYER_PREFIX = "model.layers.{}."
EMBED, FINAL_NORM, LM_HEAD = "model.embed_tokens", "model.norm", "lm_head"
# The embedding and head split the vocabulary under every family's auto plan.
VOCAB_PLAN = {EMBED: VOCAB, LM_HEAD: VOCAB}
# What a model does: a causal LM has an LM head and a KV cache and generates; an encoder (BERT) attends both ways
# and returns hidden states, which the engine pools into embeddings.
CAUSAL_LM, ENCODER = "causal_lm", "encoder"


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    read_config: Callable[[dict[str, Any]], dict[str, Any]]  # config.json -> ModelConfig fields
    layer: Callable[[ModelConfig, int], dict[str, Module]]  # short name ("self_attn.q_proj") -> module
    auto_plan: dict[str, str]  # module pattern ("model.layers.*.mlp.up_proj") -> strategy
    # Column->row pairs relative to a layer; a callable (config, layer) when they depend on the layer (experts)
    pairs: tuple[Pair, ...] | Callable[[ModelConfig, int], tuple[Pair, ...]]
    model: Callable[..., Any]  # (config, ctx, plan, dtype, max_seq_len) -> the rank's nn.Module
    # Optional fast decode: takes the built model, returns a step callable or None when it does not apply.
    decode_adapter: Callable[[Any], Any] | None = None
    # Optional fast encoder forward: takes the built encoder, returns a callable with its forward's contract or None.
    encode_adapter: Callable[[Any], Any] | None = None
    # Mixture of experts: the auto plan's entries for whole experts per rank (--moe-parallel expert); None: dense
    expert_plan: dict[str, str] | None = None
    kind: str = CAUSAL_LM
    layer_prefix: str = LAYER_PREFIX  # a layer's module names start with this, formatted with its index
    # The modules before and after the layers; None: a decoder's embedding, then its final norm and LM head.
    outer: Callable[[ModelConfig], tuple[list[Module], list[Module]]] | None = None
    # Checkpoint tensors the model never loads, by name prefix (buffers, heads it does not use).
    unused_tensors: tuple[str, ...] = ()

    def modules(self, config: ModelConfig) -> list[Module]:
        """Every module of the model in registration order, with full HF names."""
        before, after = self.outer(config) if self.outer is not None else decoder_outer(config)
        out: list[Module] = list(before)
        for i in range(config.num_hidden_layers):
            out += self.layer(config, i).values()
        return out + list(after)

    def layer_pairs(self, layer: int, config: ModelConfig | None = None) -> list[tuple[list[str], str]]:
        """This layer's pairs with full module names."""
        prefix = self.layer_prefix.format(layer)
        pairs = self.pairs(config, layer) if callable(self.pairs) else self.pairs
        return [([prefix + name for name in pair.inputs], prefix + pair.output) for pair in pairs]


def decoder_outer(config: ModelConfig) -> tuple[list[Module], list[Module]]:
    """A decoder's embedding, and its final norm and LM head (tied to the embedding where the config says)."""
    head = Head(LM_HEAD, config.vocab_size, config.hidden_size, EMBED if config.tie_word_embeddings else None)
    return [Embedding(EMBED, config.vocab_size, config.hidden_size)], [Norm(FINAL_NORM, config.hidden_size), head]


def decoder_layer_name(layer: int, short: str) -> str:
    return LAYER_PREFIX.format(layer) + short

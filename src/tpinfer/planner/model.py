"""What the planner needs to know about a model, for the engine's models and for catalogue-only ones.

Two kinds of model satisfy ``ModelSpec``:

* ``EngineModel`` wraps a ``ModelConfig`` (llama, mistral, qwen2) and counts every byte through
  ``tpinfer.parallel.shard``, the same arithmetic the engine's layers and loader use;
* ``Architecture`` (architecture.py) describes models tpinfer does not run (Mixtral, OPT) from their numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from tpinfer.config import ModelConfig
from tpinfer.parallel import shard
from tpinfer.parallel.mesh import split_layers  # noqa: F401  (the engine's split, re-exported for the planner)
from tpinfer.planner.dtypes import DType, get_dtype


@dataclass(frozen=True)
class RankElements:
    """Parameter elements one tensor-parallel rank holds, split the way pipeline stages divide them."""

    embed: int  # first stage only: token (and learned position) embeddings
    layer: int  # each decoder layer
    head: int  # last stage only: final norm and lm_head
    tied_head: int = 0  # the lm_head a last stage must add when it is tied to the embedding and pp > 1
    experts: int = 0  # of ``layer``, the elements in mixture-of-experts FFNs (read only when a token routes there)

    def total(self, num_layers: int) -> int:
        """Elements at pp=1: exactly what the rank allocates."""
        return self.embed + self.layer * num_layers + self.head


class ModelSpec(Protocol):
    name: str

    @property
    def model_type(self) -> str: ...
    @property
    def engine_supported(self) -> bool: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def intermediate_size(self) -> int: ...
    @property
    def num_hidden_layers(self) -> int: ...
    @property
    def num_attention_heads(self) -> int: ...
    @property
    def num_key_value_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def max_position_embeddings(self) -> int: ...
    @property
    def num_local_experts(self) -> int: ...  # 0 for a dense FFN
    @property
    def num_experts_per_tok(self) -> int: ...

    def parameter_count(self) -> int: ...
    def active_parameter_count(self) -> int: ...  # one token's forward: top-k of each MoE layer's experts
    def rank_elements(self, tp: int) -> RankElements: ...


@dataclass(frozen=True)
class EngineModel:
    """A model the engine runs: every count comes from ``tpinfer.parallel.shard``."""

    config: ModelConfig
    name: str
    _cache: dict[int, RankElements] = field(default_factory=dict, compare=False, repr=False)

    engine_supported = True

    @property
    def num_local_experts(self) -> int:
        return self.config.num_experts

    @property
    def num_experts_per_tok(self) -> int:
        return self.config.num_experts_per_tok

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def intermediate_size(self) -> int:
        return self.config.intermediate_size

    @property
    def num_hidden_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_attention_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    @property
    def max_position_embeddings(self) -> int:
        return self.config.max_position_embeddings

    def parameter_count(self) -> int:
        return self.config.num_parameters

    def active_parameter_count(self) -> int:
        return shard.active_parameters(self.config)

    def rank_bytes(self, tp: int, dtype: DType) -> RankElements:
        """Bytes, exactly as the engine allocates them (quantized projections in their formats)."""
        key = (tp, dtype.name)
        if key not in self._cache:
            schemes = engine_schemes(self.config, dtype)
            self._cache[key] = self._split(shard.parameter_bytes(self.config, tp, 0, element_bytes(dtype), schemes))
        return self._cache[key]

    def rank_elements(self, tp: int) -> RankElements:
        if tp not in self._cache:  # one byte an element counts elements
            self._cache[tp] = self._split(shard.parameter_bytes(self.config, tp, 0, 1))
        return self._cache[tp]

    def _split(self, by_module: dict[str, int]) -> RankElements:
        """Module name -> amount (elements or bytes) as embedding, one decoder layer, and the rest (norm, head)."""
        embed = layers = head = experts = 0
        for name, n in by_module.items():
            if name.startswith("model.layers."):
                layers += n
                experts += n if ".experts." in name else 0
            elif name == "model.embed_tokens":
                embed += n
            else:
                head += n
        num_layers = self.config.num_hidden_layers
        tied = embed if self.config.tie_word_embeddings else 0
        # Layers of one model have equal sizes, except Qwen-MoE's dense mlp_only_layers: then a layer counts as the
        # largest (every stage's figure an upper bound).
        per_layer = -(-layers // num_layers)
        return RankElements(embed, per_layer, head, tied, -(-experts // num_layers))


def engine_schemes(config: ModelConfig, dtype: DType) -> dict | None:
    """The projections' formats the engine uses for a quantized dtype (its --quantization), or None."""
    if dtype.quantization is None:
        return None
    from tpinfer.parallel.plan import quantized_projections
    from tpinfer.quant.formats import parse

    return quantized_projections(config, parse(dtype.quantization))


def element_bytes(dtype: DType) -> int:
    """Bytes of each float parameter: the dtype's own, or the compute dtype's beside quantized projections."""
    return dtype.compute_bytes if dtype.quantization else int(dtype.weight_bytes)


def per_rank_weight_bytes(config: ModelConfig, tp: int, dtype: str, rank: int = 0) -> int:
    """Bytes of weights ``rank`` allocates at tensor-parallel size ``tp`` (pp=1), vocabulary padding included.

    The one number the engine's allocation must match byte for byte: it is ``shard.rank_parameter_bytes``, with
    the engine's quantized formats for int8, int4 and fp8.
    """
    d = get_dtype(dtype)
    return shard.rank_parameter_bytes(config, tp, rank, element_bytes(d), engine_schemes(config, d))


def rank_bytes(model: ModelSpec, tp: int, dtype: DType) -> RankElements:
    """What one rank stores, in bytes, split as ``rank_elements`` splits elements."""
    if isinstance(model, EngineModel):
        return model.rank_bytes(tp, dtype)
    e, b = model.rank_elements(tp), dtype.weight_bytes
    return RankElements(round(e.embed * b), round(e.layer * b), round(e.head * b), round(e.tied_head * b),
                        round(e.experts * b))


def expert_fraction_read(model: ModelSpec, batch: int) -> float:
    """Expected share of a layer's experts a decode step reads: batch tokens each routed to top-k of E experts.

    1 - (1 - k/E)^batch, assuming uniform routing; 1.0 for a dense model.
    """
    if not model.num_local_experts:
        return 1.0
    return 1.0 - (1.0 - model.num_experts_per_tok / model.num_local_experts) ** batch


def stage_elements(elements: RankElements, layers: tuple[int, ...], stage: int) -> int:
    """Parameter elements one rank of pipeline ``stage`` holds."""
    n = elements.layer * layers[stage]
    if stage == 0:
        n += elements.embed
    if stage == len(layers) - 1:
        n += elements.head
        if len(layers) > 1:
            n += elements.tied_head
    return n


def tp_failure_reason(model: ModelSpec, tp: int) -> str | None:
    """Why ``tp`` cannot shard ``model`` (the engine's own rule, for catalogue-only models too)."""
    return shard.tp_failure_reason(model, tp)  # type: ignore[arg-type]  # reads only the three head/FFN sizes


def valid_tp_sizes(model: ModelSpec) -> list[int]:
    return shard.valid_tp_sizes(model)  # type: ignore[arg-type]


def reason_kind(reason: str) -> str:
    """The constraint a failure reason names: heads, kv_heads, ffn or other."""
    if "KV heads" in reason:
        return "kv_heads"
    if "attention heads" in reason:
        return "heads"
    if "intermediate_size" in reason:
        return "ffn"
    return "other"


def local_kv_heads(model: ModelSpec, tp: int) -> int:
    return shard.kv_head_range(model.num_key_value_heads, 0, tp)[1]


def kv_replication(model: ModelSpec, tp: int) -> int:
    """How many ranks hold a copy of each KV head (1 unless tp exceeds the KV head count)."""
    return max(1, tp // model.num_key_value_heads)


def kv_bytes_per_token_per_layer(model: ModelSpec, tp: int, bytes_per_element: int) -> int:
    """K and V of one token in one layer on one rank (the engine's formula, divided by the layer count)."""
    per_token = shard.kv_cache_bytes_per_token(model, tp, 0, bytes_per_element)  # type: ignore[arg-type]
    return per_token // model.num_hidden_layers

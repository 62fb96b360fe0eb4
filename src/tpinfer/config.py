"""Model configuration read from a Hugging Face ``config.json``.

Field names are the HF keys. The family of ``model_type`` (``tpinfer.models``) reads the keys it uses, with the
helpers below for what families share (rope in both the transformers-4 and transformers-5 spellings, layer types,
sliding windows), and refuses by name what it cannot run. Derived values are properties. ``validate(tp)`` is the
one place that decides whether a tensor-parallel size can shard this model under the family's "auto" plan.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

FULL, SLIDING = "full_attention", "sliding_attention"
LAYER_TYPES = (FULL, SLIDING)

# Keys each rope type needs beyond rope_type and rope_theta (HF's names); optional keys are taken when present.
ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}
SUPPORTED_ROPE_TYPES = tuple(ROPE_REQUIRED)
# Config keys that mean a feature no tpinfer family implements; a checkpoint setting them is refused by name.
UNSUPPORTED_KEYS = {
    "num_local_experts": "mixture-of-experts layers",
    "num_experts": "mixture-of-experts layers",
    "attention_chunk_size": "chunked attention",
    "use_bidirectional_attention": "bidirectional attention",
}


class ConfigError(ValueError):
    """A config.json that tpinfer cannot run, with the reason."""


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-12  # an encoder's LayerNorms (BERT)
    type_vocab_size: int = 0  # an encoder's token types (BERT's segments A and B); 0: none
    position_offset: int = 0  # an encoder's first position id (RoBERTa's padding_idx + 1); 0 for BERT
    # Layer type ("full_attention", "sliding_attention") -> HF rope parameters: rope_type, rope_theta, and the
    # type's own keys (factor, ...); partial_rotary_factor when the family rotates part of each head.
    rope_parameters: dict[str, dict[str, Any]] = field(default_factory=lambda: {FULL: {"rope_type": "default",
                                                                                        "rope_theta": 10000.0}})
    layer_types: tuple[str, ...] = ()  # one per layer; empty means every layer is full attention
    sliding_window: int | None = None  # keys a sliding-attention layer sees: the last sliding_window positions
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (Gemma); None: head_dim ** -0.5
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = field(default_factory=tuple)
    # Mixture of experts (tpinfer.models.moe): experts per MoE layer, experts each token routes to, each expert's
    # FFN width, a shared expert's width (0: none), whether the top-k routing weights are renormalised to sum to 1,
    # and which layers are MoE layers (the others are dense MLPs of intermediate_size).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[int, ...] = ()
    name: str = ""

    @classmethod
    def from_dict(cls, raw: dict[str, Any], name: str = "") -> ModelConfig:
        from tpinfer.models import family_for

        family = family_for(raw.get("model_type"))
        for key, what in UNSUPPORTED_KEYS.items():
            if raw.get(key) and not (family.expert_plan is not None and "experts" in key):
                raise ConfigError(f"{key}={raw[key]!r}: {what} are not supported by tpinfer's {family.name} family")
        config = cls(**family.read_config(raw), name=name)
        config.check_shapes()
        return config

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.suffix == ".gguf":  # config from the file's metadata
            from tpinfer.loading.gguf import gguf_config

            try:
                return cls.from_dict(gguf_config(path), name=path.stem)
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc}") from None
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise ConfigError(f"no config.json in {path}")
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{config_file} is not valid JSON: {exc}") from exc
        try:
            return cls.from_dict(raw, name=config_file.parent.name)
        except ConfigError as exc:
            raise ConfigError(f"{config_file}: {exc}") from None

    def check_shapes(self) -> None:
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim",
                  "num_attention_heads", "num_key_value_heads"):
            if getattr(self, f) <= 0:
                raise ConfigError(f"{f} must be positive, got {getattr(self, f)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ConfigError("layer_types has sliding_attention layers but sliding_window is not set")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["eos_token_id"] = list(self.eos_token_id)
        out["layer_types"] = list(self.layer_types)
        return out

    @property
    def family(self):  # noqa: ANN201  (tpinfer.models.family.Family; imported lazily, it brings torch)
        from tpinfer.models import family_for

        return family_for(self.model_type)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters[FULL]["rope_theta"])

    @property
    def rope_scaling(self) -> dict[str, Any] | None:
        """The full-attention layers' rope scaling (transformers-4 shape), None for the default rope."""
        params = self.rope_parameters[FULL]
        if params["rope_type"] == "default":
            return None
        return {k: v for k, v in params.items() if k != "rope_theta"}

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_type(self, layer: int) -> str:
        return self.layer_types[layer] if self.layer_types else FULL

    def window(self, layer: int) -> int | None:
        """How many of the latest positions layer ``layer`` attends (None: all of them)."""
        return self.sliding_window if self.layer_type(layer) == SLIDING else None

    @property
    def num_parameters(self) -> int:
        from tpinfer.parallel.shard import numel, parameter_shapes

        return sum(numel(shape) for shape in parameter_shapes(self, tp=1, rank=0, padded=False).values())

    def validate(self, tp: int) -> None:
        """Raise ConfigError naming the numbers if ``tp`` cannot shard this model."""
        from tpinfer.parallel.shard import tp_failure_reason, valid_tp_sizes

        reason = tp_failure_reason(self, tp)
        if reason:
            sizes = ", ".join(str(s) for s in valid_tp_sizes(self))
            raise ConfigError(f"{reason}; valid sizes for this model: {sizes}")


# Helpers for the families' readers ------------------------------------------------------------------------------

def require(raw: dict[str, Any], *keys: str) -> None:
    missing = [key for key in keys if key not in raw or raw[key] is None]
    if missing:
        raise ConfigError(f"config is missing {', '.join(missing)}")


def eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list | tuple) else (int(value),)


def decoder_fields(raw: dict[str, Any], *, head_dim: int | None = None, hidden_act_key: str = "hidden_act",
                   supported_acts: tuple[str, ...] = ("silu",)) -> dict[str, Any]:
    """The fields every decoder family reads, under their HF names."""
    require(raw, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    heads = int(raw["num_attention_heads"])
    act = raw.get(hidden_act_key) or supported_acts[0]
    if act not in supported_acts:
        raise ConfigError(f"{hidden_act_key} {act!r} is not supported; supported: {', '.join(supported_acts)}")
    return {
        "model_type": raw["model_type"],
        "vocab_size": int(raw["vocab_size"]),
        "hidden_size": int(raw["hidden_size"]),
        "intermediate_size": int(raw["intermediate_size"]),
        "num_hidden_layers": int(raw["num_hidden_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(raw.get("num_key_value_heads") or heads),
        "head_dim": int(head_dim or raw.get("head_dim") or int(raw["hidden_size"]) // heads),
        "max_position_embeddings": int(raw.get("max_position_embeddings") or 4096),
        "rms_norm_eps": float(raw.get("rms_norm_eps", 1e-6)),
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
        "attention_bias": bool(raw.get("attention_bias", False)),
        "mlp_bias": bool(raw.get("mlp_bias", False)),
        "hidden_act": act,
        "torch_dtype": raw.get("torch_dtype") or raw.get("dtype"),
        "bos_token_id": raw.get("bos_token_id"),
        "eos_token_id": eos_ids(raw.get("eos_token_id")),
    }


def read_rope(raw: dict[str, Any], layer_types: tuple[str, ...], *, default_theta: float = 10000.0,
              local_theta: float | None = None, original_max: int | None = None,
              partial_rotary: bool = False) -> dict[str, dict[str, Any]]:
    """Rope parameters per layer type, from transformers-5 ``rope_parameters`` (flat, or nested by layer type) or
    transformers-4 ``rope_theta`` + ``rope_scaling``; checked against the supported types and their keys.

    ``local_theta``: the sliding layers' own theta when the checkpoint spells it apart (Gemma 3's
    ``rope_local_base_freq``); transformers-4 ``rope_scaling`` then applies to full-attention layers only.
    ``original_max``: a family-level original_max_position_embeddings that wins over the rope dict's (Phi-3)."""
    types = tuple(dict.fromkeys(layer_types or (FULL,)))
    given = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    for key, value in (("rope_parameters", given), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be an object, got {value!r}")
    theta = raw.get("rope_theta", default_theta)
    if any(key in LAYER_TYPES for key in given):  # nested by layer type; rope_scaling, if any, is the global one's
        per_type = {t: dict(given.get(t) or {"rope_type": "default"}) for t in types}
        if scaling and FULL in per_type:
            per_type[FULL].update(scaling)
    else:  # one dict for every layer type; as in HF, a transformers-4 rope_scaling wins over rope_parameters
        per_type = {t: dict(scaling or given) for t in types}
        if local_theta is not None and SLIDING in per_type:
            per_type[SLIDING] = {"rope_theta": local_theta}
    for layer_type, params in per_type.items():
        params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
        params.pop("type", None)
        params.setdefault("rope_theta", theta)
        params["rope_theta"] = float(params["rope_theta"])
        if "partial_rotary_factor" in raw:
            params.setdefault("partial_rotary_factor", raw["partial_rotary_factor"])
        kind = params["rope_type"]
        if kind not in ROPE_REQUIRED:
            raise ConfigError(f"rope type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if kind in ("llama3", "yarn", "longrope"):
            if original_max is not None:
                params["original_max_position_embeddings"] = original_max
            params.setdefault("original_max_position_embeddings",
                              raw.get("original_max_position_embeddings") or raw.get("max_position_embeddings"))
        missing = [k for k in ROPE_REQUIRED[kind] if params.get(k) is None]
        if missing:
            raise ConfigError(f"rope type {kind!r} ({layer_type}) is missing {', '.join(missing)}")
        factor = float(params.get("partial_rotary_factor", 1.0))
        if factor != 1.0 and not partial_rotary:
            raise ConfigError(f"partial_rotary_factor={factor} is not supported by this family (it rotates whole heads)")
    return per_type


def read_layer_types(raw: dict[str, Any], num_layers: int, default: list[str] | None = None) -> tuple[str, ...]:
    """``layer_types`` as the checkpoint gives it, else ``default``; only full and sliding attention run here."""
    given = raw.get("layer_types") or default or []
    for kind in given:
        if kind not in LAYER_TYPES:
            raise ConfigError(f"layer type {kind!r} is not supported; supported: {', '.join(LAYER_TYPES)}")
    if given and len(given) != num_layers:
        raise ConfigError(f"layer_types has {len(given)} entries for {num_layers} layers")
    return tuple(given) if SLIDING in given else ()

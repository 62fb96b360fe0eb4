"""Well-known architectures as config data; parameter counts are computed from them, never typed in.

Entries of the engine's families (llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3) are the HF
``config.json`` shape keys, read by ``ModelConfig.from_dict`` exactly like a user's file. The others are ``Architecture`` descriptions. ``load_model`` takes a catalogue name (any case,
with or without the HF organisation) or a directory holding ``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tpinfer.config import ModelConfig
from tpinfer.planner.architecture import PLANNER_ONLY_TYPES, Architecture, architecture_from_hf
from tpinfer.planner.model import EngineModel, ModelSpec

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

LLAMA32 = {"rope_theta": 500000.0, "rope_scaling": {**LLAMA3_ROPE, "factor": 32.0}, "tie_word_embeddings": True}


def _llama(vocab: int, hidden: int, ffn: int, layers: int, heads: int, kv: int, max_pos: int, **extra: Any) -> dict:
    """HF config.json keys of a Llama: the seven shape numbers in this order, any other key by name."""
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "max_position_embeddings": max_pos,
        "hidden_act": "silu",
        **extra,
    }


def _gemma(vocab: int, hidden: int, ffn: int, layers: int, heads: int, kv: int, max_pos: int, **extra: Any) -> dict:
    """HF config.json keys of a Gemma 3 text model (Gemma 2 entries override model_type)."""
    return {**_llama(vocab, hidden, ffn, layers, heads, kv, max_pos), "model_type": "gemma3_text",
            "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True, **extra}


def _moe(vocab: int, hidden: int, ffn: int, layers: int, heads: int, kv: int, max_pos: int) -> dict:
    """HF config.json keys of a Mixtral: Mistral attention, 8 SwiGLU experts per layer, 2 active per token, and a
    router; counted by the engine's own declaration (``tpinfer.models.moe``)."""
    return {**_llama(vocab, hidden, ffn, layers, heads, kv, max_pos, rope_theta=1e6), "model_type": "mixtral",
            "num_local_experts": 8, "num_experts_per_tok": 2}


# name -> (HF ids it is published under, HF config keys or an Architecture)
CATALOGUE: dict[str, tuple[tuple[str, ...], dict[str, Any] | Architecture]] = {
    "tinyllama-1.1b": (
        ("TinyLlama/TinyLlama-1.1B-Chat-v1.0",),
        _llama(32000, 2048, 5632, 22, 32, 4, 2048, rms_norm_eps=1e-5),
    ),
    "llama-2-7b": (
        ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf"),
        _llama(32000, 4096, 11008, 32, 32, 32, 4096),
    ),
    "llama-2-13b": (
        ("meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-13b-chat-hf"),
        _llama(32000, 5120, 13824, 40, 40, 40, 4096),
    ),
    "llama-2-70b": (
        ("meta-llama/Llama-2-70b-hf", "meta-llama/Llama-2-70b-chat-hf"),
        _llama(32000, 8192, 28672, 80, 64, 8, 4096),
    ),
    "codellama-34b": (("codellama/CodeLlama-34b-hf",), _llama(32000, 8192, 22016, 48, 64, 8, 16384, rope_theta=1e6)),
    "llama-3-8b": (
        ("meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct"),
        _llama(128256, 4096, 14336, 32, 32, 8, 8192, rope_theta=500000.0),
    ),
    "llama-3-70b": (
        ("meta-llama/Meta-Llama-3-70B", "meta-llama/Meta-Llama-3-70B-Instruct"),
        _llama(128256, 8192, 28672, 80, 64, 8, 8192, rope_theta=500000.0),
    ),
    "llama-3.1-8b": (
        ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Meta-Llama-3.1-8B"),
        _llama(128256, 4096, 14336, 32, 32, 8, 131072, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    ),
    "llama-3.1-70b": (
        ("meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-70B-Instruct", "meta-llama/Meta-Llama-3.1-70B"),
        _llama(128256, 8192, 28672, 80, 64, 8, 131072, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    ),
    "llama-3.1-405b": (
        # The seeds call it "Llama-3-405B"; only the 3.1 release has a 405B model.
        ("meta-llama/Llama-3.1-405B", "meta-llama/Llama-3.1-405B-Instruct", "llama-3-405b"),
        _llama(128256, 16384, 53248, 126, 128, 8, 131072, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    ),
    "llama-3.2-1b": (
        ("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct"),
        _llama(128256, 2048, 8192, 16, 32, 8, 131072, head_dim=64, **LLAMA32),
    ),
    "llama-3.2-3b": (
        ("meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct"),
        _llama(128256, 3072, 8192, 28, 24, 8, 131072, head_dim=128, **LLAMA32),
    ),
    "mistral-7b": (
        ("mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.2"),
        {**_llama(32000, 4096, 14336, 32, 32, 8, 32768), "model_type": "mistral"},
    ),
    "qwen2-7b": (
        ("Qwen/Qwen2-7B", "Qwen/Qwen2-7B-Instruct"),
        {**_llama(152064, 3584, 18944, 28, 28, 4, 32768, rope_theta=1e6, rms_norm_eps=1e-6), "model_type": "qwen2"},
    ),
    "qwen2-72b": (
        ("Qwen/Qwen2-72B", "Qwen/Qwen2-72B-Instruct"),
        {**_llama(152064, 8192, 29568, 80, 64, 8, 32768, rope_theta=1e6, rms_norm_eps=1e-6), "model_type": "qwen2"},
    ),
    "qwen3-8b": (
        ("Qwen/Qwen3-8B",),
        {**_llama(151936, 4096, 12288, 36, 32, 8, 40960, head_dim=128, rope_theta=1e6), "model_type": "qwen3"},
    ),
    "qwen3-32b": (
        ("Qwen/Qwen3-32B",),
        {**_llama(151936, 5120, 25600, 64, 64, 8, 40960, head_dim=128, rope_theta=1e6), "model_type": "qwen3"},
    ),
    "gemma-2-9b": (
        ("google/gemma-2-9b", "google/gemma-2-9b-it"),
        {**_gemma(256000, 3584, 14336, 42, 16, 8, 8192, head_dim=256, query_pre_attn_scalar=256), "model_type": "gemma2"},
    ),
    "gemma-2-27b": (
        ("google/gemma-2-27b", "google/gemma-2-27b-it"),
        {**_gemma(256000, 4608, 36864, 46, 32, 16, 8192, head_dim=128, query_pre_attn_scalar=144),
         "model_type": "gemma2"},
    ),
    "gemma-3-1b": (
        ("google/gemma-3-1b-pt", "google/gemma-3-1b-it"),
        _gemma(262144, 1152, 6912, 26, 4, 1, 32768, head_dim=256, query_pre_attn_scalar=256, sliding_window=512),
    ),
    "gemma-3-27b": (
        ("google/gemma-3-27b-pt", "google/gemma-3-27b-it"),  # the text model of the multimodal checkpoint
        _gemma(262208, 5376, 21504, 62, 32, 16, 131072, head_dim=128, query_pre_attn_scalar=168, sliding_window=1024,
               rope_scaling={"rope_type": "linear", "factor": 8.0}),
    ),
    "phi-3-mini-4k": (
        ("microsoft/Phi-3-mini-4k-instruct",),
        {**_llama(32064, 3072, 8192, 32, 32, 32, 4096, sliding_window=2047, original_max_position_embeddings=4096),
         "model_type": "phi3"},
    ),
    "mixtral-8x7b": (
        ("mistralai/Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x7B-Instruct-v0.1"),
        _moe(vocab=32000, hidden=4096, ffn=14336, layers=32, heads=32, kv=8, max_pos=32768),
    ),
    "mixtral-8x22b": (
        ("mistralai/Mixtral-8x22B-v0.1", "mistralai/Mixtral-8x22B-Instruct-v0.1"),
        _moe(vocab=32768, hidden=6144, ffn=16384, layers=56, heads=48, kv=8, max_pos=65536),
    ),
    "opt-175b": (
        ("facebook/opt-175b",),
        # MHA with biases, learned positions (2048 + OPT's offset of 2), GELU FFN of 4 x hidden,
        # LayerNorm weight + bias, lm_head tied to the token embedding.
        Architecture(
            name="opt-175b",
            model_type="opt",
            vocab_size=50272,
            hidden_size=12288,
            intermediate_size=4 * 12288,
            num_hidden_layers=96,
            num_attention_heads=96,
            num_key_value_heads=96,
            head_dim=128,
            max_position_embeddings=2048,
            gated_mlp=False,
            attention_bias=True,
            mlp_bias=True,
            norm_bias=True,
            learned_positions=2048 + 2,
            tie_word_embeddings=True,
        ),
    ),
}


def _normalise(name: str) -> str:
    key = name.strip().lower().rsplit("/", 1)[-1]
    return key.removeprefix("meta-")


def _index() -> dict[str, str]:
    index: dict[str, str] = {}
    for name, (aliases, _) in CATALOGUE.items():
        for alias in (name, *aliases):
            index[_normalise(alias)] = name
    return index


def catalogue_names() -> list[str]:
    return list(CATALOGUE)


def catalogue_model(name: str) -> ModelSpec:
    """The catalogue entry ``name`` (case-insensitive, HF ids accepted); ValueError lists the catalogue."""
    key = _index().get(_normalise(name))
    if key is None:
        raise ValueError(
            f"unknown model {name!r}: not a directory with config.json nor a catalogue name; "
            f"catalogue: {', '.join(CATALOGUE)}"
        )
    entry = CATALOGUE[key][1]
    if isinstance(entry, Architecture):
        return entry
    return EngineModel(ModelConfig.from_dict(entry, name=key), name=key)


def load_model(name_or_dir: str | Path) -> ModelSpec:
    """A model from a directory (or file) with an HF config.json, else from the catalogue."""
    path = Path(name_or_dir)
    if path.is_dir() or path.suffix == ".json":
        config_file = path / "config.json" if path.is_dir() else path
        if config_file.is_file():
            raw = json.loads(config_file.read_text())
            if raw.get("model_type") in PLANNER_ONLY_TYPES:
                return architecture_from_hf(raw, name=config_file.parent.name)
        config = ModelConfig.from_pretrained(path)  # raises ConfigError naming what is wrong
        return EngineModel(config, name=config.name or path.name)
    return catalogue_model(str(name_or_dir))

"""Each family's declaration against HF's own classes, and the arithmetic read from it (one process)."""

import pytest
import torch

from helpers import VARIANTS, hf_model
from tpinfer.config import ModelConfig
from tpinfer.engine.kv_cache import KVCache
from tpinfer.models import SUPPORTED_MODEL_TYPES, family_for
from tpinfer.models.rope import inv_freq
from tpinfer.parallel.plan import PlanError, resolve_plan
from tpinfer.parallel.shard import kv_cache_bytes, kv_cache_lengths, parameter_shapes, shape_notes, valid_tp_sizes


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_declared_shapes_are_hf_state_dict_shapes(checkpoints, variant):
    config = ModelConfig.from_pretrained(checkpoints[variant])
    if config.num_experts:
        # transformers 5 holds a layer's experts as fused 3-D tensors in memory, and saves them one tensor per expert
        # projection (the hub's layout, the one tpinfer reads): compare with what it saved.
        from safetensors import safe_open

        state = {}
        for file in checkpoints[variant].glob("*.safetensors"):
            with safe_open(file, "pt") as f:
                state |= {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    else:
        state = {k: tuple(v.shape) for k, v in hf_model(checkpoints[variant]).state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as the embedding
    assert parameter_shapes(config, 1, 0, padded=False) == state


def test_every_model_type_has_a_family_that_declares_it():
    for model_type in SUPPORTED_MODEL_TYPES:
        assert model_type in family_for(model_type).model_types


def test_single_kv_head_is_replicated_and_packed_qkv_splits_each_part(checkpoints):
    gemma = ModelConfig.from_pretrained(checkpoints["gemma2"])  # 8 heads, 1 KV head
    assert valid_tp_sizes(gemma) == [1, 2, 4, 8]
    k = parameter_shapes(gemma, 4, 3)["model.layers.0.self_attn.k_proj.weight"]
    assert k == (gemma.head_dim, gemma.hidden_size)  # every rank holds the one KV head
    phi = ModelConfig.from_pretrained(checkpoints["phi3"])  # 4 heads of 16, 2 KV heads: [64 | 32 | 32] rows
    assert parameter_shapes(phi, 2, 1)["model.layers.1.self_attn.qkv_proj.weight"] == (32 + 16 + 16, 64)
    assert parameter_shapes(phi, 2, 0)["model.layers.0.mlp.gate_up_proj.weight"] == (2 * 64, 64)
    assert shape_notes(phi)["model.layers.0.self_attn.qkv_proj.weight"] == (
        "rows: 64 (attention heads) + 32 (KV heads) + 32 (KV heads)")
    with pytest.raises(PlanError, match="4 attention heads are not divisible by tp=3; valid sizes for this model: 1, 2, 4"):
        resolve_plan(phi, 3)


def test_a_packed_plan_keeps_its_pairs():
    config = ModelConfig.from_dict({"model_type": "phi3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                                    "num_hidden_layers": 1, "num_attention_heads": 4})
    with pytest.raises(PlanError, match="qkv_proj is colwise but model.layers.0.self_attn.o_proj is replicate"):
        resolve_plan(config, 2, {"model.layers.*.self_attn.qkv_proj": "colwise"})
    plan = resolve_plan(config, 2, {"model.layers.*.mlp.gate_up_proj": "colwise", "model.layers.*.mlp.down_proj": "rowwise"})
    assert plan.strategy("model.layers.0.self_attn.qkv_proj") == "replicate"


@pytest.mark.parametrize("variant", ["gemma2", "gemma3_text", "qwen3", "mistral-window", "llama"])
def test_sliding_layers_keep_a_ring_and_the_bytes_say_so(checkpoints, variant):
    config = ModelConfig.from_pretrained(checkpoints[variant])
    lengths = kv_cache_lengths(config, 64)
    windows = [config.window(i) for i in range(config.num_hidden_layers)]
    assert lengths == [w if w is not None else 64 for w in windows]
    heads = config.num_key_value_heads
    cache = KVCache(lengths, 3, heads, 64, config.head_dim, torch.float32, torch.device("cpu"))
    assert cache.nbytes == kv_cache_bytes(config, 1, 0, 3, 64, 4)
    assert cache.ring == [w for w in windows]


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16, "mscale": 1.0,
     "mscale_all_dim": 0.5},
])
@pytest.mark.parametrize("seq_len", [None, 100, 1000])
def test_rope_frequencies_are_hf_bit_for_bit(scaling, seq_len):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    raw = {"model_type": "llama", "vocab_size": 10, "hidden_size": 128, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 2, "max_position_embeddings": 256, "rope_theta": 50000.0, "rope_scaling": scaling}
    ours = ModelConfig.from_dict(raw)
    hf = LlamaConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    want, want_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf, torch.device("cpu"), seq_len=seq_len)
    got, got_scale = inv_freq(ours.rope_parameters["full_attention"], ours.head_dim, ours.max_position_embeddings,
                              seq_len=seq_len)
    assert torch.equal(got, want) and got_scale == want_scale


@pytest.mark.parametrize("seq_len", [None, 20, 30])
def test_longrope_frequencies_are_hf_bit_for_bit(seq_len):
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    raw = {"model_type": "phi3", "vocab_size": 10, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 4, "max_position_embeddings": 256, "original_max_position_embeddings": 24,
           "partial_rotary_factor": 0.75,
           "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                            "long_factor": [1.5, 2.0, 3.0, 4.5, 6.0, 9.0]}}
    ours = ModelConfig.from_dict(raw)
    hf = Phi3Config(**{k: v for k, v in raw.items() if k != "model_type"})
    want, want_scale = ROPE_INIT_FUNCTIONS["longrope"](hf, torch.device("cpu"), seq_len=seq_len)
    got, got_scale = inv_freq(ours.rope_parameters["full_attention"], ours.head_dim, ours.max_position_embeddings,
                              seq_len=seq_len)
    assert torch.equal(got, want) and got_scale == want_scale


def test_a_window_too_long_for_a_ring_masks_a_full_cache(checkpoints):
    config = ModelConfig.from_pretrained(checkpoints["mistral-long-window"])  # window 24
    assert kv_cache_lengths(config, 48) == [24, 24]  # half the context or less: a ring
    assert kv_cache_lengths(config, 40) == [40, 40]  # a ring would save 16 positions of 40: masked instead
    windows = [config.window(i) for i in range(config.num_hidden_layers)]
    cache = KVCache(kv_cache_lengths(config, 40), 1, 2, 40, config.head_dim, torch.float32, torch.device("cpu"),
                    windows)
    assert cache.ring == [None, None] and cache.window == [24, 24]

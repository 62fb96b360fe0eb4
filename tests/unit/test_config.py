import json

import pytest

from tpinfer.config import ConfigError, ModelConfig

LLAMA = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 8}


def test_defaults_and_derived_values():
    c = ModelConfig.from_dict(LLAMA)
    assert c.num_key_value_heads == 8 and c.head_dim == 8 and c.q_size == 64 and not c.attention_bias


def test_explicit_head_dim_gqa_and_eos_list():
    c = ModelConfig.from_dict({**LLAMA, "num_key_value_heads": 2, "head_dim": 16, "eos_token_id": [5, 6]})
    assert c.head_dim == 16 and c.q_size == 128 and c.kv_size == 32 and c.eos_token_id == (5, 6)


def test_qwen2_has_qkv_bias():
    assert ModelConfig.from_dict({**LLAMA, "model_type": "qwen2"}).attention_bias


@pytest.mark.parametrize(
    "raw",
    [
        {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
        {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    ],
    ids=["transformers-v4", "transformers-v5"],
)
def test_rope_scaling_in_both_config_formats(raw):
    c = ModelConfig.from_dict({**LLAMA, **raw})
    assert c.rope_theta == 5e5 and c.rope_scaling["rope_type"] == "llama3" and c.rope_scaling["factor"] == 8.0


def test_unsupported_model_type_lists_supported():
    with pytest.raises(ConfigError, match="'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3, gemma2, "
                                          "gemma3_text, phi3"):
        ModelConfig.from_dict({**LLAMA, "model_type": "gpt2"})


def test_unsupported_rope_type_lists_supported():
    with pytest.raises(ConfigError, match="'mrope' is not supported; supported: default, linear, dynamic, llama3, "
                                          "yarn, longrope"):
        ModelConfig.from_dict({**LLAMA, "rope_scaling": {"rope_type": "mrope", "factor": 2.0}})


def test_missing_and_invalid_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="missing vocab_size"):
        ModelConfig.from_pretrained(tmp_path)


def test_validate_names_numbers_and_valid_sizes():
    c = ModelConfig.from_dict({**LLAMA, "num_key_value_heads": 4})
    with pytest.raises(ConfigError, match=r"8 attention heads are not divisible by tp=3; valid sizes for this model: 1, 2, 4, 8"):
        c.validate(3)
    c.validate(8)  # 4 KV heads replicated twice


GEMMA3 = {"model_type": "gemma3_text", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
          "sliding_window": 32}


def test_gemma3_rope_in_both_config_formats_and_its_layer_pattern():
    v4 = ModelConfig.from_dict({**GEMMA3, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                                "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    v5 = ModelConfig.from_dict({**GEMMA3, "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}})
    assert v4.rope_parameters == v5.rope_parameters
    assert v4.rope_parameters["sliding_attention"] == {"rope_type": "default", "rope_theta": 1e4}
    # one global layer in six, the rest sliding; the window applies to sliding layers only
    assert [v4.window(i) for i in range(7)] == [32, 32, 32, 32, 32, None, 32]
    assert v4.attention_scale == 256**-0.5 and v4.final_logit_softcapping is None and v4.tie_word_embeddings


def test_gemma2_defaults_alternate_layers_and_cap_logits():
    c = ModelConfig.from_dict({**GEMMA3, "model_type": "gemma2", "num_hidden_layers": 4})
    assert c.layer_types == ("sliding_attention", "full_attention") * 2
    assert (c.attn_logit_softcapping, c.final_logit_softcapping) == (50.0, 30.0)


def test_qwen_sliding_window_only_when_asked_and_from_max_window_layers():
    base = {**LLAMA, "model_type": "qwen2", "num_hidden_layers": 4, "sliding_window": 16, "max_window_layers": 2}
    assert ModelConfig.from_dict(base).layer_types == ()  # use_sliding_window is off: every layer is global
    c = ModelConfig.from_dict({**base, "use_sliding_window": True})
    assert [c.window(i) for i in range(4)] == [None, None, 16, 16]
    mistral = ModelConfig.from_dict({**LLAMA, "model_type": "mistral", "sliding_window": 16})
    assert all(mistral.window(i) == 16 for i in range(2))


def test_phi3_reads_longrope_in_old_and_new_names():
    raw = {**LLAMA, "model_type": "phi3", "original_max_position_embeddings": 32, "partial_rotary_factor": 0.5,
           "rope_scaling": {"type": "su", "short_factor": [1.0, 1.0], "long_factor": [2.0, 2.0]}}
    params = ModelConfig.from_dict(raw).rope_parameters["full_attention"]
    assert params["rope_type"] == "longrope" and params["original_max_position_embeddings"] == 32
    assert params["partial_rotary_factor"] == 0.5


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported; supported: silu"),
        ({"num_local_experts": 8}, "num_local_experts=8: mixture-of-experts layers are not supported"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported by this family"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope type 'llama3' .* is missing low_freq_factor"),
        ({"model_type": "gemma3_text", "layer_types": ["chunked_attention", "full_attention"]},
         "layer type 'chunked_attention' is not supported"),
        ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "bidirectional attention"),
        ({"model_type": "gemma3"}, "multimodal Gemma 3 checkpoint"),
        ({"model_type": "gemma2", "hidden_activation": "relu"}, "hidden_activation 'relu' is not supported"),
    ],
)
def test_unsupported_variants_are_refused_by_name(raw, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**LLAMA, **raw})


def test_config_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "rope_scaling": {"rope_type": "nope"}}))
    with pytest.raises(ConfigError, match=r"config.json: rope type 'nope' is not supported"):
        ModelConfig.from_pretrained(tmp_path)


def test_max_model_len_past_the_context_only_for_dynamic_rope():
    from tpinfer.engine.runtime import max_model_len

    plain = ModelConfig.from_dict({**LLAMA, "max_position_embeddings": 128})
    assert max_model_len(plain, None) == 128 and max_model_len(plain, 100) == 100
    with pytest.raises(ConfigError, match="max_model_len 200 exceeds the model's context of 128 tokens"):
        max_model_len(plain, 200)
    dynamic = ModelConfig.from_dict({**LLAMA, "max_position_embeddings": 128,
                                     "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    assert max_model_len(dynamic, 512) == 512

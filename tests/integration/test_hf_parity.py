"""TP=1 reproduces HF transformers' own model classes on the same weights: every family and rope variant."""

import pytest
import torch

from helpers import hf_model
from tpinfer.engine.runtime import EngineSpec, load_engine
from tpinfer.engine.sampling import SamplingParams
from tpinfer.parallel.context import ParallelContext

# Different lengths in one batch (padding must not leak between rows); the 20-token prompt runs past the sliding
# windows (8), the dynamic rope's max_position_embeddings (24) and Phi-3's original length (24, where its cache is
# recomputed with the long rope factors) while the others have not.
PROMPTS = [[1, 17, 29, 33, 41, 52, 60, 71, 80], [1, 200, 13], [1, 5, 99, 140, 7, 7], list(range(3, 23))]
NEW = 16
VARIANTS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "llama-yarn", "llama-dynamic",
            "mistral-window", "mistral-long-window"]
MAX_MODEL_LEN = {"llama-dynamic": 64, "mistral-long-window": 40}


@pytest.mark.parametrize("variant", VARIANTS)
def test_tp1_matches_hf_tokens_and_logprobs(checkpoints, variant):
    import transformers

    path = checkpoints[variant]
    # The dynamic rope runs past max_position_embeddings (24 here); a window of 24 in 40 positions is masked in a full
    # cache rather than kept in a ring.
    engine = load_engine(EngineSpec(str(path), max_model_len=MAX_MODEL_LEN.get(variant)), ParallelContext.single())
    assert (engine.generator.cache.window[0] is not None) == (variant == "mistral-long-window")
    outputs = engine.generator.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, temperature=0, ignore_eos=True))
    hf = hf_model(path)
    greedy = transformers.GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=[], pad_token_id=0)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), generation_config=greedy, output_logits=True,
                              return_dict_in_generate=True)
        ref_tokens = ref.sequences[0, len(prompt):].tolist()
        assert out.token_ids == ref_tokens
        ref_logprobs = torch.stack([s[0].float().log_softmax(-1)[t] for s, t in zip(ref.logits, ref_tokens, strict=True)])
        # float32 with the same operations in a different order (SDPA vs eager, fused rotary tables):
        # differences are rounding-level, ~1e-6 relative; 1e-4 absolute on log-probabilities of magnitude ~3
        # leaves room for 16 decode steps of accumulation while catching any real mistake (>1e-2).
        assert torch.allclose(torch.tensor(out.logprobs), ref_logprobs, atol=1e-4), (out.logprobs, ref_logprobs)


@pytest.mark.parametrize("variant", ["llama", "qwen2", "gemma2", "phi3"])
def test_prefill_logits_match_hf(checkpoints, variant):
    from tpinfer.engine.kv_cache import Batch

    path = checkpoints[variant]
    engine = load_engine(EngineSpec(str(path)), ParallelContext.single())
    model = engine.model
    batch = Batch.build(PROMPTS, [0] * len(PROMPTS), list(range(len(PROMPTS))), torch.device("cpu"))
    with torch.inference_mode():
        logits = model.gather_logits(model(batch, engine.generator.cache))
    hf = hf_model(path)
    for row, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0, -1].float()
        assert torch.allclose(logits[row], ref, atol=1e-4, rtol=1e-4), (logits[row] - ref).abs().max()


def test_bfloat16_matches_hf_bfloat16(checkpoints, monkeypatch):
    """bf16 weights: a long prefill takes torch's bf16 GEMM (on a CPU with bf16 arithmetic) or the widened float32
    one (without), decode the bf16 GEMV path; both ways the widened path is also checked, as a CPU without it runs."""
    import tpinfer.parallel.layers as layers

    for native_bf16 in sorted({layers.CPU_BF16_MATH, False}):
        monkeypatch.setattr(layers, "CPU_BF16_MATH", native_bf16)
        _bf16_against_hf(checkpoints["qwen2"])


def _bf16_against_hf(path) -> None:  # noqa: ANN001
    prompt = list(range(1, 41))  # 40 rows: above BF16_WIDEN_MIN_ROWS
    engine = load_engine(EngineSpec(str(path), dtype="bfloat16"), ParallelContext.single())
    out = engine.generator.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))[0]
    hf = hf_model(path, torch.bfloat16)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    assert out.token_ids == ref.sequences[0, len(prompt):].tolist()
    ref_first = ref.logits[0][0].float().log_softmax(-1)[out.token_ids[0]].item()
    # bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%); both sides accumulate in float32 and round
    # the same activations, so log-probabilities of magnitude ~3 agree to well within 0.05.
    assert abs(out.logprobs[0] - ref_first) < 0.05

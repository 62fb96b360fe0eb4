"""Quantizing while loading: the engine with --quantization equals the float engine on the same weights quantized
and dequantized offline, at TP 1 and 2, through the native decode stack; bytes reported are bytes allocated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import make_checkpoint, run_cli
from tpinfer import LLM, SamplingParams
from tpinfer.quant.formats import dequantize, parse, quantize

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = [[1, 17, 29, 33, 41, 52], [1, 200, 13]]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("quant") / "llama", "llama", seed=3, tie_word_embeddings=False)


def dequantized_copy(source: Path, out: Path, scheme_name: str, lm_head: bool = False) -> Path:
    """The checkpoint with every projection (and the LM head with ``lm_head``) replaced by its
    quantized-then-dequantized weight (float32)."""
    scheme = parse(scheme_name)
    shutil.copytree(source, out)
    for file in out.glob("*.safetensors"):
        tensors = load_file(str(file))
        for name, tensor in tensors.items():
            if (name.endswith(".weight") and any(f".{p}." in name for p in PROJECTIONS)) or (
                    lm_head and name == "lm_head.weight"):
                tensors[name] = dequantize(scheme, quantize(scheme, tensor)).contiguous()
        save_file(tensors, str(file), metadata={"format": "pt"})
    return out


def _generate(path: Path, tp: int, quantization: str | None, lm_head: bool = False):
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    with LLM(str(path), tensor_parallel_size=tp, dtype="float32", quantization=quantization, progress=False,
             quantize_lm_head=lm_head) as llm:
        assert llm.engine.native_decode  # the fused stack runs quantized projections too
        return llm.generate(PROMPTS, params), llm.engine.param_bytes


@pytest.mark.parametrize("scheme,sizes", [("int8", (1,)), ("int8-g32", (1, 2)), ("int4", (1, 2)),
                                          ("int4-g64-sym", (2,)), ("fp8", (1,))])
def test_quantized_engine_equals_float_engine_on_dequantized_weights(source, tmp_path, scheme, sizes):
    # Per-channel and per-tensor scales of a row-parallel slice are the slice's own, so only group schemes are
    # compared above TP=1 (their groups never straddle ranks, so quantizing slices = slicing the quantized tensor).
    reference_dir = dequantized_copy(source, tmp_path / "dequantized", scheme)
    for tp in sizes:
        quantized, quantized_bytes = _generate(source, tp, scheme)
        reference, float_bytes = _generate(reference_dir, tp, None)
        for got, want in zip(quantized, reference, strict=True):
            assert got.token_ids == want.token_ids, (scheme, tp)
            # The same products in another order (dequantizing kernels vs float GEMV): float32 rounding.
            assert max(abs(a - b) for a, b in zip(got.logprobs, want.logprobs, strict=True)) < 1e-4
        assert quantized_bytes < float_bytes


def test_info_and_bench_report_quantized_bytes(source):
    info = json.loads(run_cli("info", "--model", str(source), "--quantization", "int4", "--json").stdout)
    entry = next(e for e in info["tp_sizes"] if e["tp"] == 2)
    bench = json.loads(run_cli("bench", "--model", str(source), "--tensor-parallel-size", "2", "--quantization",
                               "int4", "--output-len", "8", "--repeat", "1", "--json").stdout.splitlines()[-1])
    assert bench["param_bytes"] == [entry["param_bytes_per_rank"]] * 2
    assert bench["quantization"] == "int4-g32-asym" and bench["native_kernels"]
    assert 0.6 < bench["bytes_per_weight"] < 0.7  # 4 bits + float16 scale and offset per 32 weights


def test_quantized_lm_head_equals_float_head_on_dequantized_weights(source, tmp_path):
    """--quantize-lm-head: the head's vocabulary rows quantized with their scales (the padded vocabulary of 251 at
    TP 2 included) give the tokens and log-probabilities of a float head holding the dequantized weights; the
    bytes info reports are the bytes the engine allocates, and fewer than with a float head."""
    reference_dir = dequantized_copy(source, tmp_path / "dequantized", "int4", lm_head=True)
    for tp in (1, 2):
        quantized, quantized_bytes = _generate(source, tp, "int4", lm_head=True)
        reference, _ = _generate(reference_dir, tp, None)
        for got, want in zip(quantized, reference, strict=True):
            assert got.token_ids == want.token_ids, tp
            assert max(abs(a - b) for a, b in zip(got.logprobs, want.logprobs, strict=True)) < 1e-4
        _, float_head_bytes = _generate(source, tp, "int4")
        assert quantized_bytes < float_head_bytes
        info = json.loads(run_cli("info", "--model", str(source), "-q", "int4", "--quantize-lm-head",
                                  "--json").stdout)
        assert next(e for e in info["tp_sizes"] if e["tp"] == tp)["param_bytes_per_rank"] == quantized_bytes


def test_quantized_lm_head_refusals_and_a_scheme_of_its_own(source, tmp_path):
    tied = make_checkpoint(tmp_path / "tied", "llama", seed=4, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="ties its LM head to the embedding"):
        LLM(str(tied), quantization="int8", quantize_lm_head=True, progress=False)
    with pytest.raises(ValueError, match="give --quantization"):
        LLM(str(source), quantize_lm_head=True, progress=False)
    with LLM(str(source), quantization="int4", quantize_lm_head="int8", progress=False) as llm:  # a head scheme
        assert llm.engine.model.lm_head.scheme.name == "int8"
        assert {m.scheme.name for m in llm.engine.model.model.modules() if hasattr(m, "scheme")} == {"int4-g32-asym"}


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """A checkpoint whose vocabulary covers every id of the test tokenizer (259: 256 bytes and 3 specials)."""
    return make_checkpoint(tmp_path_factory.mktemp("quant") / "wide", "llama", seed=5, vocab_size=263)


def test_scoring_refuses_ids_outside_the_vocabulary(source):
    with LLM(str(source), dtype="float32", progress=False) as llm, pytest.raises(ValueError, match=r"\[0, 251\)"):
        llm.score([[1, 2, 3], [4, 251]])


def test_perplexity_equals_hf_loss(wide):
    """The perplexity verify and bench report is HF's own cross-entropy on the same windows of the same text."""
    import torch
    import transformers

    from tpinfer.accuracy import perplexity, reference_ids

    with LLM(str(wide), dtype="float32", progress=False) as llm:
        ids = reference_ids(llm, 600)[:600]
        ours = perplexity(llm, ids, 256)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(wide), torch_dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 256):
            chunk = torch.tensor([ids[start : start + 256]])
            loss = model(chunk, labels=chunk).loss.item()  # mean over the window's len - 1 predictions
            total += loss * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    assert abs(ours / torch.tensor(total / count).exp().item() - 1) < 1e-4


def test_bench_and_verify_report_accuracy_against_the_float_model(wide):
    bench = json.loads(run_cli("bench", "--model", str(wide), "--quantization", "int8", "--accuracy", "--output-len",
                               "4", "--repeat", "1", "--json", timeout=400).stdout.splitlines()[-1])
    acc = bench["accuracy"]
    assert acc["tp"] == 1 and acc["quantization"] == "int8"
    assert acc["perplexity"]["tokens"] >= 20_000
    # int8 per channel moves a random model's distribution a little, not at all would mean no quantization
    assert 0 < acc["kl"] < 1e-2 and acc["max_logit_diff"] > 0
    assert abs(acc["perplexity"]["increase"]) < 0.01 and acc["passed"]
    assert 0 < acc["greedy_agreement"] <= 1 and 0.5 < acc["top1_agreement"] <= 1
    assert len(acc["first_divergence"]) == 3 and all(0 <= n <= 128 for n in acc["first_divergence"])
    failed = run_cli("bench", "--model", str(wide), "--accuracy", "--json", check=False)
    assert failed.returncode != 0 and "--accuracy compares a model quantized on load" in failed.stderr
    verify = json.loads(run_cli("verify", "--model", str(wide), "--tp", "2", "-q", "int4", "--max-new-tokens", "16",
                                "--json", timeout=400).stdout.splitlines()[-1])
    (size,) = verify["sizes"]
    assert size["tp"] == 2 and size["quantization"] == "int4-g32-asym" and size["kl"] > acc["kl"]


def _log_probs(path: Path, tp: int, quantization: str | None, sequences: list[list[int]],
               lm_head: bool = False) -> list[torch.Tensor]:
    with LLM(str(path), tensor_parallel_size=tp, dtype="float32", quantization=quantization, progress=False,
             quantize_lm_head=lm_head) as llm:
        return [logits.log_softmax(-1) for logits in llm.score(sequences)]


def _kl(p: list[torch.Tensor], q: list[torch.Tensor]) -> float:
    return torch.cat([(a.exp() * (a - b)).sum(-1) for a, b in zip(p, q, strict=True)]).mean().item()


@pytest.mark.parametrize("scheme,lm_head", [("int4-a8", False), ("int8-g32-a8", True)])
def test_int8_activation_schemes_agree_across_tp_and_with_prefill(source, scheme, lm_head):
    """-a8 computes x_hat W^T at every TP size, in decode (the VNNI kernels, a row a step) and prefill (the same
    kernels, 8 rows a pass) alike, the LM head too when it is quantized. Rounding activations is not continuous: a
    float32 difference elsewhere (a row-parallel sum in another order) can move one element to the next int8 step,
    so TP 2 and decode differ from TP 1 and prefill by such steps only, a KL far below what rounding the activations
    costs against the float model."""
    sequences = [p + list(range(60, 90)) for p in PROMPTS]
    float_lp = _log_probs(source, 1, None, sequences)
    tp1, tp2 = (_log_probs(source, tp, scheme, sequences, lm_head) for tp in (1, 2))
    cost, across = _kl(float_lp, tp1), _kl(tp1, tp2)
    assert cost > 1e-4  # the activations were rounded
    assert across < 1e-3 * cost, (across, cost)
    decoded, _ = _generate(source, 1, scheme, lm_head)
    with LLM(str(source), dtype="float32", quantization=scheme, progress=False, quantize_lm_head=lm_head) as llm:
        for prompt, out in zip(PROMPTS, decoded, strict=True):
            logits = llm.score([prompt + out.token_ids])[0][len(prompt) - 1 : -1]  # the same context, one prefill
            scored = logits.log_softmax(-1).gather(1, torch.tensor(out.token_ids)[:, None]).flatten().tolist()
            assert max(abs(x - y) for x, y in zip(scored, out.logprobs, strict=True)) < 0.05

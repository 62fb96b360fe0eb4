"""compressed-tensors checkpoints (what llmcompressor writes), made here by the compressed-tensors library itself:
the engine at TP 1 and 2 equals the float engine on the library's own dequantized weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from helpers import make_checkpoint, run_cli, write_compressed
from tpinfer import LLM, SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

pytest.importorskip("compressed_tensors")

PROMPTS = [[1, 17, 29, 33, 41, 52], [1, 200, 13]]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ct") / "llama", "llama", seed=8, tie_word_embeddings=False)


def _reference_checkpoint(source: Path, out: Path, references) -> Path:  # noqa: ANN001
    shutil.copytree(source, out)
    for file in out.glob("*.safetensors"):
        tensors = load_file(str(file))
        for name in tensors:
            if name.removesuffix(".weight") in references and name.endswith(".weight"):
                tensors[name] = references[name.removesuffix(".weight")].contiguous()
        save_file(tensors, str(file), metadata={"format": "pt"})
    return out


def _run(path: Path, tp: int):
    params = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)
    with LLM(str(path), tensor_parallel_size=tp, dtype="float32", progress=False) as llm:
        return llm.generate(PROMPTS, params)


@pytest.mark.parametrize("fmt,bits,strategy,group,symmetric,kind", [
    ("pack-quantized", 4, "group", 32, True, "int"),
    ("pack-quantized", 4, "group", 64, False, "int"),
    ("int-quantized", 8, "channel", None, True, "int"),
    ("int-quantized", 8, "group", 32, False, "int"),
    ("float-quantized", 8, "channel", None, True, "float"),
    ("float-quantized", 8, "tensor", None, True, "float"),
], ids=["w4-g32", "w4-g64-asym", "w8-channel", "w8-g32-asym", "fp8-channel", "fp8-tensor"])
def test_compressed_checkpoint_equals_float_engine_on_dequantized_weights(source, tmp_path, fmt, bits, strategy,
                                                                          group, symmetric, kind):
    quantized = tmp_path / "quantized"
    references = write_compressed(source, quantized, fmt, bits, strategy, group, symmetric, kind)
    reference = _reference_checkpoint(source, tmp_path / "reference", references)
    # The library's dequantized weights in float against ours dequantized in registers: float32 rounding (the
    # checkpoint's bfloat16 scales convert to int4's float16 exactly). Asymmetric 4 bits store the offset
    # -scale * (zero + 8) in float16, one rounding of 2^-11 of it per group: logprobs move by up to ~1e-2.
    tolerance = 1e-2 if bits == 4 and not symmetric else 1e-3
    for tp in (1, 2):
        got, want = _run(quantized, tp), _run(reference, tp)
        for a, b in zip(got, want, strict=True):
            assert a.token_ids == b.token_ids, (fmt, tp)
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < tolerance


def test_unsupported_compressed_configs_are_named(source, tmp_path):
    quantized = tmp_path / "w8a8"
    write_compressed(source, quantized, "int-quantized", 8, "channel")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int"}
    (quantized / "config.json").write_text(json.dumps(config))
    proc = run_cli("generate", "--model", str(quantized), "--max-new-tokens", "2", "Hello", check=False)
    assert proc.returncode == 1 and "activation quantization (W8A8 and the like) is not supported" in proc.stderr
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = None
    config["quantization_config"]["format"] = "marlin-24"
    (quantized / "config.json").write_text(json.dumps(config))
    proc = run_cli("generate", "--model", str(quantized), "--max-new-tokens", "2", "Hello", check=False)
    assert proc.returncode == 1 and "format 'marlin-24' is not supported" in proc.stderr

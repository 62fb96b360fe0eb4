"""What real checkpoints bring: generation_config.json, GGUF files, files that are wrong, and `tpinfer verify`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import make_checkpoint, run_cli, write_gguf

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = "The function returns a new"


def _generate(path: Path, *args: str, check: bool = True):
    proc = run_cli("generate", "--model", str(path), "--json", *args, PROMPT, check=check)
    return (json.loads(proc.stdout.splitlines()[0]) if check else None), proc


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("real") / "llama", "llama", seed=5, tie_word_embeddings=False)


def test_generation_config_sets_eos_ids_and_defaults(llama, tmp_path):
    path = Path(shutil.copytree(llama, tmp_path / "model"))
    greedy, _ = _generate(path, "--max-new-tokens", "12", "--temperature", "0", "--ignore-eos")
    tokens = greedy["token_ids"]
    stop = next(i for i, t in enumerate(tokens) if i >= 2 and t not in tokens[:i])  # first occurrence, not at once
    # Several end-of-sequence ids (Llama 3 lists three): generation stops at whichever comes first.
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [250, tokens[stop]],
                                                             "max_new_tokens": 12, "do_sample": False}))
    stopped, proc = _generate(path)
    assert stopped["token_ids"] == tokens[: stop + 1]
    assert "generation defaults from generation_config.json: temperature=0.0, max_new_tokens=12" in proc.stderr
    # Sampling defaults apply when the command line says nothing, and an explicit flag wins.
    (path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.9, "top_k": 20,
                                                             "repetition_penalty": 1.1}))
    by_default, proc = _generate(path, "--max-new-tokens", "12", "--seed", "3", "--ignore-eos")
    explicit, _ = _generate(path, "--max-new-tokens", "12", "--seed", "3", "--ignore-eos", "--temperature", "0.9",
                            "--top-k", "20")
    assert by_default["token_ids"] == explicit["token_ids"]
    assert "not applied (unsupported): repetition_penalty=1.1" in proc.stderr
    greedy_again, _ = _generate(path, "--max-new-tokens", "12", "--seed", "3", "--ignore-eos", "--temperature", "0")
    assert greedy_again["token_ids"] == tokens


def test_default_max_new_tokens_is_cut_to_the_context(llama):
    prompt_len = len(_generate(llama, "--max-new-tokens", "1")[0]["prompt_token_ids"])
    bounded, _ = _generate(llama, "--max-model-len", str(prompt_len + 3), "--temperature", "0", "--ignore-eos")
    assert len(bounded["token_ids"]) == 3  # the default (64) would not fit: the room left is 3
    _, proc = _generate(llama, "--max-model-len", str(prompt_len + 3), "--max-new-tokens", "10", check=False)
    assert proc.returncode == 1 and "beyond the maximum sequence length" in proc.stderr


def test_gguf_file_converts_to_the_same_model_and_tokenizer(llama, tmp_path):
    import gguf
    import transformers

    from tpinfer.loading.gguf_convert import convert

    file = write_gguf(llama, tmp_path / "model.gguf", quantize=("ffn_gate",))
    out = convert(file, tmp_path / "converted", progress=False)
    original = {}
    for shard in llama.glob("*.safetensors"):
        original.update(load_file(str(shard)))
    converted = load_file(str(out / "model.safetensors"))
    assert sorted(converted) == sorted(original)
    for name, tensor in original.items():
        want = tensor.float()
        if "gate_proj" in name:  # stored as Q8_0: exactly its dequantization, nothing re-rounded
            kind = gguf.GGMLQuantizationType.Q8_0
            want = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(want.numpy(), kind), kind))
            assert not torch.equal(want, tensor.float())
        assert torch.equal(converted[name], want), name  # q/k rows back in HF's order, bit for bit
    text = "Hello world, the quick brown fox jumps over the lazy dog."
    hf_original, hf_converted = (transformers.AutoTokenizer.from_pretrained(p) for p in (llama, out))
    assert hf_converted(text).input_ids == hf_original(text).input_ids
    assert hf_converted.chat_template
    with pytest.raises(ValueError, match="exists already"):
        convert(file, out, progress=False)


def test_a_fused_tensor_of_the_wrong_shape_is_named(tmp_path):
    path = make_checkpoint(tmp_path / "phi3", "phi3", shards=1)
    tensors = load_file(str(path / "model.safetensors"))
    name = "model.layers.0.self_attn.qkv_proj.weight"
    tensors[name] = tensors[name][:96].clone()  # q + k only: v missing
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    _, proc = _generate(path, "--max-new-tokens", "2", check=False)
    assert proc.returncode == 1
    assert (f"model.safetensors: tensor {name} has shape [96, 64], config.json implies [128, 64] "
            "(rows: 64 (attention heads) + 32 (KV heads) + 32 (KV heads))") in proc.stderr


@pytest.mark.parametrize("broken,message", [
    ("tokenizer.json", "tokenizer.json is not valid JSON"),
    ("config.json", "config.json: rope type 'sideways' is not supported; supported: default, linear, dynamic"),
    ("chat", "the chat template failed: no chat here"),
])
def test_broken_files_are_named_before_any_rank_starts(llama, tmp_path, broken, message):
    path = Path(shutil.copytree(llama, tmp_path / "model"))
    args = ["--tensor-parallel-size", "2", "--max-new-tokens", "2"]
    if broken == "tokenizer.json":
        (path / "tokenizer.json").write_text((path / "tokenizer.json").read_text()[:200])
    elif broken == "config.json":
        config = json.loads((path / "config.json").read_text())
        config["rope_scaling"] = {"rope_type": "sideways", "factor": 2.0}
        (path / "config.json").write_text(json.dumps(config))
    else:
        config = json.loads((path / "tokenizer_config.json").read_text())
        config["chat_template"] = "{{ raise_exception('no chat here') }}"
        (path / "tokenizer_config.json").write_text(json.dumps(config))
        args.append("--chat")
    _, proc = _generate(path, *args, check=False)
    assert proc.returncode == 1
    assert message in proc.stderr
    if broken != "chat":
        assert "loaded" not in proc.stderr  # refused before any weight was read


def test_verify_passes_tp_sizes_against_hf_and_fails_what_differs(tmp_path):
    path = make_checkpoint(tmp_path / "gemma2", "gemma2", seed=11)
    proc = run_cli("verify", "--model", str(path), "--tensor-parallel-size", "1,2", "--reference", "hf",
                   "--max-new-tokens", "6", "--json")
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["passed"] and [s["tp"] for s in report["sizes"]] == [1, 2]
    for size in report["sizes"]:
        assert set(size) == {"tp", "greedy_agreement", "max_logit_diff", "kl", "passed", "divergences",
                             "divergences_at_ties", "hf"}
        assert size["greedy_agreement"] == 1.0 and size["hf"]["greedy_agreement"] == 1.0
        assert size["max_logit_diff"] < 1e-4 and size["hf"]["max_logit_diff"] < 1e-4
    assert report["sizes"][0]["max_logit_diff"] == 0.0  # TP=1 against itself
    assert "PASS" in proc.stderr
    # TP=2 sums in another order: its logits differ from TP=1's by rounding, which a zero tolerance refuses.
    strict = run_cli("verify", "--model", str(path), "--tensor-parallel-size", "2", "--max-new-tokens", "4",
                     "--max-logit-diff", "0", "--json", check=False)
    assert strict.returncode == 1
    assert json.loads(strict.stdout.splitlines()[-1])["passed"] is False

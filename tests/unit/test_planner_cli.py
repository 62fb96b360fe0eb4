"""``tpinfer plan`` through the CLI entry point: JSON keys and types, text sections, errors."""

from __future__ import annotations

import json

import pytest

from tpinfer.cli.main import main


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_keys_and_types(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(capsys, "--model", "llama-3-70b", "--gpu", "h100-80gb", "--gpus-per-node", "8")
    assert isinstance(out["params"], int) and out["params"] == 70_553_706_496
    assert isinstance(out["weight_bytes"], int) and out["weight_bytes"] == 2 * out["params"]
    assert out["valid_tp_sizes"] == [1, 2, 4, 8, 16, 32, 64]
    assert len(out["tp_sizes"]) == 64
    assert out["layouts"], "at least one layout"
    for layout in out["layouts"]:
        for key, kind in (("tp", int), ("pp", int), ("dp", int), ("per_gpu_bytes", int), ("fits", bool)):
            assert isinstance(layout[key], kind), key
        assert layout["tp"] * layout["pp"] * layout["dp"] == 8
    rec = out["recommended"]
    assert (rec["tp"], rec["pp"], rec["dp"]) == (8, 1, 1)
    assert isinstance(rec["reason"], str) and rec["reason"]
    assert out["layouts"][0]["tp"] == rec["tp"]


def test_json_int8_weight_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    from tpinfer.planner import load_model, per_rank_weight_bytes

    out = run_json(capsys, "--model", "llama-3-8b", "--dtype", "int8")
    # The engine's int8: 1-byte projections with per-channel scales, the embedding, head and norms in bf16.
    assert out["weight_bytes"] == per_rank_weight_bytes(load_model("llama-3-8b").config, 1, "int8")
    assert out["params"] < out["weight_bytes"] < 2 * out["params"]
    assert out["weight_bytes_by_dtype"]["fp32"] == 4 * out["params"]


def test_text_output_sections(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "llama-3-70b", "--gpus-per-node", "8", "--objective", "throughput"]) == 0
    text = capsys.readouterr().out
    for section in (
        "Weights by dtype",
        "Tensor-parallel sizes 1..64",
        "Memory per GPU",
        "Decode per step",
        "Recommended: TP=4 x PP=1 x DP=2",
        "Assumptions",
    ):
        assert section in text
    assert "5-7" in text  # runs of invalid sizes share a row


def test_custom_config_dir_on_cpu(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    config = {
        "model_type": "llama",
        "vocab_size": 1000,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = run_json(
        capsys,
        "--model",
        str(tmp_path),
        "--gpu",
        "cpu",
        "--gpu-memory",
        "8",
        "--memory-bandwidth",
        "20",
        "--gpus-per-node",
        "2",
    )
    assert out["cluster"]["device"] == "cpu" and out["cluster"]["interconnect"]["name"] == "shm"
    assert out["valid_tp_sizes"] == [1, 2, 4]
    assert out["max_model_len"] == 256
    assert all(layout["decode_ceiling_tokens_per_s"] > 0 for layout in out["layouts"])


def test_unknown_model_lists_catalogue(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "no-such-model"]) == 1
    err = capsys.readouterr().err
    assert "llama-3-70b" in err and "mixtral-8x7b" in err


def test_help_has_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    assert "examples:" in capsys.readouterr().out

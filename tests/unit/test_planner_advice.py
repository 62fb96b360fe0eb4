"""Recommendations: the issue's acceptance scenarios and the seeds' decision tree."""

from __future__ import annotations

import pytest

from tpinfer.planner import build_request, load_model, make_plan
from tpinfer.planner.comm import GB


def plan(model: str, **kwargs):
    m = load_model(model)
    return make_plan(m, build_request(m, **kwargs))


def chosen(p) -> tuple[int, int, int]:
    layout = p.recommendation.layout
    return layout.tp, layout.pp, layout.dp


def test_70b_on_8xh100_latency_is_tp8() -> None:
    p = plan("llama-3-70b", gpu="h100-80gb", gpus_per_node=8, interconnect="nvlink", max_model_len=8192)
    assert chosen(p) == (8, 1, 1) and p.recommendation.fits
    reasons = " ".join(p.recommendation.reasons)
    assert "fast interconnect" in reasons and "largest valid TP" in reasons
    assert p.layouts[0].layout.tp == 8  # the recommended layout is ranked first


def test_70b_on_8xh100_throughput_is_tp4_dp2() -> None:
    p = plan("llama-3-70b", gpu="h100-80gb", gpus_per_node=8, max_model_len=8192, objective="throughput")
    assert chosen(p) == (4, 1, 2)
    reasons = " ".join(p.recommendation.reasons)
    assert "TP=2 leaves only" in reasons  # why not the smaller TP
    assert "DP=2" in reasons and "never communicate" in reasons


def test_405b_on_two_nodes_is_tp8_within_pp2_across() -> None:
    for objective in ("latency", "throughput"):
        p = plan("llama-3.1-405b", gpu="h100-80gb", gpus_per_node=8, nodes=2, objective=objective)
        assert chosen(p) == (8, 2, 1), objective
        assert "PP=2 across nodes" in " ".join(p.recommendation.reasons)
        assert p.layouts[0].memory.stage_layers == (63, 63)


def test_4x4090_pcie_is_warned_about() -> None:
    p = plan("llama-2-70b", gpu="rtx4090-24gb", gpus_per_node=4, interconnect="pcie")
    assert not p.recommendation.fits  # 128.5 GiB of bf16 weights on 96 GiB of GPUs
    text = " ".join(p.warnings)
    assert "TP over pcie is slow" in text and "peer-to-peer" in text
    assert "not a fast interconnect" in " ".join(p.recommendation.reasons)
    int8 = plan("llama-2-70b", gpu="rtx4090-24gb", gpus_per_node=4, dtype="int8")
    assert int8.recommendation.fits and "TP over pcie is slow" in " ".join(int8.warnings)
    int8_throughput = plan("llama-2-70b", gpu="rtx4090-24gb", gpus_per_node=4, dtype="int8", objective="throughput")
    assert chosen(int8_throughput) == (1, 4, 1)  # the decision tree: no fast interconnect -> PP


def test_fits_on_one_gpu_uses_one_gpu_per_replica() -> None:
    p = plan("llama-3-8b", gpu="h100-80gb", gpus_per_node=8)
    assert chosen(p) == (1, 1, 8)
    assert "single GPU" in p.recommendation.reasons[0]


def test_nothing_fits_says_what_would() -> None:
    p = plan("llama-3.1-405b", gpu="a100-40gb", gpus_per_node=8)
    assert not p.recommendation.fits
    reasons = " ".join(p.recommendation.reasons)
    assert "Nothing fits" in reasons and "int8" in reasons


def test_tp_beyond_kv_heads_is_flagged() -> None:
    # A hypothetical 16-GPU NVLink node: latency takes TP=16, twice Llama-3-70B's 8 KV heads.
    p = plan("llama-3-70b", gpu="h100-80gb", gpus_per_node=16)
    assert chosen(p) == (16, 1, 1)
    assert any("exceeds the 8 KV heads" in w and "stored on 2 GPUs" in w for w in p.warnings)
    assert next(t for t in p.tp_sizes if t.tp == 16).kv_replication == 2


def test_decode_ceiling_is_bandwidth_over_bytes() -> None:
    # One CPU rank, no communication: tokens/s = bandwidth / bytes of weights read per token, exactly.
    p = plan("tinyllama-1.1b", gpu="cpu", gpu_memory=24, memory_bandwidth=20, gpus_per_node=1, dtype="fp32")
    e = p.layouts[0]
    assert (e.layout.tp, e.layout.pp, e.layout.dp) == (1, 1, 1)
    expected = 20 * GB / e.memory.per_gpu.weights
    assert e.step_short.tokens_per_s_per_sequence == pytest.approx(expected, rel=1e-12)
    assert e.step_full.tokens_per_s_per_sequence < expected  # the KV cache is read too


def test_comm_counts_two_all_reduces_per_layer() -> None:
    p = plan("llama-3-70b", gpus_per_node=8)
    tp8 = next(e for e in p.layouts if e.layout.tp == 8 and e.layout.pp == 1)
    assert tp8.step_short.all_reduces == 2 * 80 + 1  # + the vocabulary-parallel embedding
    assert tp8.step_short.message_bytes == 8192 * 2  # batch 1 x hidden x bf16
    assert 0 < tp8.step_short.comm_share < 1


def test_unknown_bandwidth_warns() -> None:
    p = plan("llama-3-8b", gpu_memory=40, gpus_per_node=2)
    assert p.layouts[0].step_short is None
    assert any("--memory-bandwidth" in w for w in p.warnings)


def test_bad_requests_raise() -> None:
    with pytest.raises(ValueError, match="objective"):
        plan("llama-3-8b", objective="cost")
    with pytest.raises(ValueError, match="unknown GPU"):
        plan("llama-3-8b", gpu="tpu-v5")
    with pytest.raises(ValueError, match="batch size"):
        plan("llama-3-8b", batch_size=0)


def test_moe_decode_reads_only_routed_experts() -> None:
    # Mixtral routes each token to 2 of 8 experts: at batch 1 a step reads a quarter of the expert weights,
    # at batch B the expected share is 1 - (3/4)^B.
    p = plan("mixtral-8x7b", gpu="h200-141gb", gpus_per_node=1, max_model_len=4096)
    e = p.layouts[0]
    elements = load_model("mixtral-8x7b").rank_elements(1)
    read = e.memory.per_gpu.weights - 32 * elements.experts * 2 * 0.75
    assert e.step_short.memory_s == pytest.approx(read / (4800 * GB))


def test_planner_counts_active_parameters_as_the_engine_declares_them() -> None:
    from tpinfer.parallel.shard import active_parameters
    from tpinfer.planner.report_json import to_json

    mixtral = load_model("mixtral-8x7b")
    # Everything but the experts, plus 2 of each layer's 8 experts (3 matrices of 4096 x 14336): Mixtral's 12.9 B.
    experts = 32 * 8 * 3 * 4096 * 14336
    assert mixtral.active_parameter_count() == active_parameters(mixtral.config)
    assert mixtral.active_parameter_count() == mixtral.parameter_count() - experts * 6 // 8
    p = plan("mixtral-8x7b", gpu="h200-141gb", gpus_per_node=1, max_model_len=4096)
    assert to_json(p)["active_params"] == mixtral.active_parameter_count()
    assert load_model("llama-3-8b").active_parameter_count() == load_model("llama-3-8b").parameter_count()

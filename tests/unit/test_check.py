"""``tpinfer check``: the constraints checklist, topology parsing, torchrun variables, exit codes."""

from __future__ import annotations

import json

import pytest

from tpinfer.cli import check as check_cli
from tpinfer.cli.main import main
from tpinfer.planner import load_model
from tpinfer.planner.checks import (
    FAIL,
    PASS,
    TORCHRUN_VARS,
    UNKNOWN,
    gpu_count_check,
    interconnect_check,
    launcher_checks,
    model_checks,
    parse_topology,
)

# `nvidia-smi topo -m` on an 8 x H100 SXM node (header underlined with ANSI codes, as recent drivers print it).
DGX = "\n".join(
    ["\t\x1b[4mGPU0\tGPU1\tGPU2\tGPU3\tGPU4\tGPU5\tGPU6\tGPU7\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m"]
    + [f"GPU{i}\t" + "\t".join("X" if i == j else "NV18" for j in range(8)) + "\tPXB\t0-55\t0\t\tN/A" for i in range(8)]
    + ["NIC0\t" + "PXB\t" * 8 + "X", "", "Legend:", "  X    = Self", "  NV#  = Connection traversing a bonded set"]
)

PCIE_BOX = """\
        GPU0    GPU1    GPU2    GPU3    CPU Affinity    NUMA Affinity
GPU0     X      PIX     SYS     SYS     0-15            0
GPU1    PIX      X      SYS     SYS     0-15            0
GPU2    SYS     SYS      X      PIX     16-31           1
GPU3    SYS     SYS     PIX      X      16-31           1
"""


def by_name(checks):
    return {c.name: c for c in checks}


def test_model_checks_pass_for_llama3_70b_tp8() -> None:
    checks = model_checks(load_model("llama-3-70b"), 8)
    assert all(c.status == PASS for c in checks)
    assert "64 heads / 8 = 8 per GPU" in by_name(checks)["heads divisible by TP"].detail


def test_model_checks_name_the_failures() -> None:
    checks = by_name(model_checks(load_model("qwen2-7b"), 7))
    assert checks["heads divisible by TP"].status == PASS
    assert checks["KV heads"].status == FAIL and "4 KV heads" in checks["KV heads"].detail
    assert checks["FFN divisible by TP"].status == FAIL
    assert checks["valid TP size"].status == FAIL and "1, 2, 4" in checks["valid TP size"].detail
    too_big = by_name(model_checks(load_model("llama-3-8b"), 64))
    assert too_big["TP <= attention heads"].status == FAIL


def test_kv_replication_passes_with_note() -> None:
    kv = by_name(model_checks(load_model("llama-3-70b"), 16))["KV heads"]
    assert kv.status == PASS and "replicated on 2 GPUs" in kv.detail


def test_planner_only_model_fails_engine_check() -> None:
    checks = by_name(model_checks(load_model("opt-175b"), 2))
    assert checks["engine supports the model"].status == FAIL
    assert "mixtral" in checks["engine supports the model"].detail
    assert "engine supports the model" not in by_name(model_checks(load_model("mixtral-8x7b"), 2))


def test_gpu_count() -> None:
    assert gpu_count_check(8, 8, 1, None)[0].status == PASS
    assert gpu_count_check(16, 8, 2, None)[0].status == FAIL  # TP would span nodes
    assert gpu_count_check(16, 8, 1, None)[0].status == FAIL  # not enough GPUs
    assert gpu_count_check(4, None, None, None)[0].status == UNKNOWN
    assert gpu_count_check(4, None, None, 8)[0].status == PASS
    assert gpu_count_check(4, 8, 1, 4)[0].status == FAIL  # fewer visible than claimed


def test_parse_topology() -> None:
    links = parse_topology(DGX)
    assert links[0, 7] == "NV18" and links[3, 3] == "X" and len(links) == 64
    assert parse_topology(PCIE_BOX)[0, 1] == "PIX"
    assert parse_topology("no GPUs here") == {}


def test_interconnect_check() -> None:
    assert interconnect_check(8, DGX).status == PASS
    pcie = interconnect_check(2, PCIE_BOX)
    assert pcie.status == FAIL and "PIX" in pcie.detail
    assert interconnect_check(4, PCIE_BOX).status == FAIL
    unknown = interconnect_check(2, None)
    assert unknown.status == UNKNOWN and "cannot tell" in unknown.detail
    assert interconnect_check(1, None).status == PASS
    assert interconnect_check(16, DGX).status == FAIL


def torchrun_env(**overrides: str) -> dict[str, str]:
    env = {
        "RANK": "0",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }
    env.update(overrides)
    return env


def test_launcher_checks() -> None:
    assert launcher_checks(4, {}, None, None)[0].status == UNKNOWN
    partial = launcher_checks(4, {"RANK": "0", "WORLD_SIZE": "4"}, None, None)[0]
    assert partial.status == FAIL and "LOCAL_RANK" in partial.detail
    good = launcher_checks(4, torchrun_env(), 8, 1)
    assert [c.status for c in good] == [PASS, PASS]
    assert launcher_checks(2, torchrun_env(), None, None)[1].status == FAIL  # WORLD_SIZE 4 != tp 2
    assert launcher_checks(4, torchrun_env(RANK="4"), None, None)[0].status == FAIL
    assert launcher_checks(4, torchrun_env(MASTER_PORT="99999"), None, None)[0].status == FAIL
    assert launcher_checks(4, torchrun_env(WORLD_SIZE="x"), None, None)[0].status == FAIL
    assert launcher_checks(4, torchrun_env(), None, 2)[0].status == FAIL  # 4 / 4 = 1 node, not 2


@pytest.fixture
def no_gpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check_cli.shutil, "which", lambda name: None)
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.mark.usefixtures("no_gpu_machine")
def test_cli_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--model", "llama-3-70b", "--tensor-parallel-size", "8", "--gpus-per-node", "8"]) == 0
    text = capsys.readouterr().out
    assert "UNKNOWN" in text and "cannot tell" in text
    assert main(["check", "--model", "llama-3-70b", "--tensor-parallel-size", "3"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.usefixtures("no_gpu_machine")
def test_cli_json_with_torchrun_env(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for key, value in torchrun_env(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(key, value)
    assert main(["check", "--model", "llama-3-8b", "--tp", "2", "--gpus-per-node", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True
    statuses = {c["name"]: c["status"] for c in out["checks"]}
    assert statuses["launcher"] == PASS and statuses["WORLD_SIZE vs TP"] == PASS
    assert statuses["interconnect"] == UNKNOWN


def test_launcher_checks_a_mesh() -> None:
    # WORLD_SIZE 4 = tp 2 x pp 2; two nodes of 2 ranks: each TP group inside one node
    two_nodes = torchrun_env(LOCAL_WORLD_SIZE="2", LOCAL_RANK="0")
    assert launcher_checks(2, two_nodes, None, 2, pp=2)[1].status == PASS
    assert launcher_checks(2, torchrun_env(), None, None, pp=3)[1].status == FAIL  # 4 != 6
    crossing = launcher_checks(4, two_nodes, None, 2)[1]  # tp=4 over nodes of 2 ranks
    assert crossing.status == FAIL and "spans nodes" in crossing.detail

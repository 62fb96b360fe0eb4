"""The examples run as the README says: torchrun on one node, and on two "nodes" over loopback."""

import json
import subprocess
import sys

import pytest

from helpers import REPO, env
from tpinfer.engine.launcher import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
EXAMPLES = REPO / "examples"


def _run(cmd: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _tokens(stdout: str) -> dict:
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, stdout  # only rank 0 prints
    return lines[0]


@pytest.fixture(scope="module")
def single_process_tokens() -> list[int]:
    out = _tokens(_run([sys.executable, str(EXAMPLES / "tp_inference.py"), "--greedy", "--json"]).stdout)
    assert out["world_size"] == 1
    return out["token_ids"]


def test_tp_inference_on_the_demo_model_prints_once():
    proc = _run([*TORCHRUN, "--nproc-per-node", "2", str(EXAMPLES / "tp_inference.py")])
    assert proc.stdout.count("Response:") == 1 and proc.stdout.count("Prompt:") == 1


def test_torchrun_greedy_equals_one_process(single_process_tokens):
    out = _tokens(_run([*TORCHRUN, "--nproc-per-node", "2", str(EXAMPLES / "tp_inference.py"), "--greedy",
                        "--json"]).stdout)
    assert out["world_size"] == 2 and out["token_ids"] == single_process_tokens


def _two_nodes(nproc_per_node: int, *script_args: str) -> tuple[dict, str]:
    """The example as two torchrun "nodes" on loopback: rank 0's JSON line and node 1's stdout."""
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [*TORCHRUN, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", str(nproc_per_node),
             "--master-addr", "127.0.0.1", "--master-port", port, str(EXAMPLES / "tp_inference.py"), *script_args,
             "--greedy", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO,
        )
        for rank in (0, 1)
    ]
    try:
        outs = [node.communicate(timeout=180) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [n.returncode for n in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    return _tokens(outs[0][0]), outs[1][0]


def test_two_nodes_over_loopback_equal_one_process(single_process_tokens):
    out, node1 = _two_nodes(1)
    assert node1.strip() == ""  # node 1 holds rank 1, which prints nothing
    assert out["world_size"] == 2 and out["token_ids"] == single_process_tokens


def test_two_nodes_tp2_pp2_over_loopback_equal_one_process(single_process_tokens):
    """TP=2 inside each "node", the two pipeline stages across them: the README's two commands."""
    out, node1 = _two_nodes(2, "--pipeline-parallel-size", "2")
    assert node1.strip() == ""
    assert (out["world_size"], out["tp"], out["pp"]) == (4, 2, 2) and out["token_ids"] == single_process_tokens


def test_timed_example_reports_throughput_once():
    proc = _run([*TORCHRUN, "--nproc-per-node", "2", str(EXAMPLES / "tp_inference_timed.py"), "--max-new-tokens", "16"])
    assert proc.stdout.count("Throughput:") == 1 and "Tokens generated: 16" in proc.stdout


def test_custom_plan_example():
    proc = _run([*TORCHRUN, "--nproc-per-node", "2", str(EXAMPLES / "custom_plan.py")])
    assert "embedding and head replicated" in proc.stdout

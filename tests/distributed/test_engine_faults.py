"""Collective accounting, impossible layouts refused fast, and failing ranks never hang the job."""

import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from helpers import env, run_cli
from tpinfer import LLM, SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_two_all_reduces_per_layer_plus_embedding_and_one_logits_gather(checkpoints):
    path = checkpoints["llama"]
    with LLM(str(path), tensor_parallel_size=2, dtype="float32", progress=False) as llm:
        layers = llm.config.num_hidden_layers
        stats = llm.engine.ctx.comm.stats
        for new_tokens in (1, 5):
            stats.reset()
            out = llm.generate(["Hello world"], SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True))
            forwards = len(out[0].token_ids)
            assert forwards == new_tokens
            # Per forward step: one all-reduce after o_proj and one after down_proj in every layer,
            # one for the vocab-parallel embedding, one all-gather of the LM head's sharded logits.
            assert stats.calls["all_reduce"] == forwards * (2 * layers + 1)
            assert stats.calls["all_gather"] == forwards
            hidden_bytes = llm.config.hidden_size * 4
            assert stats.bytes["all_reduce"] == hidden_bytes * (2 * layers + 1) * (len(out[0].prompt_token_ids) + forwards - 1)


def test_impossible_tp_size_is_refused_fast_naming_valid_sizes(checkpoints):
    start = time.monotonic()
    proc = run_cli("generate", "--model", str(checkpoints["llama"]), "--tensor-parallel-size", "3", "hi", check=False)
    assert proc.returncode != 0 and time.monotonic() - start < 60
    assert "8 attention heads are not divisible by tp=3; valid sizes for this model: 1, 2, 4, 8" in proc.stderr
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1  # one line, no traceback


def _run_script(code: str, timeout: float = 90) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env())
    return proc, time.monotonic() - start


def _no_orphans(stdout: str) -> None:
    """The script printed its workers' pids first; none may outlive it."""
    pids = [int(p) for p in stdout.split("pids:", 1)[1].split(";", 1)[0].split(",")]
    time.sleep(0.5)
    alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive


@pytest.mark.parametrize("rank", [1, 0])
def test_a_rank_that_raises_mid_generation_ends_every_process_with_its_error(checkpoints, rank):
    proc, elapsed = _run_script(f"""
        from tpinfer import LLM, SamplingParams
        llm = LLM("{checkpoints['llama']}", tensor_parallel_size=2, progress=False, _fault={{"rank": {rank}, "step": 2}})
        print("pids:" + ",".join(str(p.pid) for p in llm.launcher.processes) + ";", flush=True)
        llm.generate(["Hello"], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
        print("should not get here")
    """)
    assert proc.returncode != 0 and "should not get here" not in proc.stdout
    assert f"rank {rank}: injected fault at decode step 2" in proc.stderr
    if rank == 1:
        assert "rank 1 failed" in proc.stderr
    assert elapsed < 30
    _no_orphans(proc.stdout)


def test_a_killed_worker_ends_the_job(checkpoints):
    proc, elapsed = _run_script(f"""
        import os, signal
        from tpinfer import LLM, SamplingParams
        llm = LLM("{checkpoints['llama']}", tensor_parallel_size=2, progress=False)
        print("pids:" + ",".join(str(p.pid) for p in llm.launcher.processes) + ";", flush=True)
        os.kill(llm.launcher.processes[0].pid, signal.SIGKILL)
        llm.generate(["Hello"], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
        print("should not get here")
    """)
    assert proc.returncode != 0 and "should not get here" not in proc.stdout
    assert "rank 1 exited with code -9" in proc.stderr
    assert elapsed < 30
    _no_orphans(proc.stdout)


def test_idle_workers_outlive_the_collective_timeout(checkpoints):
    """Waiting for the next request is not a late collective: an LLM may idle past --timeout."""
    with LLM(str(checkpoints["llama"]), tensor_parallel_size=2, timeout_s=2.0, progress=False) as llm:
        params = SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)
        first = llm.generate(["Hello"], params)[0].token_ids
        time.sleep(4.0)
        assert llm.generate(["Hello"], params)[0].token_ids == first
        prompts = [list(range(3 + i, 203 + i)) for i in range(8)]  # ~8 KB of JSON: two control broadcasts
        outputs = llm.generate(prompts, params)
        assert [len(o.token_ids) for o in outputs] == [3] * 8
        assert llm.engine.ctx.control.stats.calls["control"] >= 2

"""`tpinfer bench`: its JSON contract, the sweep's table and plot, on the bundled demo model."""

import json
import subprocess

import pytest

from helpers import REPO, TPINFER, env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REQUIRED = ("decode_tokens_per_s", "prefill_tokens_per_s", "load_s", "peak_rss_bytes", "param_bytes",
            "roofline_tokens_per_s")


def test_sweep_prints_the_table_writes_the_plot_and_ends_with_json(tmp_path):
    plot = tmp_path / "sweep.png"
    cmd = [*TPINFER, "bench", "--tensor-parallel-size", "1,2", "--output-len", "4",
           "--input-len", "8", "--repeat", "1", "--plot", str(plot), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    results = out["runs"]  # a sweep: one object per size; the top level is the last size's
    assert {k: v for k, v in out.items() if k != "runs"} == results[-1]
    assert [r["tp"] for r in results] == [1, 2]
    for r in results:
        assert all(key in r for key in REQUIRED), sorted(r)
        assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 and r["roofline_tokens_per_s"] > 0
        assert len(r["peak_rss_bytes"]) == len(r["param_bytes"]) == len(r["huge_page_bytes"]) == r["tp"]
        # Every rank holds its share: TP=2 ranks each hold less than the TP=1 rank.
        assert all(p > 0 for p in r["param_bytes"])
    assert max(results[1]["param_bytes"]) < results[0]["param_bytes"][0]
    assert results[1]["collectives_per_step"]["all_reduce"] > 0
    assert "weights in huge pages" in proc.stderr  # the table goes to stderr when stdout carries the JSON
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""tpinfer serve with pipeline stages: concurrent greedy requests equal sequential ones and TP=1's, with
micro-batches in flight, and /metrics reports the bubble and stage-to-stage traffic."""

import asyncio

import openai
import pytest
from test_serve import NAME, PROMPTS, _greedy, _metric, start_server, stop_server, write_checkpoint

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("pipe") / "tiny", chat_template=False)


def _together(server, requests) -> list[str]:
    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60) as client:
            outs = await asyncio.gather(*(client.completions.create(model=NAME, prompt=p, max_tokens=n, temperature=0)
                                          for p, n in requests))
            return [out.choices[0].text for out in outs]

    return asyncio.run(run())


SYSTEM = "You are a helpful assistant. Each rank holds a slice of every weight matrix, and the ranks add up. "


def test_pipeline_serves_concurrent_requests_like_sequential_ones(model_dir, tmp_path):
    # Half the prompts share a system prompt: with prefix caching (on by default) the pipelined server starts them
    # from its cached keys and values, copied between slots on both stages; the reference server computes them all.
    requests = [(f"{SYSTEM if i % 2 else ''}{PROMPTS[i % len(PROMPTS)]} {i}", 6 + (i * 5) % 17) for i in range(24)]
    single = start_server(model_dir, tmp_path / "tp1.log", "--max-num-seqs", "8", "--max-model-len", "256",
                          "--no-prefix-caching")
    try:
        reference = [_greedy(single.client(), p, max_tokens=n).choices[0].text for p, n in requests]
        assert _metric(single, "tpinfer_prefix_caching") == 0 and _metric(single, "tpinfer_prefix_cache_hits_total") == 0
    finally:
        stop_server(single)
    server = start_server(model_dir, tmp_path / "pp2.log", "--pipeline-parallel-size", "2", "--max-num-seqs", "8",
                          "--max-model-len", "256")
    try:
        alone = [_greedy(server.client(), p, max_tokens=n).choices[0].text for p, n in requests[:6]]
        assert alone == reference[:6]
        hits = _metric(server, "tpinfer_prefix_cache_hits_total")
        assert _together(server, requests) == reference  # 24 requests over 8 slots, two micro-batches in flight
        assert _metric(server, "tpinfer_prefix_caching") == 1
        assert _metric(server, "tpinfer_prefix_cache_hits_total") - hits >= 11 * 16  # the system prompt, 11 times
        assert _metric(server, "tpinfer_pipeline_parallel_size") == 2
        busy, bubble = _metric(server, "tpinfer_pipeline_busy_seconds_total"), _metric(
            server, "tpinfer_pipeline_bubble_seconds_total")
        assert 0 < bubble < busy
        assert _metric(server, 'tpinfer_pipeline_bytes_total{direction="sent"}') > 0
        assert _metric(server, 'tpinfer_pipeline_bytes_total{direction="received"}') > 0
    finally:
        stop_server(server)


def _replica_metric(server, name: str) -> dict[str, float]:
    import httpx

    out = {}
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + "{"):
            out[line.split('replica="')[1].split('"')[0]] = float(line.split()[1])
    return out


def test_two_replicas_serve_32_concurrent_requests_like_sequential_ones(model_dir, tmp_path):
    requests = [(f"{PROMPTS[i % len(PROMPTS)]} {i}", 6 + (i * 7) % 19) for i in range(32)]
    server = start_server(model_dir, tmp_path / "dp2.log", "--data-parallel-size", "2", "--max-num-seqs", "8",
                          "--max-model-len", "256")
    try:
        alone = [_greedy(server.client(), p, max_tokens=n).choices[0].text for p, n in requests]
        generated = _replica_metric(server, "tpinfer_replica_generation_tokens_total")
        assert _together(server, requests) == alone  # routed to the least-loaded replica, queued, batched
        after = _replica_metric(server, "tpinfer_replica_generation_tokens_total")
        assert sorted(after) == ["0", "1"]
        assert all(after[d] > generated[d] for d in after), (generated, after)  # both replicas took requests
        assert sum(after.values()) - sum(generated.values()) == sum(n for _, n in requests)
    finally:
        stop_server(server)
    assert "tp=1 x pp=1 x dp=2" in server.log.read_text()

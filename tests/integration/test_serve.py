"""``tpinfer serve`` against the real ``openai`` client, on loopback, at TP=1 and TP=2.

Each server is a real subprocess (``python -m tpinfer.cli.main serve``) shared by a module's tests;
teardown kills its process group. The TP=1 server requires an API key (given through
TPINFER_API_KEY); the TP=2 one does not. Failure handling (SIGKILL, SIGTERM, a full queue) is in
test_serve_faults.py, with servers of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from helpers import env, hf_greedy, make_checkpoint
from tpinfer.engine.runtime import EngineSpec, load_engine
from tpinfer.engine.sampling import SamplingParams
from tpinfer.engine.scheduler import Scheduler, Sequence
from tpinfer.parallel.context import ParallelContext
from tpinfer.serve.metrics import Metrics
from tpinfer.serve.outputs import ChoiceOutput, Delta, IncrementalDetokenizer
from tpinfer.tokenizer import Tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
API_KEY = "test-key-123"
NAME = "tiny"
PROMPTS = ["Hello world", "The function returns", "Tensor parallelism splits", "A list is", "Return the number of",
           "The quick brown fox jumps", "hello tensor parallel world", "Each rank holds a slice"]


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def client(self, api_key: str = API_KEY, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60, **kwargs)

    def log_tail(self) -> str:
        return self.log.read_text()[-4000:] if self.log.exists() else ""


def write_checkpoint(path: Path, chat_template: bool = True, positions: int = 1024) -> Path:
    """The tiny llama test checkpoint, ``positions`` long (long streams for the fault tests), optionally a chat
    template."""
    make_checkpoint(path, "llama", max_position_embeddings=positions)
    if chat_template:
        config = json.loads((path / "tokenizer_config.json").read_text())
        config["chat_template"] = CHAT_TEMPLATE
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def start_server(model: Path, log: Path, *args: str, extra_env: dict[str, str] | None = None,
                 deadline_s: float = 90) -> Server:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "tpinfer.cli.main", "serve", "--model", str(model), "--port", str(port),
           "--served-model-name", NAME, *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env={**env(), **(extra_env or {})}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise AssertionError(f"server not healthy within {deadline_s} s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(server.proc.pid, signal.SIGKILL)  # anything left in its group
    except ProcessLookupError:
        pass
    server.proc.wait(10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def tp1(model_dir, tmp_path_factory):
    server = start_server(model_dir, tmp_path_factory.mktemp("log") / "tp1.log", "--max-num-seqs", "4",
                          "--max-model-len", "512", extra_env={"TPINFER_API_KEY": API_KEY})
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def tp2(model_dir, tmp_path_factory):
    server = start_server(model_dir, tmp_path_factory.mktemp("log") / "tp2.log", "--tensor-parallel-size", "2",
                          "--max-num-seqs", "8", "--max-model-len", "512")
    yield server
    stop_server(server)


@pytest.fixture(params=["tp1", "tp2"])
def server(request) -> Server:
    return request.getfixturevalue(request.param)


def _greedy(client: openai.OpenAI, prompt: str, max_tokens: int = 16, ignore_eos: bool = False, **kwargs):
    extra = {"extra_body": {"ignore_eos": True}} if ignore_eos else {}
    return client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, **extra, **kwargs)


def test_models_health_and_completion(server, model_dir):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    out = _greedy(client, "Hello world", max_tokens=12, ignore_eos=True, user="someone")
    assert out.object == "text_completion" and out.model == NAME and len(out.choices) == 1
    assert out.choices[0].finish_reason == "length"
    prompt_tokens = len(Tokenizer.from_pretrained(model_dir).encode("Hello world"))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_tokens, 12)
    assert out.usage.total_tokens == prompt_tokens + 12


def test_streaming_equals_whole_response(server):
    client = server.client()
    whole = _greedy(client, "The function returns", max_tokens=20)
    chunks = list(_greedy(client, "The function returns", max_tokens=20, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # as OpenAI: no counts unless stream_options asks for them
    counted = list(_greedy(client, "The function returns", max_tokens=20, stream=True,
                           stream_options={"include_usage": True}))
    assert all(c.usage is None for c in counted[:-1]) and counted[-1].choices == []
    assert counted[-1].usage == whole.usage


def test_chat_whole_and_streamed(server, model_dir):
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    prompt = "system: Be brief.\nuser: Hello world\nassistant:"
    expected = Tokenizer.from_pretrained(model_dir).encode(prompt, add_special_tokens=False)  # the template has no BOS
    assert whole.usage.prompt_tokens == len(expected)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


SYSTEM = "You are a helpful assistant. Each rank holds a slice of every weight matrix, and the ranks add up. "


def test_tp1_and_tp2_generate_the_same_greedy_text(tp1, tp2):
    hits = _metric(tp2, "tpinfer_prefix_cache_hits_total")
    # The later prompts start from the system prompt's cached keys and values (each rank copies its own heads').
    for prompt in [*PROMPTS[:3], *(SYSTEM + p for p in PROMPTS[:3])]:
        a = _greedy(tp1.client(), prompt, max_tokens=24, ignore_eos=True).choices[0].text
        b = _greedy(tp2.client(), prompt, max_tokens=24, ignore_eos=True).choices[0].text
        assert a == b
    assert _metric(tp2, "tpinfer_prefix_cache_hits_total") - hits >= 2 * 16


def test_n_seed_stop_and_logprobs(tp2):
    client = tp2.client()
    kwargs = dict(model=NAME, prompt="A list is", max_tokens=16, temperature=1.0, top_p=0.9, seed=7, n=3,
                  extra_body={"ignore_eos": True, "top_k": 50})
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2] and first.usage.completion_tokens == 3 * 16
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert len({c.text for c in first.choices}) > 1  # each choice draws its own tokens
    text = _greedy(client, "Hello world", max_tokens=24, ignore_eos=True).choices[0].text
    stop = text[6:8]
    for stream in (False, True):
        out = _greedy(client, "Hello world", max_tokens=24, ignore_eos=True, stop=[stop], stream=stream)
        choice = out.choices[0] if not stream else None
        got = choice.text if choice else "".join(c.choices[0].text for c in out if c.choices)
        assert got == text[: text.index(stop)]
    lp = _greedy(client, "Hello world", max_tokens=5, logprobs=2, ignore_eos=True).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 5 and all(x <= 0 for x in lp.token_logprobs)
    for top, chosen in zip(lp.top_logprobs, lp.token_logprobs, strict=True):
        assert len(top) <= 2 and max(top.values()) >= chosen - 1e-4
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 for t in chat.choices[0].logprobs.content)


def test_greedy_logprobs_equal_hf(server, model_dir):
    """Greedy decodes bring back only each rank's top candidates and log-sum-exp (not the logits): the chosen tokens'
    logprobs and their top alternatives still equal HF transformers' full softmax on the same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = Tokenizer.from_pretrained(model_dir)
    ids = tokenizer.encode("Hello world")
    out = server.client().completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0, logprobs=3,
                                             extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generated, _ = hf_greedy(hf, ids, 6)
    with torch.no_grad():
        logits = hf(torch.tensor([ids + generated])).logits[0, len(ids) - 1 : -1].log_softmax(-1)
    assert out.choices[0].text == tokenizer.decode(ids + generated)[len(tokenizer.decode(ids)):]
    assert lp.token_logprobs == pytest.approx(logits.max(-1).values.tolist(), abs=1e-4)
    for top, row in zip(lp.top_logprobs, logits, strict=True):  # keyed by text: tokens that read alike share a key
        best = row.topk(3).values.tolist()
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(best[0], abs=1e-4)
        assert all(any(abs(v - b) < 1e-4 for b in best) for v in top.values())


def test_echo_scores_the_prompt_as_hf_does(server, model_dir):
    """echo + logprobs (lm-evaluation-harness's loglikelihood request): every prompt token's logprob given the tokens
    before it, as HF transformers computes them on the same weights; max_tokens 0 only with echo; no echo in chat."""
    import torch
    from transformers import AutoModelForCausalLM

    client = server.client()
    ids = Tokenizer.from_pretrained(model_dir).encode("The quick brown fox jumps")
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(torch.tensor([ids])).logits[0]
    expected = logits.log_softmax(-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    scored = client.completions.create(model=NAME, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice = scored.choices[0]
    assert choice.finish_reason == "length" and scored.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    for lp, top, row in zip(choice.logprobs.token_logprobs[1:], choice.logprobs.top_logprobs[1:], logits[:-1],
                            strict=True):
        assert max(top.values()) == pytest.approx(float(row.log_softmax(-1).max()), abs=1e-4) and lp <= max(top.values())
    plain = _greedy(client, "The quick brown fox jumps", max_tokens=4, ignore_eos=True)
    both = _greedy(client, "The quick brown fox jumps", max_tokens=4, ignore_eos=True, echo=True, logprobs=0)
    assert both.choices[0].text == Tokenizer.from_pretrained(model_dir).decode(ids) + plain.choices[0].text
    assert len(both.choices[0].logprobs.tokens) == len(ids) + 4 and both.usage.completion_tokens == 4
    streamed = list(_greedy(client, "The quick brown fox jumps", max_tokens=4, ignore_eos=True, echo=True,
                            stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == both.choices[0].text
    with pytest.raises(openai.BadRequestError, match="only with echo"):
        _greedy(client, "hi", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="echo is a /v1/completions parameter"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body={"echo": True})


def test_32_concurrent_greedy_requests_equal_each_alone(tp2):
    requests = [(f"{PROMPTS[i % len(PROMPTS)]} {i}", 8 + (i * 5) % 23) for i in range(32)]
    client = tp2.client()
    alone = [_greedy(client, p, max_tokens=n).choices[0].text for p, n in requests]

    async def together() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{tp2.url}/v1", api_key="x", max_retries=0, timeout=60) as aclient:
            outs = await asyncio.gather(*(aclient.completions.create(model=NAME, prompt=p, max_tokens=n, temperature=0,
                                                                     stream=i % 2 == 1)
                                          for i, (p, n) in enumerate(requests)))
            texts = []
            for out in outs:
                if isinstance(out, openai.types.Completion):
                    texts.append(out.choices[0].text)
                else:
                    texts.append("".join([c.choices[0].text async for c in out if c.choices]))
            return texts

    assert asyncio.run(together()) == alone  # 32 requests over 8 slots: they queue, join and leave the batch


def test_sequence_parallel_server_packs_prompts_as_the_plain_one(tp2, model_dir, tmp_path):
    """--tp-plan auto-sp: a packed prefill row is split along the sequence between the ranks; the same concurrent
    requests (half behind a cached system prompt) give the same greedy text as the plain TP=2 server."""
    requests = [f"{SYSTEM if i % 2 else ''}{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(10)]

    async def together(url: str) -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60) as aclient:
            outs = await asyncio.gather(*(aclient.completions.create(model=NAME, prompt=p, max_tokens=8, temperature=0,
                                                                     extra_body={"ignore_eos": True})
                                          for p in requests))
            return [out.choices[0].text for out in outs]

    split = start_server(model_dir, tmp_path / "sp.log", "--tensor-parallel-size", "2", "--tp-plan", "auto-sp",
                         "--max-num-seqs", "8", "--max-model-len", "512")
    try:
        assert asyncio.run(together(split.url)) == asyncio.run(together(tp2.url))
    finally:
        stop_server(split)


BAD_BODIES = [
    (b"{not json", "invalid_json"),
    (b"[1, 2]", None),
    (json.dumps({"model": NAME}).encode(), "prompt"),
    (json.dumps({"model": NAME, "prompt": 5}).encode(), "prompt"),
    (json.dumps({"model": NAME, "prompt": "hi", "max_tokens": "ten"}).encode(), "max_tokens"),
    (json.dumps({"model": NAME, "prompt": "hi", "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"model": NAME, "prompt": "hi", "max_tokens": 100000}).encode(), "max_tokens"),
    (json.dumps({"model": NAME, "prompt": "hi " * 600}).encode(), "prompt"),
    (json.dumps({"model": "gpt-4", "prompt": "hi"}).encode(), "model"),
    (json.dumps({"model": NAME, "prompt": "hi", "temperature": -1}).encode(), "temperature"),
    (json.dumps({"model": NAME, "prompt": "hi", "temperature": 1e9}).encode(), "temperature"),
    (json.dumps({"model": NAME, "prompt": "hi", "top_p": 0}).encode(), "top_p"),
    (json.dumps({"model": NAME, "prompt": "hi", "top_p": 1.5}).encode(), "top_p"),
    (json.dumps({"model": NAME, "prompt": "hi", "top_k": -7}).encode(), "top_k"),
    (json.dumps({"model": NAME, "prompt": "hi", "n": 0}).encode(), "n"),
    (json.dumps({"model": NAME, "prompt": "hi", "n": 100}).encode(), "n"),
    (json.dumps({"model": NAME, "prompt": "hi", "seed": 1.5}).encode(), "seed"),
    (json.dumps({"model": NAME, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}).encode(), None),
    (json.dumps({"model": NAME, "prompt": "hi", "logprobs": 50}).encode(), "logprobs"),
    (json.dumps({"model": NAME, "prompt": "hi", "stream": "yes"}).encode(), "stream"),
    (json.dumps({"model": NAME, "prompt": [1, 99999]}).encode(), "prompt"),
    (json.dumps({"model": NAME, "prompt": []}).encode(), "prompt"),
    (json.dumps({"model": NAME, "prompt": "hi", "presence_penalty": 1.0}).encode(), None),
    (b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', "temperature"),
]
BAD_CHAT = [
    {"model": NAME, "messages": []},
    {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]},
    {"model": NAME, "messages": [{"role": "user", "content": 3}]},
    {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 99},
]


def _assert_openai_error(response: httpx.Response, status: int = 400, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not None and param not in ("invalid_json",):
        assert error["param"] == param, error
    if param == "invalid_json":
        assert error["code"] == "invalid_json"


def test_bad_inputs_get_openai_errors_and_the_server_keeps_serving(tp2):
    client = tp2.client()
    before = _greedy(client, "Hello world", max_tokens=10).choices[0].text
    with httpx.Client(base_url=tp2.url, timeout=30) as http:
        for body, param in BAD_BODIES:
            _assert_openai_error(http.post("/v1/completions", content=body,
                                           headers={"content-type": "application/json"}), 400, param)
        for body in BAD_CHAT:
            _assert_openai_error(http.post("/v1/chat/completions", json=body))
        _assert_openai_error(http.post("/v1/completions", content=b"x" * (2 << 20)), 413)
        _assert_openai_error(http.get("/v1/nowhere"), 404)
        for i in range(500):  # 500 mixed malformed requests
            if i % 3 == 2:
                response = http.post("/v1/chat/completions", json=BAD_CHAT[i % len(BAD_CHAT)])
            else:
                response = http.post("/v1/completions", content=BAD_BODIES[i % len(BAD_BODIES)][0])
            assert response.status_code == 400
        assert http.get("/health").status_code == 200
        metrics = http.get("/metrics").text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="hi", max_tokens=4, temperature=3)
    assert _greedy(client, "Hello world", max_tokens=10).choices[0].text == before
    assert 'tpinfer_requests_total{outcome="invalid"}' in metrics and "tpinfer_tensor_parallel_size 2" in metrics


def test_api_key_is_required_on_v1_routes(tp1):
    with pytest.raises(openai.AuthenticationError):
        tp1.client(api_key="wrong").completions.create(model=NAME, prompt="hi", max_tokens=2)
    response = httpx.post(f"{tp1.url}/v1/completions", content=b"{bad json")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{tp1.url}/v1/models").status_code == 401
    assert httpx.get(f"{tp1.url}/health").status_code == 200 and httpx.get(f"{tp1.url}/metrics").status_code == 200
    assert tp1.client().completions.create(model=NAME, prompt="hi", max_tokens=2).usage.completion_tokens >= 1


def metrics(server: Server, *names: str) -> list[float]:
    """The values of ``names`` (metrics without labels) from one read of /metrics."""
    values = {}
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            values[name] = float(value)
    missing = [name for name in names if name not in values]
    assert not missing, f"{missing} not in /metrics"
    return [values[name] for name in names]


def _metric(server: Server, name: str) -> float:
    return metrics(server, name)[0]


def test_a_client_that_disconnects_frees_its_slot(tp1):
    client = tp1.client()
    streams = [_greedy(client, p, max_tokens=480, ignore_eos=True, stream=True) for p in PROMPTS[:4]]  # all 4 slots
    for stream in streams:
        next(iter(stream))
    assert _metric(tp1, "tpinfer_num_requests_running") == 4
    for stream in streams:
        stream.close()
    deadline = time.monotonic() + 10
    while _metric(tp1, "tpinfer_num_requests_running") > 0:
        assert time.monotonic() < deadline, "slots were not freed after the clients left"
        time.sleep(0.05)
    assert _greedy(client, "Hello world", max_tokens=4).usage.completion_tokens >= 1
    assert _metric(tp1, "tpinfer_time_to_first_token_seconds_count") >= 4


def test_metrics_say_where_the_engine_thread_spends_its_steps(tp2):
    phases = ("schedule", "prefill", "decode", "sample")
    before = {p: _metric(tp2, f'tpinfer_step_seconds_total{{phase="{p}"}}') for p in phases}
    counters = ("tpinfer_prefill_tokens_total", "tpinfer_prefix_cache_queries_total", "tpinfer_prefix_cache_hits_total")
    counted = [_metric(tp2, name) for name in counters]
    folded = _metric(tp2, "tpinfer_folded_prefill_steps_total")
    start = time.monotonic()
    out = _greedy(tp2.client(), "Hello world", max_tokens=24, ignore_eos=True)
    wall = time.monotonic() - start
    spent = {p: _metric(tp2, f'tpinfer_step_seconds_total{{phase="{p}"}}') - before[p] for p in phases}
    assert all(spent[p] > 0 for p in ("schedule", "decode", "sample")), spent  # 24 steps, each sampled
    # The prompt either had a prefill forward of its own or rode in a decode forward (fold_prefill).
    assert spent["prefill"] > 1e-3 or _metric(tp2, "tpinfer_folded_prefill_steps_total") - folded == 1, spent
    assert sum(spent.values()) <= wall  # the request's steps, timed on the engine thread within its wall time
    prefilled, queried, hits = (_metric(tp2, name) - n for name, n in zip(counters, counted, strict=True))
    # Prompts are packed, not padded: every prompt token is either computed or found in the prefix cache (this prompt
    # may have been sent before, by another test on this server).
    assert queried == out.usage.prompt_tokens and prefilled + hits == out.usage.prompt_tokens and prefilled >= 1


def test_incremental_text_adds_up_and_a_stop_string_is_never_streamed(model_dir):
    tokenizer = Tokenizer.from_pretrained(model_dir)
    text = "Tensor parallelism splits every weight matrix across ranks; each rank holds a slice."
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer.decode)
    assert "".join(detokenizer.add(t) for t in ids) + detokenizer.flush() == tokenizer.decode(ids) == text

    class Stream:
        arrival = time.monotonic()
        events: list[Delta] = []

        def push(self, event: Delta, defer: bool = False) -> None:
            self.events.append(event)

    output = ChoiceOutput(Stream(), 0, tokenizer, Metrics(1, 1, 0), stop=("each rank", "zzz"), streaming=True)
    used = next(i for i, t in enumerate(ids) if output.add(t, None, None))  # the token completing "each rank"
    assert used < len(ids) - 1
    output.finish("stop")
    assert "".join(d.text for d in Stream.events) == "Tensor parallelism splits every weight matrix across ranks; "
    assert all("each" not in d.text for d in Stream.events) and Stream.events[-1].finish_reason == "stop"


def test_scheduler_short_request_joins_and_leaves_before_a_long_one(model_dir):
    engine = load_engine(EngineSpec(str(model_dir), max_batch_size=2, max_model_len=128), ParallelContext.single())
    scheduler = Scheduler(engine, max_num_seqs=2, max_waiting=1)
    finished: list[str] = []

    class Output:
        def __init__(self, name: str) -> None:
            self.name = name

        def add(self, token_id, logprob, top) -> bool:
            return False

        def finish(self, reason: str) -> None:
            finished.append(f"{self.name}:{reason}")

    def seq(name: str, new_tokens: int) -> Sequence:
        return Sequence([1, 40, 50, 60], SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True),
                        Output(name))

    long = seq("long", 40)
    assert scheduler.add([long]) and scheduler.step() and scheduler.step()
    assert scheduler.add([seq("short", 3)])
    assert not scheduler.add([seq("a", 1), seq("b", 1)])  # 2 + 2 sequences > 2 slots + 1 waiting place
    while scheduler.step():
        pass
    assert finished == ["short:length", "long:length"] and len(long.token_ids) == 40
    assert scheduler.num_running == scheduler.num_waiting == 0
    assert scheduler.add([seq("c", 2), seq("d", 2)])  # the slots came back

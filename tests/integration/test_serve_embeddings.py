"""``tpinfer serve`` on an encoder: POST /v1/embeddings with the real ``openai`` client, against sentence-transformers,
concurrent requests batched together, OpenAI-style 400s; and each kind of server refusing the other kind's routes."""

from __future__ import annotations

import base64
import re
import threading

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_encoder import MIN_COSINE, MINILM, SENTENCES, needs_minilm
from test_serve import NAME, start_server, stop_server, write_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180), needs_minilm]


@pytest.fixture(scope="module")
def encoder_server(tmp_path_factory):
    server = start_server(MINILM, tmp_path_factory.mktemp("log") / "minilm.log", "--tensor-parallel-size", "2",
                          "--max-num-seqs", "8")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(MINILM), device="cpu").encode(SENTENCES, convert_to_tensor=True).float()


def _min_cosine(vectors, reference: torch.Tensor) -> float:
    got = torch.tensor(np.asarray(vectors, dtype=np.float64))
    return F.cosine_similarity(got, reference.double(), dim=-1).min().item()


def test_openai_client_embeddings_equal_sentence_transformers(encoder_server, reference):
    from transformers import AutoTokenizer

    # The client asks for base64 (float32 bytes) by default and decodes them itself.
    response = encoder_server.client().embeddings.create(model=NAME, input=SENTENCES)
    assert [d.index for d in response.data] == list(range(len(SENTENCES)))
    assert _min_cosine([d.embedding for d in response.data], reference) >= MIN_COSINE
    tokenizer = AutoTokenizer.from_pretrained(str(MINILM))
    tokens = sum(len(tokenizer(s).input_ids) for s in SENTENCES)
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens
    floats = httpx.post(f"{encoder_server.url}/v1/embeddings", timeout=60,
                        json={"input": SENTENCES[:3], "encoding_format": "float"}).json()
    packed = httpx.post(f"{encoder_server.url}/v1/embeddings", timeout=60,
                        json={"input": SENTENCES[:3], "encoding_format": "base64"}).json()
    for f, b in zip(floats["data"], packed["data"], strict=True):
        assert np.array_equal(np.frombuffer(base64.b64decode(b["embedding"]), "<f4"), np.float32(f["embedding"]))
    assert floats["object"] == "list" and floats["model"] == NAME
    ids = tokenizer(SENTENCES[0]).input_ids  # token ids are an input too
    by_ids = httpx.post(f"{encoder_server.url}/v1/embeddings", json={"input": ids, "encoding_format": "float"}).json()
    assert np.allclose(by_ids["data"][0]["embedding"], floats["data"][0]["embedding"], atol=1e-6)


def test_concurrent_requests_each_get_their_own_embeddings(encoder_server, reference):
    client = encoder_server.client()
    results: dict[int, list[float]] = {}

    def one(i: int) -> None:
        results[i] = client.embeddings.create(model=NAME, input=SENTENCES[i]).data[0].embedding

    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(24))
    assert _min_cosine([results[i] for i in range(24)], reference[:24]) >= MIN_COSINE


@pytest.mark.parametrize("body, message", [
    ({"input": []}, "input: at least one input is needed"),
    ({"input": ""}, r"input\[0\] is empty"),
    ({"input": ["fine", ""]}, r"input\[1\] is empty"),
    ({"input": [101, 30522, 102]}, r"input\[0\]: token ids must be in \[0, 30522\)"),
    ({"input": "word " * 300}, "maximum input length is 256 tokens; input\\[0\\] has 302"),
    ({"input": "a sentence", "dimensions": 128}, "this model's embeddings have 384 dimensions"),
    ({"input": "a sentence", "encoding_format": "int8"}, "encoding_format"),
    ({"input": ["x"] * 2049}, "at most 2048 inputs per request"),
])
def test_bad_inputs_get_openai_errors_and_the_server_keeps_serving(encoder_server, body, message):
    response = httpx.post(f"{encoder_server.url}/v1/embeddings", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert re.search(message, error["message"]), error["message"]
    assert httpx.get(f"{encoder_server.url}/health").status_code == 200


def test_truncation_on_request_and_the_routes_an_encoder_does_not_serve(encoder_server):
    long = " ".join(SENTENCES)
    cut = httpx.post(f"{encoder_server.url}/v1/embeddings", json={"input": long, "truncate": True}, timeout=60)
    assert cut.status_code == 200 and cut.json()["usage"]["prompt_tokens"] == 256
    for route in ("/v1/completions", "/v1/chat/completions"):
        response = httpx.post(f"{encoder_server.url}{route}", json={"prompt": "Hi", "messages": []}, timeout=60)
        assert response.status_code == 400
        assert "runs an encoder" in response.json()["error"]["message"]


def test_a_causal_lm_server_refuses_embeddings(tmp_path):
    model = write_checkpoint(tmp_path / "tiny", chat_template=False)
    server = start_server(model, tmp_path / "llama.log", "--max-num-seqs", "2", "--max-model-len", "128")
    try:
        response = httpx.post(f"{server.url}/v1/embeddings", json={"input": "Hello"}, timeout=60)
        assert response.status_code == 400
        assert "/v1/embeddings needs an encoder model" in response.json()["error"]["message"]
    finally:
        stop_server(server)

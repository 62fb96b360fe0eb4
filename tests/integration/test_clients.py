"""The clients people point at an OpenAI-compatible server, unchanged, against ``tpinfer serve`` at TP=2:
LangChain's ``ChatOpenAI`` (langchain-openai) and lm-evaluation-harness's ``local-completions`` model on a small
local task file (a loglikelihood task and a ``generate_until`` task; no dataset download)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_serve import NAME, start_server, stop_server, write_checkpoint

from tpinfer.tokenizer import Tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DOCS = [
    {"question": "The function returns", "choices": [" a value", " the list", " nothing"], "answer": 0},
    {"question": "A list is", "choices": [" mutable", " a tuple"], "answer": 1},
    {"question": "Tensor parallelism splits", "choices": [" every weight", " the data", " nothing at all"], "answer": 2},
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = write_checkpoint(tmp_path_factory.mktemp("clients") / "tiny")
    server = start_server(model, tmp_path_factory.mktemp("log") / "tp2.log", "--tensor-parallel-size", "2",
                          "--max-num-seqs", "8", "--max-model-len", "512")
    yield model, server
    stop_server(server)


def test_langchain_chat_openai(served):
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    _, server = served
    chat = ChatOpenAI(model=NAME, base_url=f"{server.url}/v1", api_key="unused", temperature=0, max_tokens=8,
                      max_retries=0, timeout=60)
    messages = [SystemMessage("Be brief."), HumanMessage("Hello world")]
    whole = chat.invoke(messages)
    direct = server.client().chat.completions.create(model=NAME, max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}])
    assert whole.content == direct.choices[0].message.content
    assert whole.usage_metadata["output_tokens"] == direct.usage.completion_tokens
    streamed = list(chat.stream(messages))
    assert "".join(chunk.content for chunk in streamed) == whole.content


def _task_files(root, data) -> None:
    """A multiple-choice (loglikelihood) task and a generate_until task over the same local documents."""
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in data))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'docs.jsonl'}\n"
              "test_split: test\ndoc_to_text: '{{question}}'\n")
    (root / "tpinfer_mc.yaml").write_text(
        "task: tpinfer_mc\n" + common + "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (root / "tpinfer_gen.yaml").write_text(
        "task: tpinfer_gen\n" + common + "output_type: generate_until\ndoc_to_target: '{{choices[answer]}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")


def test_lm_eval_local_completions_scores_as_hf(served, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM

    model, server = served
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    _task_files(tmp_path, DOCS)
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model={NAME},base_url={server.url}/v1/completions,tokenizer={model},tokenized_requests=True,"
                   "num_concurrent=1,max_retries=1",
        tasks=["tpinfer_mc", "tpinfer_gen"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    assert 0.0 <= results["results"]["tpinfer_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["results"]["tpinfer_gen"]["exact_match,none"] <= 1.0
    # The harness's loglikelihood of each choice equals HF transformers' on the same tokens (the harness's own
    # context/continuation split), and its greedy flag agrees.
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    tokenizer = Tokenizer.from_pretrained(model)
    samples = results["samples"]["tpinfer_mc"]
    assert len(samples) == len(DOCS)
    for sample in samples:
        for arguments, (loglik, greedy) in zip(
                sample["arguments"], (tuple(r[0]) for r in sample["resps"]), strict=True):
            context, continuation = arguments.values() if isinstance(arguments, dict) else arguments
            ctx = tokenizer.hf(context, add_special_tokens=False).input_ids
            whole = tokenizer.hf(context + continuation, add_special_tokens=False).input_ids
            with torch.no_grad():
                logprobs = hf(torch.tensor([whole])).logits[0].log_softmax(-1)
            targets = whole[len(ctx):]
            rows = logprobs[len(ctx) - 1 : len(whole) - 1]
            expected = float(rows.gather(1, torch.tensor(targets)[:, None]).sum())
            assert math.isfinite(loglik) and loglik == pytest.approx(expected, abs=1e-3)
            assert greedy == bool((rows.argmax(-1) == torch.tensor(targets)).all())
    generated = results["samples"]["tpinfer_gen"]
    assert len(generated) == len(DOCS) and all(isinstance(s["resps"][0][0], str) for s in generated)

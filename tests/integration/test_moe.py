"""Mixture-of-experts families against HF transformers' own classes, in both expert layouts, and their bad inputs."""

import json

import pytest
from safetensors.torch import load_file, save_file

from helpers import hf_greedy, hf_model, make_checkpoint
from tpinfer import LLM, SamplingParams, kernels
from tpinfer.config import ConfigError, ModelConfig
from tpinfer.engine.bench import collect
from tpinfer.loading.checkpoint import CheckpointError
from tpinfer.parallel.plan import PlanError, resolve_plan

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

VARIANTS = ("mixtral", "qwen2_moe", "qwen3_moe")
PROMPT = [1, 5, 9, 14, 3, 8, 2, 40, 77, 120]
# Float32 HF and tpinfer sum the same products in other orders (TP's all-reduce, the experts' index_add): a few ulps.
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {v: make_checkpoint(root / v, v) for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_equal_hf_at_every_size_and_layout(moe, variant):
    path = moe[variant]
    tokens, first = hf_greedy(hf_model(path), PROMPT, 10)
    for tp, layout, pp in [(1, "tensor", 1), (2, "tensor", 1), (2, "expert", 1), (4, "tensor", 1), (4, "expert", 1),
                           (2, "expert", 2)]:
        with LLM(str(path), tensor_parallel_size=tp, moe_parallel=layout, pipeline_parallel_size=pp, dtype="float32",
                 progress=False) as llm:
            out = llm.generate([PROMPT], SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True))[0]
            load = llm.engine.model.expert_load()  # rank 0's layers: the first pipeline stage's
            native = llm.engine.native_decode
        # Decode through the kernels' attention where they apply (not with Qwen3-MoE's q/k norms).
        assert native == (variant != "qwen3_moe" and kernels.available())
        assert out.token_ids == tokens, (tp, layout, pp)
        assert out.logprobs[0] == pytest.approx(first, abs=LOGPROB_TOL), (tp, layout, pp)
        # Every token of the prefill and of each decode step picked top-2 of 8 in every MoE layer.
        assert all(sum(counts) == 2 * (len(PROMPT) + 9) for counts in load.values()), load


def test_expert_parallelism_holds_and_reads_only_its_experts(moe):
    path = moe["mixtral"]
    config = ModelConfig.from_pretrained(path)
    hidden, ffn = config.hidden_size, config.intermediate_size
    with LLM(str(path), tensor_parallel_size=4, moe_parallel="expert", dtype="float32", progress=False) as llm:
        ranks = collect(llm.engine, "stats")
        read = llm.engine.load_stats["bytes"]
        experts = [k for k in llm.engine.model.model.layers[0].block_sparse_moe.experts]
    assert experts == ["0", "1"]  # rank 0 owns experts 0 and 1 of 8
    expert_bytes = 3 * hidden * ffn * 4
    with LLM(str(path), tensor_parallel_size=4, moe_parallel="tensor", dtype="float32", progress=False) as llm:
        tensor_ranks = collect(llm.engine, "stats")
    # Whole experts, 2 of 8 per rank, against a quarter of each of the 8: the same bytes per rank.
    assert [r["param_bytes"] for r in ranks] == [r["param_bytes"] for r in tensor_ranks]
    layers = config.num_hidden_layers
    assert read >= layers * 2 * expert_bytes  # its two experts' tensors in every layer
    assert read < layers * 3 * expert_bytes + 4 * config.vocab_size * hidden * 2  # and not the other six


def test_bad_moe_inputs_are_refused_by_name(moe, tmp_path):
    raw = json.loads((moe["mixtral"] / "config.json").read_text())
    six = ModelConfig.from_dict({**raw, "num_local_experts": 6})  # 8 heads and 6 experts: only 1 and 2 split both
    with pytest.raises(PlanError, match="6 experts are not divisible by tp=4 .*valid sizes for this model: 1, 2$"):
        resolve_plan(six, 4, "auto", moe_parallel="expert")
    resolve_plan(six, 4, "auto", moe_parallel="tensor")  # each expert split: the expert count does not matter
    with pytest.raises(PlanError, match="has no mixture-of-experts layers"):
        resolve_plan(ModelConfig.from_pretrained(make_checkpoint(tmp_path / "dense", "mistral")), 1, "auto",
                     moe_parallel="expert")
    with pytest.raises(ConfigError, match="num_experts_per_tok=9 must be between 1 and the 8 experts"):
        ModelConfig.from_dict({**raw, "num_experts_per_tok": 9})
    # A checkpoint missing one expert's tensor: named, before anything is served.
    broken = make_checkpoint(tmp_path / "broken", "mixtral", shards=1)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.5.w2.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.block_sparse_moe\.experts\.5\.w2"):
        LLM(str(broken), progress=False)


def test_serving_a_moe_model_batches_and_reports_expert_load(moe, tmp_path):
    import asyncio

    import httpx
    import openai
    from test_serve import NAME, _greedy, start_server, stop_server

    server = start_server(moe["qwen2_moe"], tmp_path / "moe.log", "--tensor-parallel-size", "2", "--moe-parallel",
                          "expert", "--max-num-seqs", "4", "--max-model-len", "256")
    try:
        prompts = [f"Hello world {i}" for i in range(8)]
        alone = [_greedy(server.client(), p, max_tokens=6, ignore_eos=True).choices[0].text for p in prompts]

        async def together() -> list[str]:
            async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:
                outs = await asyncio.gather(*(client.completions.create(
                    model=NAME, prompt=p, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
                    for p in prompts))
                return [o.choices[0].text for o in outs]

        assert asyncio.run(together()) == alone
        lines = [line for line in httpx.get(f"{server.url}/metrics").text.splitlines()
                 if line.startswith("tpinfer_expert_tokens_total{")]
        layers = {line.split('layer="')[1].split('"')[0] for line in lines}
        assert layers == {"1", "2"} and len(lines) == 2 * 8  # layer 0 is dense (mlp_only_layers)
        assert sum(float(line.split()[-1]) for line in lines) > 0
    finally:
        stop_server(server)


def test_planner_and_info_count_moe_communication_and_bytes_as_the_engine_measures_them(moe):
    from tpinfer.cli.info import model_info
    from tpinfer.planner import build_request, load_model, make_plan
    from tpinfer.planner.report_json import to_json

    path = moe["mixtral"]
    model = load_model(path)
    assert model.engine_supported and model.num_local_experts == 8
    plan = to_json(make_plan(model, build_request(model, gpu="cpu", gpus_per_node=2, dtype="fp32",
                                                  memory_bandwidth=20.0)))
    (tp2,) = [lay for lay in plan["layouts"] if (lay["tp"], lay["pp"], lay["dp"]) == (2, 1, 1)]
    info = next(e for e in model_info(str(path), "float32")["tp_sizes"] if e["tp"] == 2)["moe"]
    for layout in ("tensor", "expert"):
        with LLM(str(path), tensor_parallel_size=2, moe_parallel=layout, dtype="float32", progress=False) as llm:
            held = [r["param_bytes"] for r in collect(llm.engine, "stats")]
            stats = llm.engine.ctx.comm.stats
            stats.reset()
            llm.generate([PROMPT], SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True))
        # Per step: the embedding's all-reduce, then o_proj's and the MoE block's in every layer.
        assert (stats.calls["all_reduce"] / 5 == tp2["comm"]["all_reduces_per_token"]
                == info[layout]["all_reduces_per_token"] == 2 * 2 + 1)
        # Each of one hidden state per token: the prompt's 10 tokens, then 4 decode steps of one.
        assert stats.bytes["all_reduce"] == info[layout]["all_reduce_bytes_per_token"] * (len(PROMPT) + 4)
        # What each rank of the running engine holds is what info reports for the layout.
        assert held == [info[layout]["bytes_per_rank"]] * 2, layout

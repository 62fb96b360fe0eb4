"""Pipeline stages (TP x PP): the same greedy tokens and first logprob as TP=1, per-rank bytes equal to the planner's,
the planner's layer split, bad layouts refused before any process starts, and a dead last stage ends the job."""

import re

import pytest
import torch
from test_engine_faults import _no_orphans, _run_script

from helpers import make_checkpoint, run_ranks
from tpinfer import LLM, SamplingParams
from tpinfer.config import ModelConfig
from tpinfer.engine.bench import collect
from tpinfer.parallel.mesh import Mesh, MeshError, split_layers, stage_layers
from tpinfer.planner.dtypes import get_dtype
from tpinfer.planner.hardware import get_device
from tpinfer.planner.memory import Layout, estimate_memory
from tpinfer.planner.model import EngineModel, stage_elements

pytestmark = pytest.mark.timeout(300)

PROMPTS = [[1, 5, 9, 14, 3, 7], [1, 7, 2]]
GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
# Stages alone change nothing numerically (each layer runs as it would in one process); TP sums partial products in
# another order, so its float32 logprobs differ by rounding (a few ulps of values around 1-10).
LOGPROB_TOL = 1e-5


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    return {v: make_checkpoint(root / v, v, num_hidden_layers=4) for v in ("llama", "gemma2", "qwen3", "phi3")}


def _generate(path, tp: int = 1, pp: int = 1):
    with LLM(str(path), tensor_parallel_size=tp, pipeline_parallel_size=pp, dtype="float32", progress=False) as llm:
        return [(o.token_ids, o.logprobs[0]) for o in llm.generate(PROMPTS, GREEDY)]


def _assert_same(got, want) -> None:
    for (tokens, first), (ref_tokens, ref_first) in zip(got, want, strict=True):
        assert tokens == ref_tokens
        assert first == pytest.approx(ref_first, abs=LOGPROB_TOL)


@pytest.mark.parametrize("variant", ["llama", "gemma2", "qwen3", "phi3"])  # gemma2: tied head on the last stage
def test_stages_reproduce_one_process(four_layers, variant):
    path = four_layers[variant]
    reference = _generate(path)
    layouts = [(1, 2), (2, 2), (1, 4)] if variant in ("llama", "gemma2") else [(1, 2), (2, 2)]
    for tp, pp in layouts:
        _assert_same(_generate(path, tp, pp), reference)


def test_uneven_split_follows_the_planner(tmp_path):
    path = make_checkpoint(tmp_path / "three", "llama", num_hidden_layers=3)
    assert split_layers(3, 2) == (2, 1)  # the first stages take one more
    _assert_same(_generate(path, 1, 2), _generate(path))


def test_rank_bytes_at_tp2_pp2_equal_the_planner(four_layers):
    path = four_layers["gemma2"]  # tied embeddings: the last stage holds its own head
    config = ModelConfig.from_pretrained(path)
    mesh = Mesh(2, 2)
    rank_bytes = EngineModel(config, "tiny").rank_bytes(2, get_dtype("float32"))
    layers = split_layers(config.num_hidden_layers, 2)
    with LLM(str(path), tensor_parallel_size=2, pipeline_parallel_size=2, dtype="float32", progress=False) as llm:
        stats = collect(llm.engine, "stats")
        cache = llm.engine.generator.cache
        assert sum(k is not None for k in cache.keys) == layers[0]  # rank 0's cache holds only its layers
    by_rank = {s["rank"]: s for s in stats}
    assert sorted(by_rank) == [0, 1, 2, 3]
    # The planner's memory estimate splits layers with the same function the stages were built from.
    planned = estimate_memory(EngineModel(config, "tiny"), Layout(2, 2, 1), get_dtype("float32"),
                              get_device("cpu"), 4, 64, 1)
    assert planned.stage_layers == layers
    for rank, s in by_rank.items():
        stage = mesh.coords(rank)[0]
        assert s["param_bytes"] == stage_elements(rank_bytes, layers, stage), rank  # the planner's figure, exactly
        assert s["param_bytes"] == planned.stages[stage].weights
        assert s["layers"] == list(stage_layers(config.num_hidden_layers, 2, stage))
        assert s["all_reduce_backend"] == "ShmAllReduce"  # each stage's TP group has its own shared-memory segment


def test_bad_layouts_are_refused_before_loading(four_layers):
    with pytest.raises(MeshError, match="pp=5 must be between 1 and the model's 4 layers"):
        LLM(str(four_layers["llama"]), pipeline_parallel_size=5, progress=False)
    with pytest.raises(MeshError, match="world size 6 is not tp 2 x pp 2 x dp 1 = 4"):
        Mesh(2, 2).check_world(6)
    assert "spans nodes" in Mesh(4, 2).tp_crossing(6)
    assert Mesh(2, 2).tp_crossing(2) is None


def test_mesh_places_tp_innermost():
    mesh = Mesh(tp=2, pp=2, dp=2)
    assert [mesh.coords(r) for r in range(8)] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1),
                                                  (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert mesh.tp_group(1, 0) == [4, 5] and mesh.pp_group(1, 1) == [3, 7]
    assert mesh.replica_group(1) == [2, 3, 6, 7]
    for rank in range(8):
        assert mesh.rank(*mesh.coords(rank)) == rank


def test_sampled_tokens_agree_with_stages(four_layers):
    params = SamplingParams(max_new_tokens=8, temperature=1.2, top_k=20, seed=3, ignore_eos=True)
    path = four_layers["llama"]
    with LLM(str(path), tensor_parallel_size=1, pipeline_parallel_size=2, progress=False) as llm:
        first = [o.token_ids for o in llm.generate(PROMPTS, params)]
        again = [o.token_ids for o in llm.generate(PROMPTS, params)]
    assert first == again and all(len(t) == 8 for t in first)


def test_scores_come_from_the_last_stage(four_layers):
    path = four_layers["qwen3"]
    sequence = [1, 4, 9, 16, 25, 3]
    with LLM(str(path), dtype="float32", progress=False) as llm:
        want = llm.score([sequence])[0]
    with LLM(str(path), pipeline_parallel_size=2, dtype="float32", progress=False) as llm:
        got = llm.score([sequence])[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tp", [1, 2])
def test_a_killed_last_stage_rank_ends_every_process(four_layers, tp):
    last = 2 * tp - 1  # the last stage's last TP rank
    proc, elapsed = _run_script(f"""
        import os, signal, time
        from tpinfer import LLM, SamplingParams
        llm = LLM("{four_layers['llama']}", tensor_parallel_size={tp}, pipeline_parallel_size=2, progress=False)
        print("pids:" + ",".join(str(p.pid) for p in llm.launcher.processes) + ";", flush=True)
        llm.generate(["Hello"], SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True))
        os.kill(llm.launcher.processes[{last - 1}].pid, signal.SIGKILL)
        llm.generate(["Hello"], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
        print("should not get here")
    """)
    assert proc.returncode != 0 and "should not get here" not in proc.stdout
    # -9, or None when the watchdog reads the exit code a moment too early
    assert re.search(rf"rank {last} exited with code (-9|None)", proc.stderr), proc.stderr[-2000:]
    assert elapsed < 30
    _no_orphans(proc.stdout)


def _residual_shapes(ctx, path, plan, length):
    """Every layer's output shape in a prefill of ``length`` tokens, and the greedy tokens after it."""
    from tpinfer.api import TPModel
    from tpinfer.engine.runtime import EngineSpec, load_engine

    engine = load_engine(EngineSpec(str(path), tensor_parallel_size=ctx.tp_size, tp_plan=plan, dtype="float32"), ctx)
    shapes = []
    for layer in engine.model.model.layers:
        layer.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    ids = torch.arange(1, length + 1)[None]
    tokens = TPModel(engine).generate(ids, max_new_tokens=4)[0, length:].tolist()
    return shapes[: len(engine.model.model.layers)], tokens


@pytest.mark.parametrize("variant", ["llama", "gemma2", "phi3"])
def test_sequence_parallel_splits_the_residual_stream_and_gives_the_same_tokens(four_layers, variant):
    path, length = four_layers[variant], 9  # not a multiple of tp: the last rank's chunk is padded
    plain = run_ranks(2, _residual_shapes, path, "auto", length)
    split = run_ranks(2, _residual_shapes, path, "auto-sp", length)
    hidden = ModelConfig.from_pretrained(path).hidden_size
    assert all(shape == (1, length, hidden) for shape in plain[0][0])
    assert all(shape == (1, 5, hidden) for rank in split for shape in rank[0])  # ceil(9 / 2) positions per rank
    assert split[0][1] == split[1][1] == plain[0][1]


def test_sequence_parallel_plans_are_all_or_nothing(four_layers):
    from tpinfer.parallel.plan import PlanError, resolve_plan

    config = ModelConfig.from_pretrained(four_layers["llama"])
    assert resolve_plan(config, 2, "auto-sp").sequence_parallel
    assert not resolve_plan(config, 2, "auto").sequence_parallel
    with pytest.raises(PlanError, match="every norm must be sequence_parallel"):
        resolve_plan(config, 2, {**config.family.auto_plan, "model.norm": "sequence_parallel"})


def test_torchrun_world_that_stages_do_not_divide_is_refused_before_joining(four_layers, monkeypatch):
    from tpinfer import from_pretrained

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(MeshError, match="pipeline_parallel_size=2 does not divide the world size 3"):
        from_pretrained(str(four_layers["llama"]), pipeline_parallel_size=2)

"""Loading from safetensors: every tensor once, and every bad checkpoint a clear error naming file and tensor."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tpinfer.config import ConfigError
from tpinfer.engine.runtime import EngineSpec, load_engine
from tpinfer.engine.sampling import SamplingParams
from tpinfer.loading import hugepages
from tpinfer.loading.checkpoint import CheckpointError
from tpinfer.parallel.context import ParallelContext


def _load(path, **kw):
    return load_engine(EngineSpec(str(path), **kw), ParallelContext.single())


@pytest.fixture
def ckpt(tmp_path, checkpoints):
    dst = tmp_path / "model"
    shutil.copytree(checkpoints["mistral"], dst)
    return dst


def _first_shard(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return path / sorted(set(index["weight_map"].values()))[0]


def test_loads_every_tensor_once_from_a_sharded_checkpoint(ckpt):
    engine = _load(ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert engine.load_stats["tensors"] == len(index["weight_map"])
    expected = {}
    for file in set(index["weight_map"].values()):
        expected.update(load_file(ckpt / file))
    params = dict(engine.model.named_parameters())
    for name, tensor in expected.items():
        assert torch.equal(params[name], tensor), name


def test_single_file_checkpoint(tmp_path, ckpt):
    tensors = {}
    for file in set(json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"].values()):
        tensors.update(load_file(ckpt / file))
        (ckpt / file).unlink()
    (ckpt / "model.safetensors.index.json").unlink()
    save_file(tensors, ckpt / "model.safetensors")
    assert _load(ckpt).load_stats["tensors"] == len(tensors)


@pytest.mark.parametrize("dtype,expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                            ("float32", torch.float32), ("auto", torch.float32)])
def test_dtypes(ckpt, dtype, expected):
    engine = _load(ckpt, dtype=dtype)
    assert {p.dtype for p in engine.model.parameters()} == {expected}


def _rewrite_first_shard(path, edit):
    shard = _first_shard(path)
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard)
    return shard


def test_missing_tensor_is_named(ckpt):
    removed = {}

    def drop(t):
        name = sorted(t)[0]
        removed["name"] = name
        del t[name]

    shard = _rewrite_first_shard(ckpt, drop)
    with pytest.raises(CheckpointError, match=f"{shard.name}: missing tensor {removed['name']}"):
        _load(ckpt)


def test_missing_tensor_in_index_and_file_is_named(ckpt):
    index_file = ckpt / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    del index["weight_map"][name]
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"missing tensor {name}"):
        _load(ckpt)


def test_extra_tensor_is_named(ckpt):
    shard = _rewrite_first_shard(ckpt, lambda t: t.__setitem__("model.layers.9.extra.weight", torch.zeros(2)))
    index_file = ckpt / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.layers.9.extra.weight"] = shard.name
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{shard.name}: unexpected tensor model.layers.9.extra.weight"):
        _load(ckpt)


def test_misshaped_tensor_is_named(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    name = "model.layers.0.self_attn.q_proj.weight"
    shard = ckpt / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor {name} has shape \[3, 3\], config.json implies \[64, 64\]"):
        _load(ckpt)


def test_truncated_file_is_named(ckpt):
    shard = _first_shard(ckpt)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{shard.name}: not a readable safetensors file"):
        _load(ckpt)


def test_corrupt_header_is_named(ckpt):
    shard = _first_shard(ckpt)
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage-header}" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match=f"{shard.name}: not a readable safetensors file"):
        _load(ckpt)


def test_missing_shard_file_is_named(ckpt):
    shard = _first_shard(ckpt)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name} is listed in model.safetensors.index.json but missing"):
        _load(ckpt)


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        _load(ckpt)


def test_pickle_checkpoints_are_not_loaded(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
                                                      "intermediate_size": 8, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle checkpoints are not loaded"):
        _load(tmp_path)


def _in_arena(tensor, arena):
    return arena.address <= tensor.data_ptr() and tensor.data_ptr() + tensor.nbytes <= arena.address + arena.nbytes


@pytest.mark.parametrize("variant", ["llama", "mistral"])  # tied and untied embeddings
def test_weights_live_in_one_huge_page_mapping(checkpoints, variant):
    engine = _load(checkpoints[variant])
    arena = engine.model.weight_arena
    if not hugepages.enabled():
        pytest.skip("this platform has no MADV_HUGEPAGE")
    params = dict(engine.model.named_parameters(remove_duplicate=False))
    assert arena is not None and all(_in_arena(p, arena) for p in params.values())
    if variant == "llama":  # tied: one tensor, still shared after the move
        assert params["lm_head.weight"] is params["model.embed_tokens.weight"]
    starts = sorted({p.data_ptr() for p in params.values()})
    assert all(s % 64 == 0 for s in starts)
    assert arena.nbytes == sum(-(-p.nbytes // 64) * 64 for p in {id(p): p for p in params.values()}.values())
    # The advice is recorded on the mapping (whether the kernel could hand out huge pages is its business).
    flags = _vm_flags(arena.address)
    assert flags is None or "hg" in flags


def _vm_flags(address: int) -> list[str] | None:
    try:
        text = open("/proc/self/smaps").read()
    except OSError:
        return None
    inside = False
    for line in text.splitlines():
        head = line.split()[0] if line else ""
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    return None


def test_huge_pages_switch_and_what_is_left_alone(checkpoints, monkeypatch):
    zeroed = torch.nn.Parameter(torch.zeros(3, 5), requires_grad=False)
    assert hugepages.place_in_huge_pages([zeroed, zeroed, torch.nn.Parameter(torch.empty(0))]) is not None
    assert torch.equal(zeroed, torch.zeros(3, 5))  # the new storage starts zeroed (padded vocabulary rows)
    monkeypatch.setenv(hugepages.ENV_SWITCH, "0")
    assert hugepages.place_in_huge_pages([torch.nn.Parameter(torch.ones(4))]) is None
    engine = _load(checkpoints["mistral"])
    assert engine.model.weight_arena is None
    assert engine.generator.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3, temperature=0.0))[0].token_ids

"""Planner arithmetic: parameter counts, bytes, TP sizes, shard agreement, memory and communication formulas."""

from __future__ import annotations

import json

import pytest

from tpinfer.config import ModelConfig
from tpinfer.parallel import shard
from tpinfer.planner import load_model, per_rank_weight_bytes
from tpinfer.planner.architecture import Architecture
from tpinfer.planner.catalogue import CATALOGUE, catalogue_model
from tpinfer.planner.comm import all_gather_seconds, all_reduce_seconds, placement, send_seconds
from tpinfer.planner.dtypes import get_dtype
from tpinfer.planner.hardware import LINKS, get_device, get_link
from tpinfer.planner.memory import Layout, activation_bytes, estimate_memory, total_weight_bytes
from tpinfer.planner.model import EngineModel, reason_kind, split_layers, stage_elements, valid_tp_sizes
from tpinfer.planner.plan import tp_sizes

GB = 1e9

# Published parameter counts (HF model cards / safetensors metadata): the catalogue's numbers must reproduce
# them exactly, since they are computed from the architecture and nothing is typed in.
PUBLISHED = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "llama-3.1-405b": 405_853_388_800,
    "llama-3.2-1b": 1_235_814_400,
    "mistral-7b": 7_241_732_096,
    "qwen2-7b": 7_615_616_512,
    "qwen2-72b": 72_706_203_648,
    "mixtral-8x7b": 46_702_792_704,
    "tinyllama-1.1b": 1_100_048_384,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_published(name: str) -> None:
    assert load_model(name).parameter_count() == PUBLISHED[name]


@pytest.mark.parametrize(
    ("name", "seed_gb"),
    [("llama-3-8b", 16), ("llama-3-70b", 140), ("llama-3.1-405b", 810)],
)
def test_seed_fp16_table(name: str, seed_gb: float) -> None:
    # The seed rounds to two or three significant figures ("~16 GB", "~140 GB", "~810 GB"); the real
    # figures are 16.06, 141.1 and 811.7 GB, so 1% covers the rounding and nothing more.
    weights = total_weight_bytes(load_model(name), get_dtype("fp16"))
    assert weights / GB == pytest.approx(seed_gb, rel=0.01)
    fp32 = total_weight_bytes(load_model(name), get_dtype("fp32"))
    assert fp32 == 2 * weights


def test_opt_175b_counts() -> None:
    opt = load_model("opt-175b")
    # 175B is the paper's rounded name; the architecture gives 174.6 B (0.23% below).
    assert opt.parameter_count() == pytest.approx(175e9, rel=0.005)
    rows = {row.tp: row for row in tp_sizes(opt, get_dtype("fp16"))}
    assert rows[8].heads_per_gpu == 12  # the seed's "OPT-175B, 8 GPUs, 12 heads each"


def test_llama3_70b_valid_tp_sizes() -> None:
    assert valid_tp_sizes(load_model("llama-3-70b")) == [1, 2, 4, 8, 16, 32, 64]


def test_tp_rows_cover_every_size_with_reasons() -> None:
    qwen = load_model("qwen2-7b")  # 28 heads, 4 KV heads, FFN 18944
    rows = tp_sizes(qwen, get_dtype("bf16"))
    assert [r.tp for r in rows] == list(range(1, 29))
    by_tp = {r.tp: r for r in rows}
    assert by_tp[3].kind == "heads" and "28 attention heads are not divisible by tp=3" in by_tp[3].reason
    assert by_tp[7].kind == "kv_heads" and "4 KV heads" in by_tp[7].reason
    assert by_tp[28].kind == "ffn" and "intermediate_size 18944" in by_tp[28].reason
    assert [r.tp for r in rows if r.valid] == [1, 2, 4]
    assert by_tp[2].vocab_padding == 0 and by_tp[4].kv_heads_per_gpu == 1


def test_reason_kind_maps_shard_messages() -> None:
    config = catalogue_model("llama-3-70b").config
    assert reason_kind(shard.tp_failure_reason(config, 3)) == "heads"
    assert reason_kind("something else") == "other"


def test_names_are_case_insensitive_and_accept_hf_ids() -> None:
    for name in ("LLAMA-3-70B", "meta-llama/Meta-Llama-3-70B", "Meta-Llama-3-70B-Instruct"):
        assert load_model(name).name == "llama-3-70b"
    assert load_model("llama-3-405b").name == "llama-3.1-405b"


def test_unknown_name_lists_catalogue() -> None:
    with pytest.raises(ValueError, match="catalogue: .*llama-3-70b.*opt-175b"):
        load_model("gpt-5")


@pytest.mark.parametrize("name", ["llama-3-70b", "llama-3.2-1b", "qwen2-7b", "mistral-7b", "llama-3.1-405b"])
def test_rank_elements_equal_shard_bytes(name: str) -> None:
    """The planner's per-stage split sums to exactly what shard.rank_parameter_bytes counts, at every TP."""
    model = catalogue_model(name)
    assert isinstance(model, EngineModel)
    for tp in valid_tp_sizes(model):
        expected = shard.rank_parameter_bytes(model.config, tp, 0, 2)
        assert per_rank_weight_bytes(model.config, tp, "bf16") == expected
        assert model.rank_elements(tp).total(model.num_hidden_layers) * 2 == expected
        for rank in range(tp):  # every rank allocates the same bytes (padding keeps the vocabulary even)
            assert per_rank_weight_bytes(model.config, tp, "bfloat16", rank) == expected


@pytest.mark.parametrize("name", ["llama-3-70b", "llama-3.2-1b"])
def test_architecture_formula_agrees_with_shard(name: str) -> None:
    """The hand-written Architecture count (used for Mixtral/OPT) reproduces shard's count for Llama shapes."""
    config = catalogue_model(name).config
    arch = Architecture(
        name=name,
        model_type="llama",
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    engine = EngineModel(config, name)
    assert arch.parameter_count() == config.num_parameters
    for tp in valid_tp_sizes(engine):
        assert arch.rank_elements(tp) == engine.rank_elements(tp)


def test_split_layers_and_stages() -> None:
    assert split_layers(126, 4) == (32, 32, 31, 31)
    assert split_layers(80, 2) == (40, 40)
    with pytest.raises(ValueError):
        split_layers(4, 5)
    model = catalogue_model("llama-3.2-1b")  # tied embeddings: the last stage needs its own lm_head
    elements = model.rank_elements(2)
    layers = split_layers(model.num_hidden_layers, 4)
    stages = sum(stage_elements(elements, layers, s) for s in range(4))
    assert stages == elements.total(model.num_hidden_layers) + elements.tied_head
    assert elements.tied_head == shard.padded_vocab_size(128256, 2) // 2 * 2048


def test_memory_components() -> None:
    model = load_model("llama-3-70b")
    dtype = get_dtype("bf16")
    device = get_device("h100-80gb")
    m = estimate_memory(model, Layout(8, 1, 1), dtype, device, 8, 8192, 4)
    stage = m.per_gpu
    assert stage.weights == per_rank_weight_bytes(model.config, 8, "bf16")
    # 4 sequences x 8192 tokens x (K, V) x 1 KV head x 128 x 80 layers x 2 bytes
    assert stage.kv_cache == 4 * 8192 * 2 * 1 * 128 * 80 * 2
    assert stage.activations == activation_bytes(model, 8, dtype, 8192, 4)
    assert stage.overhead == int(1.5 * 2**30)
    assert stage.total == stage.weights + stage.kv_cache + stage.activations + stage.overhead
    assert m.fits and m.capacity == device.memory_bytes
    assert m.max_sequences(8192) == m.kv_room // (8192 * 2 * 128 * 80 * 2)


def test_quantized_weights_bf16_cache() -> None:
    model = load_model("llama-3-8b")
    bf16 = get_dtype("bf16")
    # The engine's formats: int8/fp8 projections (1 byte, per-channel scales), int4 in groups of 32 with float16
    # scales and offsets (5 bits); the embedding, LM head and norms stay bf16.
    layer = model.rank_bytes(1, bf16).layer
    for name, share in (("int8", 0.5), ("fp8", 0.5), ("int4", 5 / 16)):
        q = get_dtype(name)
        assert model.rank_bytes(1, q).layer == pytest.approx(layer * share, rel=0.01)
        assert total_weight_bytes(model, q) == per_rank_weight_bytes(model.config, 1, name)
        a = estimate_memory(model, Layout(1, 1, 1), q, get_device("h100-80gb"), 8, 1024, 1).per_gpu
        b = estimate_memory(model, Layout(1, 1, 1), bf16, get_device("h100-80gb"), 8, 1024, 1).per_gpu
        assert a.kv_cache == b.kv_cache and a.weights == total_weight_bytes(model, q) < b.weights


def test_cpu_host_is_shared_by_ranks() -> None:
    cpu = get_device("cpu", memory_gib=24, bandwidth_gbs=20)
    model = load_model("tinyllama-1.1b")
    m = estimate_memory(model, Layout(2, 1, 1), get_dtype("fp32"), cpu, 2, 512, 1)
    assert m.capacity == 12 * 2**30


def test_collective_formulas() -> None:
    link = LINKS["pcie"]  # latency 10 us, 3 us per ring step, 32 GB/s
    assert all_reduce_seconds(1 << 20, 1, link) == 0.0
    # ring all-reduce over 4 ranks: latency + 2 * 3 steps x (hop + bytes / 4 / bandwidth)
    assert all_reduce_seconds(32_000, 4, link) == pytest.approx((10 + 6 * 3) * 1e-6 + 6 * 8_000 / 32e9)
    assert all_gather_seconds(32_000, 4, link) == pytest.approx((10 + 3 * 3) * 1e-6 + 3 * 8_000 / 32e9)
    assert send_seconds(32_000, link) == pytest.approx((10 + 3) * 1e-6 + 32_000 / 32e9)
    # more ranks on the same link cost more: the seeds' "communication overhead increases with TP size"
    assert (
        all_reduce_seconds(16_384, 8, link) > all_reduce_seconds(16_384, 4, link) > all_reduce_seconds(16_384, 2, link)
    )


def test_links_from_device() -> None:
    assert get_link("nvlink", get_device("a100-80gb")).bandwidth_gbs == 300
    with pytest.raises(ValueError, match="no NVLink"):
        get_link("nvlink", get_device("rtx4090-24gb"))
    slow = get_link("pcie", get_device("rtx4090-24gb"))  # no P2P: staged through the host
    assert (slow.bandwidth_gbs, slow.latency_us, slow.hop_us) == (16, 20, 6)


def test_placement() -> None:
    assert not placement(Layout(8, 2, 1), 8).tp_crosses_nodes
    assert placement(Layout(8, 2, 1), 8).boundary_crosses_nodes == (True,)
    assert placement(Layout(16, 1, 1), 8).tp_crosses_nodes
    assert placement(Layout(2, 2, 2), 8).boundary_crosses_nodes == (False,)


def test_config_dir_and_planner_only_types(tmp_path) -> None:
    raw = dict(CATALOGUE["llama-3-8b"][1])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text(json.dumps(raw))
    model = load_model(tmp_path / "mine")
    assert model.name == "mine" and model.parameter_count() == PUBLISHED["llama-3-8b"]
    mixtral = {
        "model_type": "mixtral",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    }
    (tmp_path / "moe").mkdir()
    (tmp_path / "moe" / "config.json").write_text(json.dumps(mixtral))
    moe = load_model(tmp_path / "moe")
    # The engine's own declaration of Mixtral (tpinfer.models.moe) gives the published count exactly.
    assert moe.engine_supported and moe.parameter_count() == PUBLISHED["mixtral-8x7b"]
    assert moe.num_local_experts == 8 and moe.num_experts_per_tok == 2


def test_every_catalogue_entry_plans() -> None:
    for name in CATALOGUE:
        model = load_model(name)
        assert model.parameter_count() > 0
        assert 1 in valid_tp_sizes(model)
    assert isinstance(catalogue_model("llama-3-8b").config, ModelConfig)

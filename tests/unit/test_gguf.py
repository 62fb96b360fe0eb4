"""GGUF blocks as tpinfer reads them, slice by slice, against the gguf package's own dequantize."""

import numpy as np
import pytest

from tpinfer.loading.gguf import BLOCK_TYPES, CONVERT, GGUFCheckpoint
from tpinfer.loading.gguf_convert import GGUFError
from tpinfer.parallel.spec import Slice
from tpinfer.quant.layers import QTensor

gguf = pytest.importorskip("gguf")


def _blocks(kind: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid blocks of ``kind`` for a (rows, cols) tensor: quantized by gguf where it can, else random bytes with
    finite float16 scales (every bit pattern of the rest is a valid K-quant block)."""
    rng = np.random.default_rng(seed)
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    if kind in ("Q8_0", "Q4_0", "Q4_1"):
        return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    _, per_block, block_bytes = BLOCK_TYPES[kind]
    raw = rng.integers(0, 256, size=(rows, cols // per_block, block_bytes), dtype=np.uint8)
    halves = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[kind]
    for at in halves:  # d (and dmin) as small positive float16 values
        raw[..., at:at + 2] = rng.uniform(1e-3, 1e-2, size=raw.shape[:2] + (1,)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", sorted(BLOCK_TYPES))
def test_blocks_dequantize_as_the_gguf_package_does(kind):
    rows, cols = 6, 512
    blocks = _blocks(kind, rows, cols)
    want = gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, kind)).reshape(rows, cols)
    scheme, _, block_bytes = BLOCK_TYPES[kind]
    got = QTensor(scheme, CONVERT[kind](blocks.reshape(rows, -1, block_bytes))).dequantize().numpy()
    # Exact except Q4_K, whose per-group scale d*sc and offset dmin*m are stored in float16 (2^-11 relative).
    tolerance = 2e-3 * np.abs(want).max() if kind == "Q4_K" else 0.0
    assert np.abs(got - want).max() <= tolerance, np.abs(got - want).max()


def _write(path, tensors: dict[str, tuple[str, np.ndarray]], arch: str = "llama") -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (("block_count", 1), ("context_length", 64), ("embedding_length", 64),
                       ("feed_forward_length", 512), ("attention.head_count", 2), ("attention.head_count_kv", 2),
                       ("attention.layer_norm_rms_epsilon", 1e-5)):
        adder = writer.add_float32 if isinstance(value, float) else writer.add_uint32
        adder(f"{arch}.{key}", value)
    writer.add_uint32(f"{arch}.vocab_size", 32)
    for name, (kind, data) in tensors.items():
        if kind == "F32":
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_shape=None, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_1", "Q4_K", "Q6_K"])
def test_a_rank_reads_its_rows_and_its_columns(tmp_path, kind):
    down = _blocks(kind, 64, 512, seed=1)  # ffn_down: 64 rows (hidden) x 512 inputs, row-parallel
    _write(tmp_path / "m.gguf", {"blk.0.ffn_down.weight": (kind, down)})
    ckpt = GGUFCheckpoint(tmp_path / "m.gguf")
    full = gguf.quants.dequantize(down, getattr(gguf.GGMLQuantizationType, kind)).reshape(64, 512)
    name = "model.layers.0.mlp.down_proj.weight"
    assert ckpt.shape(name) == (64, 512)
    columns = ckpt.read(name, Slice(1, ((256, 256),), 256)).dequantize().numpy()  # rank 1 of 2
    rows = ckpt.read(name, Slice(0, ((16, 16),), 16)).dequantize().numpy()
    tolerance = 2e-3 * np.abs(full).max() if kind == "Q4_K" else 0.0
    assert np.abs(columns - full[:, 256:]).max() <= tolerance
    assert np.abs(rows - full[16:32]).max() <= tolerance
    if BLOCK_TYPES[kind][1] == 256:  # a K-quant block is 256 weights: a shard at 128 cuts it
        with pytest.raises(GGUFError, match="cut its 256-weight blocks"):
            ckpt.read(name, Slice(1, ((128, 128),), 128))
    assert ckpt.schemes()["model.layers.0.mlp.down_proj"].unit == BLOCK_TYPES[kind][1]


def test_bad_files_are_named(tmp_path):
    down = _blocks("Q8_0", 64, 512)
    _write(tmp_path / "m.gguf", {"blk.0.ffn_down.weight": ("Q8_0", down)})
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match="cut.gguf: not a readable GGUF file"):
        GGUFCheckpoint(tmp_path / "cut.gguf")
    q2 = np.zeros((64, 512 // 256 * 84), dtype=np.uint8)
    _write(tmp_path / "q2.gguf", {"blk.0.ffn_down.weight": ("Q2_K", q2)})
    with pytest.raises(GGUFError, match="tensor blk.0.ffn_down.weight is Q2_K; supported: F32, F16, BF16, Q8_0"):
        GGUFCheckpoint(tmp_path / "q2.gguf")
    _write(tmp_path / "gpt2.gguf", {"blk.0.ffn_down.weight": ("Q8_0", down)}, arch="gpt2")
    with pytest.raises(GGUFError, match="general.architecture is 'gpt2'; tpinfer reads GGUF files of the llama architecture only"):
        GGUFCheckpoint(tmp_path / "gpt2.gguf")

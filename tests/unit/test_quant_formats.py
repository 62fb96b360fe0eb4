"""The quantization formats' spelling, validation and reference arithmetic (tpinfer.quant.formats)."""

import pytest
import torch

from tpinfer.quant.formats import (
    ACT_BLOCK,
    Scheme,
    dequantize,
    from_a8_layout,
    from_tiles,
    pack_int4,
    parse,
    quantize,
    quantize_activations,
    to_a8_layout,
    to_tiles,
    unpack_int4,
)


@pytest.mark.parametrize("text,scheme", [
    ("int8", Scheme("int8")),
    ("int8-g32", Scheme("int8", 32)),
    ("int4", Scheme("int4", 32, True)),
    ("int4-g128", Scheme("int4", 128, True)),
    ("int4-g64-sym", Scheme("int4", 64, False)),
    ("fp8", Scheme("fp8")),
    ("fp8-tensor", Scheme("fp8", per_tensor=True)),
    ("int4-a8", Scheme("int4", 32, True, act8=True)),
    ("INT8-A8", Scheme("int8", act8=True)),
])
def test_parse_and_name_round_trip(text, scheme):
    assert parse(text) == scheme
    assert parse(scheme.name) == scheme


@pytest.mark.parametrize("text,message", [
    ("int3", "choose int8, int4 or fp8"),
    ("int4-g48", "multiple of 32"),
    ("int4-x", "unknown part 'x'"),
    ("fp8-a8", "unknown part 'a8'"),
    ("fp8-g32", "no groups or offsets"),
    ("int8-g16-a8", "multiples of 32"),
])
def test_bad_spellings_are_refused_by_name(text, message):
    with pytest.raises(ValueError, match=message):
        parse(text)


def test_group_and_activation_block_cuts_are_named():
    assert parse("int4-g128").failure(4096, ((0, 2048), (2048, 2048))) is None
    assert "cuts the int4-g128-asym group of 128" in parse("int4-g128").failure(2816, ((0, 704),))
    # int8 per channel has no groups, but with int8 activations a shard must hold whole activation blocks
    assert parse("int8").failure(768, ((0, 368),)) is None
    assert "368 input features at 0 cuts the int8-a8 block of 32" in parse("int8-a8").failure(768, ((0, 368),))
    assert "in_features 720 is not a multiple of the int8-a8 block of 32" in parse("int8-a8").failure(720)


def test_int4_nibble_layout():
    values = torch.arange(64, dtype=torch.uint8).remainder(16).reshape(1, 64)
    packed = pack_int4(values)
    assert packed[0, 0] == (values[0, 0] | values[0, 16] << 4)  # byte i: weight i low, weight i + 16 high
    assert packed[0, 16] == (values[0, 32] | values[0, 48] << 4)
    assert torch.equal(unpack_int4(packed), values)


@pytest.mark.parametrize("name,bound", [("int8", 1 / 254), ("int8-g32-asym", 1 / 255), ("int4", 1 / 15),
                                        ("int4-g64-sym", 1 / 14), ("fp8", 1 / 16)])
def test_round_to_nearest_error_bounds(name, bound):
    """Each dequantized weight lies within half a step of the original (relative to its group's range)."""
    torch.manual_seed(0)
    scheme = parse(name)
    w = torch.randn(16, 256)
    back = dequantize(scheme, quantize(scheme, w))
    group = scheme.group or 256
    span = w.reshape(16, -1, group).abs().amax(-1, keepdim=True).expand(-1, -1, group).reshape(16, 256)
    # fp8: 3 mantissa bits, relative to the value itself; integers: relative to the group's largest magnitude
    err = (back - w).abs() / (w.abs() if scheme.kind == "fp8" else span)
    assert err.max() <= bound * 1.01 + (1e-3 if scheme.kind == "int4" else 0)  # int4: float16 scales


@pytest.mark.parametrize("name,cols,block", [
    ("int8-a8", 2048, 128),  # per channel: the row is the group
    ("int8-a8", 2816, 128),
    ("int8-g64-a8", 1024, 64),
    ("int8-a8", 224, 32),  # 224 = 7 x 32: no wider block divides it
    ("int4-g128-a8", 1024, 128),
    ("int4-g96-sym-a8", 576, 32),  # 96 is a multiple of 32 only
    ("int4-a8", 4096, 32),  # groups of 32 bound the block
])
def test_activation_block_widths(name, cols, block):
    """-a8 rounds activations in the widest block (128, 64, 32) that divides the weight's group."""
    assert parse(name).act_block(cols) == block


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("rows", [16, 48, 37, 5])
def test_a8_tiles(kind, rows):
    """-a8 stores q, scales and offsets in tiles of 16 rows (the last may be shorter): in a tile's chunk c, row i's
    4 bytes hold inputs 4c .. 4c + 3 (int8), or 8c + j in the low nibbles and 8c + 4 + j in the high ones (int4,
    j = 0..3); scales group by group. Each round-trips, a tile's bytes are its own rows' bytes, and dequantize
    reads the tiles back."""
    torch.manual_seed(0)
    cols, per_chunk = 256, 8 if kind == "int4" else 4
    values = torch.randint(0, 16, (rows, cols)).to(torch.uint8) if kind == "int4" else \
        (torch.randint(0, 256, (rows, cols)) - 128).to(torch.int8)
    stored = to_a8_layout(kind, values)
    assert stored.shape == (rows, cols // 2 if kind == "int4" else cols)
    assert torch.equal(from_a8_layout(kind, stored), values)
    for start in range(0, rows, 16):
        m = min(16, rows - start)
        flat = stored[start : start + m].reshape(cols // per_chunk, m, 4)  # (chunk, row, byte)
        for c in (0, 5, cols // per_chunk - 1):
            for i in (0, m - 1):
                row = values[start + i, per_chunk * c : per_chunk * (c + 1)]
                if kind == "int4":
                    assert torch.equal(flat[c, i] & 0x0F, row[:4]) and torch.equal(flat[c, i] >> 4, row[4:])
                else:
                    assert torch.equal(flat[c, i], row)
        assert torch.equal(stored[start : start + m], to_a8_layout(kind, values[start : start + m]))
    scales = torch.randn(rows, 2).half()
    tiled = to_tiles(scales)
    assert torch.equal(from_tiles(tiled), scales)
    assert torch.equal(tiled[:16].reshape(-1)[: min(16, rows)], scales[:16, 0])  # group 0 of the first tile's rows
    for name in (f"{kind}-g128-a8", f"{kind}-g64-asym-a8"):
        scheme = parse(name)
        plain = parse(name.removesuffix("-a8"))
        w = torch.randn(rows, cols)
        assert torch.equal(dequantize(scheme, quantize(scheme, w)), dequantize(plain, quantize(plain, w)))


def test_quantize_activations():
    torch.manual_seed(0)
    x = torch.randn(3, 4 * ACT_BLOCK) * torch.tensor([1.0, 100.0, 1e-3, 0.0]).repeat_interleave(ACT_BLOCK)
    x_hat = quantize_activations(x)
    blocks, hat = x.reshape(3, 4, ACT_BLOCK), x_hat.reshape(3, 4, ACT_BLOCK)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    assert ((hat - blocks).abs() <= step / 2 * (1 + 1e-5)).all()  # half a step of each block's own scale
    assert torch.equal(hat[:, 3], torch.zeros(3, ACT_BLOCK))  # an all-zero block stays zero
    assert torch.allclose(hat / step.clamp_min(1e-30), (hat / step.clamp_min(1e-30)).round(), atol=1e-3)
    assert torch.equal(quantize_activations(x_hat), x_hat)  # idempotent

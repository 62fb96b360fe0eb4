"""Native CPU kernels (``cpu_decode.cpp``), compiled on first use for the host that runs them: the decode step's,
and an encoder forward's attention and fused sum + LayerNorm (``encoder_adapter``).

The decode step of a CPU rank is a handful of small GEMVs per layer plus a little attention. Torch's eager ops
leave speed on the table there (see ``cpu_decode.cpp`` and docs/performance.md), so on x86-64 hosts with
AVX-512 tpinfer compiles ``cpu_decode.cpp`` with ``g++ -O3 -march=native -fopenmp`` into a per-user cache
(``$TPINFER_CACHE_DIR``, else ``$XDG_CACHE_HOME/tpinfer``, else ``~/.cache/tpinfer``) and calls it through
ctypes. The library's name carries a hash of the source, the compiler and the CPU, so a changed file, compiler
or host builds a new one; ranks starting together build it once (atomic rename).

Anything else (no compiler, another CPU, CUDA tensors, ``TPINFER_NATIVE_KERNELS=0``) uses the torch path,
which computes the same thing; the tests compare the two.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_decode.cpp")
INCLUDES = tuple(Path(__file__).with_name(name) for name in ("cpu_quant.inc", "cpu_amx.inc"))  # #included by SOURCE
ENV_SWITCH = "TPINFER_NATIVE_KERNELS"
AMX_SWITCH = "TPINFER_AMX"  # 0: float32 GEMMs never through AMX (amx_available)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl")
MAX_HEAD_DIM = 512  # the attention kernel keeps one query head in a stack buffer of this size
ABI_VERSION = 10

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_reason = ""


def cache_dir() -> Path:
    if os.environ.get("TPINFER_CACHE_DIR"):
        return Path(os.environ["TPINFER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tpinfer"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This host's CPU feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build() -> ctypes.CDLL:
    """Compile (or reuse) the library for this host; raises RuntimeError saying why it cannot."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError(f"native kernels are built for x86-64 Linux, not {platform.system()} {platform.machine()}")
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in cpu_flags()]
    if missing:
        raise RuntimeError(f"this CPU lacks {', '.join(missing)}")
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    source = b"".join(path.read_bytes() for path in (SOURCE, *INCLUDES))
    key = hashlib.sha256(
        b"\0".join([source, version.encode(), " ".join(FLAGS).encode(), cpu_model().encode(),
                    " ".join(sorted(cpu_flags())).encode()])
    ).hexdigest()[:16]
    target = cache_dir() / f"cpu_decode-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp")
        os.close(fd)
        try:
            done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                                  check=False)
            if done.returncode != 0:
                raise RuntimeError(f"compiling {SOURCE.name} failed:\n{done.stderr.strip()[-2000:]}")
            os.replace(tmp, target)  # atomic: ranks building at once each publish a complete file
            log.info("built native CPU kernels: %s", target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    if lib.tpi_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{target} has ABI {lib.tpi_abi_version()}, expected {ABI_VERSION}")
    p, i, i64, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    lib.tpi_linear.argtypes = [p, i, p, i, p, i, p, i, i64, i64, i64, i]
    lib.tpi_gated_linear.argtypes = [p, i, p, p, i, p, p, i, p, i, i64, i64, i64, i]
    lib.tpi_decode_attention.argtypes = [p, p, p, i, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, f, i]
    lib.tpi_add_rms_norm.argtypes = [p, p, p, p, p, i, i64, i64, f]
    layer = ctypes.POINTER(DecodeLayer)
    lib.tpi_layer_attention.argtypes = [layer, p, p, p, p, p, p, p, i64, i]
    lib.tpi_layer_mlp.argtypes = [layer, p, p, p, i64, i]
    for fn in (lib.tpi_linear, lib.tpi_gated_linear, lib.tpi_decode_attention, lib.tpi_add_rms_norm,
               lib.tpi_layer_attention, lib.tpi_layer_mlp):
        fn.restype = None
    lib.tpi_encoder_attention.argtypes = [p, p, p, i64, i64, i64, i64, f, i]
    lib.tpi_sum_layer_norm.argtypes = [ctypes.POINTER(p), i, p, p, i64, p, p, p, i64, i64, f, i]
    lib.tpi_embedding_rows.argtypes = [p, i64, i64, p, i64, i64, p, i]
    lib.tpi_gelu.argtypes = [p, i64, i]
    lib.tpi_amx_available.restype = i
    lib.tpi_amx_linear.argtypes = [p, i64, i64, i64, p, i64, p, i, p, i64, i]
    lib.tpi_amx_linear.restype = i
    for name in ("tpi_encoder_attention", "tpi_sum_layer_norm", "tpi_embedding_rows", "tpi_gelu"):
        getattr(lib, name).restype = None
    lib.tpi_qlinear.argtypes = [p, i, p, p, p, i, i64, i, p, i, p, i, i64, i64, i64, i]
    lib.tpi_qlinear.restype = None
    lib.tpi_decode_layer_size.restype = ctypes.c_int64
    lib.tpi_shm_group_size.restype = ctypes.c_int64
    lib.tpi_decode_stack.argtypes = [p, i64, i64, p, p, p, p, p, p, p, i64, i, ctypes.POINTER(ShmGroup), p, i64]
    lib.tpi_decode_stack.restype = ctypes.c_int64
    for struct, size in ((DecodeLayer, lib.tpi_decode_layer_size()), (ShmGroup, lib.tpi_shm_group_size())):
        if size != ctypes.sizeof(struct):
            raise RuntimeError(f"{target}: {struct.__name__} is {size} bytes in C, {ctypes.sizeof(struct)} in Python")
    return lib


class DecodeLayer(ctypes.Structure):
    """One decoder layer as the fused decode kernels see it (``struct DecodeLayer`` in cpu_decode.cpp)."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "norm1", "norm2", "wq", "wk", "wv", "wo", "wg", "wu", "wd", "bq", "bk", "bv", "bg", "bu", "k_cache", "v_cache",
        "bo", "bd")]
    _fields_ += [(name, ctypes.c_int64) for name in ("hidden", "heads", "kv_heads", "head_dim", "ffn", "max_len")]
    _fields_ += [(name, ctypes.c_float) for name in ("eps1", "eps2", "scale")]
    _fields_ += [(name, ctypes.c_int32) for name in ("w_dtype", "act_dtype", "reduce_o", "reduce_d")]
    _fields_ += [(name, ctypes.c_void_p) for name in (
        "sq", "sk", "sv", "so", "sg", "su", "sd", "oq", "ok", "ov", "oo", "og", "ou", "od")]
    _fields_ += [("q_group", ctypes.c_int64), ("q_kind", ctypes.c_int32), ("q_per_tensor", ctypes.c_int32)]
    _fields_ += [(name, ctypes.c_void_p) for name in ("w_router", "experts", "expert_tokens", "ws_gate")]
    _fields_ += [(name, ctypes.c_int64) for name in ("n_experts", "top_k", "expert_ffn")]
    _fields_ += [(name, ctypes.c_int32) for name in ("norm_topk", "round_weights")]


class ShmGroup(ctypes.Structure):
    """A shared-memory all-reduce group as ``tpi_decode_stack`` sees it (``struct ShmGroup`` in cpu_decode.cpp);
    built by ``tpinfer.parallel.shm.ShmAllReduce.native_group``."""

    _fields_ = [("counters", ctypes.c_void_p), ("data", ctypes.c_void_p)]
    _fields_ += [(name, ctypes.c_int64) for name in ("slot_bytes", "round", "calls", "bytes", "wait_ns")]
    _fields_ += [("spin_s", ctypes.c_double), ("yield_s", ctypes.c_double)]
    _fields_ += [(name, ctypes.c_int32) for name in ("world", "rank", "stride", "pad")]


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (why: ``unavailable_reason()``). Builds on the first call."""
    global _lib, _tried, _reason
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
                _reason = f"disabled by {ENV_SWITCH}"
            else:
                try:
                    _lib = _build()
                except (RuntimeError, OSError) as exc:
                    _reason = str(exc)
                    log.warning("tpinfer: native CPU kernels unavailable, using torch ops: %s", exc)
            _tried = True
    return _lib


def unavailable_reason() -> str:
    library()
    return _reason


def available() -> bool:
    return library() is not None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: CPU, float32/bfloat16, and the library built."""
    if (_lib if _tried else library()) is None:
        return False
    for t in tensors:
        if t.dtype not in _DTYPES or t.device.type != "cpu":
            return False
    return True


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _code(t: torch.Tensor | None, default: torch.dtype) -> int:
    return _DTYPES[default if t is None else t.dtype]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x W^T + b for a few rows of x (any leading shape), result in ``out_dtype`` (default x's)."""
    x = x.contiguous()
    rows, (n, k) = x.numel() // x.shape[-1], weight.shape
    y = torch.empty(*x.shape[:-1], n, dtype=out_dtype or x.dtype)
    library().tpi_linear(x.data_ptr(), _DTYPES[x.dtype], weight.data_ptr(), _DTYPES[weight.dtype], _ptr(bias),
                         _code(bias, weight.dtype), y.data_ptr(), _DTYPES[y.dtype], rows, n, k,
                         torch.get_num_threads())
    return y


QUANT_KINDS = {"int8": 0, "int4": 1, "fp8": 2}
ACT8_KINDS = {"int8": 3, "int4": 4}  # the same weights against activations rounded to int8 (VNNI dot products)


def quant_kind(scheme) -> int:  # noqa: ANN001
    return ACT8_KINDS[scheme.kind] if scheme.act8 else QUANT_KINDS[scheme.kind]


def quant_usable(x: torch.Tensor, scheme, tensors: dict[str, torch.Tensor]) -> bool:  # noqa: ANN001
    """Whether ``quant_linear`` takes x and this quantized weight: the kernels built, CPU tensors, whole 16- (int8,
    fp8) or 32-wide (int4, int8 activations) blocks and groups."""
    if not usable(x) or tensors["q"].device.type != "cpu":
        return False
    K = x.shape[-1]
    block = 32 if scheme.kind == "int4" or scheme.act8 else 16
    group = scheme.group or K
    return K % block == 0 and group % block == 0 and K % group == 0


def quant_linear(x: torch.Tensor, scheme, tensors: dict[str, torch.Tensor],  # noqa: ANN001
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ bias) for a weight quantized in ``scheme`` (``tpinfer.quant.formats``), result in x's dtype."""
    x = x.contiguous()
    q = tensors["q"]
    rows, K, N = x.numel() // x.shape[-1], x.shape[-1], q.shape[0]
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype)
    offset = tensors.get("offset")
    library().tpi_qlinear(x.data_ptr(), _DTYPES[x.dtype], q.data_ptr(), tensors["scale"].data_ptr(), _ptr(offset),
                          quant_kind(scheme), scheme.group or K, int(scheme.per_tensor), _ptr(bias),
                          _code(bias, x.dtype), y.data_ptr(), _DTYPES[y.dtype], rows, N, K, torch.get_num_threads())
    return y


def gated_linear(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gate_bias: torch.Tensor | None = None,
                 up_bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x Wg^T + bg) * (x Wu^T + bu), result in x's dtype."""
    x = x.contiguous()
    rows, (n, k) = x.numel() // x.shape[-1], gate.shape
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    library().tpi_gated_linear(x.data_ptr(), _DTYPES[x.dtype], gate.data_ptr(), up.data_ptr(), _DTYPES[gate.dtype],
                               _ptr(gate_bias), _ptr(up_bias), _code(gate_bias, gate.dtype), y.data_ptr(),
                               _DTYPES[y.dtype], rows, n, k, torch.get_num_threads())
    return y


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One new token per row: RoPE on q/k (in place), k/v into the cache, attention over positions 0..pos.

    q (B, Hq, D), k/v (B, Hkv, D) contiguous; cos/sin (max_len, D) float32; caches (S, Hkv, L, D);
    slots/positions (B,) int64. Returns (B, Hq, D) in q's dtype.
    """
    batch, heads, dim = q.shape
    _, kv_heads, length, _ = k_cache.shape
    out = torch.empty_like(q)
    library().tpi_decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), _DTYPES[q.dtype], cos.data_ptr(),
                                   sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(),
                                   positions.data_ptr(), out.data_ptr(), batch, heads, kv_heads, dim, length, scale,
                                   torch.get_num_threads())
    return out


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, RMSNorm(x + delta) * weight), HF's rounding; without delta, (x, RMSNorm(x) * weight)."""
    x = x.contiguous()
    delta = None if delta is None else delta.contiguous()
    total = x if delta is None else torch.empty_like(x)
    out = torch.empty_like(x)
    library().tpi_add_rms_norm(x.data_ptr(), _ptr(delta), weight.data_ptr(),
                               total.data_ptr(), out.data_ptr(), _DTYPES[x.dtype], x.numel() // x.shape[-1],
                               x.shape[-1], eps)
    return total, out


def encoder_attention(qkv: torch.Tensor, key_bias: torch.Tensor | None, heads: int, head_dim: int,
                      scale: float) -> torch.Tensor:
    """Bidirectional attention of whole sequences: qkv (B, T, 3 * heads * head_dim) float32, each token's q heads
    then k then v (a fused projection's output); key_bias (B, T) float32 added to every score of a key (0 real, -inf
    padding) or None. Returns (B, T, heads * head_dim). head_dim a multiple of 16."""
    batch, length, width = qkv.shape
    if width != 3 * heads * head_dim or head_dim % 16 or qkv.dtype != torch.float32 or not qkv.is_contiguous():
        raise ValueError(f"encoder_attention takes contiguous float32 (B, T, 3 x {heads} x {head_dim}) with head_dim "
                         f"a multiple of 16, got {qkv.dtype} {list(qkv.shape)}")
    out = torch.empty(batch, length, heads * head_dim, dtype=torch.float32)
    library().tpi_encoder_attention(qkv.data_ptr(), _ptr(key_bias), out.data_ptr(), batch, length, heads, head_dim,
                                    scale, torch.get_num_threads())
    return out


def sum_layer_norm(parts: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   dense_bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm(residual + ((parts[0] + parts[1] + ...) + dense_bias)) * weight + bias over the last dimension: a
    row-parallel dense's partial outputs summed in their order, its bias, the residual (both optional). Float32,
    contiguous, the parts of one shape; the residual of theirs, or P rows of ``hidden`` repeated every P rows (an
    encoder's position embeddings, the same for every sequence; the last repetition cut short where the rows are a
    rank's share of whole sequences). Into ``out`` where given (of the parts' shape; it may be the residual or a
    part: each row is read whole before its result is written), else a new tensor."""
    first = parts[0]
    hidden = first.shape[-1]
    rows = first.numel() // hidden
    for t in (*parts, residual):
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous()):
            raise ValueError("sum_layer_norm takes contiguous float32 parts and residual")
    if any(part.shape != first.shape for part in parts):
        raise ValueError(f"sum_layer_norm's parts differ in shape: {[list(part.shape) for part in parts]}")
    residual_rows = rows
    if residual is not None and residual.shape != first.shape:
        residual_rows = residual.numel() // hidden if residual.shape[-1] == hidden else 0
        if residual.dim() != 2 or not residual_rows:
            raise ValueError(f"sum_layer_norm's residual {list(residual.shape)} is neither the parts' shape "
                             f"{list(first.shape)} nor rows of {hidden} repeating over their {rows} rows")
    if out is None:
        out = torch.empty_like(first)
    elif out.shape != first.shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"sum_layer_norm's out must be contiguous float32 of the parts' shape {list(first.shape)}")
    pointers = (ctypes.c_void_p * len(parts))(*(part.data_ptr() for part in parts))
    library().tpi_sum_layer_norm(pointers, len(parts), _ptr(dense_bias), _ptr(residual), residual_rows,
                                 weight.data_ptr(), bias.data_ptr(), out.data_ptr(), rows, hidden, eps,
                                 torch.get_num_threads())
    return out


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """GELU in its erf form (torch's default), 0.5 x (1 + erf(x / sqrt 2)), of a contiguous float32 tensor, in place;
    within 1e-7 max(1, |x|) of the exact value (erf by piecewise polynomials, see gelu_erf in cpu_decode.cpp)."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"gelu_ takes a contiguous float32 tensor, got {x.dtype}")
    library().tpi_gelu(x.data_ptr(), x.numel(), torch.get_num_threads())
    return x


@functools.cache
def _amx_hardware() -> bool:
    lib = library()
    return lib is not None and bool(lib.tpi_amx_available())


def amx_available() -> bool:
    """Whether float32 GEMMs can run through AMX here (``amx_linear``): the kernels built with AMX-BF16 (the CPU has
    it), Linux granted this process the tile state, and ``TPINFER_AMX`` is not 0."""
    if os.environ.get(AMX_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return available() and _amx_hardware()


class AmxWeight(NamedTuple):
    """A float32 weight (n, k) and its bias as ``amx_linear`` reads them (``amx_pack``)."""

    packed: torch.Tensor  # int16 bits of bfloat16 parts: [3][n/16 tiles][k/32 blocks][16 k pairs][16 columns][2]
    bias_rows: torch.Tensor | None  # 16 copies of the bias, padded to whole tiles (the C tiles start from it)
    n: int
    k: int


def amx_pack(weight: torch.Tensor, bias: torch.Tensor | None = None) -> AmxWeight:
    """A float32 weight (n, k) as ``amx_linear`` reads it: split into three bfloat16 parts that sum to it (each the
    rounding of what the parts before it leave), zero-padded to whole 16 x 32 tiles and laid out tile by tile
    (cpu_amx.inc): 1.5 times the weight's memory."""
    if weight.dtype != torch.float32 or weight.dim() != 2:
        raise ValueError(f"amx_pack takes a float32 (n, k) weight, got {weight.dtype} {list(weight.shape)}")
    n, k = weight.shape
    tiles, blocks = -(-n // 16), -(-k // 32)
    padded = weight.new_zeros(tiles * 16, blocks * 32)
    padded[:n, :k] = weight
    first = padded.bfloat16()
    rest = padded - first.float()  # exact: what the rounding dropped has at most 17 significant bits
    second = rest.bfloat16()
    parts = torch.stack([first, second, (rest - second.float()).bfloat16()])
    # (part, tile, column, block, k pair, 2) -> (part, tile, block, k pair, column, 2): a B tile is 1 KB in a row
    packed = parts.view(3, tiles, 16, blocks, 16, 2).permute(0, 1, 3, 4, 2, 5).contiguous().view(torch.int16)
    bias_rows = None
    if bias is not None:
        bias_rows = weight.new_zeros(16, tiles * 16)
        bias_rows[:, :n] = bias.float()
    return AmxWeight(packed, bias_rows, n, k)


def amx_linear(x: torch.Tensor, weight: AmxWeight, gelu: bool = False) -> torch.Tensor:
    """x W^T (+ b) (then GELU where ``gelu``) in float32 through AMX, for W and b packed by ``amx_pack``: six
    bfloat16 products of the operands' parts (cpu_amx.inc), float32's accuracy. x float32 rows with unit stride;
    returns x.shape[:-1] + (n,). Only where ``amx_available()``."""
    rows = x.reshape(-1, x.shape[-1])
    if x.dtype != torch.float32 or rows.stride(-1) != 1:
        raise ValueError(f"amx_linear takes float32 rows with unit stride, got {x.dtype} {list(x.stride())}")
    if x.shape[-1] != weight.k:
        raise ValueError(f"amx_linear: x has {x.shape[-1]} features, the packed weight {weight.k}")
    out = torch.empty(*x.shape[:-1], weight.n, dtype=torch.float32)
    done = library().tpi_amx_linear(rows.data_ptr(), rows.shape[0], weight.k, rows.stride(0), weight.packed.data_ptr(),
                                    weight.n, _ptr(weight.bias_rows), int(gelu), out.data_ptr(), weight.n,
                                    torch.get_num_threads())
    if done != 0:
        raise RuntimeError("AMX is not available in this process (kernels.amx_available())")
    return out


def embedding_rows(table: torch.Tensor, start: int, ids: torch.Tensor) -> torch.Tensor:
    """One rank's share of an embedding lookup: ``table`` holds rows [start, start + len(table)) of the vocabulary;
    an id among them gets its row, any other id zeros (a vocabulary-parallel table: the ranks' shares sum to the
    lookup). float32 table, int64 ids of any shape; returns ids.shape + (hidden,)."""
    if table.dtype != torch.float32 or table.dim() != 2 or not table.is_contiguous() or ids.dtype != torch.int64:
        raise ValueError(f"embedding_rows takes a contiguous float32 (rows, hidden) table and int64 ids, got "
                         f"{table.dtype} {list(table.shape)} and {ids.dtype}")
    ids = ids.contiguous()
    out = torch.empty(*ids.shape, table.shape[1], dtype=torch.float32)
    library().tpi_embedding_rows(table.data_ptr(), start, table.shape[0], ids.data_ptr(), ids.numel(), table.shape[1],
                                 out.data_ptr(), torch.get_num_threads())
    return out


def decode_layer(norm1: torch.Tensor, norm2: torch.Tensor, eps1: float, eps2: float,
                 projections: dict[str, tuple[torch.Tensor, torch.Tensor | None]], k_cache: torch.Tensor,
                 v_cache: torch.Tensor, reduce: tuple[bool, bool] = (False, False), scheme=None,  # noqa: ANN001
                 quantized: dict[str, dict[str, torch.Tensor]] | None = None) -> DecodeLayer:
    """Describe a layer for ``layer_attention``/``layer_mlp`` and ``DecodeStack``: ``projections`` maps q, k, v, o,
    g, u, d to this rank's (weight, bias); o and d biases follow the all-reduce, so only ``DecodeStack`` applies
    them. ``reduce``: whether o's and d's outputs are partial sums to all-reduce (row-parallel over several
    ranks). With ``scheme`` (``tpinfer.quant.formats.Scheme``), ``quantized`` maps each projection to its stored
    tensors (q, scale, offset) and the weights are those. The tensors must outlive the description (they are the
    model's parameters and cache)."""
    _, kv_heads, max_len, head_dim = k_cache.shape
    q_rows = (quantized["q"]["q"] if scheme is not None else projections["q"][0]).shape[0]
    ffn = (quantized["g"]["q"] if scheme is not None else projections["g"][0]).shape[0]
    layer = DecodeLayer(
        norm1=norm1.data_ptr(), norm2=norm2.data_ptr(), k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr(),
        hidden=norm1.shape[0], heads=q_rows // head_dim, kv_heads=kv_heads, head_dim=head_dim,
        ffn=ffn, max_len=max_len, eps1=eps1, eps2=eps2, scale=head_dim**-0.5,
        w_dtype=_DTYPES[norm1.dtype] if scheme is not None else _DTYPES[projections["q"][0].dtype],
        act_dtype=_DTYPES[norm1.dtype], reduce_o=int(reduce[0]), reduce_d=int(reduce[1]),
        q_kind=-1 if scheme is None else quant_kind(scheme), q_group=0 if scheme is None else scheme.group or 0,
        q_per_tensor=0 if scheme is None else int(scheme.per_tensor),
    )
    for key, (weight, bias) in projections.items():
        if scheme is not None:
            stored = quantized[key]
            setattr(layer, "w" + key, stored["q"].data_ptr())
            setattr(layer, "s" + key, stored["scale"].data_ptr())
            setattr(layer, "o" + key, _ptr(stored.get("offset")))
        else:
            setattr(layer, "w" + key, weight.data_ptr())
        setattr(layer, "b" + key, _ptr(bias))
    return layer


MOE_MAX_EXPERTS, MOE_MAX_TOP_K = 256, 16  # cpu_decode.cpp's kMaxExperts, kMaxTopK


def describe_moe(layer: DecodeLayer, router: torch.Tensor, experts: list[tuple[torch.Tensor, ...] | None],
                 expert_tokens: torch.Tensor, top_k: int, norm_topk: bool, round_weights: bool,
                 shared_gate: torch.Tensor | None = None) -> DecodeLayer:
    """Make ``layer``'s MLP half a mixture of experts (``layer_moe`` in cpu_decode.cpp): ``router`` [E, hidden],
    ``experts[e]`` this rank's (gate, up, down) slices of expert e or None for another rank's, ``expert_tokens`` the
    int64 [E] counters each step adds its routed rows to; with ``shared_gate`` [1, hidden] the layer's g/u/d are the
    shared expert's. Float weights only; the tensors must outlive the description."""
    if not 1 <= top_k <= min(len(experts), MOE_MAX_TOP_K) or len(experts) > MOE_MAX_EXPERTS:
        raise ValueError(f"the MoE kernel takes up to {MOE_MAX_EXPERTS} experts and top {MOE_MAX_TOP_K}, got "
                         f"{len(experts)} and top {top_k}")
    if expert_tokens.dtype != torch.int64 or not expert_tokens.is_contiguous():
        raise ValueError("expert_tokens must be a contiguous int64 tensor")
    pointers = (ctypes.c_void_p * (3 * len(experts)))()
    held = [e for e in experts if e is not None]
    for e, weights in enumerate(experts):
        for j, w in enumerate(weights or ()):
            pointers[3 * e + j] = w.data_ptr()
    layer.w_router, layer.experts, layer.expert_tokens = router.data_ptr(), ctypes.addressof(pointers), \
        expert_tokens.data_ptr()
    layer.ws_gate = _ptr(shared_gate)
    layer.n_experts, layer.top_k, layer.norm_topk, layer.round_weights = len(experts), top_k, int(norm_topk), \
        int(round_weights)
    layer.expert_ffn = held[0][0].shape[0] if held else 1
    layer._moe_pointers = pointers  # kept alive with the description
    return layer


class DecodeStack:
    """All decoder layers of a decode step in one native call (``tpi_decode_stack``), all-reduces included.

    The per-layer path costs two Python round trips and two Python all-reduces per layer; right after a GEMV has
    streamed megabytes through the caches that Python code runs cold, about 25-30 us an all-reduce on the
    development machine against 7-15 us warm. Here the stack runs in C and all-reduces through the same
    shared-memory segment and protocol as ``ShmAllReduce`` (``group``, None for one rank). A peer that is
    more than a few milliseconds late hands the wait back to Python (``finish``), which sleeps, times out and
    handles signals as every collective does, then the stack resumes at the next half-layer."""

    def __init__(self, layers: list[DecodeLayer], tail: torch.Tensor | None = None) -> None:
        self.layers = (DecodeLayer * len(layers))(*layers)
        self.n_layers = len(layers)
        self.hidden = layers[0].hidden
        self._tail = (tail.data_ptr(), tail.numel() * tail.element_size()) if tail is not None else (None, 0)
        self._fn = library().tpi_decode_stack

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
            positions: torch.Tensor, group: ShmGroup | None,
            finish: Callable[[int, torch.Tensor], None]) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, hidden) is the stream after the embedding and is updated in place; returns (x, delta) with the
        last layer's residual add not yet done (``add_rms_norm`` folds it into the final norm). ``finish(h, t)``
        completes half h's open all-reduce on t and adds its bias."""
        rows = x.numel() // self.hidden
        buffers = torch.empty((2, *x.shape), dtype=x.dtype)
        ref = ctypes.byref(group) if group is not None else None
        half = 0
        while True:
            half = self._fn(ctypes.addressof(self.layers), self.n_layers, half, x.data_ptr(), buffers[0].data_ptr(),
                            buffers[1].data_ptr(), cos.data_ptr(), sin.data_ptr(), slots.data_ptr(),
                            positions.data_ptr(), rows, torch.get_num_threads(), ref, self._tail[0], self._tail[1])
            if half < 0:
                return x, buffers[1]
            finish(half, buffers[half & 1])
            half += 1


def layer_attention(layer: DecodeLayer, x: torch.Tensor, delta: torch.Tensor | None, cos: torch.Tensor,
                    sin: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x += delta in place, then this rank's attention output projection (before the all-reduce)."""
    partial = torch.empty_like(x)
    library().tpi_layer_attention(ctypes.byref(layer), x.data_ptr(), _ptr(delta), partial.data_ptr(), cos.data_ptr(),
                                  sin.data_ptr(), slots.data_ptr(), positions.data_ptr(), x.numel() // x.shape[-1],
                                  torch.get_num_threads())
    return partial


def layer_mlp(layer: DecodeLayer, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """x += delta in place, then this rank's MLP down projection (before the all-reduce)."""
    partial = torch.empty_like(x)
    library().tpi_layer_mlp(ctypes.byref(layer), x.data_ptr(), delta.data_ptr(), partial.data_ptr(),
                            x.numel() // x.shape[-1], torch.get_num_threads())
    return partial

"""Reading each rank's slices straight from safetensors files.

A checkpoint is ``model.safetensors`` or shards listed in ``model.safetensors.index.json``. The
loader walks the model's parallel modules, asks each for the slice it holds (``shards``), and reads
exactly that slice with safetensors' lazy slicing: no rank materialises a full tensor it does not
keep. Every expected tensor is read exactly once; anything missing, extra or mis-shaped is an error
naming the file and tensor. Only safetensors: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from tpinfer.loading.hugepages import place_in_huge_pages
from tpinfer.parallel.layers import ParallelModule
from tpinfer.parallel.spec import Slice

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors some checkpoints carry that tpinfer recomputes or shares instead of loading.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint directory tpinfer cannot load, naming the file and tensor."""


def resolve_dtype(dtype: str | torch.dtype | None, checkpoint_dtype: str | None) -> torch.dtype:
    """float32 / bfloat16 / float16 by name or torch.dtype; "auto" (or None) means the checkpoint's torch_dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise CheckpointError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if dtype in (None, "auto"):
        return DTYPES.get(str(checkpoint_dtype), torch.float32)
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; use auto, float32, bfloat16 or float16")
    return DTYPES[dtype]


class Checkpoint:
    """The safetensors files of a checkpoint directory and where each tensor lives."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory {self.path} does not exist")
        index, single = self.path / INDEX_FILE, self.path / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
            self.files = {name: self.path / file for name, file in weight_map.items()}
        elif single.is_file():
            self.files = {}
            with self._open(single) as f:
                self.files = {name: single for name in f.keys()}
        else:
            pickles = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt"))
            hint = f" (found {', '.join(pickles)}: pickle checkpoints are not loaded; convert to safetensors)" if pickles else ""
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.path}{hint}")
        for file in sorted(set(self.files.values())):
            if not file.is_file():
                raise CheckpointError(f"{file.name} is listed in {INDEX_FILE} but missing from {self.path}")
        self._handles: dict[Path, object] = {}

    @staticmethod
    def _open(file: Path):  # noqa: ANN205
        try:
            return safe_open(str(file), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error type for corrupt or truncated files
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc

    def _file(self, name: str) -> Path:
        """The file holding stored tensor ``name``."""
        return self.files[name]

    def handle(self, name: str):  # noqa: ANN201
        file = self._file(name)
        if file not in self._handles:
            self._handles[file] = self._open(file).__enter__()
        return self._handles[file]

    def _slice(self, name: str):  # noqa: ANN202
        try:
            return self.handle(name).get_slice(name)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{self._file(name)}: missing tensor {name} ({exc})") from exc

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, piece: Slice | None) -> torch.Tensor:
        """The tensor, or only the rows/columns ``piece`` names (its ranges, concatenated), read lazily from disk."""
        tensor_slice = self._slice(name)
        try:
            if piece is None:
                return tensor_slice[:]
            parts, remaining = [], piece.valid
            for start, length in piece.ranges:
                take = min(length, remaining)
                if take <= 0:
                    break
                index = slice(start, start + take)
                parts.append(tensor_slice[index] if piece.dim == 0 else tensor_slice[:, index])
                remaining -= take
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=piece.dim)
        except Exception as exc:
            raise CheckpointError(f"{self._file(name)}: cannot read tensor {name} ({exc})") from exc

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()


def open_checkpoint(path: str | Path, config=None):  # noqa: ANN001, ANN201  (a Checkpoint-like reader)
    """The checkpoint at ``path``: a directory of safetensors (pre-quantized in compressed-tensors format when its
    config.json says so; ``config``, the ModelConfig, then gives the projections' input features), or a GGUF file."""
    if str(path).endswith(".gguf"):
        from tpinfer.loading.gguf import GGUFCheckpoint

        return GGUFCheckpoint(path)
    from tpinfer.loading.compressed import CompressedCheckpoint, quantization_config

    if Path(path).is_dir() and quantization_config(path) is not None:
        from tpinfer.parallel.spec import Linear

        linears = {m.name: m.in_features.total for m in config.family.modules(config) if isinstance(m, Linear)}
        return CompressedCheckpoint(path, linears)
    return Checkpoint(path)


def expected_tensors(model: nn.Module) -> dict[str, tuple[ParallelModule, str, Slice | None]]:
    """Checkpoint name -> (module that loads it, its name there, the slice the module holds), in the order the
    model registers its modules."""
    expected: dict[str, tuple[ParallelModule, str, Slice | None]] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, ParallelModule):
            # A last pipeline stage's own copy of a tied head reads the embedding's tensor (``source_name``).
            source = getattr(module, "source_name", None) or module_name
            for suffix, piece in module.sources().items():
                expected[f"{source}.{suffix}"] = (module, suffix, piece)
    return expected


def _nbytes(tensor) -> int:  # noqa: ANN001  (a tensor, or a QTensor of several)
    if isinstance(tensor, torch.Tensor):
        return tensor.numel() * tensor.element_size()
    return sum(t.numel() * t.element_size() for t in tensor.tensors.values())


def load_weights(
    model: nn.Module,
    checkpoint: Checkpoint,
    full_shapes: dict[str, tuple[int, ...]],
    progress: bool = False,
    ignore: tuple[str, ...] = (),
    notes: dict[str, str] | None = None,
) -> dict[str, int]:
    """Fill ``model``'s parameters with their slices; returns {"tensors": n, "bytes": read}.

    ``full_shapes`` are the checkpoint shapes the config implies (``notes`` say how, for fused tensors);
    ``ignore`` names tensors the checkpoint may carry that the model does not load (e.g. lm_head.weight when
    embeddings are tied). Each module receives all of its tensors at once (``ParallelModule.load``): a quantized
    layer quantizes its float slice there, so a rank never holds more than one float slice at a time.
    """
    notes = notes or {}
    expected = expected_tensors(model)
    available = set(checkpoint.files)
    missing = sorted(set(expected) - available)
    if missing:
        file = checkpoint.path
        # A model with a task head stores the same tensors under a prefix (BertForMaskedLM's "bert."): say so.
        stored = next((n for n in sorted(available) if n.endswith("." + missing[0])), None)
        hint = (f" (the checkpoint has {stored}: a model saved with a head around it, whose names tpinfer does not "
                "read)" if stored else "")
        raise CheckpointError(f"{file}: missing tensor{'s' if len(missing) > 1 else ''} {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else "") + hint)
    extra = sorted(n for n in available - set(expected) if n not in ignore and not n.endswith(IGNORED_SUFFIXES))
    if extra:
        raise CheckpointError(
            f"{checkpoint.files[extra[0]]}: unexpected tensor{'s' if len(extra) > 1 else ''} "
            f"{', '.join(extra[:5])}" + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            + " (does config.json match these weights?)"
        )
    # Fresh storage in huge pages, before anything is written (zeroed, as padded rows need: see hugepages.py).
    params = [p for _, m in model.named_modules() if isinstance(m, ParallelModule) for p in m.parameters(False)]
    model.weight_arena = place_in_huge_pages(params)
    groups: dict[int, list[str]] = {}
    for name in sorted(expected, key=lambda n: (str(checkpoint.files[n]), n)):
        groups.setdefault(id(expected[name][0]), []).append(name)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(expected), desc="loading weights", unit="tensor", leave=False)
    start, nbytes = time.perf_counter(), 0
    try:
        for names in groups.values():
            module, parts = expected[names[0]][0], {}
            for name in names:
                _, suffix, piece = expected[name]
                shape = checkpoint.shape(name)
                if name in full_shapes and shape != full_shapes[name]:
                    note = f" ({notes[name]})" if name in notes else ""
                    raise CheckpointError(
                        f"{checkpoint.files[name]}: tensor {name} has shape {list(shape)}, "
                        f"config.json implies {list(full_shapes[name])}{note}"
                    )
                if _chunked(module, checkpoint, name, piece):
                    nbytes += _read_chunked(module, suffix, checkpoint, name, piece)
                    if bar is not None:
                        bar.update(1)
                    continue
                parts[suffix] = checkpoint.read(name, piece)
                nbytes += _nbytes(parts[suffix])
                # safetensors reads through a memory map: pages it touched count as this process's memory until
                # the map is dropped. Dropping it after every tensor keeps the peak at the slices we keep plus one
                # tensor's pages (a row-parallel slice touches most pages of its tensor).
                checkpoint.close()
                if bar is not None:
                    bar.update(1)
            try:
                if parts:
                    module.load(parts)
            except ValueError as exc:
                raise CheckpointError(f"{checkpoint.files[names[0]]}: tensor {names[0]}: {exc}") from exc
            del parts
    finally:
        if bar is not None:
            bar.close()
        checkpoint.close()
    release_free_memory()
    log.debug("read %d tensors (%.1f MB) in %.2fs", len(expected), nbytes / 1e6, time.perf_counter() - start)
    return {"tensors": len(expected), "bytes": nbytes}


# A plain tensor larger than this is read a block of rows at a time. Each block is held twice for a moment (the
# file's pages and the copy read from them): at 32 MiB, a float32 embedding's blocks were a rank's largest loading
# transient (1.1B Llama, int8 at TP=2: rank 1's peak 910 MiB, 845 at 8 MiB).
CHUNK_BYTES = 8 << 20


def _chunked(module: ParallelModule, checkpoint, name: str, piece: Slice | None) -> bool:  # noqa: ANN001
    """Whether to read ``name`` in blocks of rows straight into its parameter: a large float tensor of a module that
    just copies (embeddings and LM heads: their copy and the file's pages would otherwise both be resident)."""
    if type(module).load is not ParallelModule.load or type(checkpoint) is not Checkpoint:
        return False
    if piece is not None and (piece.dim != 0 or len(piece.ranges) != 1):
        return False
    param = getattr(module, name.rsplit(".", 1)[-1])
    return param.numel() * param.element_size() > CHUNK_BYTES and param.dim() == 2


def _read_chunked(module: ParallelModule, suffix: str, checkpoint: Checkpoint, name: str,
                  piece: Slice | None) -> int:
    param = getattr(module, suffix)
    start, valid = (0, param.shape[0]) if piece is None else (piece.ranges[0][0], piece.valid)
    rows = max(1, CHUNK_BYTES // (param.shape[1] * param.element_size()))
    nbytes = 0
    for offset in range(0, valid, rows):
        n = min(rows, valid - offset)
        block = checkpoint.read(name, Slice(0, ((start + offset, n),), n))
        if tuple(block.shape) != (n, param.shape[1]):
            raise CheckpointError(f"{checkpoint.files[name]}: tensor {name} rows have shape {list(block.shape)}")
        param.data[offset : offset + n].copy_(block)
        nbytes += block.numel() * block.element_size()
        del block
        checkpoint.close()  # drop the file's pages of this block before the next
    return nbytes


def release_free_memory() -> None:
    """Hand the allocator's freed pages back to the system (glibc keeps the heap's temporaries of loading)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

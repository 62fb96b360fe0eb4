"""Convert a llama-architecture GGUF file into an HF checkpoint directory tpinfer (and transformers) load.

The ``gguf`` package reads the file: its metadata becomes ``config.json`` and ``generation_config.json``, every
tensor is dequantized to float32 (Q4_1 blocks become d * q + m exactly; nothing is re-rounded) and written to
``model.safetensors`` under its HF name. llama.cpp's converter stores q_proj and k_proj rows interleaved for its
rope layout; they are put back into HF's rotate-half order. The tokenizer (vocabulary, merges, special tokens and
chat template in the file's ``tokenizer.*`` keys) is converted by HF transformers' own GGUF support and saved as
``tokenizer.json``/``tokenizer_config.json``.

The output is written into a temporary folder next to ``out`` and renamed into place when complete, so an
interrupted conversion leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

# GGUF tensor name (after "blk.{i}.") -> HF name (after "model.layers.{i}.")
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


class GGUFError(ValueError):
    pass


def _field(reader, key: str, default: Any = None) -> Any:  # noqa: ANN001
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head it stores rows (pair, half) where HF stores (half, pair)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_config(reader, file: Path) -> dict[str, Any]:  # noqa: ANN001
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"{file}: general.architecture is {arch!r}; tpinfer reads GGUF files of the llama architecture "
                        "only")

    def need(key: str) -> Any:
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise GGUFError(f"{file}: metadata llama.{key} is missing")
        return value

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    vocab = int(_field(reader, "llama.vocab_size", len(tokens)))
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // heads))
    rope_dim = int(_field(reader, "llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise GGUFError(f"{file}: rope.dimension_count {rope_dim} != head dim {head_dim} (partial rope) is not handled")
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(_field(reader, "llama.context_length", 4096)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    if _field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise GGUFError(f"{file}: rope scaling {_field(reader, 'llama.rope.scaling.type')!r} is not handled")
    return config


def tensors(reader, config: dict[str, Any], file: Path) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Every tensor dequantized to float32 under its HF name."""
    from gguf.quants import dequantize

    out: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = tensor.name
        if name in TOP_NAMES:
            hf = TOP_NAMES[name]
        elif name.startswith("blk.") and name.split(".", 2)[2] in LAYER_NAMES:
            _, layer, rest = name.split(".", 2)
            hf = f"model.layers.{layer}.{LAYER_NAMES[rest]}"
        elif name == "rope_freqs.weight":
            raise GGUFError(f"{file}: tensor {name} (llama3-style rope frequencies) is not handled")
        else:
            raise GGUFError(f"{file}: unexpected tensor {name}")
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        weight = weight.reshape(tuple(int(d) for d in reversed(tensor.shape)))  # ggml lists dims fastest-first
        if hf.endswith("q_proj.weight"):
            weight = _unpermute(weight, config["num_attention_heads"])
        elif hf.endswith("k_proj.weight"):
            weight = _unpermute(weight, config["num_key_value_heads"])
        out[hf] = torch.from_numpy(np.array(weight, order="C"))  # a writable copy
    return out


def convert(gguf_file: str | Path, out: str | Path, progress: bool = True) -> Path:
    """Write an HF checkpoint of ``gguf_file`` to ``out`` (which must not exist yet); returns ``out``."""
    from gguf import GGUFReader
    from safetensors.torch import save_file

    gguf_file, out = Path(gguf_file), Path(out)
    if not gguf_file.is_file():
        raise GGUFError(f"{gguf_file}: no such file")
    if out.exists():
        raise GGUFError(f"{out} exists already; remove it to convert again")
    try:
        reader = GGUFReader(str(gguf_file))
    except Exception as exc:
        raise GGUFError(f"{gguf_file}: not a readable GGUF file ({exc})") from exc
    config = read_config(reader, gguf_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if progress:
            print(f"tpinfer: converting {gguf_file.name} to a safetensors checkpoint in {out} (once)",
                  file=sys.stderr, flush=True)
        weights = tensors(reader, config, gguf_file)
        save_file(weights, str(work / "model.safetensors"), metadata={"format": "pt"})
        (work / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
        (work / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        _convert_tokenizer(gguf_file, work)
        for file in work.iterdir():
            file.chmod(0o644)
        work.chmod(0o755)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def _convert_tokenizer(gguf_file: Path, work: Path) -> None:
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    tokenizer.save_pretrained(str(work))

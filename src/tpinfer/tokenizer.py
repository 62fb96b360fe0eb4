"""A checkpoint's tokenizer exactly as HF transformers loads it (``AutoTokenizer``), with what tpinfer needs.

Prompt ids are ``AutoTokenizer.from_pretrained(dir)(prompt).input_ids``: special tokens as the tokenizer config says
(``add_bos_token`` and the post-processor), and never padded or truncated, whatever padding or truncation the
``tokenizer.json`` carries (a prompt too long for the model is the engine's error to report, not the tokenizer's to
cut; only an embedding input whose caller asks for truncation is cut). Chat prompts are ``apply_chat_template`` renderings (system/user/assistant turns, ``add_generation_prompt``,
``tools``, ``strftime_now`` and ``raise_exception`` in templates), tokenized as HF does it: the rendered text
without adding special tokens again. Only rank 0 loads a tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Files a checkpoint's tokenizer may come from; one of them must be there.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer_config.json")


class TokenizerError(ValueError):
    pass


class BatchEncoding(dict):
    """input_ids and attention_mask tensors (left-padded), movable with ``.to(device)``."""

    def to(self, device: torch.device | str) -> BatchEncoding:
        return BatchEncoding({k: v.to(device) for k, v in self.items()})

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc


def _config_stand_in(path: Path) -> Any:
    """What ``AutoTokenizer`` reads of the model config (the config class's name, ``model_type``, ``tokenizer_class``,
    ``_name_or_path``), without importing the model's config class, or None to let it load the real one.

    ``AutoTokenizer.from_pretrained`` loads the model config only to choose the tokenizer class, and transformers
    maps config classes to tokenizer classes by the class's name. Importing a real config class (``LlamaConfig``...)
    imports transformers' modeling stack with it (activations, hub kernels, torch.distributed.tensor, FSDP, sympy:
    about 700 modules and 55 MB on rank 0, which is all that loads a tokenizer). A plain ``PreTrainedConfig``
    subclass carrying the same name and the checkpoint's ``config.json`` leads ``AutoTokenizer`` to the same class:
    tests check the class and the ids against ``AutoTokenizer.from_pretrained(dir)`` for every family. Remote code,
    composite (encoder-decoder) configs and unknown model types get the real config."""
    import json

    from transformers import PreTrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    name = CONFIG_MAPPING_NAMES.get(model_type) if isinstance(model_type, str) else None
    if name is None or "auto_map" in raw or any(isinstance(v, dict) and "model_type" in v for v in raw.values()):
        return None
    stand_in = type(name, (PreTrainedConfig,), {"model_type": model_type})
    return stand_in.from_pretrained(str(path), local_files_only=True)


class Tokenizer:
    def __init__(self, hf: Any, path: Path) -> None:
        self.hf, self.path = hf, path
        self._backend = _plain_backend(hf)
        self._batch: Any = None  # encode_many's direct encoder: unknown yet (None), none (False), or the callable

    @staticmethod
    def check_files(path: str | Path) -> None:
        """The cheap checks of ``from_pretrained`` (the files exist and parse), without importing transformers: a
        caller can refuse a broken directory before starting anything, and load the tokenizer later."""
        path = Path(path)
        if path.suffix == ".gguf":
            return
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise TokenizerError(f"no tokenizer in {path} (looked for {', '.join(TOKENIZER_FILES)})")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            _check_json(path / name)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.suffix == ".gguf":
            return cls._from_gguf(path)
        cls.check_files(path)
        try:
            import transformers
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise TokenizerError(f"reading tokenizers needs transformers ({exc})") from exc
        transformers.logging.set_verbosity_error()  # no "sequence longer than model_max_length" noise on prompts
        try:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True, config=_config_stand_in(path))
        except Exception as exc:  # transformers and tokenizers raise many kinds; all mean this directory's files
            files = ", ".join(n for n in TOKENIZER_FILES if (path / n).is_file())
            raise TokenizerError(f"{path}: cannot load the tokenizer from {files} ({type(exc).__name__}: {exc})") from exc
        return cls(hf, path)

    @classmethod
    def _from_gguf(cls, path: Path) -> Tokenizer:
        """The tokenizer a GGUF file's ``tokenizer.ggml.*`` keys describe, converted by HF transformers."""
        import transformers
        from transformers import AutoTokenizer

        transformers.logging.set_verbosity_error()
        try:
            hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        except Exception as exc:
            raise TokenizerError(f"{path}: cannot read the tokenizer from its metadata ({type(exc).__name__}: {exc})") from exc
        return cls(hf, path)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def chat_template(self) -> str | None:
        return getattr(self.hf, "chat_template", None)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def pad_token_id(self) -> int:
        pad = self.hf.pad_token_id
        if pad is None:
            pad = self.eos_token_id if self.eos_token_id is not None else 0
        return pad

    def encode(self, text: str, add_special_tokens: bool = True, max_length: int | None = None) -> list[int]:
        """HF's ``tokenizer(text).input_ids``: no padding, and no truncation unless ``max_length`` asks for it (an
        embedding input whose caller asked to truncate: HF's ``truncation=True, max_length=...``, special tokens
        kept)."""
        cut = {"truncation": True, "max_length": max_length} if max_length is not None else {"truncation": False}
        return list(self.hf(text, add_special_tokens=add_special_tokens, padding=False, **cut)["input_ids"])

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """``encode`` of each text (no padding, no truncation), in one batch call: to a copy of HF's Rust tokenizer
        where that is exactly what HF's wrapper calls (``_batch_encoder``; 1.4 against 2.2 ms for 32 texts of 64
        tokens: no character offsets, no wrapper), else to HF's batch tokenizer."""
        if not texts:
            return []
        if self._batch is None:
            self._batch = _batch_encoder(self.hf) or False
        if self._batch:
            return self._batch(texts)
        return [list(ids) for ids in self.hf(texts, padding=False, truncation=False)["input_ids"]]

    def decode(self, token_ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        if self._backend is not None:
            return self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def __call__(self, text: str | list[str], return_tensors: str | None = "pt") -> BatchEncoding:
        texts = [text] if isinstance(text, str) else list(text)
        ids = [self.encode(t) for t in texts]
        width = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, toks in enumerate(ids):
            input_ids[row, width - len(toks) :] = torch.tensor(toks, dtype=torch.long)
            mask[row, width - len(toks) :] = 1
        return BatchEncoding(input_ids=input_ids, attention_mask=mask)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        """The prompt text for a chat, rendered by HF with the checkpoint's own template."""
        if not self.chat_template:
            raise TokenizerError(f"the tokenizer in {self.path} has no chat template")
        try:
            return self.hf.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                               tokenize=False, **kwargs)
        except Exception as exc:  # the template's own raise_exception, or a jinja2 error on these messages
            raise TokenizerError(f"the chat template failed: {exc}") from exc

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> list[int]:
        """The chat's token ids, as ``apply_chat_template(..., tokenize=True)`` gives them."""
        text = self.apply_chat_template(messages, add_generation_prompt, tools, **kwargs)
        return self.encode(text, add_special_tokens=False)  # the template places BOS itself


def _plain_backend(hf: Any) -> Any:
    """The Rust ``tokenizers.Tokenizer`` behind ``hf`` where HF's ``decode`` is exactly its ``decode`` (a fast
    tokenizer class that does not override decoding, with no clean-up of spaces after it); else None. The server
    decodes twice per generated token (``serve.outputs.IncrementalDetokenizer``), and HF's wrapper first walks the
    ids in Python (``to_py_obj``): 2.7 us a call for 5 ids against 0.7 us."""
    plain = _keeps_backend(hf, "_decode", "decode") and not hf.clean_up_tokenization_spaces
    return hf._tokenizer if plain else None


def _keeps_backend(hf: Any, *methods: str) -> bool:
    """Whether ``hf`` is one of HF's fast tokenizers (``TokenizersBackend``) whose class keeps that class's own
    ``methods`` (so they do exactly what its Rust tokenizer does)."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    return isinstance(hf, TokenizersBackend) and all(getattr(type(hf), name) is getattr(TokenizersBackend, name)
                                                     for name in methods)


def _batch_encoder(hf: Any) -> Any:
    """For a fast tokenizer whose class encodes exactly as HF's ``TokenizersBackend`` does (its encoding methods
    not overridden, special tokens not split), a function texts -> token ids through a copy of its Rust tokenizer
    with no truncation and no padding: a copy of its own, so the state HF's wrapper sets on the original (truncation
    for ``encode(max_length=...)``) never reaches it. Checked against HF's own call on a few texts; else None."""
    if (not _keeps_backend(hf, "_encode_plus", "__call__", "encode", "tokenize")
            or getattr(hf, "split_special_tokens", False)):
        return None
    from tokenizers import Tokenizer as RustTokenizer  # installed with every TokenizersBackend

    try:
        rust = RustTokenizer.from_str(hf._tokenizer.to_str())
    except Exception:  # a tokenizer the library cannot serialize: HF's call then
        return None
    rust.no_truncation()
    rust.no_padding()
    rust.encode_special_tokens = False
    encode = getattr(rust, "encode_batch_fast", rust.encode_batch)

    def batch(texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in encode(texts)]

    probe = ["Hello, world!", "  two  spaces\nand a line", "émigré 東京 🙂", f"{hf.cls_token or ''} tokens {hf.eos_token or ''}"]
    expected = [list(ids) for ids in hf(probe, padding=False, truncation=False)["input_ids"]]
    return batch if batch(probe) == expected else None


def _check_json(file: Path) -> None:
    import json

    if not file.is_file():
        return
    try:
        json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{file} is not valid JSON: {exc}") from exc

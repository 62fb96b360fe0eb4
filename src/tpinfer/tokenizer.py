"""A thin tokenizer over the ``tokenizers`` library, reading an HF checkpoint's tokenizer files.

Gives what tpinfer's scripts, CLI and server need: encode/decode, special tokens, batched calls
that return tensors (``tokenizer(prompt, return_tensors="pt").to(device)``), and chat templates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as _Tokenizer


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


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, tokenizer: _Tokenizer, config: dict[str, Any], model_config: dict[str, Any]) -> None:
        self._tok = tokenizer
        self.chat_template: str | None = config.get("chat_template")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        self.bos_token_id = self._id(self.bos_token, model_config.get("bos_token_id"))
        eos = model_config.get("eos_token_id")
        self.eos_token_id = self._id(self.eos_token, eos[0] if isinstance(eos, list) else eos)
        self.pad_token_id = self._id(self.pad_token, None)
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id if self.eos_token_id is not None else 0

    def _id(self, token: str | None, fallback: int | None) -> int | None:
        if token is not None:
            found = self._tok.token_to_id(token)
            if found is not None:
                return found
        return fallback

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"no tokenizer.json in {path} (tpinfer reads fast-tokenizer files)")
        try:
            tok = _Tokenizer.from_file(str(file))
        except Exception as exc:
            raise TokenizerError(f"{file}: cannot load tokenizer ({exc})") from exc
        config = _read_json(path / "tokenizer_config.json")
        chat_file = path / "chat_template.jinja"
        if "chat_template" not in config and chat_file.is_file():
            config["chat_template"] = chat_file.read_text()
        return cls(tok, config, _read_json(path / "config.json"))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        return self._tok.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

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

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for a chat, rendered with the checkpoint's own template (sandboxed jinja2)."""
        if not self.chat_template:
            raise TokenizerError("this model's tokenizer has no chat template")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TokenizerError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{file} is not valid JSON: {exc}") from exc

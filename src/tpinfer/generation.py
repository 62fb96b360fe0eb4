"""A checkpoint's generation defaults: ``generation_config.json``, as HF's ``generate`` and vLLM's
``--generation-config auto`` read it.

* End-of-sequence ids: the file's ``eos_token_id`` (one id or several, Llama 3 has three), else config.json's, else
  the tokenizer's ``eos_token``.
* Sampling: ``temperature``, ``top_p``, ``top_k`` and ``max_new_tokens`` from the file are the defaults for
  whatever a request leaves out; ``do_sample: false`` makes the default greedy, as in HF.
* Keys that change sampling in ways tpinfer does not implement (``repetition_penalty`` and others) are listed in
  ``ignored`` so the CLI and the server can say so instead of dropping them silently.

Reads JSON only (no transformers), so every rank can call it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpinfer.config import ConfigError, eos_ids

FILE = "generation_config.json"
# Keys whose value changes nothing here when it has its neutral value.
UNSUPPORTED = {"repetition_penalty": 1.0, "min_p": 0.0, "typical_p": 1.0, "no_repeat_ngram_size": 0,
               "num_beams": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0}


@dataclass(frozen=True)
class GenerationDefaults:
    eos_token_ids: tuple[int, ...] = ()
    temperature: float | None = None  # None: the file does not say (the CLI is greedy, the server samples at 1)
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int | None = None
    ignored: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_pretrained(cls, path: str | Path, config_eos: tuple[int, ...] = ()) -> GenerationDefaults:
        path = Path(path)
        file = path / FILE
        raw: dict[str, Any] = {}
        if file.is_file():
            try:
                raw = json.loads(file.read_text())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{file} is not valid JSON: {exc}") from exc
            if not isinstance(raw, dict):
                raise ConfigError(f"{file} must hold a JSON object")
        eos = eos_ids(raw.get("eos_token_id")) or config_eos or tokenizer_eos(path)
        temperature = raw.get("temperature")
        if raw.get("do_sample") is False:
            temperature = 0.0  # HF's generate ignores temperature, top_p and top_k without do_sample
        ignored = {k: raw[k] for k, neutral in UNSUPPORTED.items() if raw.get(k) not in (None, neutral)}
        return cls(
            eos_token_ids=eos,
            temperature=None if temperature is None else float(temperature),
            top_p=None if raw.get("top_p") is None or temperature == 0.0 else float(raw["top_p"]),
            top_k=None if raw.get("top_k") is None or temperature == 0.0 else int(raw["top_k"]),
            max_new_tokens=None if raw.get("max_new_tokens") is None else int(raw["max_new_tokens"]),
            ignored=ignored,
        )

    def describe(self) -> str:
        """One line for logs: what the file sets and what tpinfer does not apply."""
        parts = [f"{k}={v}" for k, v in (("temperature", self.temperature), ("top_p", self.top_p),
                                          ("top_k", self.top_k), ("max_new_tokens", self.max_new_tokens))
                 if v is not None]
        text = f"generation defaults from {FILE}: {', '.join(parts)}" if parts else ""
        if self.ignored:
            text += ("; " if text else "") + "not applied (unsupported): " + ", ".join(
                f"{k}={v}" for k, v in self.ignored.items())
        return text


def tokenizer_eos(path: Path) -> tuple[int, ...]:
    """The tokenizer's eos_token id, read from tokenizer_config.json and tokenizer.json without loading them."""
    try:
        config = json.loads((path / "tokenizer_config.json").read_text())
        vocab = json.loads((path / "tokenizer.json").read_text())
    except (OSError, json.JSONDecodeError):
        return ()
    token = config.get("eos_token")
    if isinstance(token, dict):
        token = token.get("content")
    if not token:
        return ()
    for added in vocab.get("added_tokens", []):
        if added.get("content") == token:
            return (int(added["id"]),)
    found = (vocab.get("model") or {}).get("vocab", {})
    return (int(found[token]),) if isinstance(found, dict) and token in found else ()

"""Sentence embeddings from an encoder's hidden states, pooled as the checkpoint's sentence-transformers files say.

A sentence-transformers model directory lists its pipeline in ``modules.json``: the Transformer (this directory's
``config.json`` and weights, with ``sentence_bert_config.json``: ``max_seq_length``, ``do_lower_case``), a Pooling
module (``1_Pooling/config.json``: CLS, mean, max, mean / sqrt(length) or last-token pooling, in the legacy
``pooling_mode_*_token(s)`` booleans or the newer ``pooling_mode``) and optionally Normalize (unit L2 length).
tpinfer runs exactly that pipeline and refuses any other module (Dense, ...) by name. A directory without
``modules.json`` gets the default: mean pooling, no normalisation (``PoolingConfig.default`` says so, for a log line).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tpinfer.config import ConfigError

MODES = ("cls", "mean", "max", "mean_sqrt_len_tokens", "lasttoken")
# sentence-transformers' legacy booleans -> its mode names (``sentence_transformers.models.Pooling``)
LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
RUN_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class PoolingConfig:
    modes: tuple[str, ...] = ("mean",)  # several: their vectors concatenated in this order, as sentence-transformers
    normalize: bool = False
    max_seq_length: int | None = None  # longer inputs are an error unless truncation is asked for
    lower_case: bool = False  # sentence_bert_config.json's do_lower_case: the text is lowercased before tokenizing
    default: bool = False  # no modules.json: tpinfer's default, not the checkpoint's

    @classmethod
    def from_pretrained(cls, path: str | Path) -> PoolingConfig:
        path = Path(path)
        settings = _read(path / "sentence_bert_config.json") or {}
        max_len = settings.get("max_seq_length")
        common = {"max_seq_length": int(max_len) if max_len else None,
                  "lower_case": bool(settings.get("do_lower_case", False))}
        file = path / "modules.json"
        if not file.is_file():
            return cls(**common, default=True)
        entries = _read(file)
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "type" in e for e in entries):
            raise ConfigError(f"{file}: expected a list of modules, each with a \"type\"")
        kinds = [str(e["type"]).rsplit(".", 1)[-1] for e in entries]
        for entry, kind in zip(entries, kinds, strict=True):
            if kind not in RUN_MODULES:
                raise ConfigError(f"{file}: module {entry['type']} ({entry.get('path') or entry.get('name')}) is not "
                                  f"supported; tpinfer runs {', '.join(RUN_MODULES)}")
        if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
            raise ConfigError(f"{file}: modules {', '.join(kinds)}; tpinfer runs Transformer, Pooling and optionally "
                              "Normalize, in that order")
        if entries[0].get("path"):
            raise ConfigError(f"{file}: the Transformer lives in {entries[0]['path']!r}; tpinfer reads it from the "
                              "model directory itself")
        pooling_file = path / str(entries[1].get("path") or "") / "config.json"
        pooling = _read(pooling_file)
        if pooling is None:
            raise ConfigError(f"{pooling_file} is missing (the Pooling module's config)")
        return cls(modes=_modes(pooling, pooling_file), normalize=len(kinds) == 3, **common)

    def describe(self) -> str:
        how = "+".join(self.modes) + " pooling" + (", normalized" if self.normalize else ", not normalized")
        return how + (" (no sentence-transformers modules.json: tpinfer's default)" if self.default else "")


def _read(file: Path) -> Any:
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file} is not valid JSON: {exc}") from exc


def _modes(raw: dict[str, Any], file: Path) -> tuple[str, ...]:
    given = raw.get("pooling_mode")
    if given is None:
        given = [mode for key, mode in LEGACY_KEYS.items() if raw.get(key)]
    modes = (given,) if isinstance(given, str) else tuple(given)
    if not modes:
        raise ConfigError(f"{file}: no pooling mode is set")
    for mode in modes:
        if mode not in MODES:
            raise ConfigError(f"{file}: pooling mode {mode!r} is not supported; supported: {', '.join(MODES)}")
    return modes


def pool(hidden: torch.Tensor, mask: torch.Tensor, config: PoolingConfig) -> torch.Tensor:
    """Sentence embeddings (B, modes x hidden) in float32 from hidden states (B, T, hidden) of right-padded rows and
    their attention mask (B, T; 1 = a real token), as sentence-transformers' Pooling and Normalize compute them."""
    hidden = hidden.float()
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    out = []
    for mode in config.modes:
        if mode == "cls":
            out.append(hidden[:, 0])
        elif mode == "max":
            out.append(hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values)
        elif mode == "lasttoken":
            last = mask.sum(dim=1).long() - 1
            out.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        else:
            count = weights.sum(dim=1).clamp(min=1e-9)
            total = torch.bmm(weights.transpose(1, 2), hidden).squeeze(1)  # (B, hidden): no (B, T, hidden) product
            out.append(total / (count if mode == "mean" else count.sqrt()))
    vectors = torch.cat(out, dim=-1)
    return F.normalize(vectors, p=2, dim=1) if config.normalize else vectors

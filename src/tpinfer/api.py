"""The two Python entry points.

- ``from_pretrained``: inside a script every rank runs (torchrun), in the shape of HF's
  ``AutoModelForCausalLM.from_pretrained(..., tp_plan="auto")`` then ``model.generate(**inputs)``.
- ``LLM``: starts the ranks for the caller and takes prompts, like vLLM's ``LLM``: ``generate``, ``chat`` and
  ``score`` for a causal LM, ``embed`` for an encoder (sentence embeddings, pooled as sentence-transformers does).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tpinfer.engine.generator import GenerationOutput
from tpinfer.engine.launcher import Launcher, RankFailure
from tpinfer.engine.runtime import EngineSpec, RankEngine, encoder_max_len, load_engine
from tpinfer.engine.runtime import max_model_len as max_model_len_for
from tpinfer.engine.sampling import SamplingParams
from tpinfer.generation import GenerationDefaults
from tpinfer.models.family import CAUSAL_LM, ENCODER
from tpinfer.parallel.context import ParallelContext
from tpinfer.parallel.mesh import MeshError
from tpinfer.pooling import PoolingConfig
from tpinfer.tokenizer import Tokenizer, TokenizerError

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 64  # when neither the caller nor generation_config.json says


def _dtype_name(dtype: str | torch.dtype) -> str:
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype


class TPModel:
    """This rank's share of a model, with HF-style ``generate``. Every rank must call the same methods."""

    def __init__(self, engine: RankEngine) -> None:
        self.engine = engine
        self.config = engine.config
        self.ctx = engine.ctx

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> torch.Tensor:
        """Prompt + generated token ids per row (B, prompt_len + new), right-padded with the pad id.

        Rows may be left- or right-padded; ``attention_mask`` says which tokens are real.
        With ``do_sample=True`` every rank returns the same tokens (rank 0's draw).
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), mask.cpu(), strict=True)]
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature if do_sample else 0.0,
            top_p=top_p if do_sample else 1.0,
            top_k=top_k if do_sample else 0,
            seed=seed,
            ignore_eos=ignore_eos,
        )
        outputs = self.engine.generator.generate(prompts, params)
        pad = (self.config.eos_token_id or (0,))[0]
        width = max(len(o.prompt_token_ids) + len(o.token_ids) for o in outputs)
        result = torch.full((len(outputs), width), pad, dtype=torch.long)
        for row, out in enumerate(outputs):
            ids = out.prompt_token_ids + out.token_ids
            result[row, : len(ids)] = torch.tensor(ids)
        return result.to(input_ids.device)

    def close(self) -> None:
        self.ctx.close()


def from_pretrained(
    path: str,
    dtype: str | torch.dtype = "auto",
    tp_plan: str | dict[str, str] = "auto",
    max_model_len: int | None = None,
    max_batch_size: int = 8,
    all_reduce: str = "auto",
    timeout_s: float = 120.0,
    torch_dtype: str | torch.dtype | None = None,
    pipeline_parallel_size: int = 1,
) -> TPModel:
    """Load this rank's slices of the checkpoint at ``path``; under torchrun TP = WORLD_SIZE / pipeline stages.

    Without torchrun's environment it runs as a single process (TP=1). Every rank calls ``generate`` with the same
    inputs; with pipeline stages each rank returns the same tokens (the last stage's choice).
    """
    spec = EngineSpec(
        model=str(path),
        dtype=_dtype_name(torch_dtype if torch_dtype is not None else dtype),
        tp_plan=tp_plan,
        max_model_len=max_model_len,
        max_batch_size=max_batch_size,
        all_reduce=all_reduce,
        timeout_s=timeout_s,
    )
    world = int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1
    if pipeline_parallel_size < 1 or world % pipeline_parallel_size:
        raise MeshError(f"pipeline_parallel_size={pipeline_parallel_size} does not divide the world size {world}")
    spec.tensor_parallel_size, spec.pipeline_parallel_size = world // pipeline_parallel_size, pipeline_parallel_size
    spec.check()  # sizes, plan and layer split before joining the others
    ctx = ParallelContext.from_env(timeout_s=timeout_s, all_reduce=all_reduce, mesh=spec.mesh)
    return TPModel(load_engine(spec, ctx, progress=ctx.is_first))


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str

    def to_json(self) -> dict:
        return {
            "prompt": self.prompt,
            "prompt_token_ids": self.prompt_token_ids,
            "token_ids": self.token_ids,
            "text": self.text,
            "logprobs": self.logprobs,
        }


@dataclass
class EmbeddingOutput:
    text: str | None  # None for an input given as token ids
    token_ids: list[int]
    embedding: list[float]
    truncated: bool = False  # the input was cut to the model's limit (only when asked for)

    def to_json(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "embedding": self.embedding}


class LLM:
    """A model served by ``tensor_parallel_size x pipeline_parallel_size`` processes that this object starts and
    stops.

    >>> llm = LLM("path/to/checkpoint", tensor_parallel_size=2, pipeline_parallel_size=2)
    >>> llm.generate(["Hello"], SamplingParams(max_new_tokens=8, temperature=0))[0].text
    """

    def __init__(
        self,
        model: str,
        tensor_parallel_size: int = 1,
        dtype: str | torch.dtype = "auto",
        tp_plan: str | dict[str, str] = "auto",
        max_model_len: int | None = None,
        max_batch_size: int = 8,
        all_reduce: str = "auto",
        timeout_s: float = 120.0,
        progress: bool = True,
        quantization: str | None = None,
        quantize_lm_head: bool | str = False,
        pipeline_parallel_size: int = 1,
        moe_parallel: str = "tensor",
        _fault: dict[str, int] | None = None,
    ) -> None:
        self.spec = EngineSpec(
            model=str(model),
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            moe_parallel=moe_parallel,
            dtype=_dtype_name(dtype),
            tp_plan=tp_plan,
            quantization=quantization,
            quantize_lm_head=quantize_lm_head,
            max_model_len=max_model_len,
            max_batch_size=max_batch_size,
            all_reduce=all_reduce,
            timeout_s=timeout_s,
            fault=_fault,
        )
        self.config, _ = self.spec.check()  # refuse impossible layouts before starting any process
        self.kind = self.config.family.kind
        # An encoder's sentence-transformers pooling (and its input limit); None for a causal LM.
        self.pooling = PoolingConfig.from_pretrained(model) if self.kind == ENCODER else None
        if self.pooling is not None:
            self.max_model_len = encoder_max_len(self.config, self.pooling, max_model_len)
            if self.pooling.default:
                log.warning("%s has no sentence-transformers modules.json: embeddings use %s", model,
                            self.pooling.describe())
        else:
            self.max_model_len = max_model_len_for(self.config, max_model_len)
        # The checkpoint's generation_config.json: end-of-sequence ids and sampling defaults.
        self.defaults = (GenerationDefaults.from_pretrained(model, self.config.eos_token_id) if self.kind == CAUSAL_LM
                         else GenerationDefaults())
        # A checkpoint without tokenizer files still serves prompts given as token ids.
        has_tokenizer = str(model).endswith(".gguf") or any(
            (Path(model) / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))
        if has_tokenizer:
            Tokenizer.check_files(model)  # broken tokenizer files are refused before any rank starts
        self.launcher = Launcher(self.spec)
        self.engine = self.launcher.start(progress)
        # Loaded after the weights: rank 0's peak memory is then its share of them plus the tokenizer (transformers'
        # import, ~90 MiB), not also the pages a read maps for a moment.
        try:
            self.tokenizer = Tokenizer.from_pretrained(model) if has_tokenizer else None
        except BaseException:
            self.launcher.shutdown(self.engine)
            raise

    def sampling_params(self, max_new_tokens: int | None = None, temperature: float | None = None,
                        top_p: float | None = None, top_k: int | None = None,
                        longest_prompt: int = 0, **rest: object) -> SamplingParams:
        """SamplingParams with what the caller leaves as None taken from the checkpoint's generation defaults
        (greedy when they say nothing); a default max_new_tokens is cut to the room the context leaves."""
        d = self.defaults
        if max_new_tokens is None:
            room = self.max_model_len - longest_prompt
            if room < 1:
                raise ValueError(f"a prompt of {longest_prompt} tokens leaves no room for new tokens in the maximum "
                                 f"sequence length {self.max_model_len} (--max-model-len)")
            max_new_tokens = min(d.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, room)
        temperature = temperature if temperature is not None else (d.temperature or 0.0)
        return SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p if top_p is not None else (d.top_p if d.top_p is not None else 1.0),
            top_k=top_k if top_k is not None else (d.top_k if d.top_k is not None else 0), **rest)

    def encode(self, prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if self.tokenizer is None:
            raise TokenizerError(f"{self.spec.model} has no tokenizer: pass prompts as lists of token ids")
        return self.tokenizer.encode(prompt)

    def encode_chat(self, messages: list[dict[str, str]], tools: list[dict] | None = None) -> list[int]:
        """A conversation's prompt ids, rendered with the checkpoint's chat template (generation prompt added)."""
        if self.tokenizer is None:
            raise TokenizerError(f"{self.spec.model} has no tokenizer, so it has no chat template")
        return self.tokenizer.encode_chat(messages, tools=tools)

    def chat(self, conversations: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """One reply per conversation (a list of {"role", "content"} messages), like vLLM's ``LLM.chat``."""
        self.engine.require(CAUSAL_LM, "chat")
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        return self.generate([self.encode_chat(c) for c in conversations], sampling_params)

    def generate(
        self, prompts: str | list[str] | list[list[int]], sampling_params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        self.engine.require(CAUSAL_LM, "generate")
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        texts = [p if isinstance(p, str) else None for p in prompts]
        token_ids = [self.encode(p) for p in prompts]
        params = sampling_params or self.sampling_params(longest_prompt=max(map(len, token_ids), default=0))
        try:
            outputs: list[GenerationOutput] = self.engine.run(token_ids, params)
        except Exception as exc:
            self.launcher.raise_failure(exc)
            raise
        return [
            RequestOutput(text, o.prompt_token_ids, o.token_ids,
                          self.tokenizer.decode(o.token_ids) if self.tokenizer else "", o.logprobs, o.finish_reason)
            for text, o in zip(texts, outputs, strict=True)
        ]

    def score(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Teacher-forced logits (len, vocab) float32 of every position of each token sequence."""
        self.engine.require(CAUSAL_LM, "score")
        for i, sequence in enumerate(sequences):
            if not sequence or len(sequence) > self.engine.model.max_seq_len:
                raise ValueError(f"sequence {i} has {len(sequence)} tokens; scoring takes 1 to "
                                 f"{self.engine.model.max_seq_len} (--max-model-len)")
            vocab = self.engine.config.vocab_size
            if min(sequence) < 0 or max(sequence) >= vocab:
                raise ValueError(f"sequence {i}: token ids must be in [0, {vocab}), got {min(sequence)}.."
                                 f"{max(sequence)} (a tokenizer larger than the model's vocabulary?)")
        try:
            return self.engine.score(sequences)
        except Exception as exc:
            self.launcher.raise_failure(exc)
            raise

    def embed(self, inputs: str | list[str] | list[int] | list[list[int]],
              truncate: bool = False) -> list[EmbeddingOutput]:
        """Sentence embeddings of an encoder model, one per input (text, or token ids), as sentence-transformers'
        ``encode`` computes them: the checkpoint's pooling and normalisation. An input longer than the model's limit
        (``max_seq_length``, or ``max_model_len``) is an error unless ``truncate``: then text is tokenized with HF's
        truncation to the limit (its special tokens kept) and token ids keep their first ``limit`` ids."""
        self.engine.require(ENCODER, "embed")
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]  # type: ignore[list-item]
        if not inputs:
            raise ValueError("no inputs to embed")
        limit = self.max_model_len
        for i, item in enumerate(inputs):
            if not item:
                raise ValueError(f"input {i} is empty")
        # what the tokenizer sees of each text input (lower-cased where the model's config says), None for token ids
        cased = [(item.lower() if self.pooling.lower_case else item) if isinstance(item, str) else None
                 for item in inputs]
        strings = [text for text in cased if text is not None]
        if strings and self.tokenizer is None:
            raise TokenizerError(f"{self.spec.model} has no tokenizer: pass inputs as lists of token ids")
        encoded = iter(self.tokenizer.encode_many(strings) if strings else [])  # one batch call for every text
        texts, token_ids, truncated = [], [], []
        for item, text in zip(inputs, cased, strict=True):
            if text is not None:
                ids = next(encoded)
                cut = truncate and len(ids) > limit
                if cut:
                    ids = self.tokenizer.encode(text, max_length=limit)
            else:
                ids = [int(t) for t in item]
                cut = truncate and len(ids) > limit
                if cut:
                    ids = ids[:limit]
            texts.append(item if isinstance(item, str) else None)
            token_ids.append(ids)
            truncated.append(cut)
        self.engine.check_sequences(token_ids)  # here, before anything crosses ranks
        try:
            vectors = self.engine.embed(token_ids)
        except Exception as exc:
            self.launcher.raise_failure(exc)
            raise
        return [EmbeddingOutput(text, ids, vector.tolist(), cut)
                for text, ids, vector, cut in zip(texts, token_ids, vectors, truncated, strict=True)]

    def close(self) -> None:
        self.launcher.shutdown(self.engine)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["LLM", "EmbeddingOutput", "RankFailure", "RequestOutput", "SamplingParams", "TPModel", "from_pretrained"]

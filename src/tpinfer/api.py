"""The two Python entry points.

- ``from_pretrained``: inside a script every rank runs (torchrun), in the shape of HF's
  ``AutoModelForCausalLM.from_pretrained(..., tp_plan="auto")`` then ``model.generate(**inputs)``.
- ``LLM``: starts the ranks for the caller and takes prompts, like vLLM's ``LLM``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tpinfer.engine.generator import GenerationOutput
from tpinfer.engine.launcher import Launcher, RankFailure
from tpinfer.engine.runtime import EngineSpec, RankEngine, load_engine
from tpinfer.engine.sampling import SamplingParams
from tpinfer.parallel.context import ParallelContext
from tpinfer.tokenizer import Tokenizer, TokenizerError

log = logging.getLogger(__name__)


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
) -> TPModel:
    """Load this rank's slices of the checkpoint at ``path``; under torchrun TP = WORLD_SIZE.

    Without torchrun's environment it runs as a single process (TP=1).
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
    ctx = ParallelContext.from_env(timeout_s=timeout_s, all_reduce=all_reduce)
    spec.tensor_parallel_size = ctx.world_size
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


class LLM:
    """A model served by ``tensor_parallel_size`` processes that this object starts and stops.

    >>> llm = LLM("path/to/checkpoint", tensor_parallel_size=2)
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
        _fault: dict[str, int] | None = None,
    ) -> None:
        self.spec = EngineSpec(
            model=str(model),
            tensor_parallel_size=tensor_parallel_size,
            dtype=_dtype_name(dtype),
            tp_plan=tp_plan,
            max_model_len=max_model_len,
            max_batch_size=max_batch_size,
            all_reduce=all_reduce,
            timeout_s=timeout_s,
            fault=_fault,
        )
        self.config, _ = self.spec.check()  # refuse impossible layouts before starting any process
        # A checkpoint without tokenizer files still serves prompts given as token ids.
        self.tokenizer = Tokenizer.from_pretrained(model) if (Path(model) / "tokenizer.json").is_file() else None
        self.launcher = Launcher(self.spec)
        self.engine = self.launcher.start(progress)

    def generate(
        self, prompts: str | list[str] | list[list[int]], sampling_params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        params = sampling_params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        texts = [p if isinstance(p, str) else None for p in prompts]
        if self.tokenizer is None and any(texts):
            raise TokenizerError(f"{self.spec.model} has no tokenizer.json: pass prompts as lists of token ids")
        token_ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
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

    def close(self) -> None:
        self.launcher.shutdown(self.engine)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["LLM", "RankFailure", "RequestOutput", "SamplingParams", "TPModel", "from_pretrained"]

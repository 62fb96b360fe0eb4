"""tpinfer: tensor-parallel inference for Hugging Face Llama-family checkpoints."""

from tpinfer import assets
from tpinfer.api import LLM, RankFailure, RequestOutput, TPModel, from_pretrained
from tpinfer.engine.sampling import SamplingParams
from tpinfer.tokenizer import Tokenizer

AutoTokenizer = Tokenizer  # the seeds' scripts say AutoTokenizer.from_pretrained(path)

__version__ = "0.1.0"
__all__ = ["LLM", "AutoTokenizer", "RankFailure", "RequestOutput", "SamplingParams", "TPModel", "Tokenizer",
           "from_pretrained"]

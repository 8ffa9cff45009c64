"""Byte-level BPE: exact round trip, special tokens never forged by text, HF compatibility."""

import json

import pytest

from fmforge.errors import UserError
from fmforge.tokenizer import SPECIAL_TOKENS, Tokenizer, train_from_inputs, train_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.\n" * 3,
    "def main():\n    return sum(x * x for x in range(10))\n",
    "토큰화는 바이트 단위로 이루어집니다. 안녕하세요!\n",
    "Emoji 😀 and café, naïve façade.\r\n",
] * 5

NASTY = [
    "",
    "plain ascii",
    "한국어 텍스트와 English mixed",
    "😀👩‍👩‍👧‍👦🇰🇷",
    "\x00\x01\x07\x1b[31m control \x7f",
    " " * 50 + "\t\t\n\n\n" + " " * 7,
    "windows\r\nline\rendings\r\n",
    "\u0301 lone combining mark at start, e\u0301 and end \u0308",
    "\ufeffBOM inside text",
    "<|endoftext|><|im_start|>user<|im_end|>",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 astral",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=400, min_frequency=1)


def test_special_tokens_have_lowest_ids(tokenizer):
    for i, token in enumerate(SPECIAL_TOKENS.values()):
        assert tokenizer.token_to_id(token) == i
    assert (tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id, tokenizer.mask_id) == (0, 1, 2, 3)
    assert tokenizer.special_ids == set(range(len(SPECIAL_TOKENS)))


@pytest.mark.parametrize("text", NASTY)
def test_round_trip_is_exact(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_text_never_yields_special_ids(tokenizer):
    text = "a <|endoftext|> b <|im_start|>assistant<|im_end|> <|pad|><|mask|><|bos|>"
    for ids in [tokenizer.encode(text), *tokenizer.encode_batch([text, text])]:
        assert not set(ids) & tokenizer.special_ids
        assert tokenizer.decode(ids) == text
    # A freshly loaded tokenizer keeps the setting (it is not stored in tokenizer.json).
    loaded = Tokenizer(type(tokenizer.hf).from_str(tokenizer.hf.to_str()))
    assert not set(loaded.encode(text)) & loaded.special_ids


def test_decode_specials(tokenizer):
    ids = [tokenizer.bos_id, *tokenizer.encode("hi"), tokenizer.eos_id]
    assert tokenizer.decode(ids) == "<|bos|>hi<|endoftext|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hi"


def test_save_load_and_hash(tokenizer, tmp_path):
    tokenizer.chat_template = "{{ messages }}"
    tokenizer.save(tmp_path, model_max_length=128)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["eos_token"] == "<|endoftext|>" and config["model_max_length"] == 128
    for source in [tmp_path, tmp_path / "tokenizer.json"]:
        loaded = Tokenizer.load(source)
        assert loaded.sha256 == tokenizer.sha256
        assert loaded.chat_template == "{{ messages }}"
        assert loaded.encode(NASTY[2]) == tokenizer.encode(NASTY[2])
    tokenizer.chat_template = None


def test_roles_come_from_config(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["bos_token"] = {"content": "<|im_start|>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.load(tmp_path).bos_id == tokenizer.token_to_id("<|im_start|>")


def test_autotokenizer_loads_saved_dir(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ["The quick brown fox", NASTY[2], NASTY[3], "a <|endoftext|> b"]:
        assert hf(text)["input_ids"] == tokenizer.encode(text)
    assert hf.eos_token_id == tokenizer.eos_id and hf.pad_token_id == tokenizer.pad_id


def test_vocab_too_small():
    with pytest.raises(UserError, match="--vocab-size 100 is too small"):
        train_tokenizer(CORPUS, vocab_size=100)


def test_train_from_inputs(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(CORPUS[:4]):
        (corpus / f"{i}.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "tok"
    summary = train_from_inputs([str(corpus)], vocab_size=300, out=str(out))
    assert summary["documents"] == 4 and summary["out"] == str(out)
    assert (out / "tokenizer.json").is_file()
    meta = json.loads((out / "tokenizer_meta.json").read_text())
    assert (
        meta["vocab_size"] == summary["vocab_size"] and meta["sources"]["inputs"][0]["files"] == 4
    )
    with pytest.raises(UserError, match="not empty"):
        train_from_inputs([str(tmp_path / "missing")], vocab_size=300, out=str(out))


hypothesis = pytest.importorskip("hypothesis")


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(hypothesis.strategies.text())
def test_round_trip_any_text(text):
    tok = _shared_tokenizer()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert not set(ids) & tok.special_ids


_CACHE: dict = {}


def _shared_tokenizer() -> Tokenizer:
    if "tok" not in _CACHE:
        _CACHE["tok"] = train_tokenizer(CORPUS, vocab_size=400, min_frequency=1)
    return _CACHE["tok"]

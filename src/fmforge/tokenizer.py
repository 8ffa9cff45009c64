"""Byte-level BPE and WordPiece on HF `tokenizers`: train, save/load, special-token roles.

Text round-trips exactly (`decode(encode(t)) == t` for any valid str): there is no normaliser, the
ByteLevel pre-tokenizer maps every byte to a symbol, and the initial alphabet holds all 256 bytes.
Plain text never encodes to a special-token id, even when it spells one (`<|endoftext|>`): callers
insert special ids themselves, so user data cannot forge document boundaries or chat turns.

WordPiece (`--kind wordpiece`) is BERT's tokenizer for the encoder family: lowercasing BERT
normaliser, [PAD] [UNK] [CLS] [SEP] [MASK] at ids 0..4, and a `vocab.txt` beside `tokenizer.json`
(transformers 5 rebuilds any `model_type: bert` tokenizer as WordPiece from it). It does not
round-trip text (lowercase, unknown characters become [UNK]); encoders never need to.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from fmforge.artifacts import atomic_dir, check_output_dir, write_json_atomic
from fmforge.data.sources import SkipLog, corpus_provenance, iter_documents
from fmforge.errors import DataError, UserError

# Order matters: these take ids 0..5 in a trained tokenizer, EOS first.
SPECIAL_TOKENS = {
    "eos": "<|endoftext|>",
    "bos": "<|bos|>",
    "pad": "<|pad|>",
    "mask": "<|mask|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
}
# BERT's special tokens, in the order a trained WordPiece tokenizer gives them ids 0..4.
WORDPIECE_SPECIAL_TOKENS = {
    "pad": "[PAD]",
    "unk": "[UNK]",
    "cls": "[CLS]",
    "sep": "[SEP]",
    "mask": "[MASK]",
}
# Roles that have a standard key in HF's tokenizer_config.json.
_CONFIG_KEYS = {
    "bos": "bos_token",
    "eos": "eos_token",
    "pad": "pad_token",
    "mask": "mask_token",
    "cls": "cls_token",
    "sep": "sep_token",
    "unk": "unk_token",
}
_BYTE_ALPHABET = 256


def _token_content(value: object) -> str | None:
    # HF writes a role token either as a string or as a serialised AddedToken dict.
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its special-token roles and optional chat template."""

    def __init__(
        self,
        hf_tokenizer: tokenizers.Tokenizer,
        roles: dict[str, str] | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.hf = hf_tokenizer
        # Not serialised in tokenizer.json, so it is set on every construction.
        self.hf.encode_special_tokens = True
        if roles is None:
            roles = {r: t for r, t in SPECIAL_TOKENS.items() if self.hf.token_to_id(t) is not None}
        for role, token in roles.items():
            if self.hf.token_to_id(token) is None:
                raise DataError(f"tokenizer: {role} token {token!r} is not in the vocabulary")
        self.roles = dict(roles)
        self.chat_template = chat_template

    # --- encoding --------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Return the token ids of `text`; no special tokens are added or recognised."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Return the token ids of each text, encoded in parallel."""
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Return the text of `ids`; special tokens appear as their spelling unless skipped."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Return the id of a token string, or None when it is not in the vocabulary."""
        return self.hf.token_to_id(token)

    # --- roles ---------------------------------------------------------------------------------

    def _role_id(self, role: str) -> int | None:
        token = self.roles.get(role)
        return None if token is None else self.hf.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Return the number of ids, special tokens included."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        """Return the end-of-sequence id (also the document separator in token shards)."""
        return self._role_id("eos")

    @property
    def bos_id(self) -> int | None:
        """Return the beginning-of-sequence id, or None."""
        return self._role_id("bos")

    @property
    def pad_id(self) -> int | None:
        """Return the padding id, or None."""
        return self._role_id("pad")

    @property
    def mask_id(self) -> int | None:
        """Return the mask id (masked LM and fill), or None."""
        return self._role_id("mask")

    @property
    def cls_id(self) -> int | None:
        """Return the [CLS] id that opens an encoder's input, or None."""
        return self._role_id("cls")

    @property
    def sep_id(self) -> int | None:
        """Return the [SEP] id that closes an encoder's input, or None."""
        return self._role_id("sep")

    @property
    def is_wordpiece(self) -> bool:
        """Return True for a WordPiece (BERT) tokenizer."""
        return isinstance(self.hf.model, models.WordPiece)

    def frame(self, ids: list[int], max_length: int) -> list[int]:
        """Return [CLS] ids [SEP], the ids cut so the whole is at most `max_length` long."""
        if self.cls_id is None or self.sep_id is None:
            raise DataError("tokenizer has no [CLS]/[SEP] tokens; it is not an encoder tokenizer")
        return [self.cls_id, *ids[: max(max_length - 2, 0)], self.sep_id]

    @property
    def special_ids(self) -> set[int]:
        """Return the ids of all special tokens."""
        decoder = self.hf.get_added_tokens_decoder()
        return {i for i, token in decoder.items() if token.special}

    @property
    def sha256(self) -> str:
        """Return the sha256 of the canonical tokenizer.json, used to match shards to models."""
        return hashlib.sha256(self.hf.to_str().encode("utf-8")).hexdigest()

    # --- files ---------------------------------------------------------------------------------

    def config_dict(self, model_max_length: int | None = None) -> dict:
        """Return the tokenizer_config.json contents that transformers' AutoTokenizer reads."""
        config: dict = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            # Matches encode_special_tokens: text spelling a special token stays plain text.
            "split_special_tokens": True,
        }
        if self.is_wordpiece:
            # BERT's own class, so fill-mask pipelines recognise "[MASK]" in their input.
            config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True}
        for role, key in _CONFIG_KEYS.items():
            if role in self.roles:
                config[key] = self.roles[role]
        extra = [t for r, t in self.roles.items() if r not in _CONFIG_KEYS]
        if extra:
            config["additional_special_tokens"] = extra
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        return config

    def save(self, directory: str | Path, model_max_length: int | None = None) -> None:
        """Write tokenizer.json and tokenizer_config.json into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(directory / "tokenizer.json"))
        write_json_atomic(directory / "tokenizer_config.json", self.config_dict(model_max_length))
        if self.is_wordpiece:
            vocab = sorted(self.hf.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
            text = "".join(token + "\n" for token, _ in vocab)
            (directory / "vocab.txt").write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a directory holding tokenizer.json (+ tokenizer_config.json) or the file."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise DataError(
                f"{file}: no such tokenizer file; train one with `fmforge tokenizer train`"
            )
        try:
            hf = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise DataError(f"{file}: not a valid tokenizer.json ({e})") from e
        config_file = file.with_name("tokenizer_config.json")
        config: dict = {}
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{config_file}: broken JSON ({e})") from e
            if not isinstance(config, dict):
                raise DataError(f"{config_file}: expected a JSON object")
        roles = {r: t for r, t in SPECIAL_TOKENS.items() if hf.token_to_id(t) is not None}
        for role, key in _CONFIG_KEYS.items():
            token = _token_content(config.get(key))
            if token is not None and hf.token_to_id(token) is not None:
                roles[role] = token
        chat_template = config.get("chat_template")
        if not isinstance(chat_template, str):
            chat_template = None
        return cls(hf, roles=roles, chat_template=chat_template)


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Return a byte-level BPE tokenizer trained on `texts`, special tokens at ids 0..5."""
    minimum = _BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise UserError(
            f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least {minimum} "
            f"({_BYTE_ALPHABET} bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)


def train_wordpiece(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Return a lowercasing BERT WordPiece tokenizer trained on `texts`: specials at ids 0..4,
    then the other tokens in sorted order, so the same vocabulary always gets the same ids."""
    from tokenizers import normalizers, processors

    minimum = len(WORDPIECE_SPECIAL_TOKENS) + 100
    if vocab_size < minimum:
        raise UserError(f"--vocab-size {vocab_size} is too small for WordPiece (>= {minimum})")
    hf = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(WORDPIECE_SPECIAL_TOKENS.values()),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    # The trainer numbers tokens of equal rank in a different order each run (on small corpora
    # its tie-breaking can even change a late token), so two runs' shards and models would
    # differ. WordPiece matches by string, not id: number the specials 0..4, then the rest sorted.
    specials = list(WORDPIECE_SPECIAL_TOKENS.values())
    rest = sorted(set(hf.get_vocab()) - set(specials))
    vocab = {token: i for i, token in enumerate(specials + rest)}
    hf.model = models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##")
    cls_id, sep_id = hf.token_to_id("[CLS]"), hf.token_to_id("[SEP]")
    hf.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    # [SEP] doubles as the document separator in token shards (`data prepare` needs one).
    return Tokenizer(hf, roles={**WORDPIECE_SPECIAL_TOKENS, "eos": "[SEP]"})


def train_from_inputs(
    inputs: list[str],
    vocab_size: int,
    out: str,
    overwrite: bool = False,
    max_skip_fraction: float = 0.05,
    kind: str = "bpe",
) -> dict:
    """Train a tokenizer on the documents of `inputs`, save it to `out`, return a summary."""
    if kind not in ("bpe", "wordpiece"):
        raise UserError(f"--kind {kind!r} is not one of ['bpe', 'wordpiece']")
    check_output_dir(out, overwrite)  # refuse before spending minutes reading data
    started = time.perf_counter()
    skips = SkipLog()
    counts = {"documents": 0, "bytes": 0}

    def texts() -> Iterable[str]:
        for document in iter_documents(inputs, skips):
            counts["documents"] += 1
            counts["bytes"] += len(document.text.encode("utf-8"))
            yield document.text

    if kind == "wordpiece":
        tokenizer = train_wordpiece(texts(), vocab_size)
    else:
        tokenizer = train_tokenizer(texts(), vocab_size)
    skips.check(max_skip_fraction)
    seconds = time.perf_counter() - started
    meta = {
        "kind": kind,
        "vocab_size": tokenizer.vocab_size,
        "requested_vocab_size": vocab_size,
        "sha256": tokenizer.sha256,
        "documents": counts["documents"],
        "bytes": counts["bytes"],
        "sources": corpus_provenance(inputs),
        "skips": skips.to_dict(),
        "seconds": round(seconds, 3),
    }
    with atomic_dir(out, overwrite) as tmp:
        tokenizer.save(tmp)
        write_json_atomic(tmp / "tokenizer_meta.json", meta)
    return {
        "vocab_size": tokenizer.vocab_size,
        "documents": counts["documents"],
        "bytes": counts["bytes"],
        "skipped": skips.skipped,
        "seconds": round(seconds, 3),
        "out": str(out),
    }

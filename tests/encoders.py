"""Shared helpers for the encoder tests: an inline WordPiece tokenizer and tiny BERT models."""

from __future__ import annotations

from pathlib import Path

import torch

SENTENCES = [
    "the teacher told the class a story about the river",
    "i heard the news from the teacher this morning",
    "the river runs past the old mill near the town",
    "a student asked the teacher about the homework",
    "the town market opens early on saturday morning",
    "she read a book about rivers and mountains",
    "the old mill was built beside the river long ago",
    "children play in the park after school every day",
]


def wordpiece_tokenizer(vocab_size: int = 200):
    """Return a WordPiece tokenizer trained in-process on the inline sentences."""
    from fmforge.tokenizer import train_wordpiece

    return train_wordpiece(SENTENCES * 20, vocab_size=vocab_size, min_frequency=1)


def tiny_bert_config(vocab_size: int):
    from fmforge.model.bert import BERT_PRESETS, BertConfig

    return BertConfig(vocab_size=vocab_size, max_position_embeddings=64, **BERT_PRESETS["tiny"])


def tiny_mlm_dir(out: Path) -> Path:
    """Write a randomly initialised tiny BertForMaskedLM dir (seeded) and return its path."""
    from fmforge.model.heads import BertForMaskedLM
    from fmforge.model.load import save_encoder_dir

    tokenizer = wordpiece_tokenizer()
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config(tokenizer.vocab_size))
    with torch.no_grad():  # a non-zero bias, so a test notices if it is dropped
        model.cls.predictions.bias.normal_(0, 0.5)
    return save_encoder_dir(model.eval(), tokenizer, out)


def tiny_embedder_dir(out: Path) -> Path:
    """Write a randomly initialised tiny BertModel sentence-encoder dir and return its path."""
    from fmforge.model.bert import BertModel
    from fmforge.model.load import SentenceSpec, save_encoder_dir

    tokenizer = wordpiece_tokenizer()
    torch.manual_seed(0)
    model = BertModel(tiny_bert_config(tokenizer.vocab_size))
    return save_encoder_dir(model.eval(), tokenizer, out, sentence=SentenceSpec(32))

"""BERT encoder: parity with transformers, HF/sentence-transformers loading of fmforge dirs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoders import SENTENCES, tiny_bert_config, tiny_embedder_dir, tiny_mlm_dir
from fmforge.model.bert import BertModel
from fmforge.model.heads import BertForMaskedLM

transformers = pytest.importorskip("transformers")


def _hf_config(config):
    return transformers.BertConfig(**config.to_hf_dict(), attn_implementation="eager")


def _padded_batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_bert_model_matches_transformers_with_padding():
    config = tiny_bert_config(100)
    ours = BertModel(config).eval()
    hf = transformers.BertModel(_hf_config(config)).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"embeddings.position_ids"}
    ids, mask = _padded_batch(100)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
        ours.set_eager_attention(True)
        eager = ours(ids, mask)
    real = mask.bool()
    assert torch.allclose(got[real], expected[real], atol=1e-5)
    assert torch.allclose(eager[real], got[real], atol=1e-5)
    assert not torch.allclose(got[0], got[1])  # padding changed what row 1 attends to


def test_masked_lm_matches_transformers():
    config = tiny_bert_config(100)
    ours = BertForMaskedLM(config).eval()
    with torch.no_grad():
        ours.cls.predictions.bias.normal_(0, 0.5)
    hf = transformers.BertForMaskedLM(_hf_config(config)).eval()
    hf.load_state_dict(ours.state_dict(), strict=False)
    hf.tie_weights()
    ids, mask = _padded_batch(100)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, mask)
        scored = ours(ids, mask, positions=mask.bool())
    assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=1e-4)
    assert torch.allclose(scored, got[mask.bool()], atol=1e-6)
    # The decoder is tied to the word embeddings: one tensor, not a copy.
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight


def test_mlm_dir_loads_in_transformers_and_fills_like_the_pipeline(tmp_path):
    import fmforge

    path = tiny_mlm_dir(tmp_path / "mlm")
    hf, info = transformers.BertForMaskedLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    lm = fmforge.load(path)
    text = "i heard [MASK] from the teacher"
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    encoded = tokenizer(text, return_tensors="pt")
    from fmforge.generate.fill import encode_with_masks

    assert encoded["input_ids"][0].tolist() == encode_with_masks(lm, text)
    with torch.no_grad():
        expected = hf.eval()(**encoded).logits
        got = lm.model(encoded["input_ids"])
    assert torch.allclose(got, expected, atol=1e-4)
    pipe = transformers.pipeline("fill-mask", model=hf, tokenizer=tokenizer, top_k=5)
    theirs = [r["token"] for r in pipe(text)]
    ours = [r["token_id"] for r in lm.fill(text, top_k=5)[0]]
    assert ours == theirs


def test_embedder_dir_loads_in_automodel_and_sentence_transformers(tmp_path):
    import fmforge

    st = pytest.importorskip("sentence_transformers")
    path = tiny_embedder_dir(tmp_path / "emb")
    _, info = transformers.AutoModel.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reference = st.SentenceTransformer(str(path), device="cpu")
    texts = [*SENTENCES, "an unseen sentence with zebra words", "x"]
    expected = reference.encode(texts, convert_to_numpy=True)
    got = fmforge.load(path).embed(texts)
    assert got.shape == (len(texts), 64)
    assert np.abs(got - expected).max() <= 1e-5
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_fmforge_load_returns_the_family_type(tmp_path):
    import fmforge
    from fmforge.api import LoadedEncoder
    from fmforge.errors import UserError

    lm = fmforge.load(tiny_embedder_dir(tmp_path / "emb"))
    assert isinstance(lm, LoadedEncoder)
    with pytest.raises(UserError, match="no masked-LM head"):
        lm.fill("i heard [MASK] from the teacher")
    with pytest.raises(UserError, match="empty"):
        lm.embed([])


def test_wordpiece_tokenizer_dir_loads_in_transformers(tmp_path):
    from encoders import wordpiece_tokenizer

    tokenizer = wordpiece_tokenizer()
    tokenizer.save(tmp_path)
    assert (tmp_path / "vocab.txt").read_text().splitlines()[:5] == [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
    ]
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "The Teacher told a STORY about zebras."
    ours = tokenizer.frame(tokenizer.encode(text), 64)
    assert hf(text)["input_ids"] == ours


def test_wordpiece_training_numbers_tokens_in_sorted_order():
    # The trainer numbers tokens of equal rank in any order from run to run; fmforge renumbers
    # them sorted, so the same vocabulary always gets the same ids (and shards, and models).
    from encoders import wordpiece_tokenizer
    from fmforge.tokenizer import WORDPIECE_SPECIAL_TOKENS

    vocab = wordpiece_tokenizer(vocab_size=300).hf.get_vocab()
    by_id = sorted(vocab, key=vocab.get)
    assert by_id[:5] == list(WORDPIECE_SPECIAL_TOKENS.values())
    assert by_id[5:] == sorted(by_id[5:]) and len(by_id) == len(set(by_id)) > 100
    assert {"teacher", "##s", "a"} <= set(by_id)

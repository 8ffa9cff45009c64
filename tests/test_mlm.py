"""Masked LM: masking statistics, the loss contract, and a trained model filling blanks."""

from __future__ import annotations

import pytest
import torch

from fmforge.train.objectives import IGNORE_INDEX, mask_tokens, masked_lm_loss

SPECIAL = {0, 1, 2, 3, 4}  # [PAD] [UNK] [CLS] [SEP] [MASK]
MASK_ID, VOCAB = 4, 500


def _rows(n_rows=1200, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 160, (n_rows,), generator=g)
    width = int(lengths.max())
    ids = torch.zeros(n_rows, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths.tolist()):
        ids[i, :n] = torch.randint(5, VOCAB, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = 2, 3  # [CLS] ... [SEP]
        ids[i, n // 2] = 1  # an [UNK] inside: special, never chosen
        mask[i, :n] = 1
    return ids, mask


def test_masking_statistics_over_100k_tokens():
    ids, mask = _rows()
    eligible = mask.bool() & ~torch.isin(ids, torch.tensor(sorted(SPECIAL)))
    assert eligible.sum() >= 100_000
    g = torch.Generator().manual_seed(7)
    inputs, labels = mask_tokens(ids, mask, SPECIAL, MASK_ID, VOCAB, g)
    chosen = labels != IGNORE_INDEX
    assert not (chosen & ~eligible).any()  # specials and padding never chosen
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])  # unchosen tokens untouched
    rate = chosen.sum().item() / eligible.sum().item()
    assert abs(rate - 0.15) <= 0.005
    n = chosen.sum().item()
    masked = (inputs[chosen] == MASK_ID).sum().item() / n
    kept = (inputs[chosen] == ids[chosen]).sum().item() / n
    randomised = 1 - masked - kept
    assert abs(masked - 0.8) <= 0.01
    assert abs(randomised - 0.1) <= 0.01  # a random pick can equal the original: ~0.2% of 10%
    assert abs(kept - 0.1) <= 0.01
    assert not torch.isin(inputs[chosen & (inputs != ids)], torch.tensor([0, 1, 2, 3])).any()
    again = mask_tokens(ids, mask, SPECIAL, MASK_ID, VOCAB, torch.Generator().manual_seed(7))
    other = mask_tokens(ids, mask, SPECIAL, MASK_ID, VOCAB, torch.Generator().manual_seed(8))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)
    assert not torch.equal(other[1], labels)


def test_masked_lm_loss_sums_over_chosen_positions_only():
    from encoders import tiny_bert_config
    from fmforge.model.heads import BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config(VOCAB)).eval()
    ids, mask = _rows(4)
    ids, mask = ids[:, :40], mask[:, :40]
    inputs, labels = mask_tokens(
        ids, mask, SPECIAL, MASK_ID, VOCAB, torch.Generator().manual_seed(1)
    )
    batch = {"input_ids": inputs, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        loss, count = masked_lm_loss(model, batch)
        logits = model(inputs, mask)  # (B, T, V)
    chosen = labels != IGNORE_INDEX
    assert int(count) == int(chosen.sum()) > 0
    expected = torch.nn.functional.cross_entropy(logits[chosen], labels[chosen], reduction="sum")
    assert torch.allclose(loss, expected, atol=1e-4)


@pytest.fixture(scope="module")
def encoder_shards(tmp_path_factory):
    """WordPiece tokenizer + token shards of the inline sentences (through the CLI functions)."""
    import json

    from encoders import SENTENCES
    from fmforge.data.pack import prepare_shards
    from fmforge.tokenizer import train_from_inputs

    root = tmp_path_factory.mktemp("enc")
    docs = root / "docs.jsonl"
    lines = [f"{s} {SENTENCES[(i * 3) % len(SENTENCES)]}" for i, s in enumerate(SENTENCES * 40)]
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    train_from_inputs([str(docs)], 200, str(root / "tok"), kind="wordpiece")
    prepare_shards([str(docs)], str(root / "tok"), str(root / "shards"), val_fraction=0.1)
    return root / "shards"


def _config(shards, steps, init_from=None):
    from fmforge.config import PretrainConfig

    return PretrainConfig.from_dict(
        {
            "model": {"preset": "tiny", "init_from": init_from, "max_position_embeddings": 64},
            "data": {"shards": str(shards)},
            "train": {
                "max_steps": steps,
                "batch_size": 8,
                "seq_len": 32,
                "warmup_steps": 2,
                "lr": 3e-3,
                "eval_every": steps,
                "eval_batches": 2,
                "checkpoint_every": steps,
                "log_every": 1,
            },
            "runtime": {"device": "cpu", "threads": 1},
        }
    )


def test_pretrain_mlm_then_simcse_through_the_one_trainer(encoder_shards, tmp_path):
    import json

    import fmforge
    from fmforge.api import LoadedEncoder
    from fmforge.train.pretrain import pretrain

    threads = torch.get_num_threads()  # runtime.threads=1 sets it for the process; restored
    try:
        summary = pretrain(_config(encoder_shards, 30), tmp_path / "mlm", objective="mlm")
        pretrain(
            _config(encoder_shards, 4, init_from=str(tmp_path / "mlm" / "final")),
            tmp_path / "simcse",
            objective="contrastive",
        )
    finally:
        torch.set_num_threads(threads)
    history = [json.loads(line) for line in (tmp_path / "mlm" / "metrics.jsonl").open()]
    losses = [r["loss"] for r in history if "loss" in r]
    assert losses[-1] < losses[0] - 1.0  # it learned the tiny corpus
    assert 0 < history[0]["scored"] < history[0]["tokens"]  # only masked positions are scored
    assert "val_loss" in summary or any("val_loss" in r for r in history)
    mlm = fmforge.load(tmp_path / "mlm")
    assert isinstance(mlm, LoadedEncoder)
    fillers = mlm.fill("the teacher told the [MASK] a story", top_k=3)[0]
    assert len(fillers) == 3 and fillers[0]["score"] >= fillers[1]["score"]

    final = tmp_path / "simcse" / "final"
    assert (final / "modules.json").is_file() and (final / "1_Pooling" / "config.json").is_file()
    vectors = fmforge.load(final).embed(["the river", "the teacher"])
    assert vectors.shape == (2, 64)
    start = mlm.model.bert.encoder.layer[0].attention.self.query.weight
    after = fmforge.load(final).model.encoder.layer[0].attention.self.query.weight
    assert not torch.equal(start, after)  # SimCSE moved the encoder it started from


def test_cloze_set_is_frozen_and_leaves_out_sentences_seen_in_training():
    from encoders import SENTENCES, wordpiece_tokenizer
    from fmforge.experiments.cloze import cloze_set, unigram_top5

    tokenizer = wordpiece_tokenizer()
    held_out = [f"{s} and then {SENTENCES[(i + 1) % 8]}" for i, s in enumerate(SENTENCES)]
    seen = set(held_out[:3])
    items = cloze_set(held_out, tokenizer, n=20, seed=3, exclude=seen)
    assert items == cloze_set(
        held_out, tokenizer, n=20, seed=3, exclude=seen
    )  # same seed, same set
    assert len(items) == 5  # one blank per unseen sentence, none from the three seen ones
    for item in items:
        assert item.text.count("[MASK]") == 1
        filled = item.text.replace("[MASK]", item.answer)
        assert filled in held_out[3:] and filled not in seen
    top = [tokenizer.decode([i]) for i in unigram_top5(SENTENCES, tokenizer)]
    assert top[0] == "the" and all(w.isalpha() for w in top)


def test_fresh_encoders_start_from_sinusoidal_positions_at_the_init_scale():
    from encoders import tiny_bert_config
    from fmforge.train.encoder_pretrain import fresh_encoder

    torch.manual_seed(0)
    model = fresh_encoder(tiny_bert_config(100), "mlm")
    weight = model.bert.embeddings.position_embeddings.weight.detach()  # (P, C)
    assert abs(weight.std().item() - 0.02) < 1e-3
    similarity = weight @ weight[10]  # (P,)
    assert similarity[11] > similarity[14] > similarity[30]  # nearer positions are more alike
    words = model.bert.embeddings.word_embeddings.weight.detach()
    assert abs(words[1:].std().item() - 0.02) < 2e-3  # the rest keeps BERT's init

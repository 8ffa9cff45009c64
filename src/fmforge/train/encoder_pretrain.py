"""`fmforge pretrain --objective mlm|contrastive`: BERT encoders through the one training loop.

- mlm: windows of the token shards framed as [CLS] window [SEP], masked per step by
  `mask_tokens` (15%, 80/10/10, seeded by step so resume reproduces the masks) and scored by
  `masked_lm_loss`. The final dir is a `BertForMaskedLM` (fills blanks; `transformers` loads it).
- contrastive: unsupervised SimCSE (Gao et al. 2021): short spans of the shards, each encoded
  twice with independent dropout and scored by `info_nce_loss` (in-batch negatives, cosine,
  temperature 0.05), usually starting from an MLM checkpoint (`model.init_from`). The final dir
  is a sentence encoder (`BertModel` + mean pooling + sentence-transformers files).
  With `data.pairs` (a JSONL of {"anchor", "positive"}) it trains on supervised pairs instead:
  each anchor's positive is its pair, the batch's other positives its negatives.

The shards must be prepared with a WordPiece tokenizer (`fmforge tokenizer train --kind
wordpiece`); [SEP] separates documents in them. `model.preset` names a BERT preset
(`model/bert.py`); `model.hidden_size`, `intermediate_size`, `num_hidden_layers` and
`num_attention_heads` override its width and depth, as they do a decoder preset's, and
`model.init_std` the std of a fresh encoder's init (BERT's `initializer_range`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from fmforge.config import PretrainConfig, dump_yaml
from fmforge.errors import ConfigError

ENCODER_OBJECTIVES = ("mlm", "contrastive")
CONTRASTIVE_SPAN = 32  # tokens per SimCSE "sentence", [CLS] and [SEP] included


class FramedWindows:
    """Batches of shard windows framed as [CLS] window [SEP]; masked for MLM when asked.

    Wraps `BatchSampler` (seeded order, exact resume); the masks of step n come from a generator
    seeded with (seed, n), so a resumed run masks exactly as an uninterrupted one.
    """

    def __init__(self, tokens, tokenizer, batch_size: int, seq_len: int, seed: int, runtime,
                 mask: bool) -> None:  # fmt: skip
        from fmforge.data.pack import BatchSampler

        if seq_len < 3:
            raise ConfigError(f"train.seq_len={seq_len} leaves no room between [CLS] and [SEP]")
        self.windows = BatchSampler(
            tokens, batch_size, seq_len - 2, seed=seed, rank=runtime.rank,
            world_size=runtime.world_size,
        )  # fmt: skip
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.seed = seed
        self.mask = mask
        self.step = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        from fmforge.train.objectives import mask_tokens

        x, _ = self.windows.next_batch()  # (B, T-2)
        b = x.shape[0]
        cls = torch.full((b, 1), self.tokenizer.cls_id, dtype=torch.long)
        sep = torch.full((b, 1), self.tokenizer.sep_id, dtype=torch.long)
        ids = torch.cat([cls, x, sep], dim=1)  # (B, T)
        attention = torch.ones_like(ids)
        self.step += 1
        if not self.mask:
            return {"input_ids": ids, "attention_mask": attention}
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        inputs, labels = mask_tokens(
            ids, attention, self.tokenizer.special_ids, self.tokenizer.mask_id,
            self.tokenizer.vocab_size, generator,
        )  # fmt: skip
        return {"input_ids": inputs, "attention_mask": attention, "labels": labels}

    def state_dict(self) -> dict[str, Any]:
        return {"windows": self.windows.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.windows.load_state_dict(state["windows"])
        self.step = int(state["step"])


def bert_config(cfg: PretrainConfig, vocab_size: int):
    """Return the BertConfig of a run: the BERT preset, the tokenizer's vocab, the context."""
    from fmforge.model.bert import BERT_PRESETS, BertConfig

    if cfg.model.preset not in BERT_PRESETS:
        raise ConfigError(
            f"model.preset={cfg.model.preset!r} has no encoder preset "
            f"(choose from {sorted(BERT_PRESETS)})"
        )
    positions = cfg.model.max_position_embeddings or 512
    if cfg.train.seq_len > positions:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} exceeds {positions} positions")
    # The preset's width and depth overrides, as for decoders (`model.*`, None: the preset's).
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    overrides = {k: getattr(cfg.model, k) for k in sizes if getattr(cfg.model, k) is not None}
    preset = BERT_PRESETS[cfg.model.preset]
    heads = overrides.get("num_attention_heads", preset["num_attention_heads"])
    if cfg.model.num_key_value_heads not in (None, heads):
        raise ConfigError(
            f"model.num_key_value_heads={cfg.model.num_key_value_heads}: BERT has one key/value "
            f"head per query head ({heads})"
        )
    if cfg.model.init_std is not None:
        if not cfg.model.init_std > 0:
            raise ConfigError(f"model.init_std={cfg.model.init_std} must be > 0")
        overrides["initializer_range"] = cfg.model.init_std
    return BertConfig(
        vocab_size=cfg.model.vocab_size or vocab_size,
        max_position_embeddings=positions,
        **{**preset, **overrides, **_dropout(cfg)},
    )


def _dropout(cfg: PretrainConfig) -> dict[str, float]:
    """Return the BertConfig dropout fields `model.dropout` sets (none when it is unset)."""
    if cfg.model.dropout is None:
        return {}
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"model.dropout={cfg.model.dropout} must be in [0, 1)")
    return dict(
        hidden_dropout_prob=cfg.model.dropout, attention_probs_dropout_prob=cfg.model.dropout
    )


def _check_tokenizer(tokenizer, shards_dir: str) -> None:
    missing = [r for r in ("cls", "sep", "mask", "pad") if tokenizer.roles.get(r) is None]
    if missing:
        raise ConfigError(
            f"data.shards={shards_dir} was prepared with a tokenizer without {missing} tokens; "
            "encoders need a WordPiece tokenizer: fmforge tokenizer train --kind wordpiece"
        )


def fresh_encoder(config, objective: str) -> torch.nn.Module:
    """Return an untrained BertForMaskedLM (mlm) or BertModel, as every fresh run starts.

    BERT's init, then sinusoidal starting values for the learned positions
    (`init_sinusoidal_positions`). Random-init twins in experiments are built here too, so a
    twin is exactly where its trained model started (up to the seed).
    """
    from fmforge.model.bert import BertModel, init_sinusoidal_positions
    from fmforge.model.heads import BertForMaskedLM

    model = BertForMaskedLM(config) if objective == "mlm" else BertModel(config)
    init_sinusoidal_positions(model)
    return model


def build_encoder(cfg: PretrainConfig, objective: str, tokenizer):
    """Return (model, config, sentence) to train: a fresh encoder, or `model.init_from`'s weights.

    From `init_from` the architecture is the base model's own (its config.json; `model.dropout`
    may change its dropout), so any BERT dir or built-in encoder can be continued; `sentence` is
    the base's sentence-transformers spec (its max_seq_length), None for a fresh model.
    """
    import dataclasses

    from fmforge.model.bert import BertModel
    from fmforge.model.heads import BertForMaskedLM, add_projection
    from fmforge.model.load import load_bundle

    projection = cfg.model.projection
    if projection is not None and (objective != "contrastive" or projection < 1):
        raise ConfigError("model.projection (a positive width) is for --objective contrastive")
    if not cfg.model.init_from:
        config = bert_config(cfg, tokenizer.vocab_size)
        torch.manual_seed(cfg.train.seed)
        model = fresh_encoder(config, objective)
        return (add_projection(model, projection) if projection else model), config, None
    if cfg.model.init_std is not None:
        raise ConfigError("model.init_std is for fresh encoders, not model.init_from runs")
    base = load_bundle(cfg.model.init_from, kind="encoder")
    if tokenizer is not None and base.tokenizer is not None:
        if base.tokenizer.sha256 != tokenizer.sha256:
            raise ConfigError(
                f"model.init_from={cfg.model.init_from} uses a different tokenizer than "
                "data.shards; prepare the shards with that model's tokenizer"
            )
    config = dataclasses.replace(base.config, **_dropout(cfg))
    if cfg.train.seq_len > config.max_position_embeddings:
        raise ConfigError(
            f"train.seq_len={cfg.train.seq_len} exceeds {config.max_position_embeddings} positions"
        )
    torch.manual_seed(cfg.train.seed)
    model = BertForMaskedLM(config) if objective == "mlm" else BertModel(config)
    base_projection = getattr(base.model, "projection", None)
    if base_projection is not None and objective == "contrastive":
        add_projection(model, base_projection.linear.out_features)  # continued with the rest
    source = base.model.state_dict()
    # An MLM checkpoint's encoder is under `bert.`; its head is not needed by SimCSE.
    if objective == "contrastive" and any(k.startswith("bert.") for k in source):
        source = {k[5:]: v for k, v in source.items() if k.startswith("bert.")}
    missing, unexpected = model.load_state_dict(source, strict=False)
    if unexpected or set(missing) - {"pooler.dense.weight", "pooler.dense.bias"}:
        raise ConfigError(
            f"model.init_from={cfg.model.init_from} cannot start a {objective} run "
            f"(missing {missing[:2]}, unexpected {unexpected[:2]})"
        )
    if projection and base_projection is None:
        add_projection(model, projection)
    elif projection and projection != base_projection.linear.out_features:
        raise ConfigError(
            f"model.projection={projection}: {cfg.model.init_from} already projects to "
            f"{base_projection.linear.out_features}"
        )
    return model, config, base.sentence


class PairBatches:
    """Batches of supervised (anchor, positive) pairs for InfoNCE, in a seeded order.

    Each epoch is a permutation drawn from a generator seeded with (seed, epoch); a batch never
    spans two epochs (the remainder is dropped), so every batch has `batch_size` distinct pairs
    and the state (epoch, position) resumes exactly.
    """

    def __init__(self, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int,
                 seed: int) -> None:  # fmt: skip
        if batch_size < 2 or len(pairs) < batch_size:
            raise ConfigError(
                f"train.batch_size={batch_size} needs at least 2 and at most {len(pairs)} pairs "
                "(in-batch negatives are the other pairs of the batch)"
            )
        self.pairs, self.pad_id, self.batch_size, self.seed = pairs, pad_id, batch_size, seed
        self.epoch, self.position = 0, 0

    def _order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.pairs), generator=generator).tolist()

    def next_batch(self) -> dict[str, torch.Tensor]:
        from fmforge.generate.embed import pad_batch

        if self.position + self.batch_size > len(self.pairs):
            self.epoch, self.position = self.epoch + 1, 0
        index = self._order()[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        ids, mask = pad_batch([self.pairs[i][0] for i in index], self.pad_id)  # (B, T)
        pair_ids, pair_mask = pad_batch([self.pairs[i][1] for i in index], self.pad_id)  # (B, T')
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "pair_input_ids": pair_ids,
            "pair_attention_mask": pair_mask,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def read_pairs(path: str, tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Return framed token ids of each {"anchor", "positive"} record of a JSONL file."""
    from fmforge.data.sources import iter_jsonl
    from fmforge.errors import DataError

    texts = []
    for number, record in iter_jsonl(path):
        anchor, positive = record.get("anchor"), record.get("positive")
        if not isinstance(anchor, str) or not isinstance(positive, str):
            raise DataError(f'{path}:{number}: expected string "anchor" and "positive" fields')
        if not anchor.strip() or not positive.strip():
            raise DataError(f"{path}:{number}: empty anchor or positive")
        texts.append((anchor, positive))
    anchors = tokenizer.encode_batch([a for a, _ in texts])
    positives = tokenizer.encode_batch([b for _, b in texts])
    return [
        (tokenizer.frame(a, max_length), tokenizer.frame(b, max_length))
        for a, b in zip(anchors, positives)
    ]


@torch.no_grad()
def masked_lm_eval_loss(model, batches: FramedWindows, n_batches: int) -> float:
    """Return the mean masked-LM loss over `n_batches` fixed, seeded validation batches."""
    from fmforge.train.objectives import masked_lm_loss

    total, count = 0.0, 0
    for _ in range(n_batches):
        batch = {k: v.to(next(model.parameters()).device) for k, v in batches.next_batch().items()}
        loss, scored = masked_lm_loss(model, batch)
        total, count = total + loss.item(), count + int(scored)
    return total / max(count, 1)


def pretrain_encoder(
    cfg: PretrainConfig,
    out: str | Path,
    objective: str,
    resume: str = "never",
    overwrite: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train a BERT encoder with `objective` ("mlm" or "contrastive"); write the run dir."""
    from fmforge.artifacts import write_json_atomic
    from fmforge.data.pack import TokenShards
    from fmforge.model.load import SentenceSpec, load_bundle, save_encoder_dir
    from fmforge.train.distributed import setup_runtime
    from fmforge.train.objectives import info_nce_loss, masked_lm_loss
    from fmforge.train.pretrain import open_run_dir
    from fmforge.train.trainer import Trainer

    if objective not in ENCODER_OBJECTIVES:
        raise ConfigError(f"--objective={objective!r} is not one of {list(ENCODER_OBJECTIVES)}")
    if cfg.data.pairs and objective != "contrastive":
        raise ConfigError("data.pairs (supervised pairs) is for --objective contrastive only")
    run_dir, resuming = open_run_dir(cfg, out, resume, overwrite)
    shards = TokenShards.open(cfg.data.shards) if cfg.data.shards else None
    if shards is not None:
        tokenizer = shards.tokenizer()
        _check_tokenizer(tokenizer, cfg.data.shards)
    elif cfg.model.init_from:
        tokenizer = load_bundle(cfg.model.init_from, kind="encoder").tokenizer
    else:
        raise ConfigError("data.pairs without data.shards needs model.init_from (its tokenizer)")
    runtime = setup_runtime(cfg.runtime)
    model, config, base_sentence = build_encoder(cfg, objective, tokenizer)
    cfg.model.vocab_size = config.vocab_size
    mlm = objective == "mlm"
    seq_len = cfg.train.seq_len if mlm else min(cfg.train.seq_len, CONTRASTIVE_SPAN)
    if cfg.data.pairs:  # supervised: each pair's second text is its anchor's positive
        pairs = read_pairs(cfg.data.pairs, tokenizer, cfg.train.seq_len)
        train = PairBatches(pairs, tokenizer.pad_id or 0, cfg.train.batch_size, cfg.train.seed)
    else:
        train = FramedWindows(
            shards.split("train"), tokenizer, cfg.train.batch_size, seq_len, cfg.train.seed,
            runtime, mask=mlm,
        )  # fmt: skip

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        if not mlm:
            return {}
        val = FramedWindows(
            shards.split("val"), tokenizer, cfg.train.batch_size, seq_len, 0, runtime, mask=True
        )
        return {"val_loss": masked_lm_eval_loss(m, val, cfg.train.eval_batches)}

    run_dir.mkdir(parents=True, exist_ok=True)
    if runtime.is_main and not resuming:
        (run_dir / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
        (run_dir / "objective.txt").write_text(objective + "\n", encoding="utf-8")
    trainer = Trainer(
        model,
        cfg.train,
        run_dir,
        train,
        masked_lm_loss if mlm else info_nce_loss,
        eval_fn=eval_fn if mlm else None,
        config_dict={**cfg.to_dict(), "objective": objective},
        runtime=runtime,
        progress=progress,
    )
    summary = trainer.fit(resume=resuming)
    if not runtime.is_main:
        return summary
    provenance = {
        "training": summary,
        "objective": objective,
        "config": cfg.to_dict(),
        "data": {
            "shards": str(cfg.data.shards),
            "pairs": _pairs_provenance(cfg.data.pairs),
            "tokenizer_sha256": tokenizer.sha256,
            "sources": shards.meta.get("sources") if shards is not None else None,
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    sentence = base_sentence or SentenceSpec(max_seq_length=config.max_position_embeddings)
    sentence = None if mlm else sentence
    model.eval()
    save_encoder_dir(model, tokenizer, run_dir / "final", provenance, sentence, overwrite=True)
    write_json_atomic(run_dir / "summary.json", {**summary, "objective": objective})
    return summary


def _pairs_provenance(path: str) -> dict[str, Any] | None:
    from fmforge.artifacts import sha256_file

    return {"path": str(path), "sha256": sha256_file(path)} if path else None

"""`fmforge pretrain --objective mlm|contrastive`: BERT encoders through the one training loop.

- mlm: windows of the token shards framed as [CLS] window [SEP], masked per step by
  `mask_tokens` (15%, 80/10/10, seeded by step so resume reproduces the masks) and scored by
  `masked_lm_loss`. The final dir is a `BertForMaskedLM` (fills blanks; `transformers` loads it).
- contrastive: unsupervised SimCSE (Gao et al. 2021): short spans of the shards, each encoded
  twice with independent dropout and scored by `info_nce_loss` (in-batch negatives, cosine,
  temperature 0.05), usually starting from an MLM checkpoint (`model.init_from`). The final dir
  is a sentence encoder (`BertModel` + mean pooling + sentence-transformers files).

The shards must be prepared with a WordPiece tokenizer (`fmforge tokenizer train --kind
wordpiece`); [SEP] separates documents in them. `model.preset` names a BERT preset
(`model/bert.py`).
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
    return BertConfig(
        vocab_size=cfg.model.vocab_size or vocab_size,
        max_position_embeddings=positions,
        **BERT_PRESETS[cfg.model.preset],
    )


def _check_tokenizer(tokenizer, shards_dir: str) -> None:
    missing = [r for r in ("cls", "sep", "mask", "pad") if tokenizer.roles.get(r) is None]
    if missing:
        raise ConfigError(
            f"data.shards={shards_dir} was prepared with a tokenizer without {missing} tokens; "
            "encoders need a WordPiece tokenizer: fmforge tokenizer train --kind wordpiece"
        )


def build_encoder(cfg: PretrainConfig, objective: str, tokenizer):
    """Return the model to train: a fresh (or `init_from`) BertForMaskedLM or BertModel."""
    from fmforge.model.bert import BertModel
    from fmforge.model.heads import BertForMaskedLM
    from fmforge.model.load import load_bundle

    config = bert_config(cfg, tokenizer.vocab_size)
    torch.manual_seed(cfg.train.seed)
    model = BertForMaskedLM(config) if objective == "mlm" else BertModel(config)
    if cfg.model.init_from:
        base = load_bundle(cfg.model.init_from, kind="encoder")
        if base.tokenizer is not None and base.tokenizer.sha256 != tokenizer.sha256:
            raise ConfigError(
                f"model.init_from={cfg.model.init_from} uses a different tokenizer than "
                "data.shards; prepare the shards with that model's tokenizer"
            )
        source = base.model.state_dict()
        # An MLM checkpoint's encoder is under `bert.`; its head is not needed by SimCSE.
        if objective == "contrastive" and any(k.startswith("bert.") for k in source):
            source = {k[5:]: v for k, v in source.items() if k.startswith("bert.")}
        missing, unexpected = model.load_state_dict(source, strict=False)
        if unexpected or set(missing) - {"pooler.dense.weight", "pooler.dense.bias"}:
            raise ConfigError(
                f"model.init_from={cfg.model.init_from} does not match model.preset="
                f"{cfg.model.preset} (missing {missing[:2]}, unexpected {unexpected[:2]})"
            )
    return model, config


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
    from fmforge.model.load import SentenceSpec, save_encoder_dir
    from fmforge.train.distributed import setup_runtime
    from fmforge.train.objectives import info_nce_loss, masked_lm_loss
    from fmforge.train.pretrain import open_run_dir
    from fmforge.train.trainer import Trainer

    if objective not in ENCODER_OBJECTIVES:
        raise ConfigError(f"--objective={objective!r} is not one of {list(ENCODER_OBJECTIVES)}")
    run_dir, resuming = open_run_dir(cfg, out, resume, overwrite)
    shards = TokenShards.open(cfg.data.shards)
    tokenizer = shards.tokenizer()
    _check_tokenizer(tokenizer, cfg.data.shards)
    runtime = setup_runtime(cfg.runtime)
    model, config = build_encoder(cfg, objective, tokenizer)
    cfg.model.vocab_size = config.vocab_size
    mlm = objective == "mlm"
    seq_len = cfg.train.seq_len if mlm else min(cfg.train.seq_len, CONTRASTIVE_SPAN)
    train = FramedWindows(
        shards.split("train"), tokenizer, cfg.train.batch_size, seq_len, cfg.train.seed, runtime,
        mask=mlm,
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
            "tokenizer_sha256": shards.meta.get("tokenizer_sha256"),
            "sources": shards.meta.get("sources"),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    sentence = None if mlm else SentenceSpec(max_seq_length=config.max_position_embeddings)
    model.eval()
    save_encoder_dir(model, tokenizer, run_dir / "final", provenance, sentence, overwrite=True)
    write_json_atomic(run_dir / "summary.json", {**summary, "objective": objective})
    return summary

"""`fmforge pretrain`: next-token prediction on token shards, through the one training loop.

A run dir holds the resolved `config.yaml` (re-runs it), `metrics.jsonl`, `checkpoints/step-N/`,
`final/` (a model dir `transformers` loads), `plots/loss.png` and `report.md`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from fmforge.artifacts import check_output_dir, write_json_atomic
from fmforge.config import PretrainConfig, dump_yaml, validate
from fmforge.errors import ConfigError, UserError


def build_model_config(cfg: PretrainConfig, vocab_size: int):
    """Return the LlamaConfig for a run: the preset, the tokenizer's vocab, the context."""
    from fmforge.model.config import preset_config

    if cfg.model.vocab_size is not None and cfg.model.vocab_size < vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{vocab_size} tokens; leave it unset (null) to use the tokenizer's"
        )
    if any(v is not None for v in (cfg.model.dropout, cfg.model.projection, cfg.model.init_std)):
        raise ConfigError(
            "model.dropout, model.projection and model.init_std apply to encoders "
            "(--objective mlm|contrastive)"
        )
    if cfg.data.pairs:
        raise ConfigError("data.pairs (supervised pairs) is for --objective contrastive only")
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers")
    sizes += ("num_attention_heads", "num_key_value_heads")
    model_config = preset_config(
        cfg.model.preset,
        vocab_size=cfg.model.vocab_size or vocab_size,
        max_position_embeddings=cfg.model.max_position_embeddings,
        **{name: getattr(cfg.model, name) for name in sizes},
    )
    if cfg.train.seq_len > model_config.max_position_embeddings:
        raise ConfigError(
            f"train.seq_len={cfg.train.seq_len} exceeds the model's context "
            f"{model_config.max_position_embeddings}; lower it or raise "
            "model.max_position_embeddings"
        )
    return model_config


def evaluate_loss(
    model: torch.nn.Module, tokens, batch_size: int, seq_len: int, max_batches: int | None
) -> tuple[float, int]:
    """Return (mean next-token loss in nats, tokens scored) over sequential val windows."""
    import torch.nn.functional as F

    from fmforge.data.pack import iter_eval_batches

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in iter_eval_batches(tokens, batch_size, seq_len, max_batches):
            logits = model(x.to(device))
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)).float(), y.to(device).reshape(-1), reduction="sum"
            )
            total += loss.item()
            count += y.numel()
    if count == 0:
        raise UserError(
            f"validation split has fewer than {seq_len + 1} tokens; "
            "raise --val-fraction in `fmforge data prepare` or lower train.seq_len"
        )
    return total / count, count


def open_run_dir(
    cfg: PretrainConfig, out: str | Path, resume: str, overwrite: bool
) -> tuple[Path, bool]:
    """Validate the config and the output dir; return (run dir, whether to resume it)."""
    validate(cfg)
    if resume not in ("never", "auto"):
        raise ConfigError(f"--resume={resume!r} is not one of ['never', 'auto']")
    run_dir = Path(out)
    resuming = resume == "auto" and (run_dir / "config.yaml").is_file()
    if not resuming:
        check_output_dir(run_dir, overwrite)
    return run_dir, resuming


def pretrain(
    cfg: PretrainConfig,
    out: str | Path,
    resume: str = "never",
    overwrite: bool = False,
    progress: bool | None = None,
    objective: str = "causal",
) -> dict[str, Any]:
    """Train a decoder from scratch (or `model.init_from`) and write the run dir; return summary.

    objective "mlm" or "contrastive" trains a BERT encoder instead (train/encoder_pretrain.py).
    """
    if objective != "causal":
        from fmforge.train.encoder_pretrain import pretrain_encoder

        return pretrain_encoder(cfg, out, objective, resume, overwrite, progress)
    from fmforge.cost.flops import training_flops_per_token
    from fmforge.data.pack import BatchSampler, TokenShards
    from fmforge.model.llama import LlamaForCausalLM
    from fmforge.model.load import load_model_dir, save_model_dir
    from fmforge.train.distributed import full_state_dict, setup_runtime
    from fmforge.train.objectives import causal_lm_loss
    from fmforge.train.trainer import Trainer

    run_dir, resuming = open_run_dir(cfg, out, resume, overwrite)
    shards = TokenShards.open(cfg.data.shards)
    tokenizer = shards.tokenizer()
    model_config = build_model_config(cfg, tokenizer.vocab_size)
    cfg.model.vocab_size = model_config.vocab_size
    runtime = setup_runtime(cfg.runtime)
    train_tokens = shards.split("train")
    sampler = BatchSampler(
        train_tokens,
        cfg.train.batch_size,
        cfg.train.seq_len,
        seed=cfg.train.seed,
        rank=runtime.rank,
        world_size=runtime.world_size,
    )
    val_tokens = shards.split("val")

    torch.manual_seed(cfg.train.seed)
    model = LlamaForCausalLM(model_config)
    if cfg.model.init_from:
        base = load_model_dir(cfg.model.init_from)
        if base.tokenizer is not None and base.tokenizer.sha256 != tokenizer.sha256:
            raise ConfigError(
                f"model.init_from={cfg.model.init_from} uses a different tokenizer "
                "than data.shards; prepare the shards with that model's tokenizer"
            )
        model.load_state_dict(base.model.state_dict())

    run_dir.mkdir(parents=True, exist_ok=True)
    if runtime.is_main and not resuming:
        (run_dir / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        loss, _ = evaluate_loss(
            m, val_tokens, cfg.train.batch_size, cfg.train.seq_len, cfg.train.eval_batches
        )
        return {"val_loss": loss}

    trainer = Trainer(
        model,
        cfg.train,
        run_dir,
        sampler,
        causal_lm_loss,
        eval_fn=eval_fn,
        config_dict=cfg.to_dict(),
        runtime=runtime,
        progress=progress,
        flops_per_token=training_flops_per_token(model_config, cfg.train.seq_len),
    )
    summary = trainer.fit(resume=resuming)
    weights = full_state_dict(model, runtime)  # every rank takes part under FSDP
    if not runtime.is_main:
        return summary
    if runtime.sharded:  # the final dir is the same plain HF-format dir as a one-process run
        model = LlamaForCausalLM(model_config)
        model.load_state_dict(weights)
    provenance = {
        "training": summary,
        "config": cfg.to_dict(),
        "data": {
            "shards": str(cfg.data.shards),
            "tokenizer_sha256": shards.meta.get("tokenizer_sha256"),
            "sources": shards.meta.get("sources"),
            "train_tokens": int(len(train_tokens)),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    save_model_dir(model, tokenizer, run_dir / "final", provenance, overwrite=True)
    write_json_atomic(run_dir / "summary.json", summary)
    write_report(run_dir, trainer.history, summary, model_config)
    return summary


def write_report(
    run_dir: Path, history: list[dict[str, Any]], summary: dict[str, Any], model_config
) -> None:
    """Write plots/loss.png and report.md for a run."""
    from fmforge.cost.flops import num_params

    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    plot_loss(history, plots / "loss.png")
    lines = [
        f"# Run report: {run_dir.name}",
        "",
        f"- parameters: {num_params(model_config):,} ({model_config.num_hidden_layers} layers, "
        f"d {model_config.hidden_size}, vocab {model_config.vocab_size})",
        f"- steps: {summary['steps']}, tokens: {summary['tokens']:,}",
        f"- final train loss: {summary['final_loss']:.4f}",
    ]
    if "val_loss" in summary:
        lines.append(
            f"- final validation loss: {summary['val_loss']:.4f} nats/token "
            f"(perplexity {math.exp(summary['val_loss']):.1f})"
        )
    if summary.get("tokens_per_second"):
        lines.append(f"- throughput: {summary['tokens_per_second']:,.0f} tokens/s (median)")
    if summary.get("mfu") is not None:
        lines.append(
            f"- MFU: {100 * summary['mfu']:.1f}% of {summary['peak_flops'] / 1e9:,.1f} GFLOP/s, "
            f"the {summary['peak_source']}"
        )
    lines.append(f"- wall time: {summary['seconds']:.1f} s")
    lines += ["", "![loss](plots/loss.png)", ""]
    lines += cost_lines(summary, model_config)
    (run_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")


def cost_lines(summary: dict[str, Any], model_config) -> list[str]:
    """Return Markdown lines: this run's FLOPs and what they would cost on catalog GPUs."""
    from fmforge.cost.calculator import catalog_costs
    from fmforge.cost.flops import training_flops_per_token

    seq_len = summary.get("seq_len")
    mfu = summary.get("mfu")
    if not seq_len or not mfu:
        return []
    total = training_flops_per_token(model_config, seq_len) * summary["tokens"]
    lines = [
        "## What this run would cost elsewhere",
        "",
        f"{total:.3g} training FLOPs (6N + attention, per token x {summary['tokens']:,} tokens). "
        f"At the MFU measured here ({100 * mfu:.1f}%) on each catalog accelerator, at its "
        "typical on-demand price (edit `fmforge/cost/gpus.json`):",
        "",
        "| accelerator | dtype | GPU-hours | cost (USD) | energy (kWh) |",
        "|---|---|---|---|---|",
    ]
    for row in catalog_costs(total, mfu=min(mfu, 1.0)):
        lines.append(
            f"| {row['gpu']} | {row['dtype']} | {row['gpu_hours']:.3g} | "
            f"{row['cost_usd']:.3g} | {row['energy_kwh']:.3g} |"
        )
    return [*lines, ""]


def plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    """Save a train/validation loss curve as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""`fmforge posttrain sft|reward|dpo`: load a base, read the data, train through the one Trainer,
write a model dir.

A run dir holds `config.json` (the resolved options), `metrics.jsonl`, `checkpoints/step-N/`,
`final/` (a model dir: the merged model for sft/dpo, an HF `LlamaForSequenceClassification` dir
for reward), `adapter/` under --lora (PEFT layout), `summary.json` and `report.md`.
`--resume auto` continues from the newest checkpoint; the reference of DPO is rebuilt from the
base, so a resumed run computes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from fmforge.errors import ConfigError
from fmforge.posttrain.options import DEFAULT_LR, RECIPES, PosttrainOptions


def _split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Return (train, held-out): a seeded share of the items, none when there are fewer than 10."""
    if fraction <= 0 or len(items) < 10:
        return items, []
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = max(1, round(len(items) * fraction))
    return [items[i] for i in order[cut:]], [items[i] for i in order[:cut]]


def posttrain(
    recipe: str,
    base: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    options: PosttrainOptions | None = None,
    resume: str = "never",
    overwrite: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Post-train `base` on `data` with `recipe`; return the summary (also in out/summary.json)."""
    from fmforge.adapt.lora import apply_lora, lora_parameters
    from fmforge.artifacts import check_output_dir, write_json_atomic
    from fmforge.config import RuntimeSection, TrainSection
    from fmforge.model.load import load_bundle
    from fmforge.posttrain.sequences import chat_template_of, pad_id_of
    from fmforge.train.distributed import setup_runtime
    from fmforge.train.trainer import Trainer

    opts = options or PosttrainOptions()
    if recipe not in RECIPES:
        raise ConfigError(f"posttrain recipe {recipe!r} is unknown (choose from {RECIPES})")
    if resume not in ("never", "auto"):
        raise ConfigError(f"--resume={resume!r} is not one of ['never', 'auto']")
    run_dir = Path(out)
    resuming = resume == "auto" and (run_dir / "config.json").is_file()
    if not resuming:
        check_output_dir(run_dir, overwrite)
    bundle = load_bundle(base, kind="decoder")
    tokenizer = bundle.tokenizer
    template = chat_template_of(tokenizer)
    pad_id = pad_id_of(tokenizer)
    model = bundle.model
    torch.manual_seed(opts.seed)
    batches, objective, heldout, counts, wrapped = _recipe(
        recipe, model, tokenizer, template, pad_id, data, opts
    )
    if opts.lora:
        apply_lora(model, opts.targets, opts.rank, opts.alpha)
        trainable = lora_parameters(model)
        if wrapped is not model:  # a new head (reward score, PPO value) trains with the adapters
            head = [p for n, p in wrapped.named_parameters() if not n.startswith("lm.")]
            for p in head:
                p.requires_grad_(True)
            trainable += head
    else:
        for p in wrapped.parameters():
            p.requires_grad_(True)
        trainable = None
    if recipe == "dpo":  # the reference is the base as loaded: built after LoRA, before training
        from fmforge.posttrain.preference import PreferenceObjective, Reference, pair_batches

        reference = Reference(model, lora=opts.lora)
        objective = PreferenceObjective(reference, opts.beta, opts.loss, opts.label_smoothing)
        if opts.precompute_reference:  # one reference pass over the data instead of every step
            cache = reference.precompute(model, batches.items + heldout, pad_id)
            batches = pair_batches(batches.items, opts.batch_size, pad_id, opts.seed, cache)
    if recipe in ("grpo", "ppo"):
        batches, objective = _rollouts(recipe, wrapped, tokenizer, template, pad_id, data, opts)
    lr = opts.lr if opts.lr is not None else DEFAULT_LR[recipe][int(opts.lora)]
    cfg = TrainSection(
        max_steps=opts.max_steps,
        batch_size=opts.batch_size,
        grad_accum=opts.grad_accum,
        seq_len=opts.seq_len,
        lr=lr,
        warmup_steps=min(opts.warmup_steps, opts.max_steps // 5),
        weight_decay=0.0,
        eval_every=opts.log_every if hasattr(objective, "pop_metrics") else 0,
        checkpoint_every=opts.checkpoint_every,
        log_every=opts.log_every,
        seed=opts.seed,
    )
    config = {"recipe": recipe, "base": str(base), "data": str(data), **dataclasses.asdict(opts)}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", config)
    trainer = Trainer(
        wrapped,
        cfg,
        run_dir,
        batches,
        objective,
        eval_fn=_metrics_of(objective),
        trainable=trainable,
        config_dict=config,
        runtime=setup_runtime(RuntimeSection(threads=opts.threads)),
        progress=progress,
    )
    summary = {"recipe": recipe, "base": str(base), "lr": lr, **counts}
    summary.update(trainer.fit(resume=resuming))
    if recipe in ("grpo", "ppo"):
        summary["prompts"] = len(batches.prompts)
        summary["sample_outputs"] = batches.samples
    wrapped.eval()
    summary.update(_heldout_metrics(recipe, wrapped, objective, heldout, pad_id))
    summary["final"] = str(_save(recipe, wrapped, model, tokenizer, run_dir, opts, bundle))
    write_json_atomic(run_dir / "summary.json", summary)
    _write_report(run_dir, summary, trainer.history)
    return summary


def _metrics_of(objective: Any) -> Any:
    """Return an eval hook logging the objective's accumulated metrics (None if it has none)."""
    if not hasattr(objective, "pop_metrics"):
        return None
    return lambda model: objective.pop_metrics()


def _recipe(recipe, model, tokenizer, template, pad_id, data, opts):
    """Return (batches, objective, held-out items, data counts, the module to train)."""
    if recipe == "sft":
        from fmforge.posttrain.sft import packed_batches, read_sft, sft_loss

        examples, counts = read_sft(data, tokenizer, template)

        batches = packed_batches(examples, opts.seq_len, opts.batch_size, pad_id, opts.seed)
        return batches, sft_loss, [], counts, model
    if recipe == "reward":
        from fmforge.posttrain.reward import (
            RewardModel,
            RewardObjective,
            read_reward_pairs,
            reward_batches,
        )

        pairs = read_reward_pairs(data, tokenizer, template, opts.seq_len)
        train, heldout = _split(pairs, opts.heldout_fraction, opts.seed)
        batches = reward_batches(train, opts.batch_size, pad_id, opts.seed)
        counts = {"pairs": len(train), "heldout_pairs": len(heldout)}
        return batches, RewardObjective(opts.centring), heldout, counts, RewardModel(model)
    if recipe in ("grpo", "ppo"):  # built after LoRA (the reference needs it): _rollouts
        from fmforge.posttrain.rl import PolicyWithValue

        return None, None, [], {}, PolicyWithValue(model) if recipe == "ppo" else model
    from fmforge.posttrain.preference import pair_batches, read_preferences

    pairs = read_preferences(data, tokenizer, template, opts.seq_len)
    train, heldout = _split(pairs, opts.heldout_fraction, opts.seed)
    batches = pair_batches(train, opts.batch_size, pad_id, opts.seed)
    counts = {"pairs": len(train), "heldout_pairs": len(heldout)}
    return batches, None, heldout, counts, model


class _RolloutObjective:
    """An RL objective with the rollouts' metrics (reward, zero-variance groups) in its log."""

    def __init__(self, objective: Any, rollouts: Any):
        self.objective, self.rollouts = objective, rollouts

    def __call__(self, model: Any, batch: Any) -> Any:
        return self.objective(model, batch)

    def pop_metrics(self) -> dict[str, float]:
        own = self.objective.pop_metrics() if hasattr(self.objective, "pop_metrics") else {}
        return {**own, **self.rollouts.pop_metrics()}


def _rollouts(recipe, wrapped, tokenizer, template, pad_id, data, opts):
    """Return (rollouts, objective) of a GRPO or PPO run: prompts from JSONL, rewards from a
    function or a reward model."""
    from fmforge.errors import DataError, UserError
    from fmforge.posttrain.preference import Reference
    from fmforge.posttrain.rl import (
        GRPOObjective,
        GRPORollouts,
        PPOObjective,
        PPORollouts,
        reward_function,
    )
    from fmforge.posttrain.sequences import read_jsonl

    if opts.reward_model:
        from fmforge.posttrain.reward import reward_model_scorer

        reward_fn = reward_model_scorer(opts.reward_model)
    else:
        reward_fn = reward_function(opts.reward)
    numbered = read_jsonl(data, required=("prompt",))
    records = [record for _, record in numbered]
    prompts = []
    for number, record in numbered:
        prompt = record["prompt"]
        if isinstance(prompt, str):  # a plain completion prompt, ended by EOS
            ids, stop = tokenizer.encode(prompt), [tokenizer.eos_id]
        elif isinstance(prompt, list) and prompt:
            try:
                ids = template.render(tokenizer, prompt)
            except UserError as e:
                raise DataError(f"{data}:{number}: {e}") from e
            stop = template.stop_ids(tokenizer)
        else:
            raise DataError(f"{data}:{number}: prompt must be a string or a list of messages")
        if not ids:
            raise DataError(f"{data}:{number}: the prompt is empty")
        prompts.append(ids)
    lm = wrapped.lm if recipe == "ppo" else wrapped
    reference = Reference(lm, lora=opts.lora) if opts.kl_coef else None
    stop = tuple(s for s in stop if s is not None)
    common = (tokenizer, prompts, records, reward_fn, opts.group_size, opts.batch_size,
              opts.max_new_tokens, opts.temperature, stop, pad_id, reference,
              opts.seed)  # fmt: skip
    if recipe == "ppo":
        rollouts = PPORollouts(wrapped, *common, kl_coef=opts.kl_coef, lam=opts.lam)
        return rollouts, _RolloutObjective(PPOObjective(opts.clip_eps, opts.vf_coef), rollouts)
    rollouts = GRPORollouts(wrapped, *common)
    return rollouts, _RolloutObjective(GRPOObjective(opts.clip_eps, opts.kl_coef), rollouts)


def _heldout_metrics(recipe, model, objective, heldout, pad_id) -> dict[str, float]:
    if not heldout:
        return {}
    if recipe == "reward":
        from fmforge.posttrain.reward import pairwise_accuracy

        return {"heldout_pairwise_accuracy": pairwise_accuracy(model, heldout, pad_id)}
    from fmforge.posttrain.preference import pair_batches

    batch = pair_batches(heldout, len(heldout), pad_id).next_batch()
    objective.pop_metrics()
    with torch.no_grad():
        summed, pairs = objective(model, batch)
    metrics = {f"heldout_{k}": v for k, v in objective.pop_metrics().items()}
    metrics["heldout_loss"] = summed.item() / pairs
    return metrics


def _save(recipe, wrapped, model, tokenizer, run_dir, opts, bundle) -> Path:
    from fmforge.adapt.lora import base_fingerprint, merge_lora, remove_lora, save_lora_adapter
    from fmforge.model.load import save_model_dir

    provenance = {"posttrain": {"recipe": recipe, "base": bundle.source}}
    if opts.lora:
        save_lora_adapter(
            model, run_dir / "adapter", bundle.source, base_fingerprint(model, tokenizer)
        )
        merge_lora(model)
        remove_lora(model)
    final = run_dir / "final"
    if recipe == "reward":
        from fmforge.posttrain.reward import save_reward_model

        return save_reward_model(wrapped, tokenizer, final, provenance, overwrite=True)
    return save_model_dir(model, tokenizer, final, provenance, overwrite=True)


# The curves drawn per recipe besides the loss (whichever the run logged).
CURVES = ("reward_margin", "reward_accuracy", "pair_accuracy", "reward", "kl",
          "zero_variance_groups")  # fmt: skip


def plot_curves(history: list[dict[str, Any]], path: Path) -> list[str]:
    """Save the loss and the recipe's logged curves as one PNG; return the curves drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["loss"] + [k for k in CURVES if any(k in r for r in history)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in history if key in r]
        if points:
            ax.plot(*zip(*points), "o-", markersize=3)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return keys


def _write_report(run_dir: Path, summary: dict[str, Any], history: list[dict]) -> None:
    lines = [f"# posttrain {summary['recipe']}", "", f"Base: `{summary['base']}`", ""]
    if history:
        drawn = plot_curves(history, run_dir / "plots" / "curves.png")
        lines += [f"![{', '.join(drawn)}](plots/curves.png)", ""]
    lines += ["| key | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(summary.items()) if not isinstance(v, dict)]
    keys = sorted({k for r in history for k in r} - {"step", "tokens"})
    lines += ["", "## Curves (metrics.jsonl)", "", "| step | " + " | ".join(keys) + " |"]
    lines += ["|---" * (len(keys) + 1) + "|"]
    for record in history:
        cells = [_cell(record.get(k)) for k in keys]
        lines.append(f"| {record['step']} | " + " | ".join(cells) + " |")
    (run_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)

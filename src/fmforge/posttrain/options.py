"""The options of `fmforge posttrain` (one flat dataclass; no torch import, so --help is fast)."""

from __future__ import annotations

from dataclasses import dataclass, field

RECIPES = ("sft", "reward", "dpo", "grpo", "ppo")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Peak learning rates when --lr is not given: (full fine-tuning, LoRA). Full-model rates follow
# the anchors' small-model defaults (TRL/Zephyr: SFT 2e-5, DPO 5e-7..5e-6, reward 1e-5) scaled up
# for the short CPU budgets here; LoRA's adapters start at zero and take ~10x larger steps.
DEFAULT_LR = {
    "sft": (5e-5, 1e-3),
    "reward": (5e-5, 1e-3),
    "dpo": (5e-6, 5e-4),
    "grpo": (5e-6, 5e-4),
    "ppo": (5e-6, 5e-4),
}


@dataclass
class PosttrainOptions:
    """Budget and hyperparameters of a post-training run."""

    max_steps: int = 100  # optimizer steps
    batch_size: int = 8  # sft: packed rows; reward/dpo: pairs; grpo: prompts per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # None: the recipe's default (DEFAULT_LR)
    warmup_steps: int = 10  # linear warmup steps
    seq_len: int = 1024  # sft: packed row length; reward/dpo: tokens kept per sequence
    lora: bool = False  # train LoRA adapters (PEFT layout) instead of every weight
    rank: int = 16  # LoRA rank r
    alpha: float = 32.0  # LoRA scaling alpha (update scaled by alpha / r)
    targets: list[str] = field(default_factory=lambda: list(ALL_LINEAR))  # LoRA modules
    beta: float = 0.1  # dpo: KL strength beta
    loss: str = "sigmoid"  # dpo: sigmoid, cdpo, robust, hinge, ipo (docs/posttrain.md)
    label_smoothing: float = 0.0  # dpo cdpo/robust: assumed label-flip rate eps
    precompute_reference: bool = False  # dpo: reference log-probs once before training, cached
    centring: float = 0.0  # reward: coefficient of (r_c + r_r)^2
    reward: str = "exact"  # grpo: exact, lenient, compiles, or module:function(text, record)
    group_size: int = 4  # grpo: completions sampled per prompt
    max_new_tokens: int = 32  # grpo: completion budget
    temperature: float = 1.0  # grpo: sampling temperature of the rollouts
    kl_coef: float = 0.04  # grpo/ppo: weight of the k3 KL to the reference; 0 drops the reference
    clip_eps: float = 0.2  # grpo/ppo: ratio clipping
    reward_model: str | None = (
        None  # grpo/ppo: a reward-model dir scoring completions (not --reward)
    )
    vf_coef: float = 0.1  # ppo: weight of the value loss
    lam: float = 0.95  # ppo: GAE lambda (gamma is 1: rewards come at the end of a completion)
    heldout_fraction: float = 0.1  # reward/dpo: pairs kept out for accuracy
    checkpoint_every: int = 50  # steps between checkpoints (and the last)
    log_every: int = 10  # steps between metrics.jsonl records
    seed: int = 0  # data order, held-out split
    threads: int = 0  # torch CPU threads; 0 keeps torch's default

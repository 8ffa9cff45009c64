"""The options every adaptation method reads (torch-free: the CLI builds its flags from them)."""

from __future__ import annotations

from dataclasses import dataclass, field

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class AdaptOptions:
    """Budget and hyperparameters shared by every method (method-specific ones included).

    Each method's entry in `adapt.methods.METHODS` names the fields it reads; the CLI offers
    exactly those as flags, with these defaults.
    """

    max_steps: int = 60  # optimizer steps for methods that train
    batch_size: int = 8  # prompts per step
    lr: float | None = None  # None: the method's default (Method.lr)
    seed: int = 0  # splits, demonstrations, init and data order
    max_text_tokens: int = 96  # each input text is cut to this many tokens
    rank: int = 8  # lora/pet: rank r
    alpha: float = 16.0  # lora/pet: scaling alpha (update scaled by alpha / r)
    dropout: float = 0.0  # lora/pet: dropout on the adapter input
    targets: list[str] = field(default_factory=lambda: list(ALL_LINEAR))  # lora/pet modules
    top_blocks: int = 1  # freeze: decoder blocks left trainable (from the top)
    virtual_tokens: int = 8  # prompt-tuning: soft prompt length
    shots: int = 0  # icl/ensemble: demonstrations in the prompt
    patterns: int = 4  # pet/ensemble: how many of PATTERNS to use
    eval_batch_size: int = 16
    threads: int = 0  # torch CPU threads; 0 keeps the default

"""Post-training recipes: each an objective + a batch source handed to the one Trainer.

`sequences.py` (chat rendering with loss masks, padding, sequence log-probs), `sft.py`
(instruction tuning with packing), `preference.py` (DPO and variants), `reward.py` (Bradley-Terry
reward model), `rl.py` (GRPO and PPO maths), `run.py` (the `fmforge posttrain` entry points).
"""

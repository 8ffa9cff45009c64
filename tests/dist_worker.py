"""One rank of tests/test_distributed.py: one Trainer step on this rank's unequal rows.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python tests/dist_worker.py ddp|fsdp OUT

Rank r trains on rows 4r..4r+3 of `unequally_masked` (rank 0 scores 16 targets, rank 1 48) in two
micro-batches of 2; rank 0 saves the gradients the optimizer stepped with (gathered under FSDP).
"""

from __future__ import annotations

import sys

import torch

from batches import FixedBatches, unequally_masked
from fmforge.config import RuntimeSection, TrainSection
from fmforge.model.config import preset_config
from fmforge.model.llama import LlamaForCausalLM
from fmforge.train.distributed import setup_runtime
from fmforge.train.objectives import causal_lm_loss
from fmforge.train.trainer import Trainer


def main() -> None:
    parallel, out = sys.argv[1], sys.argv[2]
    runtime = setup_runtime(RuntimeSection(parallel=parallel, threads=1))
    config = preset_config("tiny", tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    x, y = unequally_masked(config.vocab_size)
    rows = slice(4 * runtime.rank, 4 * runtime.rank + 4)
    cfg = TrainSection(
        max_steps=1,
        batch_size=2,
        grad_accum=2,
        warmup_steps=0,
        eval_every=0,
        checkpoint_every=0,
        lr=1e-2,
        grad_clip=1.0,
    )
    batches = FixedBatches(x[rows], y[rows], 2)
    trainer = Trainer(model, cfg, out + "-run", batches, causal_lm_loss, runtime=runtime)
    grads = {}

    def keep(*_):
        for name, p in model.named_parameters():
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name] = grad.detach().clone()

    trainer.optimizer.register_step_pre_hook(keep)
    trainer.fit()
    if runtime.is_main:
        torch.save({"grads": grads, "loss": trainer.history[0]["loss"]}, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

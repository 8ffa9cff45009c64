"""GPU training MFU of the 124m preset in bf16 (compile + fused AdamW) and decode tokens/s.

Driven by bench/gpu.sh. Synthetic tokens, so no data set is needed. MFU is quoted against a bf16
matmul measured in the same run (and, as the trainer reports it, against the datasheet peak when
the GPU is in the catalog). `--parallel fsdp` under torchrun trains the same model sharded with
FSDP2 (one rank per GPU) and skips decoding. The last line is `ratio=X`: training MFU against
the measured matmul rate.
"""

from __future__ import annotations

import argparse
import time

import torch

from fmforge.config import RuntimeSection, TrainSection
from fmforge.cost.flops import training_flops_per_token
from fmforge.model.config import preset_config
from fmforge.model.llama import LlamaForCausalLM
from fmforge.train.distributed import setup_runtime
from fmforge.train.objectives import causal_lm_loss
from fmforge.train.trainer import Trainer


class SyntheticBatches:
    """Random token batches on the GPU; the position makes it resumable like real data."""

    def __init__(self, vocab: int, batch_size: int, seq_len: int, device: str):
        self.vocab, self.batch_size, self.seq_len, self.device = vocab, batch_size, seq_len, device
        self.position = 0

    def next_batch(self):
        g = torch.Generator(device=self.device).manual_seed(self.position)
        self.position += 1
        shape = (self.batch_size, self.seq_len + 1)
        t = torch.randint(0, self.vocab, shape, device=self.device, generator=g)
        return t[:, :-1], t[:, 1:]

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def matmul_rate(dtype: torch.dtype, n: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--parallel", default="auto", help="none, ddp or fsdp (under torchrun)")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_rate(torch.bfloat16)
    name = torch.cuda.get_device_name()
    print(f"device: {name}; measured bf16 matmul: {peak / 1e12:.0f} TFLOP/s")

    config = preset_config("124m")
    model = LlamaForCausalLM(config)
    flops_per_token = training_flops_per_token(config, args.seq_len)
    cfg = TrainSection(
        max_steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=6e-4,
        warmup_steps=20,
        eval_every=0,
        checkpoint_every=0,
        log_every=10,
    )
    batches = SyntheticBatches(config.vocab_size, args.batch_size, args.seq_len, "cuda")
    runtime = setup_runtime(RuntimeSection(device="cuda"))
    trainer = Trainer(
        model,
        cfg,
        "/tmp/fmforge-gpu-bench",
        batches,
        causal_lm_loss,
        runtime=runtime,
        progress=False,
    )
    summary = trainer.fit()
    # The first records include compilation; the trainer's rate excludes evals and saves.
    steady = [r["tokens_per_second"] for r in trainer.history[3:]]
    tps = sorted(steady)[len(steady) // 2]
    mfu = tps * flops_per_token / (peak * runtime.world_size)
    catalog = summary.get("mfu")
    print(
        f"train 124m bf16 (compile, fused AdamW, parallel={runtime.parallel}, "
        f"{runtime.world_size} rank(s)): {tps:,.0f} tokens/s, "
        f"MFU vs catalog peak: {'-' if catalog is None else f'{100 * catalog:.1f}%'}; "
        f"{flops_per_token / 1e6:.0f} MFLOP/token, MFU {100 * mfu:.1f}% of the measured "
        f"matmul; {summary['steps']} steps in {summary['seconds']:.0f} s, "
        f"loss {summary['final_loss']:.3f}"
    )

    if runtime.parallel != "none":  # sharded or replicated: the training figure is the point
        if runtime.is_main:
            print(f"ratio={mfu:.3f}")
        torch.distributed.destroy_process_group()
        return
    model.eval()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        cache = model.new_cache(1, 32 + 256)
        ids = torch.randint(0, config.vocab_size, (1, 32), device="cuda")
        logits = model(ids, cache=cache, start=0)
        nxt = logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for pos in range(32, 32 + 256):
            nxt = model(nxt, cache=cache, start=pos)[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        print(f"decode batch 1 (eager, KV cache): {256 / (time.perf_counter() - t0):.0f} tokens/s")
    print(f"ratio={mfu:.3f}")


if __name__ == "__main__":
    main()

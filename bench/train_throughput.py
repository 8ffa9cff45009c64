"""Training tokens/s: fmforge's Llama vs `transformers.LlamaForCausalLM` (sdpa), same everything.

Same dims, weights, batch, sequence length, data and thread count; fp32 on CPU. Both sides run
forward + cross-entropy + backward + AdamW step, alternating, after warm-up; medians of repeats.
MFU is quoted against the fastest fp32 matmul measured in this run at the model's GEMM shapes
(the trainer's own peak). fmforge runs twice: eager, and with `runtime.compile=true`
(torch.compile with inductor, as the trainer applies it). The last lines are `ratio_default=Y`
(fmforge eager, the default for runs too short to pay compilation back, ÷ transformers) and
`ratio=X` (fmforge's best path ÷ transformers; higher is better); `--no-compile` times eager
only.

    .venv/bin/python bench/train_throughput.py [--preset small] [--batch-size 16] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fmforge.cost.flops import mfu, training_flops_per_token
from fmforge.cost.hardware import measure_peak_flops
from fmforge.model.config import preset_config
from fmforge.model.llama import LlamaForCausalLM
from fmforge.train.distributed import Runtime, compile_objective
from fmforge.train.objectives import causal_lm_loss
from fmforge.train.optim import build_optimizer
from fmforge.train.trainer import model_gemm_shapes


def make_step(model, logits_of, x, y, vocab, opt, objective=None):

    def step():
        if objective is None:
            loss = F.cross_entropy(logits_of(model, x).view(-1, vocab), y.reshape(-1))
        else:
            loss, _ = objective(model, (x, y))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def timed(step) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time fmforge with runtime.compile=true; `ratio` takes the faster path",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    config = preset_config(args.preset)
    torch.manual_seed(0)
    ours = LlamaForCausalLM(config)
    hf_config = transformers.LlamaConfig(**config.to_hf_dict())
    hf_config._attn_implementation = "sdpa"
    theirs = transformers.LlamaForCausalLM(hf_config)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    x = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))
    y = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len))
    with torch.no_grad():
        diff = (ours(x[:2]) - theirs(x[:2]).logits).abs().max().item()
    print(
        f"threads={torch.get_num_threads()} preset={args.preset} batch={args.batch_size} "
        f"seq_len={args.seq_len} logits max abs diff={diff:.2e}"
    )
    assert diff < 1e-4, "the two models disagree; not timing"

    # Each side's own optimizer: fmforge's trainer builds fused AdamW with decay groups;
    # fused AdamW is also transformers' Trainer default (optim="adamw_torch_fused").
    ours_opt = build_optimizer(ours, 1e-4, 0.1, (0.9, 0.95), fused=True)
    theirs_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    # fmforge's eager side runs the trainer's own objective (`causal_lm_loss`: the head and the
    # loss fused in row chunks when training a bare fp32 model), as `fmforge pretrain` does.
    steps = {
        "fmforge": make_step(
            ours, lambda m, t: m(t), x, y, config.vocab_size, ours_opt, objective=causal_lm_loss
        ),
        "transformers": make_step(
            theirs, lambda m, t: m(input_ids=t).logits, x, y, config.vocab_size, theirs_opt
        ),
    }
    if args.compile:
        # What `--runtime.compile=true` does in fmforge's trainer: the objective (forward + loss)
        # compiled whole with inductor; ~25-45 s the first time, cached after that.
        objective = compile_objective(
            causal_lm_loss, Runtime(torch.device("cpu"), None, True, True)
        )
        started = time.perf_counter()
        steps["fmforge+compile"] = make_step(
            ours, lambda m, t: m(t), x, y, config.vocab_size, ours_opt, objective=objective
        )
        steps["fmforge+compile"]()
        print(f"torch.compile of the fmforge objective: {time.perf_counter() - started:.0f} s")
    for step in steps.values():  # warm-up
        step()
        step()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    # The MFU denominator: the fastest matmul at this model's GEMM shapes (and a 1024-cube),
    # best of several, re-measured between repeats; the maximum over all measurements.
    shapes = model_gemm_shapes(ours, args.batch_size * args.seq_len)
    peak = 0.0
    for _ in range(args.repeats):
        peak = max(peak, measure_peak_flops(shapes, repeats=3))
        for name, step in steps.items():  # alternate so co-tenant noise hits both
            times[name].append(timed(step))
    flops_per_token = training_flops_per_token(config, args.seq_len)
    tokens = args.batch_size * args.seq_len
    print(
        f"matmul peak (measured, fp32, fastest at the model's GEMM shapes): "
        f"{peak / 1e9:.1f} GFLOP/s; "
        f"{flops_per_token / 1e6:.1f} MFLOP/token"
    )
    rates = {}
    for name, samples in times.items():
        walls = sorted(w for w, _ in samples)
        cpu_ratio = statistics.median(c / w for w, c in samples)
        rates[name] = tokens / statistics.median(walls)
        print(
            f"{name:>12}: {rates[name]:8.0f} tokens/s (min/median/max step "
            f"{walls[0]:.3f}/{statistics.median(walls):.3f}/{walls[-1]:.3f} s), "
            f"MFU {100 * mfu(rates[name], flops_per_token, peak):.1f}%, cpu/wall {cpu_ratio:.2f}"
        )
    # The default path is what `fmforge pretrain` runs unless told otherwise for a run this size:
    # eager (runtime.compile=auto compiles only runs long enough to pay compilation back). The
    # best path is the faster of eager and compiled.
    best = max((n for n in rates if n.startswith("fmforge")), key=rates.get)
    print(f"best path: {best}, MFU {100 * mfu(rates[best], flops_per_token, peak):.1f}%")
    print(f"ratio_default={rates['fmforge'] / rates['transformers']:.3f}")
    print(f"ratio={rates[best] / rates['transformers']:.3f}")


if __name__ == "__main__":
    main()

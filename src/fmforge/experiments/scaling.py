"""Experiment: loss falls with parameters and data, predictably enough to plan a bigger run.

Claim (Kaplan et al. 2020; Hoffmann et al. 2022, "Chinchilla"): validation loss follows
L(N, D) = E + A / N^α + B / D^β in the parameters N and training tokens D, and the fitted law
predicts the loss of a run larger than any it was fitted on. Chinchilla's fit: α ≈ 0.34,
β ≈ 0.28.

Setup, all on CPU:
1. a byte-level BPE tokenizer and token shards of the built-in `stdlib` corpus (2% held out);
2. a sweep of `SIZES` (5 widths/depths of the Llama family) × 3 token budgets, each run trained
   from scratch by `fmforge pretrain` with its own warmup + cosine schedule, validation loss
   measured on the same held-out windows;
3. a fit of the five constants to the sweep (Hoffmann et al.'s form, least squares on log L),
   judged on held-out points by leave-one-out: every point predicted by a fit without it;
4. the prediction: the compute-optimal (N, D) under the fit for 4× the compute of the largest
   sweep run, chosen from the same family of shapes; that run is trained once and its loss
   compared with the predicted loss;
5. `xz -9` on the held-out text in bits per byte, and the compute the fitted frontier says a
   model needs to beat it (`--verify-xz` trains that model when it fits in 60 CPU-minutes).

N counts the parameters that take part in a matmul per token: the blocks and the output head,
not the embedding lookup (a gather). That is the N whose 6·N·D is the training compute, which
keeps C ≈ 6ND honest for models this small, where the head is a large share of the FLOPs.

Writes `results.json` (`r2_heldout`, `alpha`, `beta`, `predicted_loss`, `verified_loss`,
`points`, ...), `loss_vs_compute.png` and `report.md`; every run keeps its own run dir under
`runs/`, and a re-run with `--resume` skips the runs that finished.
"""

from __future__ import annotations

import json
import lzma
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmforge.artifacts import check_output_dir, write_json_atomic
from fmforge.errors import UserError

VOCAB_SIZE = 1024
SEQ_LEN = 128
BATCH_SIZE = 4  # sequences per step: 512 tokens (small budgets want many steps)
EVAL_BATCHES = 96  # 49,152 held-out tokens, the same windows for every run
CHINCHILLA = {"alpha": 0.34, "beta": 0.28}  # Hoffmann et al. 2022, approach 3
# Tokens per run at budget scale 1; --budget-minutes scales them all by one factor.
TOKEN_BUDGETS = (250_000, 500_000, 1_000_000)
MIN_STEPS = 40  # a run shorter than this has no schedule to speak of
VERIFY_FACTOR = 4.0  # the prediction is for 4x the compute of the largest sweep run
XZ_MINUTES = 60.0  # --verify-xz trains the xz-beating model only if it fits in this


@dataclass(frozen=True)
class Shape:
    """One model of the sweep's family: width, depth and MLP width (head_dim 16-32)."""

    hidden_size: int
    num_hidden_layers: int

    @property
    def name(self) -> str:
        return f"d{self.hidden_size}-l{self.num_hidden_layers}"

    @property
    def heads(self) -> int:
        heads = max(2, self.hidden_size // 32)  # head_dim ~32 where the width allows
        return heads if self.hidden_size % heads == 0 else self.hidden_size // 16

    @property
    def intermediate_size(self) -> int:
        return 8 * round(self.hidden_size * 8 / 3 / 8)  # SwiGLU's 8/3·d, multiple of 8

    def config(self):
        """Return the LlamaConfig of this shape."""
        from fmforge.model.config import LlamaConfig

        return LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=SEQ_LEN,
        )

    def lr(self) -> float:
        # Narrower models take larger steps (roughly 1/sqrt(width), as muP-style sweeps find).
        return min(5e-3, 3e-3 * math.sqrt(256 / self.hidden_size))


# The sweep: matmul parameters from ~0.06M to ~0.9M (16x), each at every token budget. Budgets
# start at 250k tokens: below that these models barely get past unigram statistics and the
# loss reflects optimisation speed more than capacity.
SIZES = (Shape(32, 2), Shape(48, 2), Shape(64, 2), Shape(96, 3), Shape(128, 4))


def family() -> list[Shape]:
    """Return the shapes the compute-optimal choice picks from: the sweep's rule, widths 48-512."""
    shapes = []
    for width in range(32, 513, 16):
        layers = 2 if width < 96 else 3 if width < 128 else 4 if width < 256 else 6
        shapes.append(Shape(width, layers))
    return shapes


def _say(message: str) -> None:
    print(f"[scaling] {message}", file=sys.stderr, flush=True)


def params_of(shape: Shape) -> int:
    """Return N: the matmul parameters per token (blocks + output head)."""
    from fmforge.cost.flops import matmul_params

    return matmul_params(shape.config())


def flops_per_token(shape: Shape) -> float:
    """Return training FLOPs per token (6N + attention) at the sweep's sequence length."""
    from fmforge.cost.flops import training_flops_per_token

    return training_flops_per_token(shape.config(), SEQ_LEN)


# ---------------------------------------------------------------------------------------------
# Running one point.
# ---------------------------------------------------------------------------------------------


def run_point(
    shape: Shape, tokens: int, shards: Path, run_dir: Path, seed: int, threads: int = 0
) -> dict:
    """Train `shape` on `tokens` tokens (from scratch) and return its point of the sweep."""
    from fmforge.config import (
        DataSection,
        ModelSection,
        PretrainConfig,
        RuntimeSection,
        TrainSection,
    )
    from fmforge.train.pretrain import pretrain

    done = run_dir / "point.json"
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    steps = max(1, round(tokens / (BATCH_SIZE * SEQ_LEN)))
    cfg = PretrainConfig(
        model=ModelSection(
            preset="tiny",
            max_position_embeddings=SEQ_LEN,
            hidden_size=shape.hidden_size,
            intermediate_size=shape.intermediate_size,
            num_hidden_layers=shape.num_hidden_layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.heads,
        ),
        data=DataSection(shards=str(shards)),
        train=TrainSection(
            max_steps=steps,
            batch_size=BATCH_SIZE,
            seq_len=SEQ_LEN,
            lr=shape.lr(),
            warmup_steps=max(1, steps // 20),
            eval_every=steps,  # once, at the end
            eval_batches=EVAL_BATCHES,
            checkpoint_every=0,
            log_every=max(1, steps // 20),
            seed=seed,
        ),
        runtime=RuntimeSection(threads=threads),
    )
    started = time.perf_counter()
    summary = pretrain(cfg, run_dir, overwrite=True, progress=False)
    point = {
        "name": shape.name,
        "hidden_size": shape.hidden_size,
        "layers": shape.num_hidden_layers,
        "params": params_of(shape),
        "tokens": summary["tokens"],
        "flops": flops_per_token(shape) * summary["tokens"],
        "val_loss": summary["val_loss"],
        "train_loss": summary["final_loss"],
        "seconds": round(time.perf_counter() - started, 1),
        "tokens_per_second": summary.get("tokens_per_second"),
    }
    write_json_atomic(done, point)
    return point


def measure_throughput(shape: Shape, steps: int = 4) -> float:
    """Return this machine's training tokens/s for `shape` (a few steps after a warm-up)."""
    import torch
    import torch.nn.functional as F

    from fmforge.model.llama import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(shape.config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, VOCAB_SIZE, (BATCH_SIZE, SEQ_LEN))

    def step() -> None:
        loss = F.cross_entropy(model(x).view(-1, VOCAB_SIZE), x.view(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH_SIZE * SEQ_LEN / (time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# Fit, prediction, held-out score.
# ---------------------------------------------------------------------------------------------


def leave_one_out_r2(points: list[dict]) -> tuple[float, list[float]]:
    """Return R² of leave-one-out predictions of val_loss, and the predictions themselves."""
    from fmforge.cost.scaling import fit

    predictions = []
    for i, held in enumerate(points):
        rest = [p for j, p in enumerate(points) if j != i]
        law = fit(
            [p["params"] for p in rest], [p["tokens"] for p in rest], [p["val_loss"] for p in rest]
        )["law"]
        predictions.append(law.loss(held["params"], held["tokens"]))
    losses = [p["val_loss"] for p in points]
    mean = sum(losses) / len(losses)
    ss_res = sum((y - f) ** 2 for y, f in zip(losses, predictions))
    ss_tot = sum((y - mean) ** 2 for y in losses)
    return 1.0 - ss_res / ss_tot, predictions


def compute_optimal(law, flops: float) -> tuple[Shape, int, float]:
    """Return the family shape, tokens and predicted loss that minimise the law at `flops`."""
    best = None
    for shape in family():
        tokens = int(flops / flops_per_token(shape))
        if tokens < BATCH_SIZE * SEQ_LEN * MIN_STEPS:
            continue
        loss = law.loss(params_of(shape), tokens)
        if best is None or loss < best[2]:
            best = (shape, tokens, loss)
    if best is None:
        raise UserError(f"no shape of the family trains for {MIN_STEPS} steps on {flops:.3g} FLOPs")
    return best


def frontier(law, flops: float) -> float:
    """Return the lowest loss the law allows at `flops` over the family (the iso-FLOP minimum)."""
    return compute_optimal(law, flops)[2]


def xz_bits_per_byte(text: bytes) -> float:
    """Return the size of `text` compressed by xz at preset 9 (`xz -9`), in bits per byte."""
    return 8.0 * len(lzma.compress(text, preset=9)) / len(text)


def flops_to_beat(law, target_nats: float, low: float, high: float) -> float | None:
    """Return the least compute (FLOPs) whose frontier loss is below `target_nats`, or None."""
    if law.constants()["E"] >= target_nats:
        return None  # the irreducible loss alone is above the target
    if frontier(law, high) >= target_nats:
        return None
    for _ in range(40):  # bisection in log space
        mid = math.sqrt(low * high)
        if frontier(law, mid) < target_nats:
            high = mid
        else:
            low = mid
    return high


# ---------------------------------------------------------------------------------------------
# The experiment.
# ---------------------------------------------------------------------------------------------


def plan_budgets(budget_minutes: float, rates: dict[str, float]) -> tuple[float, float]:
    """Return (scale, estimated minutes) so the sweep + verification fit `budget_minutes`."""
    sweep_seconds = sum(t / rates[s.name] for s in SIZES for t in TOKEN_BUDGETS)
    largest = max(SIZES, key=flops_per_token)
    # The verification run's compute is 4x the largest point's; at the largest rate measured.
    verify_seconds = VERIFY_FACTOR * TOKEN_BUDGETS[-1] / rates[largest.name]
    overhead = 4.0 * len(SIZES) * len(TOKEN_BUDGETS)  # start, eval and save per run, seconds
    seconds_at_1 = sweep_seconds + verify_seconds
    scale = max(0.0, (budget_minutes * 60 - overhead - 60)) / seconds_at_1
    scale = min(scale, 8.0)
    min_tokens = MIN_STEPS * BATCH_SIZE * SEQ_LEN
    if scale * TOKEN_BUDGETS[0] < min_tokens:
        need = (min_tokens / TOKEN_BUDGETS[0] * seconds_at_1 + overhead + 60) / 60
        raise UserError(
            f"--budget-minutes={budget_minutes:g} is too small for {len(SIZES)} sizes x "
            f"{len(TOKEN_BUDGETS)} budgets of at least {MIN_STEPS} steps on this machine; "
            f"give at least {math.ceil(need)} minutes"
        )
    return scale, (scale * seconds_at_1 + overhead + 60) / 60


def run_scaling(
    out: str | Path,
    budget_minutes: float = 30.0,
    verify_xz: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    resume: bool = False,
    threads: int = 0,
) -> dict[str, Any]:
    """Run the sweep, fit, predict and verify; write results.json, the PNG and report.md."""
    import torch

    from fmforge.cost.scaling import fit
    from fmforge.data.pack import TokenShards, prepare_shards
    from fmforge.tokenizer import train_from_inputs

    if budget_minutes <= 0:
        raise UserError(f"--budget-minutes must be positive, got {budget_minutes:g}")
    out = Path(out)
    plan_file = out / "plan.json"
    resuming = resume and plan_file.is_file()
    if not resuming:
        check_output_dir(out, overwrite)
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    cpu_started = time.process_time()
    if resuming:
        plan = json.loads(plan_file.read_text(encoding="utf-8"))
        _say(f"resuming: token scale {plan['scale']:.3f} from {plan_file}")
    else:
        # Measured before anything is written, so a budget too small leaves no output behind.
        rates = {s.name: measure_throughput(s) for s in SIZES}
        scale, minutes = plan_budgets(budget_minutes, rates)
        plan = {"scale": scale, "estimated_minutes": round(minutes, 1), "rates": rates}
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(plan_file, plan)
        _say(f"1/5 measured speeds: token budgets x{scale:.2f}; estimated {minutes:.0f} minutes")
    scale = plan["scale"]
    budgets = [int(scale * t) for t in TOKEN_BUDGETS]

    shards = out / "data"
    if not (shards / "meta.json").is_file():
        _say(f"2/5 tokenizer ({VOCAB_SIZE} tokens) and shards of the stdlib corpus")
        train_from_inputs(["stdlib"], vocab_size=VOCAB_SIZE, out=str(out / "tokenizer"),
                          overwrite=True)  # fmt: skip
        prepare_shards(["stdlib"], str(out / "tokenizer"), str(shards), 0.02, overwrite=True)

    points = []
    total = len(SIZES) * len(budgets)
    for i, shape in enumerate(SIZES):
        for j, tokens in enumerate(budgets):
            index = i * len(budgets) + j + 1
            _say(f"3/5 run {index}/{total}: {shape.name} ({params_of(shape):,} params), "
                 f"{tokens:,} tokens")  # fmt: skip
            points.append(run_point(shape, tokens, shards, out / "runs" / f"{shape.name}-{j}",
                                    seed, threads))  # fmt: skip

    _say("4/5 fitting L(N, D) = E + A/N^alpha + B/D^beta; leave-one-out predictions")
    fitted = fit([p["params"] for p in points], [p["tokens"] for p in points],
                 [p["val_loss"] for p in points])  # fmt: skip
    law = fitted["law"]
    r2, loo = leave_one_out_r2(points)
    for point, predicted in zip(points, loo):
        point["loo_predicted_loss"] = round(predicted, 5)
    largest = max(p["flops"] for p in points)
    target_flops = VERIFY_FACTOR * largest
    shape, tokens, predicted = compute_optimal(law, target_flops)
    _say(f"5/5 verifying: {shape.name} ({params_of(shape):,} params) on {tokens:,} tokens, "
         f"predicted loss {predicted:.4f}")  # fmt: skip
    verified = run_point(shape, tokens, shards, out / "runs" / "verify", seed, threads)

    # xz -9 on the held-out text, and what the frontier says it takes to beat it.
    shard_set = TokenShards.open(shards)
    tokenizer = shard_set.tokenizer()
    val_tokens = shard_set.split("val")
    val_text = tokenizer.decode([int(t) for t in val_tokens]).encode("utf-8")
    tokens_per_byte = len(val_tokens) / len(val_text)
    xz_bpb = xz_bits_per_byte(val_text)
    xz_nats = xz_bpb * math.log(2) / tokens_per_byte  # the same figure in nats per token
    beat = flops_to_beat(law, xz_nats, largest / 100, largest * 1e6)
    xz = {"bits_per_byte": round(xz_bpb, 4), "nats_per_token_equivalent": round(xz_nats, 4),
          "flops_to_beat": beat, "tokens_per_byte": round(tokens_per_byte, 4)}  # fmt: skip
    if beat is not None:
        xz_shape, xz_tokens, xz_loss = compute_optimal(law, beat)
        rate = plan["rates"].get(xz_shape.name) or min(plan["rates"].values())
        xz.update(shape=xz_shape.name, params=params_of(xz_shape), tokens=xz_tokens,
                  predicted_loss=round(xz_loss, 4),
                  estimated_cpu_minutes=round(xz_tokens / rate / 60, 1))  # fmt: skip
        if verify_xz:
            if xz["estimated_cpu_minutes"] > XZ_MINUTES:
                xz["verify"] = f"skipped: needs ~{xz['estimated_cpu_minutes']:.0f} CPU-minutes"
            else:
                _say(f"--verify-xz: {xz_shape.name} on {xz_tokens:,} tokens")
                run = run_point(xz_shape, xz_tokens, shards, out / "runs" / "xz", seed, threads)
                bpb = run["val_loss"] / math.log(2) * tokens_per_byte
                xz["verify"] = {"val_loss": run["val_loss"], "bits_per_byte": round(bpb, 4),
                                "beats_xz": bpb < xz_bpb}  # fmt: skip

    constants = fitted["constants"]
    results = {
        "r2_heldout": round(r2, 4),
        "alpha": constants["alpha"],
        "beta": constants["beta"],
        "E": constants["E"],
        "A": constants["A"],
        "B": constants["B"],
        "chinchilla": CHINCHILLA,
        "predicted_loss": round(predicted, 5),
        "verified_loss": round(verified["val_loss"], 5),
        "verify_error": round(abs(verified["val_loss"] - predicted) / predicted, 5),
        "verify": {**verified, "target_flops": target_flops, "largest_sweep_flops": largest},
        "points": points,
        "xz": xz,
        "budgets": budgets,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "wall_minutes": round((time.perf_counter() - started) / 60, 1),
        "cpu_minutes": round((time.process_time() - cpu_started) / 60, 1),
        "plan": plan,
    }
    write_json_atomic(out / "results.json", results)
    plot(results, law, out / "loss_vs_compute.png")
    write_report(results, out / "report.md")
    _say(f"done: R² (leave-one-out) {r2:.3f}, alpha {constants['alpha']:.3f}, beta "
         f"{constants['beta']:.3f}; predicted {predicted:.4f} vs verified "
         f"{verified['val_loss']:.4f}; report {out / 'report.md'}")  # fmt: skip
    return results


def plot(results: dict, law, path: Path) -> None:
    """Loss against compute: the sweep per size, the fitted iso-FLOP frontier, the verification."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = results["points"]
    names = sorted({p["name"] for p in points}, key=lambda n: [p["params"] for p in points
                                                                 if p["name"] == n][0])  # fmt: skip
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(names)))
    for name, colour in zip(names, colours):
        rows = sorted((p["flops"], p["val_loss"], p["params"]) for p in points if p["name"] == name)
        ax.plot([r[0] for r in rows], [r[1] for r in rows], "o-", color=colour,
                label=f"{name} ({rows[0][2] / 1e6:.2f}M)")  # fmt: skip
    low = min(p["flops"] for p in points) / 1.5
    high = results["verify"]["target_flops"] * 2
    grid = np.geomspace(low, high, 40)
    ax.plot(grid, [frontier(law, c) for c in grid], "k--", label="fitted frontier (iso-FLOP min)")
    v = results["verify"]
    ax.plot([v["flops"]], [results["predicted_loss"]], "rx", ms=10, label="predicted (4x compute)")
    ax.plot([v["flops"]], [results["verified_loss"]], "r*", ms=12, label="verified")
    ax.set_xscale("log")
    ax.set_xlabel("training compute (FLOPs)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"stdlib: α={results['alpha']:.2f}, β={results['beta']:.2f} "
                 f"(Chinchilla 0.34, 0.28); LOO R²={results['r2_heldout']:.3f}")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, path: Path) -> None:
    """Write the Markdown report: the law, the held-out score, the prediction, xz."""
    v = results["verify"]
    xz = results["xz"]
    lines = [
        "# Scaling laws on the stdlib corpus",
        "",
        f"{len(results['points'])} runs: {len(SIZES)} sizes x {len(results['budgets'])} token "
        f"budgets ({', '.join(f'{b:,}' for b in results['budgets'])} tokens), trained from "
        f"scratch, validation loss on {EVAL_BATCHES * BATCH_SIZE * SEQ_LEN:,} held-out tokens. "
        f"Wall time {results['wall_minutes']} min ({results['cpu_minutes']} CPU-min in the main "
        "process).",
        "",
        "## The fitted law",
        "",
        "L(N, D) = E + A / N^α + B / D^β (N: matmul parameters, D: training tokens)",
        "",
        "| constant | fmforge on stdlib | Chinchilla (Hoffmann et al. 2022) |",
        "|---|---|---|",
        f"| α | {results['alpha']:.3f} | 0.34 |",
        f"| β | {results['beta']:.3f} | 0.28 |",
        f"| E | {results['E']:.3f} | 1.69 (on MassiveText) |",
        f"| A | {results['A']:.4g} | 406.4 |",
        f"| B | {results['B']:.4g} | 410.7 |",
        "",
        f"Held-out fit quality: **R² = {results['r2_heldout']:.3f}** over leave-one-out "
        "predictions (each point predicted by a fit to the others).",
        "",
        "![loss vs compute](loss_vs_compute.png)",
        "",
        "## Prediction at 4x the largest run's compute",
        "",
        f"The compute-optimal shape for {v['target_flops']:.3g} FLOPs under the fit is "
        f"**{v['name']}** ({v['params']:,} params) on **{v['tokens']:,} tokens**. Predicted "
        f"loss **{results['predicted_loss']:.4f}**, trained: **{results['verified_loss']:.4f}** "
        f"(error {100 * results['verify_error']:.2f}%).",
        "",
        "## Against xz",
        "",
        f"`xz -9` compresses the held-out text to **{xz['bits_per_byte']} bits/byte** "
        f"({xz['nats_per_token_equivalent']} nats/token at {xz['tokens_per_byte']} tokens/byte).",
    ]
    if xz.get("flops_to_beat"):
        lines.append(
            f"The fitted frontier beats it at **{xz['flops_to_beat']:.3g} FLOPs**: "
            f"{xz['shape']} ({xz['params']:,} params) on {xz['tokens']:,} tokens, about "
            f"{xz['estimated_cpu_minutes']} minutes on this machine."
        )
    else:
        lines.append("The fitted law never reaches it (its irreducible loss E is above xz).")
    if isinstance(xz.get("verify"), dict):
        lines.append(
            f"Trained (`--verify-xz`): {xz['verify']['bits_per_byte']} bits/byte, "
            f"{'beats' if xz['verify']['beats_xz'] else 'does not beat'} xz."
        )
    lines += [
        "",
        "## Points",
        "",
        "| run | params | tokens | FLOPs | val loss | LOO predicted |",
        "|---|---|---|---|---|---|",
    ]
    for p in results["points"]:
        lines.append(
            f"| {p['name']} | {p['params']:,} | {p['tokens']:,} | {p['flops']:.3g} | "
            f"{p['val_loss']:.4f} | {p['loo_predicted_loss']:.4f} |"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

"""Cost, memory and scaling-law commands: fmforge cost, fmforge scaling plan|fit."""

from __future__ import annotations

import json

from jsonargparse import ArgumentParser, Namespace

from fmforge.commands import GROUPS, command, new_parser
from fmforge.errors import UserError

# ---------------------------------------------------------------------------------------------
# Cost, memory and scaling laws (fmforge cost, fmforge scaling plan|fit).
# ---------------------------------------------------------------------------------------------

GROUPS["scaling"] = "Scaling laws: compute-optimal size and data, predicted loss, fits."


def _cost_parser() -> ArgumentParser:
    p = new_parser(
        "Training cost (FLOPs, GPU-hours, wall-clock, $, kWh) or, with --memory, whether a "
        "training step fits on a GPU."
    )
    p.add_argument("--flops", type=float, default=None, help="total training FLOPs")
    p.add_argument("--params", type=float, default=None, help="parameters N (6ND with --tokens)")
    p.add_argument("--tokens", type=float, default=None, help="training tokens D")
    p.add_argument("--preset", default=None, help="model preset (tiny, small, 124m)")
    p.add_argument("--model-config", default=None, help="an HF config.json (or its model dir)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: context)")
    p.add_argument("--gpu", default=None, help="catalog name, e.g. h100-sxm, a100-80gb, cpu")
    p.add_argument("--tflops", type=float, default=None, help="sustained TFLOP/s per GPU")
    p.add_argument("--mfu", type=float, default=None, help="fraction of the catalog peak (0.4)")
    p.add_argument("--dtype", default=None, help="fp32, tf32, fp16 or bf16 (default bf16)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs in parallel")
    p.add_argument("--price-per-hour", type=float, default=None, help="USD per GPU-hour")
    p.add_argument("--watts", type=float, default=None, help="power per GPU for energy")
    p.add_argument("--memory", action="store_true", help="plan training-step memory instead")
    p.add_argument("--batch-size", type=int, default=None, help="with --memory: sequences/step")
    p.add_argument("--checkpointing", action="store_true", help="with --memory: recompute blocks")
    p.add_argument("--lora-rank", type=int, default=0, help="with --memory: train LoRA only")
    p.add_argument("--list-gpus", action="store_true", help="print the accelerator catalog")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def _scaling_plan_parser() -> ArgumentParser:
    p = new_parser("Compute-optimal params and tokens for a FLOP budget, or the loss of (N, D).")
    p.add_argument("--flops", type=float, default=None, help="FLOP budget C (C = 6ND)")
    p.add_argument("--params", type=float, default=None, help="parameters N (with --tokens)")
    p.add_argument("--tokens", type=float, default=None, help="training tokens D")
    p.add_argument("--preset", default="chinchilla", help="chinchilla or kaplan")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def _scaling_fit_parser() -> ArgumentParser:
    p = new_parser("Fit L = E + A/N^alpha + B/D^beta to your own runs (CSV or JSON lines).")
    p.add_argument("points", help="file with params, tokens, loss per row (CSV header or JSONL)")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def _list_gpus() -> None:
    from fmforge.cost.hardware import all_gpus

    header = ("name", "bf16", "fp16", "tf32", "fp32", "GB", "$/h")
    print("{:<11} {:>7} {:>7} {:>7} {:>6} {:>4} {:>5}  label".format(*header))
    for g in all_gpus():
        peaks = [g.peak_tflops.get(d) for d in ("bf16", "fp16", "tf32", "fp32")]
        cells = [f"{v:g}" if v else "-" for v in peaks]
        price = f"{g.price_per_hour:g}" if g.price_per_hour is not None else "-"
        print(
            f"{g.name:<11} {cells[0]:>7} {cells[1]:>7} {cells[2]:>7} {cells[3]:>6} "
            f"{g.memory_gb:>4g} {price:>5}  {g.label}"
        )
    print(
        "cpu: this CPU, fp32 measured on the spot. Peaks are dense TFLOP/s; prices are editable "
        "in fmforge/cost/gpus.json."
    )


@command("cost", _cost_parser)
def _cost(args: Namespace) -> None:
    from fmforge.cost import calculator

    if args.list_gpus:
        _list_gpus()
        return
    if args.memory:
        stray = [
            f
            for f in ("flops", "params", "tokens", "tflops", "mfu", "price_per_hour", "watts")
            if args[f] is not None
        ]
        if stray:
            names = ", ".join("--" + f.replace("_", "-") for f in stray)
            raise UserError(f"--memory plans one training step; {names} do not apply")
        if args.batch_size is None or args.batch_size <= 0:
            raise UserError("--memory needs a positive --batch-size")
        config = calculator.load_model_config(args.preset, args.model_config)
        seq_len = args.seq_len or config.max_position_embeddings
        if seq_len <= 0 or args.lora_rank < 0:
            raise UserError("--seq-len must be positive and --lora-rank non-negative")
        plan = calculator.plan_memory(
            config,
            args.batch_size,
            seq_len,
            gpu=args.gpu,
            dtype=args.dtype,
            checkpointing=args.checkpointing,
            lora_rank=args.lora_rank,
        )
        print(json.dumps(plan, indent=2) if args.json else calculator.format_memory(plan))
        return
    config = None
    if args.preset or args.model_config:
        config = calculator.load_model_config(args.preset, args.model_config)
    elif args.seq_len is not None:
        raise UserError("--seq-len applies with --preset or --model-config")
    total, note = calculator.total_training_flops(
        flops=args.flops,
        params=args.params,
        tokens=args.tokens,
        config=config,
        seq_len=args.seq_len,
    )
    result = calculator.estimate_cost(
        total,
        gpu=args.gpu,
        tflops=args.tflops,
        mfu=args.mfu,
        dtype=args.dtype,
        gpus=args.gpus,
        price_per_hour=args.price_per_hour,
        watts=args.watts,
        flops_note=note,
    )
    print(json.dumps(result, indent=2) if args.json else calculator.format_cost(result))


def _experiment_scaling_parser() -> ArgumentParser:
    p = new_parser("Scaling-law sweep on stdlib: fit L(N, D), predict a 4x run and verify it.")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument(
        "--budget-minutes", type=float, default=30.0, help="wall-clock budget the sweep is sized to"
    )
    p.add_argument(
        "--verify-xz", action="store_true", help="also train the model the fit says beats xz -9"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--resume", action="store_true", help="continue a stopped sweep in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


@command("experiment scaling", _experiment_scaling_parser)
def _experiment_scaling(args: Namespace) -> None:
    from fmforge.experiments.scaling import run_scaling

    result = run_scaling(
        args.out,
        budget_minutes=args.budget_minutes,
        verify_xz=args.verify_xz,
        seed=args.seed,
        overwrite=args.overwrite,
        resume=args.resume,
        threads=args.threads,
    )
    print(
        f"R² (held out) {result['r2_heldout']}, alpha {result['alpha']:.3f}, beta "
        f"{result['beta']:.3f}; predicted {result['predicted_loss']:.4f}, verified "
        f"{result['verified_loss']:.4f}; report: {args.out}/report.md"
    )


@command("scaling plan", _scaling_plan_parser)
def _scaling_plan(args: Namespace) -> None:
    from fmforge.cost.scaling import format_plan, plan

    result = plan(flops=args.flops, params=args.params, tokens=args.tokens, preset=args.preset)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))


@command("scaling fit", _scaling_fit_parser)
def _scaling_fit(args: Namespace) -> None:
    from fmforge.cost.scaling import fit, read_points

    params, tokens, losses = read_points(args.points)
    result = fit(params, tokens, losses)
    result.pop("law")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        consts = ", ".join(f"{k} {v:.4g}" for k, v in result["constants"].items())
        print(f"fitted L = E + A/N^alpha + B/D^beta to {len(params)} points: {consts}")
        print(f"largest |residual| {result['max_abs_residual']:.4f} nats ({result['source']})")

"""Data curation command: fmforge data curate INPUT... --out DIR."""

from __future__ import annotations

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from fmforge.commands import command, new_parser


def _data_curate_parser() -> ArgumentParser:
    from fmforge.data.curate_config import CurateConfig

    p = new_parser(
        "Curate documents: quality filters, PII scrubbing, language id, decontamination, exact "
        "and near-duplicate removal; writes kept/, removed/<reason>/ and a report."
    )
    p.add_argument("inputs", nargs="+", help="built-in corpus names or files/directories")
    p.add_argument("--config", action=ActionConfigFile, help="a YAML config file")
    p.add_class_arguments(CurateConfig, None, as_group=False)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--max-skip-fraction", type=float, default=0.05)
    return p


@command("data curate", _data_curate_parser)
def _data_curate(args: Namespace) -> None:
    import dataclasses

    from fmforge.commands import print_json
    from fmforge.data.curate_config import CurateConfig
    from fmforge.data.pipeline import curate

    names = [f.name for f in dataclasses.fields(CurateConfig)]
    cfg = CurateConfig(**{name: args[name] for name in names})
    report = curate(
        list(args.inputs),
        args.out,
        cfg,
        resume=args.resume,
        overwrite=args.overwrite,
        max_skip_fraction=args.max_skip_fraction,
    )
    print_json({k: report[k] for k in ("in", "kept", "removed")} | {"out": args.out})


def _experiment_curation_parser() -> ArgumentParser:
    p = new_parser(
        "Pretrain the same small model on a damaged corpus raw and curated (equal token budget, "
        "2 seeds); compare held-out loss and memorisation."
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--seeds", default="1,2", help="comma-separated training seeds")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


@command("experiment curation", _experiment_curation_parser)
def _experiment_curation(args: Namespace) -> None:
    from fmforge.commands import print_json
    from fmforge.errors import UserError
    from fmforge.experiments.curation import run_curation

    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    result = run_curation(args.out, steps=args.steps, seeds=seeds, overwrite=args.overwrite)
    print_json({k: result[k] for k in ("claim_holds_every_seed", "mean", "seconds")})

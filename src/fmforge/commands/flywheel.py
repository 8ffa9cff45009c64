"""Flywheel commands: fmforge flywheel cycle|ls|lineage|promote|rollback (docs/flywheel.md)."""

from __future__ import annotations

import time

from jsonargparse import ArgumentParser, Namespace

from fmforge.commands import GROUPS, command, new_parser, print_json

GROUPS["flywheel"] = "The data flywheel: feedback -> a gated new model version, lineage, rollback."

_DB_HELP = "feedback store / registry URL or SQLite path (default: per-user)"


def _cycle_parser() -> ArgumentParser:
    from jsonargparse import ActionConfigFile

    from fmforge.flywheel.cycle import CycleConfig

    p = new_parser(
        "Curate the feedback since the serving version, train a candidate (SFT then DPO), "
        "evaluate it against the incumbent, gate, register (and promote when it wins)."
    )
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file of the options")
    p.add_argument("--db", default=None, help=_DB_HELP)
    p.add_argument(
        "--serving",
        default=None,
        help="the base model (dir or built-in name) when the registry is empty; else a version id",
    )
    p.add_argument("--out", required=True, help="the cycle's dir (re-run it to resume)")
    p.add_argument("--by", default="gate", help="who the registry names as the decider")
    p.add_class_arguments(CycleConfig, None, as_group=False)
    return p


def _db_parser(description: str, version: bool = False) -> ArgumentParser:
    def build() -> ArgumentParser:
        p = new_parser(description)
        if version:
            p.add_argument("version", help="a version id (v0, v1, ...)")
        p.add_argument("--db", default=None, help=_DB_HELP)
        if description.startswith(("Promote", "Roll")):
            p.add_argument("--by", default="cli", help="who the serving event names")
        else:
            p.add_argument("--json", action="store_true", help="print JSON")
        return p

    return build


@command("flywheel cycle", _cycle_parser)
def _cycle(args: Namespace) -> int:
    import dataclasses

    from fmforge.flywheel.cycle import CycleConfig, run_cycle
    from fmforge.flywheel.datasets import NothingToLearn

    names = [f.name for f in dataclasses.fields(CycleConfig)]
    config = CycleConfig(**{n: getattr(args, n) for n in names})
    try:
        result = run_cycle(args.db, args.serving, args.out, config, by=args.by)
    except NothingToLearn as e:
        print(f"nothing to learn from yet: {e}; no new version")
        return 0
    print_json(result)
    return 0


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp))


@command("flywheel ls", _db_parser("List the model versions, oldest first (* serves now)."))
def _ls(args: Namespace) -> None:
    import dataclasses

    from fmforge.flywheel.registry import Registry

    registry = Registry(args.db)
    versions, serving = registry.list(), registry.serving()
    if args.json:
        print_json([dataclasses.asdict(v) for v in versions])
        return
    if not versions:
        print("the registry is empty (fmforge flywheel cycle --serving MODEL registers v0)")
        return
    for v in versions:
        mark = "*" if serving is not None and v.id == serving.id else " "
        gate = v.gate.get("decision", "-")
        delta = v.gate.get("metrics", {}).get("delta")
        judged = f" {v.gate['metrics']['metric']} {delta:+.4g}" if delta is not None else ""
        dataset = (v.dataset_id or "-")[:19]
        print(
            f"{mark} {v.id:<5} {v.status:<9} parent={v.parent or '-':<5} {v.kind:<4} "
            f"data={dataset:<19} gate={gate}{judged}  {_when(v.created)} UTC"
        )


@command("flywheel lineage", _db_parser("Show where a version came from.", version=True))
def _lineage(args: Namespace) -> None:
    import dataclasses

    from fmforge.flywheel.registry import Registry

    registry = Registry(args.db)
    version = registry.get(args.version)
    ancestry, parent = [], version.parent
    while parent is not None:
        ancestry.append(parent)
        parent = registry.get(parent).parent
    serving = registry.serving()
    info = dataclasses.asdict(version)
    info["ancestry"] = ancestry
    info["serving"] = serving is not None and serving.id == version.id
    info["serving_events"] = [e for e in registry.history() if e["version"] == version.id]
    if args.json:
        print_json(info)
        return
    gate = version.gate
    lines = [
        f"{version.id} ({version.status}{', serving' if info['serving'] else ''}; {version.kind})",
        f"  parent:          {version.parent or '-'} (ancestry: {' <- '.join(ancestry) or '-'})",
        f"  base:            {version.base}",
        f"  path:            {version.path}",
        f"  dataset id:      {version.dataset_id or '-'}",
        f"  log window:      {_window(version.log_window)}",
        f"  feedback counts: {_pairs(version.feedback_counts)}",
        f"  gate:            {gate.get('decision', '-')} by {gate.get('by', '-')}: "
        f"{gate.get('reason', '')}",
        f"  config:          {_pairs(version.config)}",
    ]
    for side in ("incumbent", "candidate"):
        if side in version.eval_report:
            lines.append(f"  eval {side + ':':<11} {_pairs(version.eval_report[side])}")
    for event in info["serving_events"]:
        lines.append(f"  {event['action']} by {event['by']} at {_when(event['created'])} UTC")
    print("\n".join(lines))


def _pairs(mapping: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(mapping.items())) or "-"


def _window(window: dict) -> str:
    if not window:
        return "-"
    return f"({_when(window.get('from', 0))}, {_when(window.get('to', 0))}] UTC"


@command("flywheel promote", _db_parser("Promote a version: it serves from now on.", version=True))
def _promote(args: Namespace) -> None:
    from fmforge.flywheel.registry import Registry

    registry = Registry(args.db)
    version = registry.promote(args.version, by=args.by)
    print(f"{version.id} now serves (promoted by {args.by})")


@command("flywheel rollback", _db_parser("Roll back: serve the previously served version again."))
def _rollback(args: Namespace) -> None:
    from fmforge.flywheel.registry import Registry

    registry = Registry(args.db)
    current = registry.serving()
    version = registry.rollback(by=args.by)
    print(f"{version.id} serves again (rolled back from {current.id} by {args.by})")


def _experiment_parser() -> ArgumentParser:
    from fmforge.experiments.flywheel import FlywheelExperiment

    p = new_parser(
        "Simulated users with a hidden preference talk to fmforge serve --db over HTTP; 3 "
        "flywheel cycles, then a broken candidate the gate must refuse; win rates vs v0."
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_class_arguments(FlywheelExperiment, None, as_group=False)
    return p


@command("experiment flywheel", _experiment_parser)
def _experiment(args: Namespace) -> None:
    import dataclasses

    from fmforge.experiments.flywheel import (
        FlywheelExperiment,
        results_summary,
        run_flywheel_experiment,
    )

    names = [f.name for f in dataclasses.fields(FlywheelExperiment)]
    exp = FlywheelExperiment(**{n: getattr(args, n) for n in names})
    print_json(results_summary(run_flywheel_experiment(args.out, exp, args.overwrite)))

"""Adaptation commands: fmforge adapt METHOD|compare|recommend, eval, experiment."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jsonargparse import ArgumentParser, Namespace

from fmforge.adapt.methods import METHODS
from fmforge.commands import GROUPS, Handler, command, new_parser, print_json
from fmforge.errors import UserError

# ---------------------------------------------------------------------------------------------
# Adaptation lab (fmforge adapt METHOD|compare|recommend), eval, experiments.
# ---------------------------------------------------------------------------------------------

GROUPS["adapt"] = "Adapt a base model to a task: methods, compare, recommend."
GROUPS["experiment"] = "Reproducible experiments that write a report dir."


# The CLI side of AdaptOptions: each field's flag type and help. Defaults come from AdaptOptions and
# which flags a command offers from the method table (Method.option_names).
FLAG_HELP: dict[str, tuple[type, str]] = {
    "max_steps": (int, "optimizer steps"),
    "batch_size": (int, "prompts per step"),
    "lr": (float, "peak LR (default: the method's)"),
    "seed": (int, "splits, demonstrations, init, order"),
    "max_text_tokens": (int, "cut each input to this many tokens"),
    "rank": (int, "LoRA rank r"),
    "alpha": (float, "LoRA alpha (update scaled by alpha/r)"),
    "dropout": (float, "LoRA dropout on the adapter input"),
    "targets": (str, "comma-separated module names that get LoRA"),
    "top_blocks": (int, "top decoder blocks left trainable"),
    "virtual_tokens": (int, "soft prompt length"),
    "shots": (int, "demonstrations in the prompt"),
    "patterns": (int, "cloze patterns used (1-4)"),
    "threads": (int, "torch CPU threads (0: default)"),
}


def _add_adapt_options(p: ArgumentParser, names: list[str], steps: int | None = None) -> None:
    """Add a flag for each AdaptOptions field in `names` (AdaptOptions' defaults)."""
    from dataclasses import fields

    from fmforge.adapt.options import AdaptOptions

    defaults = {f.name: f.default for f in fields(AdaptOptions)}
    defaults["targets"] = ",".join(AdaptOptions().targets)
    if steps is not None:
        defaults["max_steps"] = steps
    for name in names:
        kind, text = FLAG_HELP[name]
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=kind, default=defaults[name], help=text)
    p.add_argument("--verbalizer", default=None, help="label=word,... or a JSON file")


def _adapt_options(args: Namespace) -> Any:
    from fmforge.adapt.options import AdaptOptions

    given = {name: args[name] for name in FLAG_HELP if name in args}
    for name in ("max_steps", "batch_size", "max_text_tokens"):
        if name in given and given[name] < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {given[name]}")
    if given.get("shots", 0) < 0 or not 1 <= given.get("patterns", 1) <= 4:
        raise UserError("--shots must be >= 0 and --patterns in 1..4")
    if "targets" in given:
        given["targets"] = [t.strip() for t in given["targets"].split(",") if t.strip()]
    return AdaptOptions(**given)


def _all_option_names() -> list[str]:
    names = {n for m in METHODS.values() for n in m.option_names()}
    return [n for n in FLAG_HELP if n in names]


def _adapt_method_parser(method: str) -> Callable[[], ArgumentParser]:
    def build() -> ArgumentParser:
        p = new_parser(f"Adapt a base model to a task with {method}; write the adapted dir.")
        p.add_argument("--base", required=True, help="a model dir or built-in name")
        p.add_argument("--task", required=True, help="a task name or a .jsonl of text/label")
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--examples-per-class", type=int, default=None, help="train subset K")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
        _add_adapt_options(p, list(METHODS[method].option_names()))
        return p

    return build


def _adapt_compare_parser() -> ArgumentParser:
    p = new_parser("Every adaptation method on one base, task and budget: results, report, plot.")
    p.add_argument("--base", required=True, help="a model dir or built-in name")
    p.add_argument("--task", required=True, help="a task name or a .jsonl of text/label")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--examples-per-class", default="8,32,128", help="comma-separated K values")
    p.add_argument("--methods", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    _add_adapt_options(p, _all_option_names(), steps=40)
    return p


def _adapt_recommend_parser() -> ArgumentParser:
    p = new_parser(
        "Recommend an adaptation method from the task's size and similarity to the base."
    )
    p.add_argument("--base", required=True, help="a model dir or built-in name")
    p.add_argument("--task", required=True, help="a task name or a .jsonl of text/label")
    p.add_argument("--examples-per-class", type=int, default=None, help="data you will have")
    p.add_argument("--results", default=None, help="a compare dir or results.json to ground it")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def _eval_parser() -> ArgumentParser:
    p = new_parser("Test accuracy of an adapted dir, or of a base model with k-shot prompts.")
    p.add_argument("model", help="an adapted dir (fmforge adapt) or a base model")
    p.add_argument("--task", default=None, help="task (default: the adapted dir's)")
    p.add_argument("--shots", type=int, default=0, help="base models: demonstrations")
    p.add_argument("--base", default=None, help="adapters: the base they were trained on")
    p.add_argument("--seed", type=int, default=0, help="splits and demonstrations")
    p.add_argument("--verbalizer", default=None, help="label=word,... or a JSON file")
    return p


def _experiment_transfer_parser() -> ArgumentParser:
    p = new_parser("Transfer vs from-scratch training: steps to reach the same validation loss.")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--base", default=None, help="a pretrained model dir (default: pretrain one)")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning budget per run")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def _experiment_objectives_parser() -> ArgumentParser:
    p = new_parser("Causal vs masked-LM vs contrastive encoders: probes, STS-B, retrieval.")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--steps", type=int, default=None, help="causal and MLM steps (64 x 32 tokens)")
    p.add_argument("--simcse-steps", type=int, default=None, help="SimCSE steps from the MLM")
    p.add_argument("--layers", type=int, default=None, help="depth of every model (width 128)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def _adapt_handler(method: str) -> Handler:
    def handle(args: Namespace) -> None:
        from fmforge.adapt.adapted import adapt
        from fmforge.data.tasks import parse_verbalizer

        row = adapt(
            method,
            args.base,
            args.task,
            args.out,
            _adapt_options(args),
            examples_per_class=args.examples_per_class,
            verbalizer=parse_verbalizer(args.verbalizer),
            overwrite=args.overwrite,
        )
        print_json({"out": args.out, **row})

    return handle


for _method in METHODS:
    command(f"adapt {_method}", _adapt_method_parser(_method))(_adapt_handler(_method))


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError as e:
        raise UserError(f"{flag} takes comma-separated integers, got {text!r}") from e
    if not values or min(values) < 1:
        raise UserError(f"{flag} needs positive integers, got {text!r}")
    return values


@command("adapt compare", _adapt_compare_parser)
def _adapt_compare(args: Namespace) -> None:
    from fmforge.adapt.compare import compare
    from fmforge.data.tasks import parse_verbalizer

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    result = compare(
        args.base,
        args.task,
        args.out,
        _int_list(args.examples_per_class, "--examples-per-class"),
        methods,
        _adapt_options(args),
        overwrite=args.overwrite,
        verbalizer=parse_verbalizer(args.verbalizer),
    )
    outputs = "results.json, report.md, accuracy_vs_examples.png"
    print(f"wrote {args.out}/ {outputs} ({result['seconds']} s)")


@command("adapt recommend", _adapt_recommend_parser)
def _adapt_recommend(args: Namespace) -> None:
    from fmforge.adapt.recommend import recommend

    result = recommend(args.base, args.task, args.examples_per_class, args.results)
    if args.json:
        print_json(result)
    else:
        print(f"recommended: {result['method']}\nwhy: {result['reason']}")


@command("eval", _eval_parser)
def _eval(args: Namespace) -> None:
    from fmforge.adapt.adapted import evaluate
    from fmforge.adapt.options import AdaptOptions
    from fmforge.data.tasks import parse_verbalizer

    if args.shots < 0:
        raise UserError(f"--shots must be >= 0, got {args.shots}")
    result = evaluate(
        args.model,
        args.task,
        args.shots,
        args.base,
        AdaptOptions(seed=args.seed),
        parse_verbalizer(args.verbalizer),
    )
    print_json(result)


@command("experiment objectives", _experiment_objectives_parser)
def _experiment_objectives(args: Namespace) -> None:
    from fmforge.experiments.objectives import run_objectives

    budgets = {k: args[k] for k in ("steps", "simcse_steps", "layers") if args[k] is not None}
    results = run_objectives(args.out, overwrite=args.overwrite, **budgets)
    print_json(results["verdicts"])
    print(f"report: {args.out}/report.md")


@command("experiment transfer", _experiment_transfer_parser)
def _experiment_transfer(args: Namespace) -> None:
    from fmforge.experiments.transfer import run_transfer

    result = run_transfer(args.out, base=args.base, steps=args.steps, overwrite=args.overwrite)
    print(f"speedup {result['speedup']}x; report: {args.out}/report.md")

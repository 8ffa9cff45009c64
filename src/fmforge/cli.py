"""The `fmforge` command: thin subcommands that parse arguments, then call one stage function.

Parsing uses jsonargparse, so every config-driven command takes `--config FILE`, dotted overrides
(`--train.lr=3e-4`) and `--print-config`. Heavy imports (torch, transformers) happen inside the
handlers, never at module import, so `fmforge --help` starts in well under a second.
Bad input raises `UserError`; `main` prints it on one line and exits 2 (`--debug` shows the trace).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from fmforge.adapt import METHODS
from fmforge.errors import UserError

Handler = Callable[[Namespace], int | None]
COMMANDS: dict[str, tuple[Callable[[], ArgumentParser], Handler]] = {}
GROUPS: dict[str, str] = {  # command groups with subcommands, and their one-line descriptions
    "tokenizer": "Byte-level BPE tokenizers.",
    "data": "Data curation and preparation.",
}


def command(path: str, parser: Callable[[], ArgumentParser]) -> Callable[[Handler], Handler]:
    """Register a subcommand ("pretrain", "tokenizer train") with its parser factory."""

    def register(fn: Handler) -> Handler:
        COMMANDS[path] = (parser, fn)
        return fn

    return register


def _parser(description: str) -> ArgumentParser:
    return ArgumentParser(description=description, exit_on_error=False)


# ---------------------------------------------------------------------------------------------
# Parsers. One function per top-level command; nested commands get a subparser each.
# ---------------------------------------------------------------------------------------------


def _quickstart_parser() -> ArgumentParser:
    p = _parser("Whole pretraining path on the built-in stdlib corpus, minutes on a CPU.")
    p.add_argument("--out", default="runs/quickstart", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--max-steps", type=int, default=None, help="override the training steps")
    p.add_argument("--preset", default="small", help="model preset (tiny for a smoke test)")
    p.add_argument("--corpus", default="stdlib", help="built-in corpus name or a path")
    return p


def _tokenizer_train_parser() -> ArgumentParser:
    train = _parser("Train a byte-level BPE tokenizer on corpora or files.")
    train.add_argument("inputs", nargs="+", help="built-in corpus names or files/directories")
    train.add_argument("--vocab-size", type=int, default=4096)
    train.add_argument("--out", required=True)
    train.add_argument("--overwrite", action="store_true")
    train.add_argument("--max-skip-fraction", type=float, default=0.05)
    return train


def _data_prepare_parser() -> ArgumentParser:
    prepare = _parser("Tokenise documents into packed token shards with a train/val split.")
    prepare.add_argument("inputs", nargs="+", help="built-in corpus names or files/directories")
    prepare.add_argument("--tokenizer", required=True, help="a tokenizer dir or a model dir")
    prepare.add_argument("--out", required=True)
    prepare.add_argument("--val-fraction", type=float, default=0.01)
    prepare.add_argument("--seed", type=int, default=0)
    prepare.add_argument("--overwrite", action="store_true")
    prepare.add_argument("--max-skip-fraction", type=float, default=0.05)
    return prepare


def _pretrain_parser() -> ArgumentParser:
    from fmforge.config import PretrainConfig

    p = _parser("Pretrain a decoder with next-token prediction; resumable.")
    p.add_argument("--config", action=ActionConfigFile, help="a YAML config file")
    p.add_class_arguments(PretrainConfig, None, as_group=False)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", default="never", help="auto: continue from the newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def _models_parser() -> ArgumentParser:
    return _parser("List built-in models and whether their packages are installed.")


def _env_parser() -> ArgumentParser:
    p = _parser("Print versions, devices and threads.")
    p.add_argument("--short", action="store_true")
    return p


def build_parser() -> ArgumentParser:
    """Return the full `fmforge` argument parser, built from the registered commands."""
    parser = ArgumentParser(
        prog="fmforge",
        description="fmforge: raw text to a deployed foundation model.",
        exit_on_error=False,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    subcommands = {"": parser.add_subcommands(dest="command")}
    # jsonargparse wants parent levels added before their children.
    for path in sorted(COMMANDS, key=lambda p: (p.count(" "), list(COMMANDS).index(p))):
        words = path.split(" ")
        for depth in range(1, len(words)):
            group = " ".join(words[:depth])
            if group not in subcommands:
                group_parser = _parser(GROUPS.get(group, ""))
                subcommands[" ".join(words[: depth - 1])].add_subcommand(
                    words[depth - 1], group_parser
                )
                subcommands[group] = group_parser.add_subcommands(
                    dest=group.replace(" ", "_") + "_command"
                )
        subcommands[" ".join(words[:-1])].add_subcommand(words[-1], COMMANDS[path][0]())
    return parser


# ---------------------------------------------------------------------------------------------
# Handlers: each calls one stage function.
# ---------------------------------------------------------------------------------------------


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


@command("quickstart", _quickstart_parser)
def _quickstart(args: Namespace) -> None:
    from fmforge.quickstart import quickstart

    quickstart(
        out=args.out,
        overwrite=args.overwrite,
        max_steps=args.max_steps,
        preset=args.preset,
        corpus=args.corpus,
    )


@command("tokenizer train", _tokenizer_train_parser)
def _tokenizer_train(args: Namespace) -> None:
    from fmforge.tokenizer import train_from_inputs

    summary = train_from_inputs(
        list(args.inputs),
        vocab_size=args.vocab_size,
        out=args.out,
        overwrite=args.overwrite,
        max_skip_fraction=args.max_skip_fraction,
    )
    _print_json(summary)


@command("data prepare", _data_prepare_parser)
def _data_prepare(args: Namespace) -> None:
    from fmforge.data.pack import prepare_shards

    meta = prepare_shards(
        list(args.inputs),
        tokenizer_dir=args.tokenizer,
        out=args.out,
        val_fraction=args.val_fraction,
        seed=args.seed,
        overwrite=args.overwrite,
        max_skip_fraction=args.max_skip_fraction,
    )
    splits = meta.get("splits", {})
    _print_json({"out": args.out, "splits": splits})


@command("pretrain", _pretrain_parser)
def _pretrain(args: Namespace) -> None:
    from fmforge.config import PretrainConfig
    from fmforge.train.pretrain import pretrain

    values = {k: args[k].as_dict() for k in ("model", "data", "train")}
    cfg = PretrainConfig.from_dict(values)
    pretrain(cfg, out=args.out, resume=args.resume, overwrite=args.overwrite)


@command("models", _models_parser)
def _models(args: Namespace) -> None:
    from fmforge.model.load import list_builtin_models

    for row in list_builtin_models():
        status = "installed" if row["installed"] else f"missing: {row['install']}"
        print(f"{row['name']:<24} {row['family']:<8} {status}")


@command("env", _env_parser)
def _env(args: Namespace) -> None:
    from fmforge.train.distributed import environment_report

    report = environment_report()
    if args.short:
        print(
            " ".join(f"{k}={v}" for k, v in report.items() if k in ("fmforge", "torch", "device"))
        )
    else:
        _print_json(report)


# ---------------------------------------------------------------------------------------------
# Cost, memory and scaling laws (fmforge cost, fmforge scaling plan|fit).
# ---------------------------------------------------------------------------------------------

GROUPS["scaling"] = "Scaling laws: compute-optimal size and data, predicted loss, fits."


def _cost_parser() -> ArgumentParser:
    p = _parser(
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
    p = _parser("Compute-optimal params and tokens for a FLOP budget, or the loss of (N, D).")
    p.add_argument("--flops", type=float, default=None, help="FLOP budget C (C = 6ND)")
    p.add_argument("--params", type=float, default=None, help="parameters N (with --tokens)")
    p.add_argument("--tokens", type=float, default=None, help="training tokens D")
    p.add_argument("--preset", default="chinchilla", help="chinchilla or kaplan")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def _scaling_fit_parser() -> ArgumentParser:
    p = _parser("Fit L = E + A/N^alpha + B/D^beta to your own runs (CSV or JSON lines).")
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


# ---------------------------------------------------------------------------------------------
# Generation (fmforge generate, fmforge chat) and export to an HF model dir.
# ---------------------------------------------------------------------------------------------


def _add_sampling_arguments(p: ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 256, within context")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")


def _generate_parser() -> ArgumentParser:
    p = _parser("Continue a prompt (or answer it as a chat turn with --chat).")
    p.add_argument("model", help="a model dir, a built-in name (fmforge models) or a .gguf file")
    p.add_argument("--prompt", required=True, help="the text to continue or the user message")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--system", default=None, help="with --chat: the system message")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    _add_sampling_arguments(p)
    return p


def _chat_parser() -> ArgumentParser:
    p = _parser("Chat interactively (streaming, multi-turn). Type /reset or /exit.")
    p.add_argument("model", help="a model dir, a built-in name (fmforge models) or a .gguf file")
    p.add_argument("--system", default=None, help="the system message")
    _add_sampling_arguments(p)
    return p


def _export_parser() -> ArgumentParser:
    p = _parser("Write any loadable model (a GGUF base included) as an HF-format model dir.")
    p.add_argument("model", help="a model dir, a built-in name (fmforge models) or a .gguf file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def _load_model(name: str) -> Any:
    if name.endswith(".gguf") and os.path.isfile(name):
        from fmforge.model.gguf import load_gguf

        return load_gguf(name)
    from fmforge.model.load import load

    return load(name)


def _sampling_kwargs(args: Namespace) -> dict[str, Any]:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
    }


def _print_stream(deltas: Any) -> None:
    for delta in deltas:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


@command("generate", _generate_parser)
def _generate(args: Namespace) -> None:
    if not args.prompt:
        raise UserError("--prompt is empty; give some text to continue")
    loaded = _load_model(args.model)
    kwargs = _sampling_kwargs(args)
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.prompt})
        out = loaded.chat(messages, stream=args.stream, **kwargs)
    else:
        out = loaded.generate(args.prompt, stream=args.stream, **kwargs)
    if args.stream:
        _print_stream(out)
    else:
        print(out)


@command("chat", _chat_parser)
def _chat(args: Namespace) -> None:
    loaded = _load_model(args.model)
    kwargs = _sampling_kwargs(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = list(system)
    print("fmforge chat: /reset clears the history, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        command_word = line.strip()
        if command_word in ("/exit", "/quit"):
            return
        if command_word == "/reset":
            history = list(system)
            print("(history cleared)", file=sys.stderr)
            continue
        if not command_word:
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = "".join(_echo(loaded.chat(history, stream=True, **kwargs)))
        except UserError as e:  # e.g. the history outgrew the context: say so, keep chatting
            history.pop()
            print(f"fmforge: error: {' '.join(str(e).split())} (try /reset)", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": reply})


def _echo(deltas: Any) -> Any:
    for delta in deltas:
        sys.stdout.write(delta)
        sys.stdout.flush()
        yield delta
    sys.stdout.write("\n")
    sys.stdout.flush()


@command("export", _export_parser)
def _export(args: Namespace) -> None:
    from fmforge.artifacts import check_output_dir

    check_output_dir(args.out, args.overwrite)  # refuse before a slow load
    loaded = _load_model(args.model)
    path = loaded.save(args.out, overwrite=args.overwrite)
    print(f"wrote {path} (config.json, model.safetensors, tokenizer.json); transformers loads it")


# ---------------------------------------------------------------------------------------------
# Serving and the feedback flywheel (fmforge serve, fmforge feedback ls|export).
# ---------------------------------------------------------------------------------------------

GROUPS["feedback"] = "The feedback store: list generations and feedback, export SFT/DPO data."


def _serve_parser() -> ArgumentParser:
    p = _parser("Serve a model over the OpenAI API with a playground at / (127.0.0.1 by default).")
    p.add_argument("model", help="a model dir or a built-in name (fmforge models)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", default=None, help="file holding the key clients must send")
    p.add_argument("--db", default=None, help="store URL or SQLite path (default: per-user)")
    p.add_argument("--no-store", action="store_true", help="record nothing")
    p.add_argument("--max-concurrency", type=int, default=4, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=16, help="waiting sequences before 429")
    p.add_argument("--metrics", action="store_true", help="expose Prometheus /metrics")
    p.add_argument("--log-level", default="info", help="uvicorn log level")
    return p


def _feedback_ls_parser() -> ArgumentParser:
    p = _parser("List stored generations (newest first) with their feedback.")
    p.add_argument("--db", default=None, help="feedback store URL or SQLite path")
    p.add_argument("--limit", type=int, default=20, help="how many generations to show")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def _feedback_export_parser() -> ArgumentParser:
    p = _parser("Export feedback as training data: SFT examples or DPO pairs (JSON lines).")
    p.add_argument("--db", default=None, help="feedback store URL or SQLite path")
    p.add_argument("--format", required=True, help="sft or dpo")
    p.add_argument("--out", required=True, help="output .jsonl file")
    return p


@command("serve", _serve_parser)
def _serve(args: Namespace) -> None:
    from fmforge.serve.run import serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        api_key_file=args.api_key_file,
        db=args.db,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        metrics=args.metrics,
        no_store=args.no_store,
        log_level=args.log_level,
    )


@command("feedback ls", _feedback_ls_parser)
def _feedback_ls(args: Namespace) -> None:
    from fmforge.flywheel.store import FeedbackStore

    store = FeedbackStore(args.db)
    rows = store.list_generations(limit=args.limit)
    by_generation: dict[str, list[dict[str, Any]]] = {}
    for row in store.list_feedback():
        by_generation.setdefault(row["generation_id"], []).append(row)
    if args.json:
        for row in rows:
            row["feedback"] = by_generation.get(row["id"], [])
        _print_json(rows)
        return
    counts = store.counts()
    print(f"{counts['generations']} generations, {counts['feedback']} feedback rows")
    for row in rows:
        kinds = ",".join(f["kind"] for f in by_generation.get(row["id"], [])) or "-"
        output = " ".join(row["outputs"][0].split())[:60] if row["outputs"] else ""
        print(f"{row['id']}  {row['endpoint']:<10} {kinds:<16} {output}")


@command("feedback export", _feedback_export_parser)
def _feedback_export(args: Namespace) -> None:
    from fmforge.flywheel.export import export
    from fmforge.flywheel.store import FeedbackStore

    count = export(FeedbackStore(args.db), args.format, args.out)
    print(f"wrote {count} {args.format} records to {args.out}")


# ---------------------------------------------------------------------------------------------
# Adaptation lab (fmforge adapt METHOD|compare|recommend), eval, experiments.
# ---------------------------------------------------------------------------------------------

GROUPS["adapt"] = "Adapt a base model to a task: methods, compare, recommend."
GROUPS["experiment"] = "Reproducible experiments that write a report dir."


def _add_adapt_options(p: ArgumentParser, steps: int = 60) -> None:
    p.add_argument("--max-steps", type=int, default=steps, help="optimizer steps (trained methods)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per step")
    p.add_argument("--lr", type=float, default=None, help="peak LR (default: per method)")
    p.add_argument("--seed", type=int, default=0, help="splits, demonstrations, init, order")
    p.add_argument("--max-text-tokens", type=int, default=96, help="cut each input to this")
    p.add_argument("--rank", type=int, default=8, help="lora/pet: rank r")
    p.add_argument("--alpha", type=float, default=16.0, help="lora/pet: alpha (scale alpha/r)")
    p.add_argument("--dropout", type=float, default=0.0, help="lora/pet: adapter dropout")
    p.add_argument(
        "--targets",
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        help="lora/pet: comma-separated module names",
    )
    p.add_argument("--top-blocks", type=int, default=1, help="freeze: top blocks left trainable")
    p.add_argument("--virtual-tokens", type=int, default=8, help="prompt-tuning: soft tokens")
    p.add_argument("--shots", type=int, default=0, help="icl/ensemble: demonstrations")
    p.add_argument("--patterns", type=int, default=4, help="pet/ensemble: patterns used (1-4)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--verbalizer", default=None, help="label=word,... or a JSON file")


def _adapt_options(args: Namespace) -> Any:
    from fmforge.adapt.training import AdaptOptions

    for name in ("max_steps", "batch_size", "max_text_tokens"):
        if args[name] < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {args[name]}")
    if args.shots < 0 or not 1 <= args.patterns <= 4:
        raise UserError("--shots must be >= 0 and --patterns in 1..4")
    return AdaptOptions(
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        max_text_tokens=args.max_text_tokens,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        targets=[t.strip() for t in args.targets.split(",") if t.strip()],
        top_blocks=args.top_blocks,
        virtual_tokens=args.virtual_tokens,
        shots=args.shots,
        patterns=args.patterns,
        threads=args.threads,
    )


def _adapt_method_parser(method: str) -> Callable[[], ArgumentParser]:
    def build() -> ArgumentParser:
        p = _parser(f"Adapt a base model to a task with {method}; write the adapted dir.")
        p.add_argument("--base", required=True, help="a model dir or built-in name")
        p.add_argument("--task", required=True, help="a task name or a .jsonl of text/label")
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--examples-per-class", type=int, default=None, help="train subset K")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
        _add_adapt_options(p)
        return p

    return build


def _adapt_compare_parser() -> ArgumentParser:
    p = _parser("Every adaptation method on one base, task and budget: results, report, plot.")
    p.add_argument("--base", required=True, help="a model dir or built-in name")
    p.add_argument("--task", required=True, help="a task name or a .jsonl of text/label")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--examples-per-class", default="8,32,128", help="comma-separated K values")
    p.add_argument("--methods", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    _add_adapt_options(p, steps=40)
    return p


def _adapt_recommend_parser() -> ArgumentParser:
    p = _parser("Recommend an adaptation method from the task's size and similarity to the base.")
    p.add_argument("--base", required=True, help="a model dir or built-in name")
    p.add_argument("--task", required=True, help="a task name or a .jsonl of text/label")
    p.add_argument("--examples-per-class", type=int, default=None, help="data you will have")
    p.add_argument("--results", default=None, help="a compare dir or results.json to ground it")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def _eval_parser() -> ArgumentParser:
    p = _parser("Test accuracy of an adapted dir, or of a base model with k-shot prompts.")
    p.add_argument("model", help="an adapted dir (fmforge adapt) or a base model")
    p.add_argument("--task", default=None, help="task (default: the adapted dir's)")
    p.add_argument("--shots", type=int, default=0, help="base models: demonstrations")
    p.add_argument("--base", default=None, help="adapters: the base they were trained on")
    p.add_argument("--seed", type=int, default=0, help="splits and demonstrations")
    p.add_argument("--verbalizer", default=None, help="label=word,... or a JSON file")
    return p


def _experiment_transfer_parser() -> ArgumentParser:
    p = _parser("Transfer vs from-scratch training: steps to reach the same validation loss.")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--base", default=None, help="a pretrained model dir (default: pretrain one)")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning budget per run")
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
        _print_json({"out": args.out, **row})

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
        _print_json(result)
    else:
        print(f"recommended: {result['method']}\nwhy: {result['reason']}")


@command("eval", _eval_parser)
def _eval(args: Namespace) -> None:
    from fmforge.adapt.adapted import evaluate
    from fmforge.adapt.training import AdaptOptions
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
    _print_json(result)


@command("experiment transfer", _experiment_transfer_parser)
def _experiment_transfer(args: Namespace) -> None:
    from fmforge.experiments.transfer import run_transfer

    result = run_transfer(args.out, base=args.base, steps=args.steps, overwrite=args.overwrite)
    print(f"speedup {result['speedup']}x; report: {args.out}/report.md")


# ---------------------------------------------------------------------------------------------
# Entry point and error reporting.
# ---------------------------------------------------------------------------------------------


def _normalise_argv(argv: list[str]) -> list[str]:
    # jsonargparse spells it --print_config; accept the dashed form users type.
    return [
        "--print_config" + a[len("--print-config") :] if a.startswith("--print-config") else a
        for a in argv
    ]


def _known_keys(parser: ArgumentParser) -> list[str]:
    return [a.dest for a in parser._actions if a.dest and a.dest != "help"]


def _explain_parse_error(parser: ArgumentParser, argv: list[str], message: str) -> str:
    first = message.strip().splitlines()[0] if message.strip() else "invalid arguments"
    match = re.search(r"option '([\w.\-]+)'|unrecognized arguments: --([\w.\-]+)", first)
    if match:
        key = match.group(1) or match.group(2)
        key = key.split("=")[0]
        sub = parser
        for word in argv:
            subcommands = getattr(sub, "_subcommands_action", None)
            if subcommands is not None and word in subcommands._name_parser_map:
                sub = subcommands._name_parser_map[word]
        keys = _known_keys(sub)
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        source = next(
            (argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"),
            None,
        )
        where = f"{source}: " if source else ""
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"{where}unknown key {key}{hint}"
    if "Problems parsing config" in message or "could not determine a constructor" in message:
        tag = re.search(r"tag '([^']+)'", message)
        detail = f" (tag {tag.group(1)} is refused)" if tag else ""
        return f"config file is not safe YAML{detail}; use plain values"
    return " ".join(message.split())[:400]


def _command_path(ns: Namespace) -> tuple[str, Namespace]:
    words: list[str] = []
    node, key = ns, "command"
    while key in node and node[key]:
        words.append(node[key])
        node = node[node[key]]
        key = "_".join(words) + "_command"
    return " ".join(words), node


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the process exit code (2 for bad input, 130 on Ctrl-C)."""
    argv = _normalise_argv(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in argv or os.environ.get("FMFORGE_DEBUG") == "1"
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 2
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # --help and --print-config exit through argparse
        return int(e.code or 0)
    except Exception as e:  # jsonargparse raises ArgumentError / NSKeyError subclasses
        if debug:
            raise
        print(f"fmforge: error: {_explain_parse_error(parser, argv, str(e))}", file=sys.stderr)
        return 2
    path, node = _command_path(ns)
    if path not in COMMANDS:
        print(
            f"fmforge: error: '{path}' needs a subcommand; see fmforge {path} --help",
            file=sys.stderr,
        )
        return 2
    try:
        code = COMMANDS[path][1](node)
    except UserError as e:
        if debug:
            raise
        print(f"fmforge: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fmforge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `fmforge ... | head`
        sys.stderr.close()
        return 0
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())

"""Generation commands: fmforge generate, chat, export."""

from __future__ import annotations

import os
import sys
from typing import Any

from jsonargparse import ArgumentParser, Namespace

from fmforge.commands import command, new_parser
from fmforge.errors import UserError

# ---------------------------------------------------------------------------------------------
# Generation (fmforge generate, fmforge chat) and export to an HF model dir.
# ---------------------------------------------------------------------------------------------


def _add_sampling_arguments(p: ArgumentParser) -> None:
    # Sampling flags left unset take the model's shipped defaults, else fmforge's
    # (generate/defaults.py: temperature 0.8, top-k 40, top-p 0.95, min-p 0.05).
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 256, within context")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy; default: model's")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens < min-p x the best")
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats")
    p.add_argument("--presence-penalty", type=float, default=None, help="OpenAI-style, per token")
    p.add_argument("--frequency-penalty", type=float, default=None, help="OpenAI-style, per count")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")


def _generate_parser() -> ArgumentParser:
    p = new_parser("Continue a prompt (or answer it as a chat turn with --chat).")
    p.add_argument("model", help="a model dir, a built-in name (fmforge models) or a .gguf file")
    p.add_argument("--prompt", required=True, help="the text to continue or the user message")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--system", default=None, help="with --chat: the system message")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--quantize", default=None, help="int8 or int4: quantise the weights in memory")
    _add_sampling_arguments(p)
    return p


def _chat_parser() -> ArgumentParser:
    p = new_parser("Chat interactively (streaming, multi-turn). Type /reset or /exit.")
    p.add_argument("model", help="a model dir, a built-in name (fmforge models) or a .gguf file")
    p.add_argument("--system", default=None, help="the system message")
    p.add_argument("--quantize", default=None, help="int8 or int4: quantise the weights in memory")
    _add_sampling_arguments(p)
    return p


def _export_parser() -> ArgumentParser:
    p = new_parser("Write a model as an HF-format dir (transformers) or a GGUF file (llama.cpp).")
    p.add_argument("model", help="a model dir, a built-in name (fmforge models) or a .gguf file")
    p.add_argument("--out", required=True, help="output directory (hf) or file (gguf)")
    p.add_argument("--format", default="hf", help="hf (a model dir) or gguf (one file)")
    p.add_argument("--dtype", default="f32", help="gguf only: f32, f16, q8_0, q4_0 or q4_1")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def _load_model(name: str, quantize: str | None = None) -> Any:
    from fmforge.api import load_decoder

    return load_decoder(name, quantize=quantize)


def _sampling_kwargs(args: Namespace, loaded: Any) -> dict[str, Any]:
    from fmforge.generate.defaults import sampling_defaults

    names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
    names += ("presence_penalty", "frequency_penalty")
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.greedy:
        given["temperature"] = 0.0
    sampling = {**sampling_defaults(loaded), **given}  # greedy (temperature 0) ignores top-k/p
    return {**sampling, "max_new_tokens": args.max_new_tokens, "seed": args.seed, "stop": args.stop}


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
    loaded = _load_model(args.model, args.quantize)
    kwargs = _sampling_kwargs(args, loaded)
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
    loaded = _load_model(args.model, args.quantize)
    kwargs = _sampling_kwargs(args, loaded)
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

    if args.format not in ("hf", "gguf"):
        raise UserError(f"--format {args.format!r}: choose hf or gguf")
    if args.format == "gguf":
        from fmforge.model.gguf_export import DTYPES, export_gguf

        if args.dtype not in DTYPES:
            raise UserError(f"--dtype {args.dtype!r}: choose one of {', '.join(DTYPES)}")
        if os.path.exists(args.out) and not args.overwrite:
            raise UserError(f"--out {args.out} exists; pass --overwrite to replace it")
        path = export_gguf(_load_model(args.model), args.out, args.dtype)
        print(f"wrote {path} (GGUF, {args.dtype}); llama.cpp and fmforge load it")
        return
    if args.dtype != "f32":
        raise UserError("--dtype applies to --format gguf; an hf export keeps the model's dtype")
    check_output_dir(args.out, args.overwrite)  # refuse before a slow load
    loaded = _load_model(args.model)
    path = loaded.save(args.out, overwrite=args.overwrite)
    print(f"wrote {path} (config.json, model.safetensors, tokenizer.json); transformers loads it")

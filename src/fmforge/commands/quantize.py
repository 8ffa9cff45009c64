"""Quantisation command: fmforge quantize MODEL --bits 8|4 --out DIR."""

from __future__ import annotations

from jsonargparse import ArgumentParser, Namespace

from fmforge.commands import command, new_parser
from fmforge.errors import UserError


def _quantize_parser() -> ArgumentParser:
    p = new_parser("Write a model dir with int8 or int4 weights that load, generate and serve run.")
    p.add_argument("model", help="a model dir, a built-in name (fmforge models) or a .gguf file")
    p.add_argument("--bits", type=int, required=True, help="8 or 4 (scale and min per 32 weights)")
    p.add_argument(
        "--per-channel",
        action="store_true",
        help="int8 only: one scale and minimum per output row instead of per 32 inputs",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


@command("quantize", _quantize_parser)
def _quantize(args: Namespace) -> None:
    if args.bits not in (8, 4):
        raise UserError(f"--bits {args.bits}: use 8 or 4")
    if args.per_channel and args.bits != 8:
        raise UserError("--per-channel applies to --bits 8; int4 is quantised in groups of 32")
    from fmforge.artifacts import check_output_dir

    check_output_dir(args.out, args.overwrite)  # refuse before a slow load
    from fmforge.model.load import load_bundle
    from fmforge.model.quantize import quantize_model, quantized_bytes

    loaded = load_bundle(args.model, kind="decoder")
    before = quantized_bytes(loaded.model)
    quantize_model(loaded.model, args.bits, group_size=0 if args.per_channel else 32)
    path = loaded.save(args.out, overwrite=args.overwrite)
    after = quantized_bytes(loaded.model)
    print(
        f"wrote {path}: int{args.bits} weights, {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB in "
        "memory; fmforge load/generate/serve run it directly"
    )

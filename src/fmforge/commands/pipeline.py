"""Pipeline commands: quickstart, tokenizer train, data prepare, pretrain, models, env."""

from __future__ import annotations

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from fmforge.commands import command, new_parser, print_json

# ---------------------------------------------------------------------------------------------
# Parsers. One function per top-level command; nested commands get a subparser each.
# ---------------------------------------------------------------------------------------------


def _quickstart_parser() -> ArgumentParser:
    p = new_parser("Whole pretraining path on the built-in stdlib corpus, minutes on a CPU.")
    p.add_argument("--out", default="runs/quickstart", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--max-steps", type=int, default=None, help="override the training steps")
    p.add_argument("--preset", default="small", help="model preset (tiny for a smoke test)")
    p.add_argument("--corpus", default="stdlib", help="built-in corpus name or a path")
    return p


def _tokenizer_train_parser() -> ArgumentParser:
    train = new_parser("Train a tokenizer (byte-level BPE, or WordPiece for encoders) on files.")
    train.add_argument("inputs", nargs="+", help="built-in corpus names or files/directories")
    train.add_argument("--vocab-size", type=int, default=4096)
    train.add_argument("--kind", default="bpe", help="bpe (decoders) or wordpiece (BERT encoders)")
    train.add_argument("--out", required=True)
    train.add_argument("--overwrite", action="store_true")
    train.add_argument("--max-skip-fraction", type=float, default=0.05)
    return train


def _data_prepare_parser() -> ArgumentParser:
    prepare = new_parser("Tokenise documents into packed token shards with a train/val split.")
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

    p = new_parser("Pretrain a decoder (next-token) or an encoder (--objective mlm|contrastive).")
    p.add_argument("--config", action=ActionConfigFile, help="a YAML config file")
    p.add_class_arguments(PretrainConfig, None, as_group=False)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", default="never", help="auto: continue from the newest checkpoint")
    p.add_argument(
        "--objective", default="causal", help="causal (decoder), mlm or contrastive (encoders)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def _models_parser() -> ArgumentParser:
    return new_parser("List built-in models and whether their packages are installed.")


def _env_parser() -> ArgumentParser:
    p = new_parser("Print versions, devices and threads.")
    p.add_argument("--short", action="store_true")
    return p


# ---------------------------------------------------------------------------------------------
# Handlers: each calls one stage function.
# ---------------------------------------------------------------------------------------------


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
        kind=args.kind,
    )
    print_json(summary)


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
    print_json({"out": args.out, "splits": splits})


@command("pretrain", _pretrain_parser)
def _pretrain(args: Namespace) -> None:
    from fmforge.config import PretrainConfig
    from fmforge.train.pretrain import pretrain

    values = {k: args[k].as_dict() for k in ("model", "data", "train", "runtime")}
    cfg = PretrainConfig.from_dict(values)
    pretrain(
        cfg, out=args.out, resume=args.resume, overwrite=args.overwrite, objective=args.objective
    )


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
        print_json(report)

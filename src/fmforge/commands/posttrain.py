"""Post-training commands: fmforge posttrain sft|reward|dpo|grpo|ppo."""

from __future__ import annotations

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from fmforge.commands import GROUPS, command, new_parser, print_json

GROUPS["posttrain"] = "Post-training: SFT, a reward model, DPO, GRPO, PPO (docs/posttrain.md)."

_DESCRIPTIONS = {
    "sft": "Instruction-tune on chat JSONL (messages or prompt/completion): assistant tokens only.",
    "reward": "Train a Bradley-Terry reward model on preference pairs (an HF sequence classifier).",
    "dpo": "Direct preference optimisation (sigmoid, cdpo, robust, hinge, ipo) on preferences.",
    "grpo": "GRPO: sample groups of completions, reward them with a function, optimise.",
    "ppo": "PPO with a value head and GAE; rewards from a function or --reward_model DIR.",
}
_DATA_HELP = {
    "sft": "JSONL with `messages` (feedback export --format sft) or prompt/completion, or "
    "chatterbot[:LANGUAGE] (the chatterbot corpus)",
    "reward": "JSONL with prompt, chosen, rejected (fmforge feedback export --format dpo)",
    "dpo": "JSONL with prompt, chosen, rejected (fmforge feedback export --format dpo)",
    "grpo": "JSONL with prompt (messages or text) and the fields --reward reads (answer)",
    "ppo": "JSONL with prompt (messages or text) and the fields --reward reads (answer)",
}


def _parser(recipe: str):
    def build() -> ArgumentParser:
        from fmforge.posttrain.options import PosttrainOptions

        p = new_parser(_DESCRIPTIONS[recipe])
        p.add_argument("--config", action=ActionConfigFile, help="a YAML file of the options")
        p.add_argument("--base", required=True, help="a model dir or built-in name to start from")
        p.add_argument("--data", required=True, help=_DATA_HELP[recipe])
        p.add_argument("--out", required=True, help="run directory (final/ holds the model)")
        p.add_argument("--lora", action="store_true", help="train LoRA adapters (PEFT layout)")
        p.add_class_arguments(PosttrainOptions, None, as_group=False, skip={"lora"})
        p.add_argument(
            "--resume", default="never", help="auto: continue from the newest checkpoint"
        )
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
        return p

    return build


def _run(recipe: str):
    def handler(args: Namespace) -> None:
        import dataclasses

        from fmforge.posttrain.options import PosttrainOptions
        from fmforge.posttrain.run import posttrain

        names = [f.name for f in dataclasses.fields(PosttrainOptions) if f.name != "lora"]
        options = PosttrainOptions(lora=args.lora, **{n: getattr(args, n) for n in names})
        summary = posttrain(
            recipe, args.base, args.data, args.out, options, args.resume, args.overwrite
        )
        print_json(summary)

    return handler


for _recipe in ("sft", "reward", "dpo", "grpo", "ppo"):
    command(f"posttrain {_recipe}", _parser(_recipe))(_run(_recipe))


def _experiment_rl_parser() -> ArgumentParser:
    p = new_parser(
        "Compare base, SFT, best-of-n, DPO, GRPO and PPO (LoRA on SmolLM2-135M-Instruct) on a "
        "zero-shot arithmetic task with a strict answer format; --tiny: the CI version."
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--base", default="smollm2-135m-instruct", help="a model dir or built-in name")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per trained method")
    p.add_argument("--heldout", type=int, default=None, help="held-out prompts (default 500)")
    p.add_argument(
        "--methods", default="base,sft,best_of_n,dpo,grpo,ppo", help="comma-separated methods"
    )
    p.add_argument("--tiny", action="store_true", help="GRPO on a tiny model, compile reward")
    p.add_argument("--seed", type=int, default=0, help="--tiny: model and sampling seed")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


@command("experiment rl", _experiment_rl_parser)
def _experiment_rl(args: Namespace) -> None:
    from fmforge.errors import UserError
    from fmforge.experiments.rl import METHODS, run_rl, run_rl_tiny

    if args.tiny:
        result = run_rl_tiny(args.out, seed=args.seed, overwrite=args.overwrite,
                             **({"steps": args.steps} if args.steps else {}))  # fmt: skip
        print_json({k: result[k] for k in ("first_reward", "final_reward", "seconds")})
        return
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or "base" not in methods:
        raise UserError(f"--methods must include base and come from {list(METHODS)}: {unknown}")
    result = run_rl(args.out, args.base, args.steps, args.heldout, methods, args.overwrite)
    keys = [m for m in METHODS if m in result] + ["win_rate_grpo_vs_sft", "seconds"]
    print_json({k: result[k] for k in keys if k in result})

"""Experiment: a reward and reinforcement learning make zero-shot answers better.

Claim (DeepSeekMath's GRPO, Shao et al. 2024; InstructGPT, Ouyang et al. 2022): optimising a small
instruction-tuned model against a verifiable reward raises its zero-shot accuracy on the rewarded
task, and does so more than supervised fine-tuning on the same budget, at a small cost in general
chat quality.

Setup (`run_rl`), all on CPU:
1. task: "What number comes right after N? Answer with only the number." (N + 1, the shortest
   arithmetic; SmolLM2-135M-Instruct knows it often but answers in a sentence, and it is poor at
   two-digit sums: 16% lenient, 0% strict on 32 probes of A + B up to 50) for a seeded order of
   N in 1..999; every question is drawn once, so train and held-out prompts are disjoint
   (`HELDOUT` held out). The task's rule scores a completion 1 when it is exactly the number
   (strict), 0.5 when the last number in other text is the answer (lenient), else 0
   (`task_score`); it judges the head-to-head comparison (no reward model judges). The reward
   of GRPO and PPO, which also ranks DPO's samples, is the rule with its lenient credit scaled
   down by length (`answer_reward`): a bare answer is what strict accuracy needs and the base
   rarely gives one, while sentences holding the answer are common;
2. methods, each with LoRA on SmolLM2-135M-Instruct through `fmforge posttrain` (the one Trainer),
   on the same number of steps and prompts per step:
   - `base`: the model as shipped;
   - `sft`: supervised on the train prompts with the gold answer as the assistant turn;
   - `best_of_n`: N samples of the base per held-out prompt; the answer given most often wins, and
     a sample that states it alone is preferred (self-consistency: the selector never sees the
     gold answer, which would make it an oracle);
   - `dpo`: the base samples `DPO_SAMPLES` completions per train prompt, ranked by the reward;
     the best and the worst of a prompt form a pair when their rewards differ;
   - `grpo`, `ppo`: a cold start of `WARMUP_STEPS` of the same SFT, then rollouts from the
     generation engine, rewarded, for the rest of the budget;
3. evaluation on the held-out prompts, greedy: strict and lenient accuracy; KL(model || base) per
   token on the model's own greedy answers (exact over the vocabulary, not sampled); perplexity on
   the assistant turns of held-out chats (the chatterbot corpus, conversations no method trains
   on); GRPO against SFT per prompt by the rule: the win rate over prompts where they differ, with
   a Wilson 95% interval.

`run_rl_tiny` is the CI version: the quickstart's `tiny` preset (random init, a tokenizer trained
on the standard library's `json` package) rewarded by GRPO for completions that compile as Python.

Writes `results.json`, `report.md`, `accuracy.png` (or `reward.png`) and each method's run dir.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

from fmforge.artifacts import check_output_dir, write_json_atomic
from fmforge.experiments.stats import wilson_interval

BASE = "smollm2-135m-instruct"
METHODS = ("base", "sft", "best_of_n", "dpo", "grpo", "ppo")
HELDOUT = 500  # held-out prompts (acceptance: >= 200; more give the head-to-head its power)
NUMBERS = range(1, 1000)  # N of the questions
QUESTION = "What number comes right after {n}? Answer with only the number."
# One budget for every trained method (LoRA, rank 16): steps x prompts per step.
# Sized for 2 shared CPU cores, where one SmolLM2 forward+backward over 16 rollouts takes ~1 min.
TRAIN = dict(max_steps=80, batch_size=4, lr=5e-4, warmup_steps=3, rank=16, alpha=32.0)
GROUP_SIZE = 4  # grpo/ppo completions per prompt
# GRPO and PPO start with a short SFT "cold start" on gold answers (DeepSeek-R1's recipe; the SFT
# of InstructGPT's SFT -> reward -> RL): the base almost never samples a bare number, so RL from
# the base alone finds no reward for the strict format to reinforce. These steps come out of the
# method's budget: WARMUP_STEPS of SFT + (steps - WARMUP_STEPS) of RL = the same steps as SFT alone.
WARMUP_STEPS = 10
# SFT rows of 96 tokens hold one ~50-token example each: 4 rows are the 4 prompts of a GRPO step.
SFT_SEQ_LEN = 96
# Rollouts and evaluation: "The number that comes after 865 is 866." needs ~13 tokens (lenient).
MAX_NEW_TOKENS = 16
EVAL_NEW_TOKENS = 16
TEMPERATURE = 0.7  # rollouts and samples (at 1.0 the base's samples are mostly off-topic)
BEST_OF_N = 4
DPO_SAMPLES = 4
CHAT_CONVERSATIONS = 50  # held-out chatterbot conversations for perplexity
EVAL_BATCH = 50  # prompts per batched greedy generation


def _say(message: str) -> None:
    print(f"[rl] {message}", file=sys.stderr, flush=True)


# --- the task -----------------------------------------------------------------------------------


def arithmetic_task(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list, list]:
    """Return (train, held-out) records {prompt: [user message], answer: "N+1"}, disjoint."""
    numbers = list(NUMBERS)
    random.Random(seed).shuffle(numbers)
    if n_train + n_heldout > len(numbers):
        from fmforge.errors import ConfigError

        raise ConfigError(f"the task has {len(numbers)} questions, {n_train + n_heldout} asked for")
    records = [
        {"prompt": [{"role": "user", "content": QUESTION.format(n=n)}], "answer": str(n + 1)}
        for n in numbers[: n_train + n_heldout]
    ]
    return records[n_heldout:], records[:n_heldout]


def task_score(completion: str, record: dict[str, Any]) -> float:
    """The task's rule: 1 for exactly the number, 0.5 when the last number in other text is the
    answer, else 0.

    The last number, not any occurrence: with "appears as a whole word" GRPO learned to answer
    "After 441 is 442." to "What number comes right after 440?" (lenient 0.995, strict 0).
    """
    import re

    from fmforge.posttrain.rl import exact_answer

    if exact_answer(completion, record):
        return 1.0
    numbers = re.findall(r"\d+", completion)
    return 0.5 if numbers and numbers[-1] == str(record["answer"]).strip() else 0.0


def answer_reward(completion: str, record: dict[str, Any]) -> float:
    """The RL reward: the task's rule, with the lenient credit scaled by brevity (0.5 for the
    answer alone with a stray character, falling to 0 at 50 characters), so that among answers
    holding the number the shorter ones, closer to the strict format, are preferred."""
    score = task_score(completion, record)
    if score == 0.5:
        return 0.5 * max(0.0, 1.0 - len(completion.strip()) / 50)
    return score


# --- evaluation ---------------------------------------------------------------------------------


def _generate(model, tokenizer, template, records, temperature=0.0, samples=1, seed=0,
              max_new_tokens=EVAL_NEW_TOKENS):  # fmt: skip
    """Return the completions (texts) and token lists of every record, `samples` each, batched."""
    from fmforge.generate.engine import generate_tokens
    from fmforge.generate.sampling import SamplingParams

    prompts = [template.render(tokenizer, r["prompt"]) for r in records for _ in range(samples)]
    stop = tuple(template.stop_ids(tokenizer))
    tokens = []
    for start in range(0, len(prompts), EVAL_BATCH):
        chunk = prompts[start : start + EVAL_BATCH]
        params = SamplingParams(temperature=temperature)
        gens = generate_tokens(model, chunk, max_new_tokens, params, stop, seed=seed + start)
        tokens += [g.tokens + (list(stop[:1]) if g.finish_reason == "stop" else []) for g in gens]
    texts = [tokenizer.decode([t for t in ids if t not in stop]) for ids in tokens]
    return prompts, tokens, texts


def kl_to_base(model, base, prompts, completions, pad_id: int) -> float:
    """Return the mean per-token KL(model || base) over the completion tokens (exact sums over the
    vocabulary at each position of the model's own completions)."""
    import torch
    import torch.nn.functional as F

    from fmforge.posttrain.sequences import IGNORE_INDEX, pad_sequences

    total, count = 0.0, 0
    rows = [(p + c, [IGNORE_INDEX] * len(p) + c) for p, c in zip(prompts, completions) if c]
    with torch.no_grad():
        for start in range(0, len(rows), 16):
            batch = pad_sequences(rows[start : start + 16], pad_id)
            scored = batch["target_ids"] != IGNORE_INDEX  # (B, T)
            logp = F.log_softmax(model(batch["input_ids"]).float(), dim=-1)  # (B, T, V)
            logq = F.log_softmax(base(batch["input_ids"]).float(), dim=-1)
            kl = (logp.exp() * (logp - logq)).sum(-1)  # (B, T)
            total += float(kl[scored].sum())
            count += int(scored.sum())
    return total / max(count, 1)


def chat_perplexity(model, examples, pad_id: int) -> float:
    """Return exp(mean NLL) of the assistant tokens of chat examples ((ids, targets) pairs)."""
    import torch

    from fmforge.posttrain.sequences import pad_sequences, token_logprobs

    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), 16):
            batch = pad_sequences(examples[start : start + 16], pad_id)
            logp = token_logprobs(model(batch["input_ids"]), batch["target_ids"])
            nll -= float(logp.sum())
            count += int((batch["target_ids"] >= 0).sum())
    return math.exp(nll / max(count, 1))


def heldout_chats(tokenizer, template) -> list:
    """Return the encoded held-out chat examples (the first chatterbot conversations in order)."""
    from fmforge.posttrain.sft import encode_sft_record, sft_records

    records = [record for _, record in sft_records("chatterbot")][:CHAT_CONVERSATIONS]
    return [encode_sft_record(tokenizer, template, r) for r in records]


def _best_of_n(texts: list[str], n: int) -> list[str]:
    """Pick one completion per prompt from n samples each: the most frequent number wins (ties:
    the earliest); a sample that is only that number is preferred."""
    import re
    from collections import Counter

    picked = []
    for start in range(0, len(texts), n):
        group = texts[start : start + n]
        numbers = [re.findall(r"-?\d+", t) for t in group]
        votes = Counter(ns[-1] for ns in numbers if ns)
        if not votes:
            picked.append(group[0])
            continue
        best = max(votes, key=lambda k: (votes[k], -min(i for i, ns in enumerate(numbers)
                                                           if ns and ns[-1] == k)))  # fmt: skip
        alone = [t for t in group if t.strip() == best]
        picked.append(alone[0] if alone else next(t for t, ns in zip(group, numbers)
                                                  if ns and ns[-1] == best))  # fmt: skip
    return picked


# --- the experiment -----------------------------------------------------------------------------


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _options(**overrides: Any) -> Any:
    from fmforge.posttrain.options import PosttrainOptions

    values = dict(TRAIN, lora=True, checkpoint_every=0, log_every=5, seed=0, seq_len=256)
    values.update(overrides)
    return PosttrainOptions(**values)


def run_rl(
    out: str = "runs/experiment-rl",
    base: str = BASE,
    steps: int | None = None,
    heldout: int | None = None,
    methods: tuple[str, ...] = METHODS,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Compare base, SFT, best-of-n, DPO, GRPO and PPO on the arithmetic task; write and return
    results.json."""
    import torch

    from fmforge.model.load import load_bundle, load_model_dir
    from fmforge.posttrain.run import posttrain
    from fmforge.posttrain.sequences import chat_template_of, pad_id_of

    out_dir = check_output_dir(out, overwrite)
    started = time.perf_counter()
    steps = steps or TRAIN["max_steps"]
    heldout = heldout or HELDOUT
    n_train = steps * TRAIN["batch_size"]
    train, held = arithmetic_task(n_train, heldout)
    data = out_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    _write_jsonl(data / "heldout.jsonl", held)
    prompts_file = _write_jsonl(data / "train_prompts.jsonl", train)
    bundle = load_bundle(base, kind="decoder")
    tokenizer, base_model = bundle.tokenizer, bundle.model.eval()
    template, pad_id = chat_template_of(tokenizer), pad_id_of(tokenizer)
    chats = heldout_chats(tokenizer, template)
    results: dict[str, Any] = {"heldout_prompts": len(held), "train_prompts": len(train)}
    answers: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}
    reward = "fmforge.experiments.rl:answer_reward"

    def evaluate(name: str, model: Any, texts: list[str] | None = None) -> None:
        tick = time.perf_counter()
        prompts, tokens, greedy = _generate(model, tokenizer, template, held)
        texts = greedy if texts is None else texts
        scores = [task_score(t, r) for t, r in zip(texts, held)]
        results[name] = {
            "strict_accuracy": sum(s == 1.0 for s in scores) / len(held),
            "lenient_accuracy": sum(s > 0 for s in scores) / len(held),
            "kl_to_base": 0.0
            if model is base_model
            else kl_to_base(model, base_model, prompts, tokens, pad_id),
            "chat_perplexity": results["base"]["chat_perplexity"]
            if model is base_model and "base" in results
            else chat_perplexity(model, chats, pad_id),
            "train_seconds": round(seconds.get(name, 0.0), 1),
            "samples": [
                {"prompt": r["prompt"][0]["content"], "answer": r["answer"], "completion": t}
                for r, t in zip(held[:5], texts[:5])
            ],  # fmt: skip
        }
        answers[name] = texts
        row = results[name]
        _say(
            f"{name}: strict {row['strict_accuracy']:.3f} lenient {row['lenient_accuracy']:.3f} "
            f"kl {row['kl_to_base']:.4f} chat ppl {row['chat_perplexity']:.2f} "
            f"({time.perf_counter() - tick:.0f} s to evaluate)"
        )

    def trained(name: str, recipe: str, data_file: Path, extra: float = 0.0, warmup: int = 0,
                **overrides) -> None:  # fmt: skip
        tick = time.perf_counter() - extra  # extra: seconds spent making the data (DPO samples)
        start = base
        if warmup:  # the cold start: SFT on the first train prompts' gold answers
            _say(f"{name}: {warmup} steps of SFT with LoRA (cold start)")
            opts = _options(max_steps=warmup, seq_len=SFT_SEQ_LEN)
            posttrain("sft", base, sft_file, out_dir / f"{name}_warmup", opts, overwrite=True,
                      progress=False)  # fmt: skip
            start = out_dir / f"{name}_warmup" / "final"
        _say(f"{name}: {recipe} with LoRA, {steps - warmup} steps")
        opts = _options(max_steps=steps - warmup, **overrides)
        posttrain(recipe, start, data_file, out_dir / name, opts, overwrite=True, progress=False)
        seconds[name] = time.perf_counter() - tick
        _say(f"{name}: trained in {seconds[name]:.0f} s")
        model = load_model_dir(out_dir / name).model.eval()
        evaluate(name, model)

    torch.manual_seed(0)
    evaluate("base", base_model)
    sft = [{"messages": r["prompt"] + [{"role": "assistant", "content": r["answer"]}]}
           for r in train]  # fmt: skip
    sft_file = _write_jsonl(data / "sft.jsonl", sft)
    if "sft" in methods:
        trained("sft", "sft", sft_file, seq_len=SFT_SEQ_LEN)
    if "best_of_n" in methods:
        tick = time.perf_counter()
        _, _, samples = _generate(
            base_model, tokenizer, template, held, TEMPERATURE, BEST_OF_N, seed=1
        )
        seconds["best_of_n"] = time.perf_counter() - tick
        evaluate("best_of_n", base_model, _best_of_n(samples, BEST_OF_N))
        results["best_of_n"]["kl_to_base"] = None  # the base's own samples: no new model
        results["best_of_n"]["n"] = BEST_OF_N
    if "dpo" in methods:
        tick = time.perf_counter()
        _, _, samples = _generate(
            base_model, tokenizer, template, train, TEMPERATURE, DPO_SAMPLES, 2, MAX_NEW_TOKENS
        )
        pairs = []
        for i, record in enumerate(train):
            group = samples[i * DPO_SAMPLES : (i + 1) * DPO_SAMPLES]
            ranked = sorted(group, key=lambda t: -answer_reward(t, record))
            if answer_reward(ranked[0], record) > answer_reward(ranked[-1], record):
                chosen, rejected = ranked[0], ranked[-1]
                pairs.append(
                    {
                        "prompt": record["prompt"],
                        "chosen": [{"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "assistant", "content": rejected}],
                    }
                )
        results["dpo_pairs"] = len(pairs)
        if pairs:
            dpo_file = _write_jsonl(data / "dpo.jsonl", pairs)
            trained("dpo", "dpo", dpo_file, time.perf_counter() - tick, heldout_fraction=0.0)
        else:
            results["dpo"] = {"skipped": "no sampled pair differed under the rule"}
    rl = dict(reward=reward, group_size=GROUP_SIZE, max_new_tokens=MAX_NEW_TOKENS,
              temperature=TEMPERATURE)  # fmt: skip
    for name in ("grpo", "ppo"):
        if name in methods:
            trained(name, name, prompts_file, warmup=min(WARMUP_STEPS, steps - 1), **rl)
            metrics = [json.loads(line) for line in (out_dir / name / "metrics.jsonl").open()]
            results[name]["reward_curve"] = [
                [m["step"], m["reward"]] for m in metrics if "reward" in m
            ]
    if "grpo" in answers and "sft" in answers:
        results.update(head_to_head(answers["grpo"], answers["sft"], held))
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["config"] = {"base": str(base), "steps": steps, "group_size": GROUP_SIZE,
                         "max_new_tokens": MAX_NEW_TOKENS, "best_of_n": BEST_OF_N,
                         "dpo_samples": DPO_SAMPLES, **TRAIN}  # fmt: skip
    write_json_atomic(out_dir / "results.json", results)
    _plot_accuracy(results, out_dir / "accuracy.png")
    _write_report(out_dir, results)
    return results


def head_to_head(a: list[str], b: list[str], records: list[dict]) -> dict[str, Any]:
    """Return the win rate of answers `a` over `b` judged by the task's rule over the prompts
    where they score differently, with its Wilson 95% interval and the tie count."""
    wins = sum(task_score(x, r) > task_score(y, r) for x, y, r in zip(a, b, records))
    losses = sum(task_score(x, r) < task_score(y, r) for x, y, r in zip(a, b, records))
    low, high = wilson_interval(wins, wins + losses)
    return {
        "win_rate_grpo_vs_sft": wins / (wins + losses) if wins + losses else 0.5,
        "win_rate_ci_low": low,
        "win_rate_ci_high": high,
        "head_to_head": {"wins": wins, "losses": losses, "ties": len(records) - wins - losses},
    }


def _plot_accuracy(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in METHODS if isinstance(results.get(m), dict) and "strict_accuracy" in
             results[m]]  # fmt: skip
    fig, (ax, curve) = plt.subplots(1, 2, figsize=(10, 3.6))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [results[m]["strict_accuracy"] for m in names], 0.4,
           label="strict")  # fmt: skip
    ax.bar([i + 0.2 for i in x], [results[m]["lenient_accuracy"] for m in names], 0.4,
           label="lenient")  # fmt: skip
    ax.set_xticks(list(x), names)
    ax.set_ylabel(f"held-out accuracy ({results['heldout_prompts']} prompts, greedy)")
    ax.set_ylim(0, 1)
    ax.legend()
    for name in ("grpo", "ppo"):
        points = results.get(name, {}).get("reward_curve", [])
        if points:
            curve.plot(*zip(*points), "o-", markersize=3, label=name)
    curve.set_xlabel("step")
    curve.set_ylabel("mean rollout reward")
    curve.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_report(out_dir: Path, results: dict[str, Any]) -> None:
    base = results["base"]
    lines = [
        "# Experiment: reward + RL on a zero-shot arithmetic question",
        "",
        f"Base `{results['config']['base']}`, LoRA, {results['config']['steps']} steps of "
        f"{results['config']['batch_size']} prompts for every trained method; "
        f"{results['heldout_prompts']} held-out prompts, greedy. Total {results['seconds']} s.",
        "",
        "![accuracy and reward](accuracy.png)",
        "",
        "| method | strict | lenient | KL to base (per token) | chat perplexity | train s |",
        "|---|---|---|---|---|---|",
    ]
    for name in METHODS:
        row = results.get(name)
        if not isinstance(row, dict) or "strict_accuracy" not in row:
            continue
        kl = "" if row["kl_to_base"] is None else f"{row['kl_to_base']:.4f}"
        lines.append(
            f"| {name} | {row['strict_accuracy']:.3f} | {row['lenient_accuracy']:.3f} | {kl} | "
            f"{row['chat_perplexity']:.2f} | {row['train_seconds']} |"
        )
    if "win_rate_grpo_vs_sft" in results:
        h = results["head_to_head"]
        lines += [
            "",
            f"GRPO vs SFT by the task's rule: {h['wins']} wins, {h['losses']} losses, "
            f"{h['ties']} ties; win rate {results['win_rate_grpo_vs_sft']:.3f} "
            f"(95% interval {results['win_rate_ci_low']:.3f}-{results['win_rate_ci_high']:.3f}).",
        ]
    if isinstance(results.get("grpo"), dict) and "strict_accuracy" in results["grpo"]:
        gain = results["grpo"]["strict_accuracy"] - base["strict_accuracy"]
        ppl = results["grpo"]["chat_perplexity"] / base["chat_perplexity"] - 1
        lines += [
            "",
            f"GRPO: strict accuracy {100 * gain:+.1f} points over the base; chat perplexity "
            f"{100 * ppl:+.1f}%.",
        ]
    lines += ["", "## Samples", ""]
    for name in METHODS:
        for s in results.get(name, {}).get("samples", [])[:3]:
            lines.append(f"- {name}: {s['prompt']!r} -> {s['completion']!r} (answer {s['answer']})")
    (out_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


# --- the CI version -----------------------------------------------------------------------------

TINY_STEPS = 25
TINY_FUNCTIONS = ("area", "total", "scale", "parse", "merge", "count", "value", "first")


def run_rl_tiny(
    out: str = "runs/experiment-rl-tiny", seed: int = 0, steps: int = TINY_STEPS,
    overwrite: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """GRPO on the quickstart's `tiny` preset (random init) rewarded for completions that compile;
    write and return results.json with the reward curve."""
    import sysconfig

    import torch

    from fmforge.model.config import preset_config
    from fmforge.model.llama import LlamaForCausalLM
    from fmforge.model.load import save_model_dir
    from fmforge.posttrain.run import posttrain
    from fmforge.tokenizer import Tokenizer, train_from_inputs

    out_dir = check_output_dir(out, overwrite)
    started = time.perf_counter()
    package = Path(sysconfig.get_paths()["stdlib"]) / "json"
    train_from_inputs(
        [str(p) for p in sorted(package.glob("*.py"))], 512, str(out_dir / "tokenizer"), True
    )
    tokenizer = Tokenizer.load(out_dir / "tokenizer")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(preset_config("tiny", vocab_size=tokenizer.vocab_size))
    save_model_dir(model, tokenizer, out_dir / "base", overwrite=True)
    prompts = [{"prompt": f"def {name}(x, y):\n    return"} for name in TINY_FUNCTIONS]
    data = _write_jsonl(out_dir / "prompts.jsonl", prompts)
    opts = _options(
        lora=False, max_steps=steps, batch_size=4, lr=1e-2, warmup_steps=0, log_every=1,
        reward="compiles", group_size=8, max_new_tokens=4, kl_coef=0.0, seed=seed, seq_len=64,
    )  # fmt: skip
    summary = posttrain(
        "grpo", out_dir / "base", data, out_dir / "grpo", opts, overwrite=True, progress=False
    )
    metrics = [json.loads(line) for line in (out_dir / "grpo" / "metrics.jsonl").open()]
    curve = [m["reward"] for m in metrics if "reward" in m]
    results = {
        "reward_curve": curve,
        "final_reward": sum(curve[-3:]) / len(curve[-3:]),
        "first_reward": curve[0],
        "samples": summary["sample_outputs"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(out_dir / "results.json", results)
    return results

"""`fmforge experiment rl`: the task and its rule, the win-rate interval, and the CI version (GRPO
on a tiny random-init model rewarded for code that compiles)."""

from __future__ import annotations

import pytest

from fmforge.experiments.rl import (
    arithmetic_task,
    head_to_head,
    run_rl_tiny,
    task_score,
)
from fmforge.experiments.stats import wilson_interval


def test_train_and_heldout_prompts_are_disjoint_and_seeded():
    train, held = arithmetic_task(300, 200, seed=0)
    assert len(train) == 300 and len(held) == 200
    questions = [r["prompt"][0]["content"] for r in train + held]
    assert len(set(questions)) == 500
    again, _ = arithmetic_task(300, 200, seed=0)
    assert again == train
    n = int(held[0]["prompt"][0]["content"].split("?")[0].split()[-1])
    assert held[0]["answer"] == str(n + 1)


def test_task_rule_strict_lenient_wrong():
    record = {"answer": "42"}
    assert task_score(" 42\n", record) == 1.0
    assert task_score("The answer is 42.", record) == 0.5
    assert task_score("The answer is 142.", record) == 0.0
    assert task_score("4.2", record) == 0.0
    # GRPO's hack under an "appears anywhere" rule: mention the answer, end on another number.
    assert task_score("After 42 is 43.", record) == 0.0


def test_wilson_interval_golden_values():
    low, high = wilson_interval(60, 100)  # textbook: 0.502 - 0.691
    assert low == pytest.approx(0.5020, abs=1e-4) and high == pytest.approx(0.6906, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_head_to_head_counts_only_prompts_that_differ():
    records = [{"answer": str(i)} for i in range(4)]
    a = ["0", "1", "x", "3 apples"]
    b = ["0", "one", "2", "3"]
    result = head_to_head(a, b, records)
    assert result["head_to_head"] == {"wins": 1, "losses": 2, "ties": 1}
    assert result["win_rate_grpo_vs_sft"] == pytest.approx(1 / 3)


def test_tiny_grpo_learns_to_compile_and_repeats_exactly(tmp_path):
    """The CI version of `experiment rl`: reward >= 0.8 at the end, from a low start, and a second
    run with the same seed gives the identical reward curve."""
    first = run_rl_tiny(tmp_path / "a", seed=0)
    assert first["first_reward"] < 0.5
    assert first["final_reward"] >= 0.8
    second = run_rl_tiny(tmp_path / "b", seed=0)
    assert second["reward_curve"] == first["reward_curve"]


@pytest.mark.slow
def test_the_comparison_runs_end_to_end_on_a_tiny_base(tokenizer_dir, tmp_path, capsys):
    """Every method trains and is evaluated; results.json has the issue's keys (a tiny random
    base, 2 steps: the plumbing, not the claim)."""
    import json

    from fmforge.cli import main
    from fmforge.model.load import save_model_dir
    from fmforge.tokenizer import Tokenizer
    from posttrain_data import tiny_lm

    tok = Tokenizer.load(tokenizer_dir)
    base = tmp_path / "base"
    save_model_dir(tiny_lm(tok.vocab_size), tok, base)
    out = tmp_path / "rl"
    code = main(["experiment", "rl", "--out", str(out), "--base", str(base), "--steps", "2",
                 "--heldout", "6"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    keys = {"strict_accuracy", "lenient_accuracy", "kl_to_base", "chat_perplexity"}
    for method in ("base", "sft", "best_of_n", "grpo", "ppo"):
        assert keys <= set(results[method]), method
    assert "dpo" in results
    assert results["base"]["kl_to_base"] == 0.0
    assert results["sft"]["kl_to_base"] > 0.0
    assert results["heldout_prompts"] == 6
    for name in ("grpo", "ppo"):  # RL starts from its SFT cold start, not from the base
        assert (out / f"{name}_warmup" / "final" / "config.json").is_file()
        assert json.loads((out / name / "summary.json").read_text())["base"].endswith("final")
    assert {"win_rate_grpo_vs_sft", "win_rate_ci_low", "win_rate_ci_high"} <= set(results)
    assert (out / "accuracy.png").stat().st_size > 0
    assert "| grpo |" in (out / "report.md").read_text()


def test_rl_reward_prefers_shorter_answers_that_hold_the_number():
    from fmforge.experiments.rl import answer_reward

    record = {"answer": "866"}
    assert answer_reward("866", record) == 1.0
    short, long = (
        answer_reward("866.", record),
        answer_reward("The number after 865 is 866.", record),
    )
    assert short == pytest.approx(0.5 * (1 - 4 / 50)) and long == pytest.approx(0.5 * (1 - 28 / 50))
    assert answer_reward("867", record) == 0.0


def test_cli_tiny_and_bad_methods(tmp_path, capsys):
    import json

    from fmforge.cli import main

    code = main(["experiment", "rl", "--tiny", "--steps", "2", "--out", str(tmp_path / "t")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    printed = json.loads(captured.out)
    assert set(printed) == {"first_reward", "final_reward", "seconds"}
    results = json.loads((tmp_path / "t" / "results.json").read_text())
    assert len(results["reward_curve"]) == 2
    code = main(["experiment", "rl", "--out", str(tmp_path / "o"), "--methods", "base,rlhf"])
    assert code == 2 and "--methods" in capsys.readouterr().err

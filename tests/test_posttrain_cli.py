"""`fmforge posttrain`: sft, reward and dpo end to end on a tiny base; resume; bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from cli_support import assert_one_line_error, cli
from fmforge.model.load import load_model_dir, save_model_dir
from fmforge.tokenizer import Tokenizer
from polling import wait_until
from posttrain_data import arithmetic_records, tiny_lm, write_jsonl

FAST = ["--max_steps", "4", "--batch_size", "2", "--checkpoint_every", "2", "--log_every", "1"]


@pytest.fixture(scope="module")
def base_dir(tokenizer_dir, tmp_path_factory):
    """A tiny decoder with fmforge's own tokenizer (ChatML tokens, no Jinja template)."""
    tok = Tokenizer.load(tokenizer_dir)
    out = tmp_path_factory.mktemp("base") / "model"
    save_model_dir(tiny_lm(tok.vocab_size), tok, out)
    return out


def test_sft_writes_a_model_dir_that_loads(base_dir, tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    records = [
        {"messages": r["prompt"] + r["chosen"]} for r in arithmetic_records(6)
    ]  # the layout of `fmforge feedback export --format sft`
    write_jsonl(data, records)
    code, out, err = cli(
        capsys, "posttrain", "sft", "--base", base_dir, "--data", data, "--out", tmp_path / "r",
        "--seq_len", "128", *FAST,
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    assert summary["steps"] == 4 and summary["examples"] == 6
    bundle = load_model_dir(tmp_path / "r")
    assert bundle.tokenizer is not None
    assert "plots/curves.png" in (tmp_path / "r" / "report.md").read_text()
    assert (tmp_path / "r" / "plots" / "curves.png").stat().st_size > 0


def test_dpo_with_lora_resumes_with_identical_losses(base_dir, tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    write_jsonl(data, arithmetic_records(12))
    run = tmp_path / "dpo"
    args = ["posttrain", "dpo", "--base", base_dir, "--data", data, "--out", run, "--lora"]
    code, out, err = cli(capsys, *args, *FAST)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["pairs"] == 11 and summary["heldout_pairs"] == 1
    assert (run / "adapter" / "adapter_config.json").is_file()
    first = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert first[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)  # policy == reference
    # A run killed after step 2: its newest checkpoint and outputs are gone.
    shutil.rmtree(run / "checkpoints" / "step-4")
    shutil.rmtree(run / "final")
    code, out, err = cli(capsys, *args, *FAST, "--resume", "auto")
    assert code == 0, err
    assert "resumed from" in err
    again = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in again] == [r["loss"] for r in first]
    assert load_model_dir(run).tokenizer is not None


def test_reward_writes_a_sequence_classifier(base_dir, tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    write_jsonl(data, arithmetic_records(4))
    code, out, err = cli(
        capsys, "posttrain", "reward", "--base", base_dir, "--data", data, "--out",
        tmp_path / "rm", *FAST,
    )  # fmt: skip
    assert code == 0, err
    config = json.loads((tmp_path / "rm" / "final" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert list(config["id2label"]) == ["0"]


def test_missing_field_in_a_preference_file(base_dir, tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    records = arithmetic_records(3)
    del records[2]["chosen"]
    write_jsonl(data, records)
    code, _, err = cli(
        capsys, "posttrain", "dpo", "--base", base_dir, "--data", data, "--out", tmp_path / "o"
    )
    assert_one_line_error(code, err, "prefs.jsonl:3: missing field 'chosen'")


@pytest.mark.parametrize("recipe", ["dpo", "reward", "grpo", "sft"])
def test_errors_name_the_real_line_after_blank_lines(recipe, base_dir, tmp_path, capsys):
    """Blank lines are skipped but still counted: the bad record on line 5 is reported as :5."""
    good, bad = arithmetic_records(2)
    if recipe == "grpo":
        good, bad = {"prompt": good["prompt"]}, {"prompt": 7}
        needle = "data.jsonl:5: prompt must be a string or a list of messages"
    elif recipe == "sft":
        good = {"messages": good["prompt"] + good["chosen"]}
        bad = {"messages": bad["prompt"] + [{"role": "assistant", "content": ""}]}
        needle = "data.jsonl:5: messages[1] is an empty assistant turn"
    else:
        del bad["rejected"]
        needle = "data.jsonl:5:"
    data = tmp_path / "data.jsonl"
    data.write_text(f"\n{json.dumps(good)}\n\n  \n{json.dumps(bad)}\n", encoding="utf-8")
    code, _, err = cli(
        capsys, "posttrain", recipe, "--base", base_dir, "--data", data, "--out", tmp_path / "o"
    )
    assert_one_line_error(code, err, needle)


def test_empty_assistant_turn(base_dir, tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    write_jsonl(data, [{"messages": chat}])
    code, _, err = cli(
        capsys, "posttrain", "sft", "--base", base_dir, "--data", data, "--out", tmp_path / "o"
    )
    assert_one_line_error(code, err, "sft.jsonl:1: messages[1] is an empty assistant turn")


def test_base_without_a_chat_template(tmp_path, capsys):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=270, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    hf.train_from_iterator(["plain text without chat tokens"] * 10, trainer=trainer)
    tok = Tokenizer(hf)
    base = tmp_path / "plain"
    save_model_dir(tiny_lm(tok.vocab_size), tok, base)
    data = tmp_path / "sft.jsonl"
    write_jsonl(data, [{"messages": arithmetic_records(1)[0]["prompt"]}])
    code, _, err = cli(
        capsys, "posttrain", "sft", "--base", base, "--data", data, "--out", tmp_path / "o"
    )
    assert_one_line_error(code, err, "no <|im_start|> / <|im_end|> tokens")


def test_grpo_with_a_compile_reward(base_dir, tmp_path, capsys):
    data = tmp_path / "code.jsonl"
    write_jsonl(data, [{"prompt": f"def f_{i}(x):\n    return"} for i in range(4)])
    code, out, err = cli(
        capsys, "posttrain", "grpo", "--base", base_dir, "--data", data, "--out", tmp_path / "g",
        "--reward", "compiles", "--group_size", "3", "--max_new_tokens", "4", *FAST,
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    assert summary["steps"] == 4 and summary["prompts"] == 4
    assert summary["sample_outputs"]
    records = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").open()]
    assert {"reward", "kl", "zero_variance_groups", "reward_errors"} <= set(records[-1])
    assert records[0]["kl"] == 0.0


def test_grpo_unknown_reward(base_dir, tmp_path, capsys):
    data = tmp_path / "code.jsonl"
    write_jsonl(data, [{"prompt": "def f(x):"}])
    code, _, err = cli(
        capsys, "posttrain", "grpo", "--base", base_dir, "--data", data, "--out", tmp_path / "g",
        "--reward", "no_such_reward",
    )  # fmt: skip
    assert_one_line_error(code, err, "--reward 'no_such_reward'")


def _kill_and_resume(command, run, kill_after, env=None):
    """Run `command` (a run dir at `run`), SIGKILL it once checkpoints/step-`kill_after` exists,
    then finish it with --resume auto."""
    import os
    import signal
    import subprocess

    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    wait_until(
        lambda: (run / "checkpoints" / f"step-{kill_after}").is_dir() or process.poll() is not None,
        300,
    )
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run / "final").exists(), "the run finished before it could be killed"
    subprocess.run([*command, "--resume", "auto"], check=True, capture_output=True, env=env)


def _metric(run, key):
    return [json.loads(line)[key] for line in (run / "metrics.jsonl").open()]


@pytest.mark.slow
def test_dpo_killed_with_sigkill_resumes_with_identical_losses(base_dir, tmp_path):
    """A real SIGKILL of the command, then --resume auto: the losses equal an uninterrupted run."""
    import subprocess
    import sys

    data = tmp_path / "prefs.jsonl"
    write_jsonl(data, arithmetic_records(12))
    steps = ["--max_steps", "8", "--batch_size", "2", "--checkpoint_every", "2", "--log_every", "1"]

    def command(out):
        return [
            sys.executable, "-m", "fmforge.cli", "posttrain", "dpo", "--base", str(base_dir),
            "--data", str(data), "--out", str(out), *steps,
        ]  # fmt: skip

    subprocess.run(command(tmp_path / "whole"), check=True, capture_output=True)
    _kill_and_resume(command(tmp_path / "killed"), tmp_path / "killed", 4)
    assert _metric(tmp_path / "killed", "loss") == _metric(tmp_path / "whole", "loss")
    assert len(_metric(tmp_path / "killed", "loss")) == 8


@pytest.mark.slow
def test_grpo_killed_with_sigkill_resumes_with_identical_losses(base_dir, tmp_path):
    """GRPO with LoRA, SIGKILLed mid-run and resumed: the rollouts (sampled with the step's seed),
    rewards, KL and losses equal an uninterrupted run's."""
    import os
    import subprocess
    import sys

    (tmp_path / "length_reward.py").write_text(
        "def reward(text, record):\n    return float(len(text) % 5)\n", encoding="utf-8"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    data = tmp_path / "prompts.jsonl"
    write_jsonl(data, [{"prompt": r["prompt"]} for r in arithmetic_records(6)])

    def command(out):
        return [
            sys.executable, "-m", "fmforge.cli", "posttrain", "grpo", "--base", str(base_dir),
            "--data", str(data), "--out", str(out), "--lora", "--reward", "length_reward:reward",
            "--group_size", "4", "--max_new_tokens", "6", "--lr", "1e-2", "--max_steps", "8",
            "--batch_size", "2", "--checkpoint_every", "2", "--log_every", "1",
        ]  # fmt: skip

    subprocess.run(command(tmp_path / "whole"), check=True, capture_output=True, env=env)
    _kill_and_resume(command(tmp_path / "killed"), tmp_path / "killed", 4, env)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert len(_metric(killed, "loss")) == 8
    for key in ("loss", "reward", "kl", "zero_variance_groups"):
        assert _metric(killed, key) == _metric(whole, key), key
    assert _metric(whole, "kl")[-1] > 0  # the adapters moved the policy away from the reference
    assert len(set(_metric(whole, "reward"))) > 1  # the rollouts differ from step to step


def test_dpo_with_precomputed_reference(base_dir, tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    write_jsonl(data, arithmetic_records(4))
    run = tmp_path / "dpo"
    code, out, err = cli(
        capsys, "posttrain", "dpo", "--base", base_dir, "--data", data, "--out", run,
        "--precompute_reference", "true", "--max_steps", "2", "--batch_size", "2",
        "--checkpoint_every", "0", "--log_every", "1",
    )  # fmt: skip
    assert code == 0, err
    first = json.loads((run / "metrics.jsonl").open().readline())
    assert first["loss"] == pytest.approx(0.6931472, abs=1e-6)


def test_ppo_with_a_reward_model(base_dir, tmp_path, capsys):
    """The seed's path: a reward model trained here scores PPO's completions."""
    prefs = tmp_path / "prefs.jsonl"
    write_jsonl(prefs, arithmetic_records(4))
    code, _, err = cli(
        capsys, "posttrain", "reward", "--base", base_dir, "--data", prefs, "--out",
        tmp_path / "rm", *FAST,
    )  # fmt: skip
    assert code == 0, err
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": r["prompt"]} for r in arithmetic_records(4)])
    code, out, err = cli(
        capsys, "posttrain", "ppo", "--base", base_dir, "--data", prompts, "--out",
        tmp_path / "ppo", "--reward_model", tmp_path / "rm" / "final", "--group_size", "2",
        "--max_new_tokens", "4", "--lora", *FAST,
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    assert summary["steps"] == 4
    records = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").open()]
    assert {"reward", "zero_variance_groups", "reward_errors"} <= set(records[-1])
    assert any(r["reward"] != 0 for r in records)  # the reward model scored the completions
    assert load_model_dir(tmp_path / "ppo").tokenizer is not None

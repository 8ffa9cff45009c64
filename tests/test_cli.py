"""Bad input on the command line: one-line errors, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cli_support import assert_one_line_error
from fmforge.cli import main


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def test_empty_corpus(capsys, tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "empty.txt").write_text("   \n\t\n")
    code, err = run_cli(
        capsys, "tokenizer", "train", tmp_path / "corpus", "--out", tmp_path / "tok"
    )
    assert_one_line_error(code, err, "no usable documents")
    assert not (tmp_path / "tok").exists()


def test_binary_file(capsys, tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02" * 1000)
    code, err = run_cli(
        capsys, "tokenizer", "train", tmp_path / "blob.bin", "--out", tmp_path / "tok"
    )
    assert_one_line_error(code, err, "blob.bin")


def test_missing_path(capsys, tmp_path, tokenizer_dir):
    code, err = run_cli(
        capsys,
        "data",
        "prepare",
        tmp_path / "nope.txt",
        "--tokenizer",
        tokenizer_dir,
        "--out",
        tmp_path / "out",
    )
    assert_one_line_error(code, err, "nope.txt")


def test_unknown_config_key_on_command_line(capsys, shards_dir, tmp_path):
    code, err = run_cli(
        capsys,
        "pretrain",
        "--data.shards",
        shards_dir,
        "--train.lrr=1e-3",
        "--out",
        tmp_path / "run",
    )
    assert_one_line_error(code, err, "train.lrr", "did you mean train.lr")


def test_unknown_config_key_in_file(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  max_step: 3\n")
    code, err = run_cli(capsys, "pretrain", "--config", cfg, "--out", tmp_path / "run")
    assert_one_line_error(code, err, "run.yaml", "train.max_step", "did you mean train.max_steps")


def test_dangerous_yaml_tag_is_refused(capsys, tmp_path):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f'train:\n  lr: !!python/object/apply:os.system ["touch {marker}"]\n')
    code, err = run_cli(capsys, "pretrain", "--config", cfg, "--out", tmp_path / "run")
    assert_one_line_error(code, err, "YAML")
    assert not marker.exists()


def test_wrong_type_and_inconsistent_values(capsys, shards_dir, tmp_path):
    code, err = run_cli(
        capsys,
        "pretrain",
        "--data.shards",
        shards_dir,
        "--train.max_steps",
        "ten",
        "--out",
        tmp_path / "a",
    )
    assert_one_line_error(code, err, "max_steps")
    code, err = run_cli(
        capsys,
        "pretrain",
        "--data.shards",
        shards_dir,
        "--train.max_steps",
        "5",
        "--train.warmup_steps",
        "50",
        "--out",
        tmp_path / "b",
    )
    assert_one_line_error(code, err, "train.warmup_steps")
    code, err = run_cli(
        capsys,
        "pretrain",
        "--data.shards",
        shards_dir,
        "--model.preset",
        "smal",
        "--out",
        tmp_path / "c",
    )
    assert_one_line_error(code, err, "did you mean 'small'")


def test_yaml_11_gotchas_parse_as_numbers(tmp_path, shards_dir, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"data:\n  shards: {shards_dir}\ntrain:\n  lr: 1e-3\nruntime:\n  compile: 'no'\n"
    )
    code = main(["pretrain", "--config", str(cfg), "--out", str(tmp_path / "r"), "--print-config"])
    out = capsys.readouterr().out
    assert code == 0
    assert "lr: 0.001" in out


def test_non_empty_output_dir_needs_overwrite(capsys, tmp_path, corpus_file):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = run_cli(capsys, "tokenizer", "train", corpus_file, "--out", out)
    assert_one_line_error(code, err, "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"


def test_invalid_records_are_counted_and_stop_above_threshold(capsys, tmp_path):
    lines = [f'{{"text": "good line number {i}"}}' for i in range(10)] + ["{broken"] * 5
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    code, err = run_cli(
        capsys, "tokenizer", "train", tmp_path / "mixed.jsonl", "--out", tmp_path / "tok"
    )
    assert_one_line_error(code, err, "mixed.jsonl:11")


def test_print_config_round_trips(tmp_path, shards_dir, capsys):
    assert (
        main(
            [
                "pretrain",
                "--data.shards",
                str(shards_dir),
                "--train.lr=3e-4",
                "--out",
                str(tmp_path / "r"),
                "--print-config",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    assert main(["pretrain", "--config", str(saved), "--print-config"]) == 0
    assert capsys.readouterr().out == printed


@pytest.mark.parametrize("args", [["pretrain", "--out"], ["nonsense"]])
def test_usage_errors_in_a_real_process(args):
    proc = subprocess.run(
        [sys.executable, "-m", "fmforge.cli", *args], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_help_is_fast_and_light():
    code = "import sys, fmforge.cli; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "False"

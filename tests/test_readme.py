"""The README tells the truth: its commands exist and parse, its Python block runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from fmforge.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
CHEAP = {"cost", "scaling", "models", "env"}  # commands fast enough to run for real here


def readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def fmforge_commands() -> list[list[str]]:
    commands = []
    for block in readme_blocks("bash"):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            line = re.sub(r"\[[^\]]*\]", "", line)  # optional parts in brackets
            if line.startswith((".venv/bin/fmforge ", "fmforge ")):
                commands.append(shlex.split(line)[1:])
    return commands


def test_readme_lists_the_setup_and_main_commands():
    text = README.read_text()
    assert "make install" in text and "make test" in text
    assert ".venv/bin/fmforge quickstart" in text


@pytest.mark.parametrize("args", fmforge_commands(), ids=lambda a: " ".join(a[:2]))
def test_readme_command(args, capsys):
    if args[0] in CHEAP:
        assert main(args) == 0
    else:  # parses, and its subcommand exists; the real runs are covered by their own tests
        assert main([*args, "--help"]) == 0


def test_readme_python_block(tokenizer_dir, tmp_path, monkeypatch):
    from fmforge.model.config import preset_config
    from fmforge.model.llama import LlamaForCausalLM
    from fmforge.model.load import save_model_dir
    from fmforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    model = LlamaForCausalLM(preset_config("tiny", vocab_size=tokenizer.vocab_size))
    save_model_dir(model, tokenizer, tmp_path / "runs/quickstart/run/final")
    monkeypatch.chdir(tmp_path)
    (block,) = readme_blocks("python")
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["logits"].shape[-1] == tokenizer.vocab_size

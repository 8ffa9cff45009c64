"""A saved model dir loads unchanged in `transformers` and through `fmforge.load`."""

from __future__ import annotations

import json

import pytest
import torch

import fmforge
from fmforge.errors import UserError
from fmforge.model.llama import LlamaForCausalLM
from fmforge.model.load import save_model_dir
from fmforge.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture
def model_dir(tmp_path, tiny_tied_config, tokenizer_dir):
    tokenizer = Tokenizer.load(tokenizer_dir)
    tiny_tied_config.vocab_size = tokenizer.vocab_size
    model = LlamaForCausalLM(tiny_tied_config)
    return save_model_dir(model, tokenizer, tmp_path / "model", {"note": "test"})


def test_transformers_loads_model_dir_with_same_logits(model_dir):
    ours = fmforge.load(str(model_dir))
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([ours.tokenizer.encode("def alpha_1(beta):\n    return beta + 3")])
    with torch.no_grad():
        diff = (ours.model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-5
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert hf_tok("return beta")["input_ids"] == ours.tokenizer.encode("return beta")


def test_model_dir_contents(model_dir):
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "fmforge.json"} <= names
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "llama"
    meta = json.loads((model_dir / "fmforge.json").read_text())
    assert meta["tokenizer_sha256"] and meta["fmforge_version"]


def test_damaged_weights_give_named_errors(model_dir):
    from safetensors.torch import load_file, save_file

    weights = model_dir / "model.safetensors"
    state = load_file(str(weights))
    state["model.norm.weight"][0] = float("nan")
    save_file(state, str(weights))
    with pytest.raises(UserError, match="model.norm.weight contains NaN"):
        fmforge.load(str(model_dir))
    weights.write_bytes(b"\x80\x04not safetensors")  # e.g. a pickle: refused, never unpickled
    with pytest.raises(UserError, match="not a readable safetensors"):
        fmforge.load(str(model_dir))
    config = json.loads((model_dir / "config.json").read_text())
    save_file({"x": torch.zeros(1)}, str(weights))
    with pytest.raises(UserError, match="do not match config.json"):
        fmforge.load(str(model_dir))
    assert config["hidden_size"] == 64


def test_unknown_model_name():
    with pytest.raises(UserError, match="did you mean 'smollm2-135m-instruct'"):
        fmforge.load("smollm2-135m-instruc")

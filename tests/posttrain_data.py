"""Shared helpers of the post-training tests: a tiny chat model and records built from rules."""

from __future__ import annotations

import json

import torch

from fmforge.model.config import preset_config
from fmforge.model.llama import LlamaForCausalLM
from fmforge.tokenizer import Tokenizer

# SmolLM2-135M-Instruct's chat template (tokenizer_config.json), as fmforge reads it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chat_tokenizer(tokenizer_dir, smollm2: bool = True) -> Tokenizer:
    """The session's in-process BPE tokenizer, with SmolLM2's chat template (and its default
    system prompt) attached, or with plain ChatML (shorter sequences) when smollm2 is False."""
    tok = Tokenizer.load(tokenizer_dir)
    tok.chat_template = SMOLLM2_TEMPLATE if smollm2 else None
    return tok


def tiny_lm(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        preset_config("tiny", vocab_size=vocab_size, max_position_embeddings=1024)
    )


def arithmetic_records(n: int, seed: int = 0) -> list[dict]:
    """Chat preference records: the right sum is chosen, a wrong one rejected."""
    g = torch.Generator().manual_seed(seed)
    records = []
    for _ in range(n):
        a, b, off = (int(v) for v in torch.randint(0, 20, (3,), generator=g))
        prompt = [{"role": "user", "content": f"{a} + {b} = ?"}]
        records.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": f"{a + b}"}],
                "rejected": [{"role": "assistant", "content": f"{a + b + off + 1} maybe"}],
            }
        )
    return records


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")

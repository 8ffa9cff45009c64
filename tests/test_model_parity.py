"""fmforge's Llama against random-init `transformers.LlamaForCausalLM` with the same weights."""

from __future__ import annotations

import pytest
import torch

from fmforge.model.llama import LlamaForCausalLM

transformers = pytest.importorskip("transformers")


def hf_twin(model: LlamaForCausalLM):
    cfg = transformers.LlamaConfig(**model.config.to_hf_dict())
    cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(cfg).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}  # tied weights are one tensor
    return hf


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers(tiny_config, tied):
    tiny_config.tie_word_embeddings = tied
    model = LlamaForCausalLM(tiny_config).eval()
    hf = hf_twin(model)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 24))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    assert ours.shape == (2, 24, tiny_config.vocab_size)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_sdpa_matches_eager(tiny_config):
    model = LlamaForCausalLM(tiny_config).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 17))
    with torch.no_grad():
        fast = model(ids)
        model.set_eager_attention(True)
        slow = model(ids)
    assert torch.allclose(fast, slow, atol=1e-5)


def test_cached_forward_matches_full_forward(tiny_config):
    model = LlamaForCausalLM(tiny_config).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch_size=2, max_len=32)
        first = model(ids[:, :7], cache=cache, start=0)
        rest = [model(ids[:, i : i + 1], cache=cache, start=i) for i in range(7, 12)]
    stepped = torch.cat([first, *rest], dim=1)
    assert torch.allclose(full, stepped, atol=1e-5)

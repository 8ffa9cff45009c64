"""One-token decode steps: the native kernels and the torch-ops path against the plain forward.

`LlamaForCausalLM.decode_step` runs on `DecodeWeights` (blocked weight copies) and its `ops`:
`NativeOps` (model/native/kernels.c, built with the system C compiler) or `TorchOps`. Both must
give the logits of the ordinary forward pass; the kernels are also checked one by one.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fmforge.generate.engine import generate_naive, generate_tokens
from fmforge.model import native
from fmforge.model.decode import DecodeWeights, NativeOps, TorchOps
from fmforge.model.kv_cache import KVCache
from fmforge.model.layers import RMSNorm
from fmforge.model.llama import LlamaForCausalLM

needs_native = pytest.mark.skipif(native.library() is None, reason=native.status())


@pytest.fixture(params=["native", "torch"])
def ops_path(request, monkeypatch):
    """Run the test once with the native kernels and once with torch ops only."""
    if request.param == "native" and native.library() is None:
        pytest.skip(native.status())
    if request.param == "torch":
        monkeypatch.setattr(native, "library", lambda: None)
    return request.param


def tiny_model(config) -> LlamaForCausalLM:
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # decisive logits: greedy ties would make tests fragile
    return model


def decode_logits(model, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits (B, T - prompt_len, V) of ids[:, prompt_len:] fed one token at a time."""
    with torch.inference_mode():
        cache = model.new_cache(ids.shape[0], ids.shape[1])
        model(ids[:, :prompt_len], cache=cache)
        weights = model.decode_weights()
        steps = [
            model.decode_step(ids[:, t : t + 1], cache, t, weights)
            for t in range(prompt_len, ids.shape[1])
        ]
    return torch.stack(steps, dim=1)


def test_decode_step_matches_forward(tiny_config, ops_path):
    model = tiny_model(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 20))
    with torch.inference_mode():
        weights = model.decode_weights()
        reference = model(ids)[:, 7:]
    assert isinstance(weights.ops, NativeOps if ops_path == "native" else TorchOps)
    torch.testing.assert_close(decode_logits(model, ids, 7), reference, atol=2e-4, rtol=1e-4)


def test_cached_equals_naive_and_batched_equals_solo(tiny_config, ops_path):
    model = tiny_model(tiny_config)
    prompts = [torch.randint(10, 300, (n,)).tolist() for n in (3, 11, 6)]
    batched = generate_tokens(model, prompts, 20)
    for prompt, result in zip(prompts, batched):
        assert result.tokens == generate_tokens(model, [prompt], 20)[0].tokens
        assert result.tokens == generate_naive(model, prompt, 20).tokens


def test_decode_weights_follow_weight_changes(tiny_config, ops_path):
    model = tiny_model(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (1, 12))
    with torch.inference_mode():
        first = model.decode_weights()
        assert model.decode_weights() is first  # kept while the weights are unchanged
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(0.05)  # like an optimizer step
    with torch.inference_mode():
        assert model.decode_weights() is not first
        reference = model(ids)[:, 5:]
    torch.testing.assert_close(decode_logits(model, ids, 5), reference, atol=2e-4, rtol=1e-4)

    other = tiny_model(tiny_config)
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        reference = other(ids)[:, 5:]
    torch.testing.assert_close(decode_logits(model, ids, 5), reference, atol=2e-4, rtol=1e-4)


def test_no_decode_weights_with_grad_or_adapters(tiny_config):
    model = tiny_model(tiny_config)
    assert model.decode_weights() is None  # gradients on: training never pays for the copy

    class Wrapped(nn.Linear):  # what an adapter looks like to decode_weights
        pass

    attn = model.model.layers[1].self_attn
    wrapped = Wrapped(attn.q_proj.in_features, attn.q_proj.out_features, bias=False)
    wrapped.load_state_dict(attn.q_proj.state_dict())
    attn.q_proj = wrapped
    with torch.inference_mode():
        assert model.decode_weights() is None
    prompt = torch.randint(10, 300, (6,)).tolist()
    assert (
        generate_tokens(model, [prompt], 12)[0].tokens == generate_naive(model, prompt, 12).tokens
    )


@needs_native
@pytest.mark.parametrize("rows", [1, 3])
def test_native_gemv_matches_matmul(rows):
    lib = native.library()
    k, sizes = 40, (8, 5, 13)  # three matrices side by side in one output, like q, k and v
    weights = [torch.randn(n, k) for n in sizes]  # nn.Linear layout (C_out, C_in)
    x = torch.randn(rows, k)
    y = torch.full((rows, sum(sizes)), float("nan"))
    start = y.data_ptr()
    for w in weights:
        lib.fmforge_gemv_rows(x.data_ptr(), w.data_ptr(), start, rows, k, w.shape[0], y.shape[1], 2)
        start += w.shape[0] * 4
    torch.testing.assert_close(y, x @ torch.cat(weights).t(), atol=1e-5, rtol=1e-5)


@needs_native
def test_native_ops_match_torch_ops():
    h, kv, d, rows, slot, max_len = 6, 2, 16, 3, 9, 14
    torch_ops, native_ops = TorchOps(h, kv, d), NativeOps(native.library(), h, kv, d)

    x, delta, norm = torch.randn(rows, 48), torch.randn(rows, 48), RMSNorm(48)
    with torch.no_grad():
        norm.weight.normal_()
    for extra in (None, delta):
        x1, x2 = x.clone(), x.clone()
        expected = torch_ops.add_rmsnorm(x1, extra, norm)
        torch.testing.assert_close(native_ops.add_rmsnorm(x2, extra, norm), expected)
        torch.testing.assert_close(x2, x1)  # both added the residual in place

    gate_up = torch.randn(rows, 2 * 40)
    torch.testing.assert_close(native_ops.silu_mul(gate_up), torch_ops.silu_mul(gate_up))

    cos, sin = torch.randn(max_len, d), torch.randn(max_len, d)
    positions = torch.tensor([[slot], [slot - 4], [slot - 2]])  # left padding of 0, 4, 2
    mask = torch.ones(rows, 1, 1, max_len, dtype=torch.bool)
    mask[1, ..., :4] = mask[2, ..., :2] = False
    for position_ids, key_mask in ((None, None), (positions, mask[..., : slot + 1])):
        caches = [KVCache(1, rows, kv, max_len, d) for _ in range(2)]
        for cache in caches:
            cache.k.normal_(generator=torch.Generator().manual_seed(1))
            cache.v.normal_(generator=torch.Generator().manual_seed(2))
        qkv = torch.randn(rows, (h + 2 * kv) * d)
        results = [
            ops.attend(
                qkv.clone(), 0, cache, slot, ops.rope(cos, sin, position_ids, slot), key_mask
            )
            for ops, cache in zip((torch_ops, native_ops), caches)
        ]
        torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(caches[1].k, caches[0].k)  # the same rotated keys written
        torch.testing.assert_close(caches[1].v, caches[0].v)


def test_missing_compiler_falls_back_to_torch_ops(tmp_path, monkeypatch, tiny_config):
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert native.library() is None
    assert "decode uses torch ops" in native.status()
    model = tiny_model(tiny_config)
    with torch.inference_mode():
        assert isinstance(model.decode_weights().ops, TorchOps)


@needs_native
def test_kernels_build_into_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native.library() is not None
    built = list((tmp_path / "fmforge" / "kernels").iterdir())
    assert [p.suffix for p in built] == [".so"]  # no temp file left behind
    assert native.status().startswith("native kernels")


def test_decode_weights_copy_only_on_the_torch_path(tiny_config, ops_path):
    model = tiny_model(tiny_config)
    with torch.inference_mode():
        weights = model.decode_weights()
    assert isinstance(weights, DecodeWeights)
    if ops_path == "native":  # the kernels read the nn.Linear weights in place
        assert weights.buffer is None
        return
    matrices = sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight"))
    assert weights.buffer.numel() == matrices + model.lm_head.weight.numel()  # one buffer
    start, end = weights.buffer.data_ptr(), weights.buffer.data_ptr() + weights.buffer.nbytes
    assert all(start <= b.data_ptr() < end for b in weights.blocks)


def test_cache_moved_or_cast_keeps_its_layer_views():
    cache = KVCache(2, 1, 2, 8, 4).to(torch.float64)
    k, _ = cache.update(1, 3, torch.ones(1, 2, 1, 4, dtype=torch.float64), torch.zeros(1, 2, 1, 4))
    assert cache.k.dtype == torch.float64 and cache.k[1, 0, :, 3].eq(1).all()
    assert k.data_ptr() == cache.k[1].data_ptr()

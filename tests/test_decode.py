"""One-token decode steps: the native kernels and the torch-ops path against the plain forward.

`LlamaForCausalLM.decode_step` runs on `DecodeWeights` and its `ops`: `NativeOps`
(model/native/kernels.c, built with the system C compiler) or `TorchOps`. Both must give the
logits of the ordinary forward pass, and B rows in one step (each at its own cache row and
position, prompt chunks included) the logits of each row run alone; the kernels are also checked
one by one.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fmforge.generate.engine import generate_naive, generate_tokens
from fmforge.model import native
from fmforge.model.decode import DecodeWeights, NativeOps, TorchOps
from fmforge.model.kv_cache import CacheRows, KVCache
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
@pytest.mark.parametrize("rows", [1, 3, 6, 16])
def test_native_gemm_matches_matmul_and_rows_are_independent(rows):
    lib = native.library()
    k, sizes = 40, (8, 5, 13)  # three matrices side by side in one output, like q, k and v
    weights = [torch.randn(n, k) for n in sizes]  # nn.Linear layout (C_out, C_in)
    x = torch.randn(rows, k)

    def product(x):
        y = torch.full((x.shape[0], sum(sizes)), float("nan"))
        start = y.data_ptr()
        for w in weights:
            lib.fmforge_gemm_rows(
                x.data_ptr(), w.data_ptr(), start, x.shape[0], k, w.shape[0], y.shape[1], 2
            )
            start += w.shape[0] * 4
        return y

    y = product(x)
    torch.testing.assert_close(y, x @ torch.cat(weights).t(), atol=1e-5, rtol=1e-5)
    for r in range(rows):  # each row bitwise equal to the row computed alone
        assert torch.equal(product(x[r : r + 1].clone())[0], y[r])


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
    # A plain cache (same slot for every row, or left padding under a mask), then cache rows
    # 4, 1, 1 at their own positions: two step rows of one prompt chunk share cache row 1.
    cases = [(None, None, None), (positions, mask[..., : slot + 1], None)]
    cases.append((torch.tensor([[5], [2], [3]]), None, ([4, 1, 1], [5, 2, 3])))
    for position_ids, key_mask, rows_view in cases:
        caches = [KVCache(1, 5, kv, max_len, d) for _ in range(2)]
        for cache in caches:
            cache.k.normal_(generator=torch.Generator().manual_seed(1))
            cache.v.normal_(generator=torch.Generator().manual_seed(2))
        views = caches if rows_view is None else [CacheRows(c, *rows_view) for c in caches]
        step_slot = slot if rows_view is None else 5
        qkv = torch.randn(rows, (h + 2 * kv) * d)
        results = [
            ops.attend(
                qkv.clone(),
                0,
                view,
                step_slot,
                ops.rope(cos, sin, position_ids, step_slot),
                key_mask,
            )
            for ops, view in zip((torch_ops, native_ops), views)
        ]
        torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(caches[1].k, caches[0].k)  # the same rotated keys written
        torch.testing.assert_close(caches[1].v, caches[0].v)


def _prefilled_cache(model, lengths):
    # One cache row per prompt, filled through decode_step with the prompt as one chunk of rows.
    cache = model.new_cache(len(lengths), max(lengths) + 1)
    weights = model.decode_weights()
    for row, length in enumerate(lengths):
        ids = torch.randint(0, model.config.vocab_size, (length, 1))
        view = CacheRows(cache, [row] * length, list(range(length)))
        position_ids = view.positions.view(-1, 1)
        model.decode_step(
            ids, view, length - 1, weights, position_ids, logit_rows=torch.tensor([0])
        )
    return cache, weights


def test_batched_step_rows_equal_rows_decoded_alone(tiny_config, ops_path):
    """B rows in one step (B = 1..16), each at its own cache row and position, give each row's
    logits equal (<= 1e-5) to that row's step run alone."""
    model = LlamaForCausalLM(tiny_config).eval()
    lengths = [3 + (7 * i) % 23 for i in range(16)]
    with torch.inference_mode():
        cache, weights = _prefilled_cache(model, lengths)
        order = torch.randperm(16).tolist()  # rows in any order, not only 0..B-1
        tokens = torch.randint(0, tiny_config.vocab_size, (16, 1))

        def step(rows):
            positions = [lengths[r] for r in rows]
            view = CacheRows(cache, rows, positions)
            ids = tokens[rows]
            return model.decode_step(ids, view, view.width - 1, weights, view.positions[:, None])

        alone = {r: step([r])[0] for r in order}
        for b in range(1, 17):
            rows = order[:b]
            together = step(rows)
            for i, r in enumerate(rows):
                torch.testing.assert_close(together[i], alone[r], atol=1e-5, rtol=0)
                if ops_path == "native":
                    assert torch.equal(together[i], alone[r])  # bitwise: rows never interact


def test_prompt_chunks_equal_the_forward_pass(tiny_config, ops_path):
    model = LlamaForCausalLM(tiny_config).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (1, 21))
    with torch.inference_mode():
        reference = model(ids)[0]  # (T, V)
        cache = model.new_cache(2, 32)
        weights = model.decode_weights()
        logits = []
        for start, end in ((0, 1), (1, 8), (8, 21)):  # chunks of 1, 7 and 13 tokens in row 1
            view = CacheRows(cache, [1] * (end - start), list(range(start, end)))
            chunk = ids[0, start:end].view(-1, 1)
            logits.append(model.decode_step(chunk, view, end - 1, weights, view.positions[:, None]))
    torch.testing.assert_close(torch.cat(logits), reference, atol=2e-4, rtol=1e-4)


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

"""RoPE's fused autograd function equals the rotate-half reference, forward and backward."""

from __future__ import annotations

import torch

from fmforge.model.layers import apply_rope, rope_cache, rotate_half


def _reference(x, cos, sin):
    return x * cos + rotate_half(x) * sin


def test_rope_equals_the_reference_forward_and_backward():
    cos, sin = rope_cache(64, 16, 10000.0)
    base = torch.randn(2, 64, 3 * 16)
    x = base.view(2, 64, 3, 16).transpose(1, 2).requires_grad_()  # (B, H, T, D), strided
    grad = torch.randn(2, 3, 64, 16)
    ours = apply_rope(x, cos, sin)
    ref = _reference(x, cos, sin)
    assert ours.is_contiguous()
    assert torch.allclose(ours, ref, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, x, grad)
    (g_ref,) = torch.autograd.grad(ref, x, grad)
    assert torch.allclose(g_ours, g_ref, atol=1e-6)
    assert not torch.allclose(ours, x)  # it does rotate


def test_rope_with_per_row_positions_passes_gradcheck():
    cos, sin = rope_cache(32, 8, 10000.0)
    positions = torch.tensor([[3, 4, 5], [0, 1, 2]])
    c = cos.double()[positions].unsqueeze(1)  # (B, 1, T, D)
    s = sin.double()[positions].unsqueeze(1)
    x = torch.randn(2, 2, 3, 8, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, c, s), (x,))
    assert torch.allclose(apply_rope(x, c, s), _reference(x, c, s))


def test_the_compiled_objective_is_one_graph():
    """Under torch.compile RoPE runs the reference maths: `_Rotary`'s out= writes broke the
    graph at every layer, leaving RoPE eager and the layers' elementwise ops unfused."""
    from fmforge.model.config import preset_config
    from fmforge.model.llama import LlamaForCausalLM
    from fmforge.train.objectives import causal_lm_loss

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LlamaForCausalLM(preset_config("tiny"))
    x = torch.randint(0, 512, (2, 16))
    explained = torch._dynamo.explain(causal_lm_loss)(model, (x, x))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1

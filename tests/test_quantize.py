"""Weight-only quantisation: block formats, the native kernels against a torch reference, decode
steps on quantised layers, quantised model dirs and their bad inputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_support import assert_one_line_error
from fmforge.cli import main
from fmforge.generate.engine import generate_tokens
from fmforge.model import quantize as quantize_module
from fmforge.model.llama import LlamaForCausalLM
from fmforge.model.load import ModelBundle, load_bundle
from fmforge.model.native import quant as native_quant
from fmforge.model.quantize import (
    QuantLinear,
    dequantize_weight,
    grouped_matmul,
    quantize_model,
    quantize_weight,
)
from fmforge.tokenizer import Tokenizer

needs_kernels = pytest.mark.skipif(
    native_quant.library() is None, reason=f"native kernels: {native_quant.status()}"
)


def quantised_activations(x: torch.Tensor) -> torch.Tensor:
    """x (B, k) rounded as the kernels round it: int8 per block of 32, scale max|x| / 127."""
    rows, k = x.shape
    kp = -(-k // 32) * 32
    padded = torch.zeros(rows, kp)
    padded[:, :k] = x
    blocks = padded.view(rows, kp // 32, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.round(blocks / scale.masked_fill(scale == 0, 1))
    return (q * scale).view(rows, kp)[:, :k]


@pytest.mark.parametrize("bits,group", [(8, 32), (8, 0), (4, 32)])
def test_round_trip_error_is_within_half_a_step(bits, group):
    weight = torch.randn(48, 96)
    qweight, scales, mins = quantize_weight(weight, bits, group)
    back = dequantize_weight(qweight, scales, bits, 96, mins)
    step = scales.float().abs().repeat_interleave(96 // scales.shape[1], dim=1)
    assert qweight.dtype == torch.uint8 and mins.shape == scales.shape
    assert qweight.shape == (48, 96 if bits == 8 else 48)
    # round to nearest: never more than half a step (plus fp16 scale and min rounding) away
    bound = 0.5 * step + 2e-3 * weight.abs().amax()
    assert ((back - weight).abs() <= bound).all()
    assert (back - weight).abs().max() > 0  # it did quantise


def test_int4_block_layout_matches_q4_1():
    """Byte i of a block holds element i (low nibble) and element 16 + i (high nibble), q in
    [0, 15] standing for scale * q + min."""
    weight = torch.zeros(1, 32)
    weight[0, 0], weight[0, 16], weight[0, 5] = -1.0, 14.0, 2.0  # min -1, scale 1
    qweight, scales, mins = quantize_weight(weight, 4)
    assert (scales.item(), mins.item()) == (1.0, -1.0)
    assert qweight[0, 0].item() == 0 | (15 << 4)
    assert qweight[0, 5].item() == 3 | (1 << 4)  # element 21 is 0: q = 1


def test_int4_reproduces_q4_1_blocks_exactly():
    """Weights already on a Q4_1 grid (SmolLM2's GGUF) come back unchanged."""
    q = torch.randint(0, 16, (8, 64)).float()
    q[:, ::32], q[:, 1::32] = 0, 15  # every block spans the whole grid, as Q4_1 blocks do
    scale = torch.rand(8, 2).half().float().repeat_interleave(32, dim=1)
    low = torch.randn(8, 2).half().float().repeat_interleave(32, dim=1)
    weight = q * scale + low
    back = dequantize_weight(*quantize_weight(weight, 4)[:2], 4, 64, quantize_weight(weight, 4)[2])
    torch.testing.assert_close(back, weight, rtol=0, atol=1e-6)


def test_int8_is_asymmetric_with_a_minimum_per_group():
    """w = s * q + m, q in [0, 240]: a block's minimum is q = 0, its maximum q = 240."""
    weight = torch.linspace(-1.0, 3.0, 64).view(1, 64)
    weight[0, 32:] = torch.linspace(0.5, 0.75, 32)  # an all-positive block keeps its resolution
    qweight, scales, mins = quantize_weight(weight, 8)
    assert qweight.dtype == torch.uint8 and qweight.shape == (1, 64)
    assert (qweight[0, 0].item(), qweight[0, 31].item(), qweight[0, 63].item()) == (0, 240, 240)
    assert mins[0].tolist() == [-1.0, 0.5] and scales.shape == mins.shape == (1, 2)
    error = (dequantize_weight(qweight, scales, 8, 64, mins) - weight).abs().view(2, 32)
    assert (error <= 0.5 * scales.float().view(2, 1) + 1e-6).all()  # round to nearest
    assert error[1].max() < 0.6e-3  # symmetric int8 (step 0.75 / 127) errs up to 3e-3 here


def test_int8_reproduces_q4_1_blocks_exactly():
    """Weights on a Q4_1 grid (SmolLM2's GGUF) come back unchanged: s = d / 16 (exact in fp16),
    q = 16 q4; symmetric int8 re-rounds them to a grid of step max|w| / 127."""
    q = torch.randint(0, 16, (8, 64)).float()
    q[:, ::32], q[:, 1::32] = 0, 15
    scale = (torch.rand(8, 2) * 0.1 + 1e-3).half().float().repeat_interleave(32, dim=1)
    low = (torch.randn(8, 2) * 0.2).half().float().repeat_interleave(32, dim=1)
    weight = q * scale + low
    qweight, scales, mins = quantize_weight(weight, 8)
    torch.testing.assert_close(qweight.float(), q * 16, rtol=0, atol=0)
    back = dequantize_weight(qweight, scales, 8, 64, mins)
    torch.testing.assert_close(back, weight, rtol=0, atol=1e-7)


@needs_kernels
@pytest.mark.parametrize(
    "bits,group,float_x",
    [(8, 32, True), (8, 0, True), (8, 32, False), (8, 0, False), (4, 32, False)],
)
@pytest.mark.parametrize("in_features", [64, 200])  # 200: padded to 224, an odd block count
def test_kernel_matches_torch_reference(bits, group, float_x, in_features, monkeypatch):
    """The kernel's product equals the dequantised weight times the activations (int8's float
    path), or times the activations rounded as the kernel rounds them (int8 activations, int4),
    for 1..5 rows and output counts that are not multiples of 4. The weights carry an offset, so
    a wrong min term shows."""
    monkeypatch.setattr(quantize_module, "FLOAT_ACTIVATIONS_INT8", float_x)
    linear = torch.nn.Linear(in_features, 37, bias=False)
    with torch.no_grad():
        linear.weight.add_(0.3)
    layer = QuantLinear.from_linear(linear, bits, group)
    for rows in (1, 3, 5):
        x = torch.randn(rows, in_features)
        with torch.no_grad():
            got = grouped_matmul([layer], x)
            want = (x if float_x else quantised_activations(x)) @ layer.weight.T
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_kernels
def test_grouped_product_puts_outputs_side_by_side():
    layers = [QuantLinear.from_linear(torch.nn.Linear(64, n, bias=False), 8) for n in (12, 8, 8)]
    x = torch.randn(2, 64)
    with torch.no_grad():
        fused = grouped_matmul(layers, x)
        alone = torch.cat([grouped_matmul([m], x) for m in layers], dim=-1)
    torch.testing.assert_close(fused, alone, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_model_stays_close_and_decode_equals_forward(tiny_config, bits):
    model = LlamaForCausalLM(tiny_config).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 12))
    with torch.no_grad():
        reference = model(ids)
        quantised = quantize_model(copy.deepcopy(model), bits)
        assert isinstance(quantised.lm_head, QuantLinear)
        assert quantised.lm_head.bits == 8  # the head stays int8 in int4 models
        full = quantised(ids)
        cache = quantised.new_cache(2, 32)
        quantised(ids[:, :8], cache=cache)
        weights = quantised.decode_weights()
        assert weights is not None  # quantised layers take the decode fast path
        steps = [quantised.decode_step(ids[:, t : t + 1], cache, t, weights) for t in range(8, 12)]
    for t, logits in zip(range(8, 12), steps):
        torch.testing.assert_close(logits, full[:, t], rtol=1e-4, atol=1e-4)
    error = (full - reference).abs().max() / reference.abs().max()
    assert 0 < error < (0.02 if bits == 8 else 0.15)


@pytest.mark.parametrize("bits", [8, 4])
def test_torch_fallback_matches_kernels(tiny_config, monkeypatch, bits):
    """The torch path (no compiler) gives the native path's logits and greedy tokens: equal up to
    fp32 summation order for int8, up to int4's activation rounding."""
    model = quantize_model(LlamaForCausalLM(tiny_config).eval(), bits)
    prompt = torch.randint(0, tiny_config.vocab_size, (6,)).tolist()
    native = generate_tokens(model, [prompt], 8)[0].tokens
    ids = torch.tensor([prompt])
    with torch.no_grad():
        kernel = model(ids)[0, -1]
    monkeypatch.setattr(native_quant, "library", lambda: None)
    model.__dict__.pop("_decode_weights", None)
    with torch.no_grad():
        fallback = model(ids)[0, -1]
    fallback_tokens = generate_tokens(model, [prompt], 8)[0].tokens
    tolerance = 1e-4 if bits == 8 else 0.02
    torch.testing.assert_close(fallback, kernel, rtol=tolerance, atol=tolerance)
    if bits == 8:
        assert fallback_tokens == native


def test_quantize_twice_refused(tiny_config):
    model = quantize_model(LlamaForCausalLM(tiny_config), 8)
    with pytest.raises(Exception, match="already quantised"):
        quantize_model(model, 4)


@pytest.fixture
def model_dir(tmp_path, tiny_config, tokenizer_dir):
    tokenizer = Tokenizer.load(tokenizer_dir)
    config = copy.deepcopy(tiny_config)
    config.vocab_size = 320
    model = LlamaForCausalLM(config).eval()
    bundle = ModelBundle(model, tokenizer, config)
    return bundle.save(tmp_path / "fp32")


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_command_writes_a_dir_that_loads_and_generates(model_dir, tmp_path, bits):
    out = tmp_path / f"int{bits}"
    assert main(["quantize", str(model_dir), "--bits", str(bits), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bits"] == bits
    assert config["quantization_config"]["format_version"] == 2
    state = load_file(str(out / "model.safetensors"))
    assert state["model.layers.0.mlp.up_proj.scales"].dtype == torch.float16
    assert state["model.layers.0.mlp.up_proj.mins"].dtype == torch.float16
    assert state["model.layers.0.mlp.up_proj.qweight"].dtype == torch.uint8
    assert "model.layers.0.mlp.up_proj.weight" not in state
    loaded = load_bundle(out)
    in_memory = load_bundle(model_dir, quantize=f"int{bits}")
    ids = torch.tensor([loaded.tokenizer.encode("def alpha_1(beta):")])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), in_memory.model(ids), rtol=0, atol=0)
    text = generate_tokens(loaded.model, [ids[0].tolist()], 5)[0].tokens
    assert len(text) == 5


def test_bits_3_is_a_one_line_error(model_dir, tmp_path, capsys):
    code = main(["quantize", str(model_dir), "--bits", "3", "--out", str(tmp_path / "q")])
    assert_one_line_error(code, capsys.readouterr().err, "--bits 3")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize(
    "corruption,tensor",
    [
        ("nan", "scales"),
        ("dtype", "scales"),
        ("shape", "scales"),
        ("bytes", "scales"),
        ("nan", "mins"),
        ("dtype", "mins"),
        ("dtype", "qweight"),  # a format-1 int8 tensor in a format-2 dir
    ],
)
def test_corrupted_scales_are_a_one_line_error(model_dir, tmp_path, capsys, corruption, tensor):
    out = tmp_path / "int8"
    assert main(["quantize", str(model_dir), "--bits", "8", "--out", str(out)]) == 0
    file = out / "model.safetensors"
    state = load_file(str(file))
    key = f"model.layers.1.self_attn.q_proj.{tensor}"
    if corruption == "dtype" and tensor == "qweight":
        state[key] = (state[key].to(torch.int16) - 128).to(torch.int8)
    elif corruption == "nan":
        state[key][3, 0] = float("nan")
    elif corruption == "dtype":
        state[key] = state[key].float()
    elif corruption == "shape":
        state[key] = state[key][:-1]
    if corruption == "bytes":
        data = bytearray(file.read_bytes())
        data[:8] = b"\xff" * 8  # the header length
        file.write_bytes(bytes(data))
    else:
        save_file(state, str(file))
    capsys.readouterr()
    code = main(["generate", str(out), "--prompt", "def", "--max-new-tokens", "2"])
    assert_one_line_error(
        code, capsys.readouterr().err, "safetensors" if corruption == "bytes" else key
    )


def legacy_int8_dir(model_dir, out):
    """Write `model_dir` quantised in format 1 (fmforge before format_version: symmetric int8,
    q = round(w / s) in [-127, 127], s = max|w| / 127 per 32, no mins); return the weights the
    dir stands for, by name."""
    bundle = load_bundle(model_dir)
    quantize_model(bundle.model, 8)
    bundle.save(out)
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]["format_version"]
    (out / "config.json").write_text(json.dumps(config))
    fp32 = load_file(str(model_dir / "model.safetensors"))
    state, weights = load_file(str(out / "model.safetensors")), {}
    for key in [k for k in state if k.endswith(".qweight")]:
        name = key.removesuffix(".qweight")
        weight = fp32.get(f"{name}.weight", fp32["model.embed_tokens.weight"])
        rows, cols = weight.shape
        padded = torch.zeros(rows, -(-cols // 32) * 32)
        padded[:, :cols] = weight
        blocks = padded.view(rows, -1, 32)
        scales = (blocks.abs().amax(-1) / 127).half()
        q = torch.round(blocks / scales.float().unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
        state[key], state[f"{name}.scales"] = q.view(rows, -1), scales
        del state[f"{name}.mins"]
        weights[name] = (q.float() * scales.float().unsqueeze(-1)).view(rows, -1)[:, :cols]
    save_file(state, str(out / "model.safetensors"))
    return weights


def test_format_1_dir_loads_converted_exactly(model_dir, tmp_path):
    weights = legacy_int8_dir(model_dir, tmp_path / "v1")
    loaded = load_bundle(tmp_path / "v1")
    assert loaded.model.quantization_config["format_version"] == 2
    layer = loaded.model.model.layers[1].self_attn.q_proj
    assert layer.qweight.dtype == torch.uint8 and layer.mins is not None
    for name, module in loaded.model.named_modules():
        if isinstance(module, QuantLinear):
            torch.testing.assert_close(module.weight, weights[name], rtol=0, atol=0)
    ids = torch.tensor([loaded.tokenizer.encode("def alpha_1(beta):")])
    assert len(generate_tokens(loaded.model, [ids[0].tolist()], 3)[0].tokens) == 3


def test_unknown_format_version_is_a_one_line_error(model_dir, tmp_path, capsys):
    out = tmp_path / "int8"
    assert main(["quantize", str(model_dir), "--bits", "8", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format_version"] = 3
    (out / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    code = main(["generate", str(out), "--prompt", "def", "--max-new-tokens", "2"])
    assert_one_line_error(code, capsys.readouterr().err, "format_version=3")


def test_unknown_quantize_value_is_a_one_line_error(model_dir, capsys):
    code = main(["generate", str(model_dir), "--prompt", "def", "--quantize", "int3"])
    assert_one_line_error(code, capsys.readouterr().err, "int3")


def test_foreign_quantization_config_is_a_one_line_error(model_dir, capsys):
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (model_dir / "config.json").write_text(json.dumps(config))
    code = main(["generate", str(model_dir), "--prompt", "def", "--max-new-tokens", "2"])
    assert_one_line_error(code, capsys.readouterr().err, "gptq")


def test_quantised_dir_serves_over_http(model_dir, tmp_path):
    """A quantised dir answers an OpenAI-style greedy completion with the tokens the library
    generates from the same dir."""
    from fastapi.testclient import TestClient

    from test_serve_support import make_app

    out = tmp_path / "int4"
    assert main(["quantize", str(model_dir), "--bits", "4", "--out", str(out)]) == 0
    app, _ = make_app(out)
    loaded = load_bundle(out)
    prompt = "def alpha"
    want = generate_tokens(loaded.model, [loaded.tokenizer.encode(prompt)], 6)[0].tokens
    with TestClient(app) as client:
        response = client.post(
            "/v1/completions",
            json={"model": "tiny-serve", "prompt": prompt, "max_tokens": 6, "temperature": 0},
        )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == loaded.tokenizer.decode(want)

"""LoRA: merged == unmerged, only adapter weights train, PEFT loads the saved adapter."""

from __future__ import annotations

import copy

import pytest
import torch

from fmforge.adapt.lora import (
    apply_lora,
    base_fingerprint,
    load_lora_adapter,
    lora_parameters,
    merge_lora,
    remove_lora,
    save_lora_adapter,
    unmerge_lora,
)
from fmforge.errors import UserError
from fmforge.model.llama import LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _trained_lora(config, steps: int = 3):
    model = LlamaForCausalLM(config)
    base = copy.deepcopy(model.state_dict())
    apply_lora(model, TARGETS, r=4, alpha=8)
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    x = torch.randint(0, config.vocab_size, (2, 12))
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(
            model(x[:, :-1]).reshape(-1, config.vocab_size), x[:, 1:].reshape(-1)
        )
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model, base, x


def test_parameter_names_keep_hf_layout(tiny_config):
    model = LlamaForCausalLM(tiny_config)
    names = set(model.state_dict())
    apply_lora(model, ["q_proj", "v_proj"], r=2)
    after = set(model.state_dict())
    assert names <= after
    added = after - names
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in added
    assert all(".lora_A." in n or ".lora_B." in n for n in added)


def test_only_lora_parameters_change(tiny_config):
    model, base, _ = _trained_lora(tiny_config)
    state = model.state_dict()
    for name, tensor in base.items():
        assert torch.equal(state[name], tensor), name
    assert any(state[n].abs().sum() > 0 for n in state if ".lora_B." in n)


def test_merged_equals_unmerged_and_unmerge_restores(tiny_config):
    model, base, x = _trained_lora(tiny_config)
    model.eval()
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        merged = model(x)
        unmerge_lora(model)
        again = model(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=1e-5)
    weight = model.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(
        weight, base["model.layers.0.self_attn.q_proj.weight"], atol=1e-6, rtol=0
    )
    merge_lora(model)
    remove_lora(model)
    assert not lora_parameters(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)


def test_save_load_roundtrip_and_wrong_base(tiny_config, tmp_path):
    model, base, x = _trained_lora(tiny_config)
    fresh = LlamaForCausalLM(tiny_config)
    fresh.load_state_dict(base)
    fingerprint = base_fingerprint(fresh)
    save_lora_adapter(model, tmp_path / "adapter", "tiny", fingerprint)
    load_lora_adapter(fresh, tmp_path / "adapter", base_fingerprint(fresh))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=1e-6, rtol=0)
    other = LlamaForCausalLM(tiny_config)  # different random weights
    with pytest.raises(UserError, match="different base"):
        load_lora_adapter(other, tmp_path / "adapter", base_fingerprint(other))


def test_peft_loads_adapter_onto_transformers_model(tiny_config, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model, base, x = _trained_lora(tiny_config)
    hf_config = transformers.LlamaConfig(
        **{k: v for k, v in tiny_config.to_hf_dict().items() if k not in ("architectures",)}
    )
    hf = transformers.LlamaForCausalLM(hf_config)
    missing, unexpected = hf.load_state_dict(base, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.eval()
    save_lora_adapter(model, tmp_path / "adapter", "tiny", base_fingerprint(model))
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter"))
    peft_model.eval()
    model.eval()
    with torch.no_grad():
        expected = model(x)
        got = peft_model(input_ids=x).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

"""Encoder run configs: the preset's width/depth overrides and `model.init_std`."""

from __future__ import annotations

import pytest
import torch

from fmforge.config import PretrainConfig
from fmforge.errors import ConfigError


def _cfg(**model):
    return PretrainConfig.from_dict(
        {"model": {"preset": "small", **model}, "train": {"seq_len": 32}}
    )


def test_width_depth_and_init_overrides_reach_the_bert_config():
    from fmforge.train.encoder_pretrain import bert_config

    plain = bert_config(_cfg(), 300)
    assert (plain.num_hidden_layers, plain.hidden_size, plain.initializer_range) == (4, 128, 0.02)
    config = bert_config(
        _cfg(num_hidden_layers=2, intermediate_size=256, num_attention_heads=2, init_std=0.05),
        300,
    )
    assert config.num_hidden_layers == 2 and config.intermediate_size == 256
    assert config.num_attention_heads == 2 and config.head_dim == 64
    assert config.initializer_range == 0.05 and config.hidden_size == 128  # the rest: the preset's
    assert config.to_hf_dict()["initializer_range"] == 0.05  # saved, so twins start alike
    # The objectives experiment passes the decoder's width, K/V heads included: equal heads pass.
    assert bert_config(_cfg(num_key_value_heads=4), 300).num_attention_heads == 4


@pytest.mark.parametrize(
    "model, words",
    [
        ({"num_key_value_heads": 2}, "one key/value head per query head"),
        ({"init_std": 0.0}, "model.init_std=0.0 must be > 0"),
    ],
)
def test_encoder_config_refusals_name_the_key(model, words):
    from fmforge.train.encoder_pretrain import bert_config

    with pytest.raises(ConfigError, match=words):
        bert_config(_cfg(**model), 300)


def test_init_std_is_refused_by_decoders_and_by_continued_encoders():
    from fmforge.train.encoder_pretrain import build_encoder
    from fmforge.train.pretrain import build_model_config

    with pytest.raises(ConfigError, match="apply to encoders"):
        build_model_config(_cfg(init_std=0.05), 300)
    with pytest.raises(ConfigError, match="fresh encoders"):
        build_encoder(_cfg(init_std=0.05, init_from="some/dir"), "mlm", None)


def test_a_fresh_encoder_starts_at_init_std():
    from fmforge.train.encoder_pretrain import bert_config, fresh_encoder

    torch.manual_seed(0)
    model = fresh_encoder(bert_config(_cfg(init_std=0.05, num_hidden_layers=1), 300), "mlm")
    query = model.bert.encoder.layer[0].attention.self.query.weight.detach()
    positions = model.bert.embeddings.position_embeddings.weight.detach()
    assert abs(query.std().item() - 0.05) < 2e-3
    assert abs(positions.std().item() - 0.05) < 2e-3  # sinusoids at the same scale
    assert len(model.bert.encoder.layer) == 1

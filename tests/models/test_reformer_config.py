"""ReformerConfig: HF's fields and defaults, config.json round trips both ways, and the attention modules take it."""

import json

import pytest
import torch

from tests.helpers import randn
from tritonformers import runtime
from tritonformers.models.reformer import ReformerConfig


def test_defaults_equal_transformers():
    from transformers import ReformerConfig as HFConfig

    ours, hf = ReformerConfig(), HFConfig()
    for key in ReformerConfig.defaults:
        assert getattr(ours, key) == getattr(hf, key), key
    assert ours.num_hidden_layers == 6


def test_round_trip_with_transformers(tmp_path):
    from transformers import ReformerConfig as HFConfig

    hf = HFConfig(attn_layers=["lsh", "local"], num_buckets=[4, 8], hash_seed=3, is_decoder=True,
                  axial_pos_shape=[8, 4], axial_pos_embds_dim=[16, 16], hidden_size=32, id2label={0: "a", 1: "b", 2: "c"})
    hf.save_pretrained(tmp_path / "hf")
    ours = ReformerConfig.from_pretrained(tmp_path / "hf")
    assert ours.attn_layers == ("lsh", "local") and ours.num_hidden_layers == 2
    assert ours.num_buckets == [4, 8] and ours.axial_pos_shape == (8, 4) and ours.num_labels == 3
    ours.custom_field = "kept"
    ours.save_pretrained(tmp_path / "ours")
    back = HFConfig.from_pretrained(tmp_path / "ours")
    for key in ("attn_layers", "num_buckets", "hash_seed", "is_decoder", "axial_pos_shape", "hidden_size",
                "num_hidden_layers", "id2label"):
        assert getattr(back, key) == getattr(hf, key), key
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["custom_field"] == "kept"


@pytest.mark.parametrize("module", ["LocalSelfAttention", "LSHSelfAttention"])
def test_attention_modules_take_our_config(module):
    import tritonformers.nn as tnn

    cfg = ReformerConfig(hidden_size=32, num_attention_heads=2, attention_head_size=16, local_attn_chunk_length=8,
                         lsh_attn_chunk_length=8, num_buckets=4, num_hashes=2, is_decoder=True,
                         local_attention_probs_dropout_prob=0.0)
    layer = getattr(tnn, module)(cfg, layer_idx=0).eval()
    with runtime.use_backend("torch"):
        out = layer(randn(2, 16, 32))
    assert out.hidden_states.shape == (2, 16, 32) and torch.isfinite(out.hidden_states).all()

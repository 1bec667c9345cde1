"""Benchmark cases for the BLOOM family: a training step and greedy generation at BLOOM-560m's shape.

Both models get the same random weights (no hub access): transformers' BloomForCausalLM is built from the
config, and ours loads its state dict. ``bloom560m_train_b2_n2048``: forward + LM loss + backward + AdamW
step (the timed "fwd_bwd"; "fwd" is forward + loss), bf16 weights; peak memory above the state after a first
step (weights and optimizer states excluded), as DESIGN.md's anchor. ``bloom560m_greedy_b8``: prompt 128,
128 new tokens, greedy, tokens/s counts new tokens. FLOPs of a training step: 6 x parameters x tokens plus
the attention (12 x layers x hidden x N^2 x B / 2 forward+backward, causal).
"""

from __future__ import annotations

import torch

from . import lm
from .registry import Case, Count, register

_SHAPE_560M = {"hidden": 1024, "layers": 24, "heads": 16, "vocab": 250880}
_TINY = {"hidden": 64, "layers": 2, "heads": 4, "vocab": 512}


def _make_model(which, shape, dtype, device):
    """transformers' BloomForCausalLM with random weights, or ours loaded with its state dict."""
    from transformers import BloomConfig as HFConfig, BloomForCausalLM as HFBloom

    from tritonformers.models.bloom import BloomConfig, BloomForCausalLM
    fields = dict(hidden_size=shape["hidden"], n_layer=shape["layers"], n_head=shape["heads"], vocab_size=shape["vocab"])
    torch.manual_seed(0)
    hf = HFBloom(HFConfig(**fields))
    if which == "hf":
        return hf.to(device, dtype)
    ours = BloomForCausalLM(BloomConfig(**fields))
    ours.load_state_dict(hf.state_dict())
    return ours.to(device, dtype)


def _train_flops(shape) -> Count:
    h, layers, vocab = shape["hidden"], shape["layers"], shape["vocab"]
    params = layers * (12 * h * h + 13 * h) + vocab * h
    tokens = shape["B"] * shape["N"]
    attention = 4 * layers * h * shape["N"] * tokens / 2  # QK^T and PV, causal
    return Count(fwd=2 * params * tokens + attention, fwd_bwd=6 * params * tokens + 3.5 * attention)


register(Case(
    "bloom560m_train_b2_n2048", setup=lm.train_setup, bound="compute", flops=_train_flops,
    gpu_shape={**_SHAPE_560M, "B": 2, "N": 2048}, cpu_shape={**_TINY, "B": 2, "N": 32},
    tokens=lambda s: s["B"] * s["N"],
    impls=lm.train_impls(_make_model, "hf_eager", "tritonformers BloomForCausalLM, fused loss, AdamW step",
                         "transformers BloomForCausalLM, AdamW step"),
    description="BLOOM-560m-shaped training step (weights stepped in place: outputs are not compared)"))

register(Case(
    "bloom560m_greedy_b8", setup=lm.greedy_setup, bound="memory", backward=False,
    gpu_shape={**_SHAPE_560M, "B": 8, "prompt": 128, "new": 128}, cpu_shape={**_TINY, "B": 2, "prompt": 8, "new": 8},
    tokens=lambda s: s["B"] * s["new"],
    impls=lm.greedy_impls(_make_model, 3, "hf_eager", "generate(), static cache, CUDA graph",
                          "transformers generate()"),
    description="BLOOM-560m-shaped greedy generation, prompt 128, 128 new tokens (ids compared)"))

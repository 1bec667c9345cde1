"""Benchmark cases for fused differential attention (DiffLlama), at module level as DESIGN.md's figures.

The module is projections + RoPE + attention + o_proj. FLOPs: the projections 2·B·N·E·(2H + 2Hkv)·D, and
the two causal softmax maps against the 2D-wide value as HF's two calls count them, 2 x 4·B·H·N²·2D / 2.
Forward+backward counts 3x the projections and 3.5x the attention.
Baselines: HF's DiffLlamaAttention with sdpa and with eager, in the same run.
"""

from __future__ import annotations

import copy

import torch

from .registry import OURS, Case, Count, Impl, register


def _config(shape):
    from transformers import DiffLlamaConfig
    return DiffLlamaConfig(hidden_size=shape["E"], num_attention_heads=shape["H"], num_key_value_heads=shape["KV"],
                           head_dim=shape["E"] // shape["H"])


def _setup(shape, dtype, device) -> dict:
    from transformers.models.diffllama.modeling_diffllama import DiffLlamaRotaryEmbedding
    cfg = _config(shape)
    B, N = shape["B"], shape["N"]
    x = torch.randn(B, N, shape["E"], device=device).to(dtype).requires_grad_(True)
    cos, sin = DiffLlamaRotaryEmbedding(cfg).to(device)(x, torch.arange(N, device=device)[None])
    # one set of weights, loaded by every implementation's module
    from transformers.models.diffllama.modeling_diffllama import DiffLlamaAttention
    state = {k: v.to(device, dtype) for k, v in DiffLlamaAttention(cfg, layer_idx=1).state_dict().items()}
    return {"x": x, "cos": cos.to(dtype), "sin": sin.to(dtype), "config": cfg, "state": state}


def _flops(shape) -> Count:
    B, N, E, H, KV = shape["B"], shape["N"], shape["E"], shape["H"], shape["KV"]
    D = E // H
    proj = 2 * B * N * E * (2 * H + 2 * KV) * D
    attn = 2 * (4 * B * H * N * N * 2 * D / 2)  # two softmax maps against the 2D-wide value, causal
    return Count(fwd=proj + attn, fwd_bwd=3 * proj + 3.5 * attn)


def _module_prepare(kind):
    def prepare(inputs: dict) -> dict:
        from transformers.models.diffllama.modeling_diffllama import DiffLlamaAttention
        from tritonformers.nn import DifferentialAttention
        cfg, x = inputs["config"], inputs["x"]
        if kind == "ours":
            module = DifferentialAttention(cfg, layer_idx=1)
        else:
            cfg = copy.deepcopy(cfg)
            cfg._attn_implementation = kind
            module = DiffLlamaAttention(cfg, layer_idx=1)
        module.load_state_dict(inputs["state"])
        return {**inputs, "module": module.to(x.device, x.dtype), "config": cfg}
    return prepare


def _hf_call(i):
    # HF's sdpa path takes no mask for a plain causal batch (is_causal inside); eager needs the 4-D mask
    N = i["x"].shape[1]
    mask = None
    if i["config"]._attn_implementation == "eager":
        mask = torch.full((N, N), torch.finfo(i["x"].dtype).min, device=i["x"].device, dtype=i["x"].dtype).triu(1)
        mask = mask[None, None]
    return i["module"](i["x"], (i["cos"], i["sin"]), attention_mask=mask)[0]


_IMPLS = [
    Impl(OURS, lambda i: i["module"](i["x"], (i["cos"], i["sin"]))[0], prepare=_module_prepare("ours"),
         description="nn.DifferentialAttention (fused kernel)"),
    Impl("hf_sdpa", _hf_call, prepare=_module_prepare("sdpa"), description="DiffLlamaAttention, sdpa"),
    Impl("hf_eager", _hf_call, prepare=_module_prepare("eager"), description="DiffLlamaAttention, eager"),
]

register(
    Case("diff_attention_4k", setup=_setup, impls=_IMPLS, bound="compute", flops=_flops,
         gpu_shape={"B": 1, "N": 4096, "E": 2048, "H": 32, "KV": 32},
         cpu_shape={"B": 1, "N": 32, "E": 64, "H": 4, "KV": 4}, tokens=lambda s: s["B"] * s["N"],
         description="differential attention module, MHA"),
    Case("diff_attention_8k_gqa", setup=_setup, impls=_IMPLS[:2], bound="compute", flops=_flops,
         gpu_shape={"B": 1, "N": 8192, "E": 2048, "H": 32, "KV": 8},
         cpu_shape={"B": 1, "N": 32, "E": 64, "H": 4, "KV": 2}, tokens=lambda s: s["B"] * s["N"],
         description="differential attention module, GQA 4:1"),
)

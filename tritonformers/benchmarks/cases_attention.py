"""Benchmark cases for the flash-attention kernel: ALiBi causal prefill/training and cached decoding.

FLOPs: a causal forward does 4·B·H·N²·D / 2 (two matmuls, half the tiles); the backward 2.5x that
(five matmuls against two). Decode is memory-bound: the bytes are the K and V cache it must read.
Baselines: HF's BLOOM attention arithmetic (build_alibi_tensor, baddbmm, fp32 softmax), SDPA with an
explicit bias, FlexAttention with an ALiBi score_mod and a causal block mask, and flash causal
attention without ALiBi (the speed of light for this shape).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .registry import OURS, Case, Count, Impl, register


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def _qkv_setup(shape, dtype, device) -> dict:
    from tritonformers.kernels.attention import alibi_slopes
    B, H, N, D = shape["B"], shape["H"], shape["N"], shape["D"]
    q, k, v = (_leaf(torch.randn(B, H, N, D, device=device).to(dtype)) for _ in range(3))
    return {"q": q, "k": k, "v": v, "slopes": alibi_slopes(H, device=device)}


def _causal_flops(shape) -> Count:
    fwd = 4 * shape["B"] * shape["H"] * shape["N"] ** 2 * shape["D"] / 2
    return Count(fwd=fwd, fwd_bwd=3.5 * fwd)


def _ours(i):
    from tritonformers.kernels.attention import attention
    return attention(i["q"], i["k"], i["v"], causal=True, alibi_slopes=i["slopes"])


def _hf_eager(i):
    """BloomAttention's core: alibi.baddbmm(q, k^T), + finfo.min causal mask, fp32 softmax, bmm with v."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    q, k, v = i["q"], i["k"], i["v"]
    B, H, N, D = q.shape
    alibi = build_alibi_tensor(torch.ones(B, N, device=q.device), H, q.dtype)  # [B*H, 1, N]
    scores = alibi.baddbmm(q.reshape(B * H, N, D), k.reshape(B * H, N, D).transpose(1, 2), beta=1.0,
                           alpha=1.0 / math.sqrt(D)).view(B, H, N, N)
    causal = torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(causal, torch.finfo(q.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ v


def _sdpa_bias_prepare(inputs: dict) -> dict:
    q, slopes = inputs["q"], inputs["slopes"]
    N = q.shape[2]
    pos = torch.arange(N, device=q.device, dtype=torch.float32)
    bias = (slopes[:, None, None] * pos[None, None, :]).to(q.dtype).expand(-1, N, -1).clone()
    bias.masked_fill_(torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return {**inputs, "bias": bias[None]}


def _flex_prepare(inputs: dict) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    slopes, N = inputs["slopes"], inputs["q"].shape[2]

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * kv_idx

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    mask = create_block_mask(causal, None, None, N, N, device=inputs["q"].device)
    return {**inputs, "flex": torch.compile(flex_attention, dynamic=False), "score_mod": alibi, "block_mask": mask}


_ATTENTION_IMPLS = [
    Impl(OURS, _ours, description="attention(causal=True, alibi_slopes=...)"),
    Impl("hf_eager", _hf_eager, description="BloomAttention's arithmetic (materialised scores)"),
    Impl("sdpa_bias", lambda i: F.scaled_dot_product_attention(i["q"], i["k"], i["v"], attn_mask=i["bias"]),
         prepare=_sdpa_bias_prepare, description="SDPA with an explicit [H, N, N] ALiBi + causal bias"),
    Impl("flex", lambda i: i["flex"](i["q"], i["k"], i["v"], score_mod=i["score_mod"], block_mask=i["block_mask"]),
         prepare=_flex_prepare, cuda_only=True, description="FlexAttention, ALiBi score_mod + causal block mask"),
    Impl("flash_no_alibi", lambda i: F.scaled_dot_product_attention(i["q"], i["k"], i["v"], is_causal=True),
         comparable=False, description="SDPA flash causal without ALiBi (a lower bound, not the same function)"),
]

for _name, _gpu in (("alibi_causal_h32_d128", {"B": 1, "H": 32, "N": 4096, "D": 128}),
                    ("alibi_causal_h16_d64", {"B": 2, "H": 16, "N": 4096, "D": 64})):
    register(Case(_name, setup=_qkv_setup, impls=_ATTENTION_IMPLS, gpu_shape=_gpu,
                  cpu_shape={"B": 1, "H": 2, "N": 64, "D": 32}, bound="compute", flops=_causal_flops,
                  tokens=lambda s: s["B"] * s["N"],
                  description="BLOOM attention core: causal + ALiBi, forward and backward"))


# ---------------------------------------------------------------------------------------------- decode

def _decode_setup(shape, dtype, device) -> dict:
    from tritonformers.kernels.attention import alibi_slopes
    B, H, N, D = shape["B"], shape["H"], shape["N"], shape["D"]
    return {"q": torch.randn(B, H, 1, D, device=device).to(dtype),
            "k": torch.randn(B, H, N, D, device=device).to(dtype),
            "v": torch.randn(B, H, N, D, device=device).to(dtype),
            "lens": torch.full((B,), N, dtype=torch.int32, device=device),
            "slopes": alibi_slopes(H, device=device)}


def _decode_bytes(shape, dtype) -> Count:
    return Count(fwd=2 * shape["B"] * shape["H"] * shape["N"] * shape["D"] * dtype.itemsize)


def _decode_ours(i):
    from tritonformers.kernels.attention import decode_attention
    return decode_attention(i["q"], i["k"], i["v"], i["lens"], alibi_slopes=i["slopes"])


def _decode_hf(i):
    """BLOOM's cached step: one query against the whole cache, ALiBi from build_alibi_tensor."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    q, k, v = i["q"], i["k"], i["v"]
    B, H, N, D = k.shape
    alibi = build_alibi_tensor(torch.ones(B, N, device=q.device), H, q.dtype)
    scores = alibi.baddbmm(q.reshape(B * H, 1, D), k.reshape(B * H, N, D).transpose(1, 2), beta=1.0,
                           alpha=1.0 / math.sqrt(D))
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(probs, v.reshape(B * H, N, D)).view(B, H, 1, D)


register(Case(
    "alibi_decode", setup=_decode_setup, backward=False, bound="memory", bytes=_decode_bytes,
    gpu_shape={"B": 8, "H": 32, "N": 4096, "D": 128}, cpu_shape={"B": 2, "H": 2, "N": 96, "D": 32},
    tokens=lambda s: s["B"],
    impls=[Impl(OURS, _decode_ours, description="decode_attention (flash-decoding, ALiBi)"),
           Impl("hf_eager", _decode_hf, description="BloomAttention's arithmetic for one cached step")],
    description="one new token per sequence against a 4096-slot KV cache (memory-bound)"))

"""Benchmark cases for the flash-attention kernel: ALiBi causal prefill/training and cached decoding.

FLOPs: a causal forward does 4·B·H·N²·D / 2 (two matmuls, half the tiles); the backward 2.5x that
(five matmuls against two). Decode is memory-bound: the bytes are the K and V cache it must read.
Baselines: HF's BLOOM attention arithmetic (build_alibi_tensor, baddbmm, fp32 softmax), SDPA with an
explicit bias, FlexAttention with an ALiBi score_mod and a causal block mask, and flash causal
attention without ALiBi (the speed of light for this shape).

What each computes, and so what the check compares: ours and SDPA take float32 scores ``scale * q.k`` plus
the ALiBi bias ``slope * pos`` rounded to the model dtype (HF's alibi tensor), then a float32 softmax. The
oracle (``reference_fp32``) computes exactly that from the same inputs in float32. FlexAttention adds the
bias unrounded: Inductor keeps a score_mod in float32 and drops a cast to bf16 inside it (measured on the
H200, 2026-12-04: 0.56 relative difference at N=4096, where the bias reaches 2047 and bf16 rounds it by up
to 4), so it is timed as the strongest peer but is another function and is not checked.
HF's eager BLOOM arithmetic also rounds the biased scores themselves to the model dtype (its ``baddbmm``
writes bf16): next to biases of ~2000 at N=4096 that keeps about 3 bits of ``q.k``, so at these lengths it
is another function (measured: 0.46 relative error against all three fused ones). It is timed, not
checked here; the tests compare ours with HF where HF's rounding is harmless (short sequences).
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


def _alibi_bias(slopes, positions, dtype):
    """HF's alibi tensor: slope * position in float32, rounded to the model dtype; back in float32."""
    return (slopes.float()[:, None] * positions.float()[None, :]).to(dtype).float()


def _reference_fp32(i):
    """The fused kernels' function in float32 (materialised): fp32 scores + dtype-rounded ALiBi bias."""
    q, k, v = (i[n].float() for n in ("q", "k", "v"))
    NQ, NK = q.shape[2], k.shape[2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores + _alibi_bias(i["slopes"], torch.arange(NK, device=q.device), i["q"].dtype)[None, :, None, :]
    visible = torch.ones(NQ, NK, dtype=torch.bool, device=q.device).tril(NK - NQ)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return (probs @ v).to(i["q"].dtype)


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
    Impl("reference_fp32", _reference_fp32,
         description="the oracle: fp32 scores + dtype-rounded ALiBi bias, fp32 softmax, materialised"),
    Impl("hf_eager", _hf_eager, comparable=False,
         description="BloomAttention's arithmetic (materialised; rounds the biased scores to the dtype)"),
    Impl("sdpa_bias", lambda i: F.scaled_dot_product_attention(i["q"], i["k"], i["v"], attn_mask=i["bias"]),
         prepare=_sdpa_bias_prepare, description="SDPA with an explicit [H, N, N] ALiBi + causal bias"),
    Impl("flex", lambda i: i["flex"](i["q"], i["k"], i["v"], score_mod=i["score_mod"], block_mask=i["block_mask"]),
         prepare=_flex_prepare, cuda_only=True, comparable=False,
         description="FlexAttention, ALiBi score_mod + causal block mask (bias kept in float32: not HF's)"),
    Impl("flash_no_alibi", lambda i: F.scaled_dot_product_attention(i["q"], i["k"], i["v"], is_causal=True),
         comparable=False, description="SDPA flash causal without ALiBi (a lower bound, not the same function)"),
]

for _name, _gpu in (("alibi_causal_h32_d128", {"B": 1, "H": 32, "N": 4096, "D": 128}),
                    ("alibi_causal_h16_d64", {"B": 2, "H": 16, "N": 4096, "D": 64})):
    register(Case(_name, setup=_qkv_setup, impls=_ATTENTION_IMPLS, gpu_shape=_gpu,
                  cpu_shape={"B": 1, "H": 2, "N": 64, "D": 32}, bound="compute", flops=_causal_flops,
                  tokens=lambda s: s["B"] * s["N"],
                  description="BLOOM attention core: causal + ALiBi, forward and backward"))
# an HF model accelerated as loaded (float32): the float32 tiles, against SDPA's and Flex's float32 kernels
register(Case("alibi_causal_fp32_h16_d64", setup=_qkv_setup, impls=_ATTENTION_IMPLS, dtype=torch.float32,
              gpu_shape={"B": 1, "H": 16, "N": 2048, "D": 64}, cpu_shape={"B": 1, "H": 2, "N": 64, "D": 32},
              bound="compute", flops=_causal_flops, tokens=lambda s: s["B"] * s["N"],
              description="BLOOM attention core in float32 (IEEE dots on the CUDA cores): causal + ALiBi"))


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


def _decode_reference_fp32(i):
    """One cached step in float32 over the first ``lens`` keys, ALiBi bias rounded to the dtype."""
    q, k, v = (i[n].float() for n in ("q", "k", "v"))
    N = k.shape[2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores + _alibi_bias(i["slopes"], torch.arange(N, device=q.device), i["q"].dtype)[None, :, None, :]
    valid = torch.arange(N, device=q.device)[None, :] < i["lens"][:, None]
    probs = torch.softmax(scores.masked_fill(~valid[:, None, None, :], float("-inf")), dim=-1)
    return (probs @ v).to(i["q"].dtype)


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
           Impl("reference_fp32", _decode_reference_fp32,
                description="the oracle: fp32 scores + dtype-rounded ALiBi bias over the valid keys"),
           Impl("hf_eager", _decode_hf, comparable=False,
                description="BloomAttention's arithmetic for one cached step (rounds the biased scores)")],
    description="one new token per sequence against a 4096-slot KV cache (memory-bound)"))

"""Benchmark cases for Reformer's local attention kernel.

``local_attention_64k`` times the attention core (no projections, as the FlexAttention figure in DESIGN.md):
B1 N65536 H8 D128, chunk 128 with one chunk before, fp16, encoder (the wrap-around is real). Each query
sees 2c keys: 4·B·H·N·2c·D FLOPs forward, 2.5x that more backward. Baselines: FlexAttention with the
equivalent block mask, and HF's LocalSelfAttention module (with its projections, as DESIGN's figure).
"""

from __future__ import annotations

import torch

from .registry import OURS, Case, Count, Impl, register


def _leaf(t):
    return t.detach().requires_grad_(True)


def _setup(shape, dtype, device) -> dict:
    B, H, N, D = shape["B"], shape["H"], shape["N"], shape["D"]
    return {n: _leaf(torch.randn(B, H, N, D, device=device).to(dtype)) for n in ("q", "k", "v")}


def _flops(shape) -> Count:
    fwd = 4 * shape["B"] * shape["H"] * shape["N"] * 2 * shape["C"] * shape["D"]
    return Count(fwd=fwd, fwd_bwd=3.5 * fwd)


def _ours(i, chunk):
    from tritonformers.kernels.local_attention import local_attention
    return local_attention(i["q"], i["k"], i["v"], chunk_length=chunk, num_chunks_before=1, num_chunks_after=0)


def _flex_prepare(chunk):
    def prepare(inputs: dict) -> dict:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        n_chunks = inputs["q"].shape[2] // chunk

        def own_or_previous_chunk(b, h, q_idx, kv_idx):
            diff = (q_idx // chunk - kv_idx // chunk + n_chunks) % n_chunks
            return diff <= 1

        N = inputs["q"].shape[2]
        mask = create_block_mask(own_or_previous_chunk, None, None, N, N, device=inputs["q"].device)
        return {**inputs, "flex": torch.compile(flex_attention, dynamic=False), "block_mask": mask}
    return prepare


def _hf_prepare(chunk):
    def prepare(inputs: dict) -> dict:
        from transformers import ReformerConfig
        from transformers.models.reformer.modeling_reformer import LocalSelfAttention
        B, H, N, D = inputs["q"].shape
        cfg = ReformerConfig(hidden_size=H * D, num_attention_heads=H, attention_head_size=D,
                             local_attn_chunk_length=chunk, local_num_chunks_before=1, local_num_chunks_after=0,
                             local_attention_probs_dropout_prob=0.0)
        module = LocalSelfAttention(cfg, layer_idx=0).to(inputs["q"].device, inputs["q"].dtype)
        hidden = _leaf(torch.randn(B, N, H * D, device=inputs["q"].device).to(inputs["q"].dtype))
        return {**inputs, "module": module, "hidden": hidden}
    return prepare


for _chunk in (128,):
    register(Case(
        "local_attention_64k", setup=_setup, bound="compute", flops=_flops, tokens=lambda s: s["B"] * s["N"],
        gpu_shape={"B": 1, "H": 8, "N": 65536, "D": 128, "C": _chunk}, cpu_shape={"B": 1, "H": 2, "N": 64, "D": 32, "C": 16},
        dtype=torch.float16,
        impls=[Impl(OURS, lambda i, c=_chunk: _ours(i, c)),
               Impl("flex", lambda i: i["flex"](i["q"], i["k"], i["v"], block_mask=i["block_mask"]),
                    prepare=_flex_prepare(_chunk), cuda_only=True,
                    description="FlexAttention with the own+previous-chunk block mask (wrapping)"),
               Impl("hf_eager", lambda i: i["module"](i["hidden"]).hidden_states, prepare=_hf_prepare(_chunk), comparable=False,
                    description="HF LocalSelfAttention module incl. q/k/v projections (not the same work)")],
        description="Reformer local attention core, chunk 128, one chunk before, encoder"))

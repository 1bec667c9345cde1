"""Benchmark cases for Reformer's local attention kernel.

``local_attention_64k`` times the attention core (no projections, as the FlexAttention figure in DESIGN.md):
B1 N65536 H8 D128, chunk 128 with one chunk before, fp16, encoder (the wrap-around is real). Each query
sees 2c keys: 4·B·H·N·2c·D FLOPs forward, 2.5x that more backward. Baselines: FlexAttention with the
equivalent block mask, and HF's LocalSelfAttention module (with its projections, as DESIGN's figure).
All use the usual ``1/sqrt(D)`` score scale (HF folds it into the keys; the kernel takes it as ``scale``);
the oracle is the PyTorch reference (HF's op-for-op core).
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


def _local(fn, i, chunk):
    return fn(i["q"], i["k"], i["v"], chunk_length=chunk, num_chunks_before=1, num_chunks_after=0,
              scale=i["q"].shape[-1] ** -0.5)


def _ours(i, chunk):
    from tritonformers.kernels.local_attention import local_attention
    return _local(local_attention, i, chunk)


def _reference(i, chunk):
    from tritonformers.kernels.local_attention import local_attention_reference
    return _local(local_attention_reference, i, chunk)


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
               Impl("torch_eager", lambda i, c=_chunk: _reference(i, c),
                    description="local_attention_reference: HF's chunked core op for op (the oracle)"),
               Impl("flex", lambda i: i["flex"](i["q"], i["k"], i["v"], block_mask=i["block_mask"]),
                    prepare=_flex_prepare(_chunk), cuda_only=True,
                    description="FlexAttention with the own+previous-chunk block mask (wrapping)"),
               Impl("hf_eager", lambda i: i["module"](i["hidden"]).hidden_states, prepare=_hf_prepare(_chunk), comparable=False,
                    description="HF LocalSelfAttention module incl. q/k/v projections (not the same work)")],
        description="Reformer local attention core, chunk 128, one chunk before, encoder"))


# ------------------------------------------------------------------------------------------ LSH module

def _lsh_config(shape):
    from transformers import ReformerConfig
    return ReformerConfig(hidden_size=shape["E"], num_attention_heads=shape["H"], attention_head_size=shape["D"],
                          lsh_attn_chunk_length=shape["C"], lsh_num_chunks_before=1, lsh_num_chunks_after=0,
                          num_hashes=shape["hashes"], num_buckets=max(2, 2 * shape["N"] // shape["C"]),
                          hash_seed=1234, lsh_attention_probs_dropout_prob=0.0, max_position_embeddings=shape["N"])


def _lsh_setup(shape, dtype, device) -> dict:
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention as HFLSH
    cfg = _lsh_config(shape)
    state = {k: v.to(device, dtype) for k, v in HFLSH(cfg, layer_idx=0).state_dict().items()}
    x = _leaf(torch.randn(shape["B"], shape["N"], shape["E"], device=device).to(dtype))
    return {"x": x, "config": cfg, "state": state}


def _lsh_prepare(kind):
    def prepare(inputs: dict) -> dict:
        if kind == "ours":
            from tritonformers.nn import LSHSelfAttention as cls
        else:
            from transformers.models.reformer.modeling_reformer import LSHSelfAttention as cls
        module = cls(inputs["config"], layer_idx=0)
        module.load_state_dict(inputs["state"])
        return {**inputs, "module": module.to(inputs["x"].device, inputs["x"].dtype)}
    return prepare


def _lsh_flops(shape) -> Count:
    B, N, E, H, D, C, R = (shape[k] for k in ("B", "N", "E", "H", "D", "C", "hashes"))
    proj = 2 * B * N * E * 2 * H * D
    attn = 4 * B * H * R * N * 2 * C * D  # every round: each slot against its chunk and the previous one
    return Count(fwd=proj + attn, fwd_bwd=3 * proj + 3.5 * attn)


for _hashes in (2, 4):
    register(Case(
        f"lsh_attention_64k_{_hashes}h", setup=_lsh_setup, bound="compute", flops=_lsh_flops, dtype=torch.float16,
        gpu_shape={"B": 1, "N": 65536, "E": 1024, "H": 8, "D": 128, "C": 256, "hashes": _hashes},
        cpu_shape={"B": 1, "N": 64, "E": 32, "H": 2, "D": 16, "C": 16, "hashes": _hashes},
        tokens=lambda s: s["B"] * s["N"],
        impls=[Impl(OURS, lambda i: i["module"](i["x"]).hidden_states, prepare=_lsh_prepare("ours"),
                    description="nn.LSHSelfAttention (projections, hashing in torch, fused attention)"),
               Impl("hf_eager", lambda i: i["module"](i["x"]).hidden_states, prepare=_lsh_prepare("hf"),
                    description="transformers' LSHSelfAttention, same weights and hash seed")],
        description=f"LSH self-attention module, chunk 256, {_hashes} hash rounds"))

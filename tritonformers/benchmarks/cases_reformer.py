"""Benchmark cases for Reformer: the local and LSH attention kernels, and the models (below).

``local_attention_64k`` times the attention core (no projections, as the FlexAttention figure in DESIGN.md):
B1 N65536 H8 D128, chunk 128 with one chunk before, fp16, encoder (the wrap-around is real). Each query
sees 2c keys: 4·B·H·N·2c·D FLOPs forward, 2.5x that more backward. Baselines: FlexAttention with the
equivalent block mask, and HF's LocalSelfAttention module (with its projections, as DESIGN's figure).
All use the usual ``1/sqrt(D)`` score scale (HF folds it into the keys; the kernel takes it as ``scale``);
the oracle is the PyTorch reference (HF's op-for-op core).
"""

from __future__ import annotations

import torch

from . import lm
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


# ------------------------------------------------------------------------------------------ models
# Both models get the same random weights (no hub access): transformers' ReformerModelWithLMHead is built from
# the published configuration (the checkpoint's config.json) and ours loads its state dict. Training steps keep the
# checkpoints' dropouts; LSH hashing is seeded (hash_seed) so the forward outputs are comparable.

_ENWIK8 = dict(layers=("local", "local", "lsh", "local", "local", "local", "lsh", "local", "local", "local", "lsh",
                       "local"), hidden=1024, heads=8, head=128, ff=4096, local_c=128, lsh_c=256, hashes=4,
               buckets=512, axial=(128, 512), axial_dims=(256, 768), vocab=258, dropout=(0.2, 0.2, 0.1))
_CRIME = dict(layers=("local", "lsh") * 3, hidden=256, heads=2, head=64, ff=512, local_c=64, lsh_c=64, hashes=1,
              buckets=(64, 128), axial=(512, 1024), axial_dims=(64, 192), vocab=320, dropout=(0.05, 0.05, 0.0))
_TINY_REFORMER = dict(layers=("local", "lsh"), hidden=32, heads=2, head=16, ff=64, local_c=8, lsh_c=16, hashes=2,
                      buckets=4, axial=(8, 8), axial_dims=(8, 24), vocab=258, dropout=(0.0, 0.0, 0.0))


def _reformer_fields(shape) -> dict:
    hidden_p, local_p, lsh_p = shape["dropout"]
    return dict(attn_layers=list(shape["layers"]), hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
                attention_head_size=shape["head"], feed_forward_size=shape["ff"],
                local_attn_chunk_length=shape["local_c"], lsh_attn_chunk_length=shape["lsh_c"],
                num_hashes=shape["hashes"], num_buckets=shape["buckets"] if isinstance(shape["buckets"], int)
                else list(shape["buckets"]), axial_pos_shape=list(shape["axial"]),
                axial_pos_embds_dim=list(shape["axial_dims"]), max_position_embeddings=shape["axial"][0] *
                shape["axial"][1], vocab_size=shape["vocab"], is_decoder=True, hash_seed=1234,
                hidden_dropout_prob=hidden_p, local_attention_probs_dropout_prob=local_p,
                lsh_attention_probs_dropout_prob=lsh_p)


def _make_reformer(which, shape, dtype, device):
    """transformers' ReformerModelWithLMHead with random weights, or ours loaded with its state dict."""
    from transformers import ReformerConfig as HFConfig, ReformerModelWithLMHead as HFReformer

    from tritonformers.models.reformer import ReformerConfig, ReformerModelWithLMHead
    fields = _reformer_fields(shape)
    torch.manual_seed(0)
    hf = HFReformer(HFConfig(**fields))
    if which == "hf":
        return hf.to(device, dtype)
    ours = ReformerModelWithLMHead(ReformerConfig(**fields))
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.decoder.bias"}:  # (transformers < 5.25 has no decoder bias)
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    return ours.to(device, dtype)


def _reformer_flops(shape) -> Count:
    """2 x parameters x tokens plus each layer's attention (its window of 2 chunks, every hash round)."""
    h, f, heads, d = shape["hidden"], shape["ff"], shape["heads"], shape["head"]
    per_layer = {"local": 4 * h * heads * d + 2 * h * f, "lsh": 3 * h * heads * d + 2 * h * f}
    params = sum(per_layer[k] for k in shape["layers"]) + shape["vocab"] * 2 * h
    tokens = shape["B"] * shape["N"]
    window = {"local": 2 * shape["local_c"], "lsh": 2 * shape["lsh_c"] * shape["hashes"]}
    attention = sum(4 * tokens * heads * d * window[k] for k in shape["layers"])
    return Count(fwd=2 * params * tokens + attention, fwd_bwd=6 * params * tokens + 3.5 * attention)


register(Case(
    "reformer_enwik8_train_n65536", setup=lm.train_setup, bound="compute", flops=_reformer_flops,
    gpu_shape={**_ENWIK8, "B": 1, "N": 65536}, cpu_shape={**_TINY_REFORMER, "B": 1, "N": 64},
    tokens=lambda s: s["B"] * s["N"],
    impls=lm.train_impls(_make_reformer, "hf_eager", "tritonformers ReformerModelWithLMHead (reversible, fused "
                         "local/LSH kernels, fused loss), AdamW step",
                         "transformers ReformerModelWithLMHead, AdamW step"),
    description="google/reformer-enwik8-shaped training step, 65,536 tokens (weights stepped: not compared)"))


def _forward_setup(shape, dtype, device) -> dict:
    ids = torch.randint(1, shape["vocab"], (shape["B"], shape["N"]), device=device)
    return {"input_ids": ids, "shape": shape, "dtype": dtype, "device": device}


def _forward_prepare(which):
    def prepare(inputs: dict) -> dict:
        return {**inputs, "model": _make_reformer(which, inputs["shape"], inputs["dtype"], inputs["device"]).eval()}
    return prepare


def _forward(i):
    with torch.no_grad():
        return i["model"](input_ids=i["input_ids"], use_cache=False).logits


register(Case(
    "reformer_crime_fwd_n524288", setup=_forward_setup, bound="compute", backward=False,
    flops=lambda s: Count(fwd=_reformer_flops(s).fwd), dtype=torch.float16,
    gpu_shape={**_CRIME, "B": 1, "N": 524288}, cpu_shape={**_TINY_REFORMER, "B": 1, "N": 64},
    tokens=lambda s: s["B"] * s["N"], check_tol=5e-2,
    impls=[Impl(OURS, _forward, prepare=_forward_prepare("ours"), description="ReformerModelWithLMHead forward"),
           Impl("hf_eager", _forward, prepare=_forward_prepare("hf"),
                description="transformers ReformerModelWithLMHead forward, same weights and hash seed")],
    description="google/reformer-crime-and-punishment-shaped forward over one 524,288-token sequence (fp16 "
                "LSH buckets can flip on near-ties between the two LayerNorms: loose check)"))

# Activation memory vs depth: a training step at enwik8's width, N 16384, with 2 to 12 layers.
for _layers in (2, 4, 8, 12):
    register(Case(
        "reformer_train_layers", variant=f"layers{_layers}", fields={"layers_n": _layers}, setup=lm.train_setup,
        bound="compute", flops=_reformer_flops,
        gpu_shape={**_ENWIK8, "layers": _ENWIK8["layers"][:_layers], "axial": (128, 128), "B": 1, "N": 16384},
        cpu_shape={**_TINY_REFORMER, "layers": ("local", "lsh") * (_layers // 2), "B": 1, "N": 64},
        tokens=lambda s: s["B"] * s["N"],
        impls=lm.train_impls(_make_reformer, "hf_eager", "tritonformers Reformer training step",
                             "transformers Reformer training step"),
        description=f"Reformer training step with {_layers} layers (peak memory vs depth)"))

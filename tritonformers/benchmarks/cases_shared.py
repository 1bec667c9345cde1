"""Benchmark cases for the shared kernels: norms, activations, rotary embedding, fused linear cross-entropy.

Work counts are the minimal ones (METHOD: each input read once, each output written once): for the
bandwidth-bound ops the bytes of the tensors a pass must touch, for the fused cross-entropy the FLOPs of
its three matmuls. Kernels and baselines are imported inside the impl functions, so a missing kernel
module or a missing transformers turns into an error on that impl's row, not a failure of the run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import OURS, Case, Count, Impl, register


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def _randn(*shape: int, dtype, device, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    """Normal draws made in float32 on the device, then rounded to ``dtype`` (never zeros)."""
    return (torch.randn(*shape, device=device) * scale + offset).to(dtype)


def _compiled(fn):
    """An impl ``prepare`` that wraps ``fn`` in ``torch.compile`` (static shapes: one graph per case)."""
    def prepare(inputs: dict) -> dict:
        return {**inputs, "compiled": torch.compile(fn, dynamic=False)}
    return prepare


# ------------------------------------------------------------------------------------------------ norms

def _norm_setup(shape, dtype, device, *, bias: bool) -> dict:
    T, d = shape["T"], shape["d"]
    inputs = {"x": _leaf(_randn(T, d, dtype=dtype, device=device)),
              "weight": _leaf(_randn(d, dtype=dtype, device=device, scale=0.1, offset=1.0))}
    if bias:
        inputs["bias"] = _leaf(_randn(d, dtype=dtype, device=device, scale=0.1))
    return inputs


def _norm_bytes(shape, dtype) -> Count:
    # forward reads x, writes y; backward reads x and dy, writes dx (weight-sized terms are negligible)
    n = shape["T"] * shape["d"] * dtype.itemsize
    return Count(fwd=2 * n, fwd_bwd=5 * n)


def _ln_ours(i):
    from tritonformers.kernels.norms import layer_norm
    return layer_norm(i["x"], i["weight"], i["bias"], eps=1e-5)


def _ln_torch(i):
    return F.layer_norm(i["x"], i["x"].shape[-1:], i["weight"], i["bias"], eps=1e-5)


def _rms_ours(i):
    from tritonformers.kernels.norms import rms_norm
    return rms_norm(i["x"], i["weight"], eps=1e-6)


def _rms_torch(i):
    return F.rms_norm(i["x"], i["x"].shape[-1:], i["weight"], eps=1e-6)


def _rms_hf_formula(x, weight):
    """LlamaRMSNorm.forward's arithmetic (float32 statistics, cast back, then times the weight)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return weight * h.to(x.dtype)


def _rms_hf_prepare(inputs: dict) -> dict:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    module = LlamaRMSNorm(inputs["x"].shape[-1], eps=1e-6)
    # swap the module's parameter for the shared input leaf, so gradients land where the runner looks
    del module.weight
    module.weight = inputs["weight"]
    return {**inputs, "module": module}


register(
    Case("norm_bandwidth", variant="layer_norm", fields={"op": "layer_norm"},
         setup=lambda s, dt, dev: _norm_setup(s, dt, dev, bias=True),
         gpu_shape={"T": 16384, "d": 4096}, cpu_shape={"T": 64, "d": 256},
         bytes=_norm_bytes, tokens=lambda s: s["T"],
         impls=[Impl(OURS, _ln_ours),
                Impl("torch_fused", _ln_torch, description="F.layer_norm (ATen's fused kernel)"),
                Impl("torch_compile", lambda i: i["compiled"](i["x"], i["x"].shape[-1:], i["weight"], i["bias"], 1e-5),
                     prepare=_compiled(F.layer_norm), cuda_only=True)],
         description="LayerNorm with weight and bias, eps 1e-5 (BLOOM's)"),
    Case("norm_bandwidth", variant="rms_norm", fields={"op": "rms_norm"},
         setup=lambda s, dt, dev: _norm_setup(s, dt, dev, bias=False),
         gpu_shape={"T": 16384, "d": 4096}, cpu_shape={"T": 64, "d": 256},
         bytes=_norm_bytes, tokens=lambda s: s["T"],
         impls=[Impl(OURS, _rms_ours),
                Impl("hf_eager", lambda i: i["module"](i["x"]), prepare=_rms_hf_prepare,
                     description="transformers' LlamaRMSNorm"),
                Impl("torch_fused", _rms_torch, description="F.rms_norm"),
                Impl("torch_compile", lambda i: i["compiled"](i["x"], i["weight"]),
                     prepare=_compiled(_rms_hf_formula), cuda_only=True,
                     description="torch.compile of LlamaRMSNorm's formula")],
         description="RMSNorm with weight, eps 1e-6 (Llama/DiffLlama's)"),
)


# ------------------------------------------------------------------------------------------ fused CE

def _ce_setup(shape, dtype, device) -> dict:
    T, d, V = shape["T"], shape["d"], shape["V"]
    target = torch.randint(0, V, (T,), device=device)
    target[torch.rand(T, device=device) < 0.05] = -100  # some padding, as in a real batch
    return {"hidden": _leaf(_randn(T, d, dtype=dtype, device=device)),
            "weight": _leaf(_randn(V, d, dtype=dtype, device=device, scale=d ** -0.5)),
            "target": target}


def _ce_flops(shape) -> Count:
    # logits = hidden @ weight.T is 2TdV; backward adds dhidden and dweight, 2TdV each
    n = 2 * shape["T"] * shape["d"] * shape["V"]
    return Count(fwd=n, fwd_bwd=3 * n)


def _ce_ours(i):
    from tritonformers.kernels.cross_entropy import fused_linear_cross_entropy
    return fused_linear_cross_entropy(i["hidden"], i["weight"], i["target"], ignore_index=-100)


def _ce_torch(i):
    return F.cross_entropy(F.linear(i["hidden"], i["weight"]).float(), i["target"], ignore_index=-100)


register(
    Case("fused_linear_ce", setup=_ce_setup, bound="compute", flops=_ce_flops,
         gpu_shape={"T": 8192, "d": 1024, "V": 250880}, cpu_shape={"T": 32, "d": 32, "V": 500},
         tokens=lambda s: s["T"],
         impls=[Impl(OURS, _ce_ours),
                Impl("torch_eager", _ce_torch,
                     description="F.cross_entropy(F.linear(h, W).float(), y), as HF's LM loss")],
         description="LM head + cross-entropy, mean over non-ignored tokens (BLOOM's vocabulary)"),
)


# ------------------------------------------------------------------------------------------ activations

def _rows_setup(*names: str, width: str):
    def setup(shape, dtype, device) -> dict:
        return {n: _leaf(_randn(shape["T"], shape[width], dtype=dtype, device=device)) for n in names}
    return setup


def _gelu_setup(shape, dtype, device) -> dict:
    inputs = _rows_setup("x", width="d")(shape, dtype, device)
    inputs["bias"] = _leaf(_randn(shape["d"], dtype=dtype, device=device, scale=0.1))
    return inputs


def _gelu_bytes(shape, dtype) -> Count:
    # forward reads x, writes y; backward reads x and dy, writes dx (the bias terms are negligible)
    n = shape["T"] * shape["d"] * dtype.itemsize
    return Count(fwd=2 * n, fwd_bwd=5 * n)


def _gelu_ours(i):
    from tritonformers.kernels.activations import gelu
    return gelu(i["x"], "bloom", bias=i["bias"])


def _bloom_gelu_prepare(inputs: dict) -> dict:
    from transformers.models.bloom.modeling_bloom import BloomGelu
    return {**inputs, "module": BloomGelu().train()}  # training mode: HF's custom-backward GeLUFunction


def _bloom_gelu_formula(x, bias):
    """bloom_gelu_forward(x + bias): the bias add of BLOOM's dense_h_to_4h, then its tanh-GeLU."""
    x = x + bias
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


register(
    Case("gelu_bloom", setup=_gelu_setup, bytes=_gelu_bytes, tokens=lambda s: s["T"],
         gpu_shape={"T": 4096, "d": 4096}, cpu_shape={"T": 64, "d": 256},
         impls=[Impl(OURS, _gelu_ours, description="gelu(x, 'bloom', bias=b), bias fused"),
                Impl("hf_eager", lambda i: i["module"](i["x"] + i["bias"]), prepare=_bloom_gelu_prepare,
                     description="x + b, then transformers' BloomGelu (training mode)"),
                Impl("torch_eager", lambda i: F.gelu(i["x"] + i["bias"], approximate="tanh"),
                     description="x + b, then F.gelu(approximate='tanh')"),
                Impl("torch_compile", lambda i: i["compiled"](i["x"], i["bias"]),
                     prepare=_compiled(_bloom_gelu_formula), cuda_only=True)],
         description="BLOOM-560m MLP activation: bias add + BLOOM's tanh-GeLU on [B*N, 4h]"),
)


def _swiglu_bytes(shape, dtype) -> Count:
    # forward reads gate and up, writes out; backward reads gate, up, dout and writes dgate, dup
    n = shape["T"] * shape["I"] * dtype.itemsize
    return Count(fwd=3 * n, fwd_bwd=8 * n)


def _swiglu_ours(i):
    from tritonformers.kernels.activations import swiglu
    return swiglu(i["gate"], i["up"])


def _swiglu_hf_prepare(inputs: dict) -> dict:
    from transformers.activations import ACT2FN
    return {**inputs, "act": ACT2FN["silu"]}


def _swiglu_formula(gate, up):
    return F.silu(gate) * up


register(
    Case("swiglu", setup=_rows_setup("gate", "up", width="I"), bytes=_swiglu_bytes, tokens=lambda s: s["T"],
         gpu_shape={"T": 4096, "I": 8192}, cpu_shape={"T": 64, "I": 256},
         impls=[Impl(OURS, _swiglu_ours),
                Impl("hf_eager", lambda i: i["act"](i["gate"]) * i["up"], prepare=_swiglu_hf_prepare,
                     description="ACT2FN['silu'](gate) * up, as LlamaMLP"),
                Impl("torch_compile", lambda i: i["compiled"](i["gate"], i["up"]),
                     prepare=_compiled(_swiglu_formula), cuda_only=True)],
         description="SwiGLU gate of the DiffLlama-1B MLP (intermediate 8192) on B1 N4096"),
)


# ------------------------------------------------------------------------------------------ rotary

def _rotary_setup(shape, dtype, device) -> dict:
    B, H, N, D = shape["B"], shape["H"], shape["N"], shape["D"]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
    freqs = torch.outer(torch.arange(N, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)[None]  # [1, N, D], as HF's rotary embedding builds it
    return {"q": _leaf(_randn(B, H, N, D, dtype=dtype, device=device)),
            "k": _leaf(_randn(B, H, N, D, dtype=dtype, device=device)),
            "cos": emb.cos().to(dtype), "sin": emb.sin().to(dtype)}


def _rotary_bytes(shape, dtype) -> Count:
    # each pass reads q, k (or their gradients) and cos, sin, and writes two tensors the size of q, k
    qk = shape["B"] * shape["H"] * shape["N"] * shape["D"] * dtype.itemsize
    cs = shape["N"] * shape["D"] * dtype.itemsize
    one = 4 * qk + 2 * cs
    return Count(fwd=one, fwd_bwd=2 * one)


def _rotary_ours(i):
    from tritonformers.kernels.rotary import apply_rotary
    return apply_rotary(i["q"], i["k"], i["cos"], i["sin"])


def _rotary_hf_prepare(inputs: dict) -> dict:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    return {**inputs, "fn": apply_rotary_pos_emb}


def _rotary_compile_prepare(inputs: dict) -> dict:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    return _compiled(apply_rotary_pos_emb)(inputs)


register(
    Case("rotary", setup=_rotary_setup, bytes=_rotary_bytes, tokens=lambda s: s["B"] * s["N"],
         gpu_shape={"B": 1, "H": 32, "N": 4096, "D": 128}, cpu_shape={"B": 1, "H": 2, "N": 32, "D": 32},
         impls=[Impl(OURS, _rotary_ours),
                Impl("hf_eager", lambda i: i["fn"](i["q"], i["k"], i["cos"], i["sin"]),
                     prepare=_rotary_hf_prepare, description="transformers' Llama apply_rotary_pos_emb"),
                Impl("torch_compile", lambda i: i["compiled"](i["q"], i["k"], i["cos"], i["sin"]),
                     prepare=_rotary_compile_prepare, cuda_only=True)],
         description="rotate-half RoPE on q and k [B, H, N, D] with cos/sin [1, N, D]"),
)

"""The public functional ops of tritonformers.

Each op validates its arguments (``TypeError``/``ValueError`` naming the argument, raised before anything
runs, under ``torch.compile`` too), then runs its Triton kernel through the ``torch.ops.tritonformers.<name>``
custom op (:mod:`tritonformers.ops`) or its PyTorch reference, as the backend says
(``tritonformers.runtime``). Every ``<op>_reference`` is exported too, as the eager oracle. Signatures,
defaults and results are those of the kernel modules' functions, whose docstrings state the math.
"""

from __future__ import annotations

import math

import torch

from .. import ops, runtime
from ..kernels import activations as _act
from ..kernels import attention as _attn
from ..kernels import cross_entropy as _ce
from ..kernels import diff_attention as _diff
from ..kernels import int_gemm as _ig
from ..kernels import int_ops as _io
from ..kernels import local_attention as _local
from ..kernels import lsh_attention as _lsh
from ..kernels import norms as _norms
from ..kernels import rotary as _rotary
from ..kernels.activations import gelu_reference, swiglu_reference
from ..kernels.attention import alibi_slopes, attention_reference, decode_attention_reference
from ..kernels.cross_entropy import fused_linear_cross_entropy_reference
from ..kernels.diff_attention import diff_attention_reference, diff_decode_attention_reference, diff_lambda
from ..kernels.int_gemm import int_attention_reference, int_linear_reference
from ..kernels.int_ops import (fixed_point, gelu_constants, int_gelu_reference, int_layer_norm_reference,
                               int_softmax_reference, layer_norm_constants, quantize_reference, requant_params,
                               requantize_reference, softmax_constants, symmetric_scale)
from ..kernels.local_attention import local_attention_reference
from ..kernels.lsh_attention import lsh_attention_reference
from ..kernels.norms import layer_norm_reference, rms_norm_reference
from ..kernels.rotary import apply_rotary_reference

_tf = torch.ops.tritonformers


def _grad_needs(*tensors) -> list[bool]:
    """Which tensors want a gradient (grad mode on and requires_grad; None never does)."""
    on = torch.is_grad_enabled()
    return [bool(on and t is not None and t.requires_grad) for t in tensors]


def _dense_last(*tensors):
    """The kernels need a unit stride on the last dimension; copy only the tensors that lack one."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def _mask_int8(mask):
    """The padding mask as the kernels read it (int8), converted once per mask and step for all layers."""
    return None if mask is None else runtime.derived_once(mask, "mask_int8", runtime.int8_mask)


def _dropout_seed(dropout_p: float) -> int:
    """The in-kernel dropout seed, drawn from torch's generator (so ``torch.manual_seed`` reproduces it)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout_p > 0 else 0


def _into(out, value):
    """``value``, or copied into a caller's preallocated ``out`` (an op returns fresh tensors)."""
    return runtime.write_out(out, "out", value)


# ---------------------------------------------------------------------------------------------- norms

def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5,
               residual: torch.Tensor | None = None):
    """LayerNorm over the last dimension, optionally fused with the residual add: y, or ``(y, x + residual)``
    (:func:`tritonformers.kernels.norms.layer_norm`)."""
    _norms._check_input(x)
    _norms._check_param(weight, "weight", x)
    _norms._check_param(bias, "bias", x)
    x, residual = _norms.check_residual(x, residual)
    eps = _norms._check_eps(eps)
    tensors = [t for t in (x, weight, bias, residual) if t is not None]
    if runtime.use_triton(*tensors, op="layer_norm") and _norms._kernel_fits(x, "layer_norm"):
        y, s, _, _ = _tf.layer_norm(x, weight, bias, residual, eps)
        return y if residual is None else (y, s)
    return layer_norm_reference(x, weight, bias, eps, residual)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """HuggingFace's RMSNorm over the last dimension (:func:`tritonformers.kernels.norms.rms_norm`)."""
    _norms._check_input(x)
    _norms._check_param(weight, "weight", x)
    eps = _norms._check_eps(eps)
    tensors = [t for t in (x, weight) if t is not None]
    if runtime.use_triton(*tensors, op="rms_norm") and _norms._kernel_fits(x, "rms_norm"):
        return _tf.rms_norm(x, weight, eps)[0]
    return rms_norm_reference(x, weight, eps)


# ----------------------------------------------------------------------------------------- activations

def gelu(x: torch.Tensor, approximate: str = "none", bias: torch.Tensor | None = None) -> torch.Tensor:
    """GELU of ``x + bias``: "none", "tanh" or "bloom" (:func:`tritonformers.kernels.activations.gelu`)."""
    _act._check_gelu_args(x, approximate, bias)
    bias = _act.bias_like(x, bias)
    if runtime.use_triton(x, op="gelu"):
        return _tf.gelu(x, bias, approximate)
    return gelu_reference(x, approximate, bias)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` as HF's Llama MLP (:func:`tritonformers.kernels.activations.swiglu`)."""
    _act._check_swiglu_args(gate, up)
    if runtime.use_triton(gate, up, op="swiglu"):
        return _tf.swiglu(gate, up)
    return swiglu_reference(gate, up)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 layout: str = "bhnd") -> tuple[torch.Tensor, torch.Tensor]:
    """HF's rotary embedding of q and k (:func:`tritonformers.kernels.rotary.apply_rotary`)."""
    _rotary._check_rotary_args(q, k, cos, sin, layout)
    cos, sin = _rotary.tables_like(q, cos, sin)
    if runtime.use_triton(q, k, cos, sin, op="apply_rotary"):
        if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
            runtime.unsupported("apply_rotary", "gradients for cos/sin (they are treated as constants)")
        else:
            return _tf.apply_rotary(q, k, cos, sin, layout)
    return apply_rotary_reference(q, k, cos, sin, layout)


# ------------------------------------------------------------------------------------ fused linear CE

def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               bias: torch.Tensor | None = None, ignore_index: int = -100,
                               reduction: str = "mean", *, chunk_size: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), target)`` without materialising the logits
    (:func:`tritonformers.kernels.cross_entropy.fused_linear_cross_entropy`)."""
    hidden, weight, bias = _ce._autocast_inputs(hidden, weight, bias)
    _ce._validate(hidden, weight, target, bias, ignore_index, reduction, chunk_size)
    if not runtime.use_triton(hidden, weight, target, op="fused_linear_cross_entropy"):
        if not torch.compiler.is_compiling():  # a data-dependent check: eager only (F.cross_entropy checks too)
            _ce._check_target_range(target, weight.shape[0], ignore_index)
        return fused_linear_cross_entropy_reference(hidden, weight, target, bias, ignore_index, reduction)
    needs = _grad_needs(hidden, weight, bias)
    # the op checks the target range itself, before its launch: a data-dependent check inside a graph
    flat_target = target.reshape(-1).contiguous()
    with torch.autocast(hidden.device.type, enabled=False):
        loss = _tf.fused_linear_cross_entropy(runtime.as_rows(hidden), weight, flat_target, bias, ignore_index,
                                              reduction, chunk_size, needs)[0]
    return loss.view(target.shape) if reduction == "none" else loss


# ------------------------------------------------------------------------------------------ attention

def attention(q, k, v, *, causal=False, alibi_slopes=None, key_padding_mask=None, scale=None, dropout_p=0.0,
              return_lse=False):
    """Fused attention, optionally with ALiBi, a padding mask, causality and dropout: out [B, H, Nq, D], or
    ``(out, lse)`` (:func:`tritonformers.kernels.attention.attention`)."""
    _attn._validate(q, k, v, alibi_slopes, key_padding_mask, scale, dropout_p)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if _attention_kernel_serves(q, k.shape[2]):
        q, k, v = _dense_last(q, k, v)
        out, lse = _tf.attention(q, k, v, alibi_slopes, *_attention_masks(alibi_slopes, key_padding_mask, k.shape[2]),
                                 bool(causal), scale, float(dropout_p), _dropout_seed(dropout_p))
        return (out, lse) if return_lse else out
    return attention_reference(q, k, v, causal=causal, alibi_slopes=alibi_slopes,
                               key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p,
                               return_lse=return_lse)


def packed_attention(qkv, *, causal=False, alibi_slopes=None, key_padding_mask=None, scale=None, dropout_p=0.0,
                     return_lse=False):
    """:func:`attention` of the q, k, v packed in ``qkv`` [B, N, H, 3, D] (BLOOM's fused projection viewed as
    ``[B, N, n_head, 3, head_dim]``; a [B, N, 3, H, D] projection passes ``.transpose(2, 3)``): out [B, H, N, D],
    or ``(out, lse)``. Same math as ``attention(*split_packed_qkv(qkv), ...)``; on the kernel the backward writes
    one [B, N, H, 3, D] gradient instead of three that autograd would scatter into it."""
    runtime.check_tensor(qkv, "qkv", ndim=5)
    if qkv.shape[3] != 3:
        raise ValueError(f"qkv must have shape [B, N, n_head, 3, head_dim], got {list(qkv.shape)}")
    q, k, v = _attn.split_packed_qkv(qkv)
    _attn._validate(q, k, v, alibi_slopes, key_padding_mask, scale, dropout_p)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if _attention_kernel_serves(q, k.shape[2]):
        qkv = _dense_last(qkv)[0]
        out, lse = _tf.packed_attention(qkv, alibi_slopes, *_attention_masks(alibi_slopes, key_padding_mask,
                                                                             qkv.shape[1]),
                                        bool(causal), scale, float(dropout_p), _dropout_seed(dropout_p))
        return (out, lse) if return_lse else out
    return attention_reference(q, k, v, causal=causal, alibi_slopes=alibi_slopes,
                               key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p,
                               return_lse=return_lse)


def _attention_kernel_serves(q, num_keys: int) -> bool:
    """The backend runs the kernel (an unsupported head dim raises under the ``triton`` backend, else falls back),
    and there is something to attend: empty sequences take the reference's empty result."""
    if not runtime.use_triton(q, op="attention"):
        return False
    if q.shape[-1] > _attn.MAX_HEAD_DIM:
        runtime.unsupported("attention", f"head dim {q.shape[-1]} (at most {_attn.MAX_HEAD_DIM})")
        return False
    return q.shape[2] > 0 and num_keys > 0


def _attention_masks(alibi_slopes, key_padding_mask, num_keys: int):
    """(ALiBi key positions or None, the padding mask as int8 or None) for the attention kernels."""
    if key_padding_mask is None:
        return None, None
    positions = runtime.derived_once(key_padding_mask, "alibi_positions", lambda m: _attn.alibi_positions(
        m, num_keys, None)) if alibi_slopes is not None else None
    return positions, _mask_int8(key_padding_mask)


def decode_attention(q, k_cache, v_cache, cache_lens, *, alibi_slopes=None, key_padding_mask=None, scale=None,
                     out=None):
    """Attention of 1-16 new queries against a preallocated KV cache (inference only;
    :func:`tritonformers.kernels.attention.decode_attention`)."""
    _attn._validate_decode(q, k_cache, v_cache, cache_lens, alibi_slopes, key_padding_mask, scale)
    result = _tf.decode_attention(q, k_cache, v_cache, cache_lens, alibi_slopes, key_padding_mask,
                                  None if scale is None else float(scale))
    return _into(out, result)


def diff_attention(q, k, v, lambda_full, lambda_init, *, causal=True, key_padding_mask=None, eps=1e-5,
                   scale=None):
    """Differential attention, [B, N, H/2, 2D] (:func:`tritonformers.kernels.diff_attention.diff_attention`)."""
    _diff._validate(q, k, v, lambda_full, lambda_init, key_padding_mask, eps, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if runtime.use_triton(q, op="diff_attention"):
        if q.shape[-1] > _diff.MAX_HEAD_DIM:
            runtime.unsupported("diff_attention", f"head dim {q.shape[-1]} (at most {_diff.MAX_HEAD_DIM})")
        elif q.shape[2] > 0 and k.shape[2] > 0:
            q, k, v = _dense_last(q, k, v)
            lam = lambda_full.reshape(())
            return _tf.diff_attention(q, k, v, lam, float(lambda_init), bool(causal), _mask_int8(key_padding_mask),
                                      float(eps), scale, _grad_needs(q, k, v, lam))[0]
    return diff_attention_reference(q, k, v, lambda_full, lambda_init, causal=causal,
                                    key_padding_mask=key_padding_mask, eps=eps, scale=scale)


def diff_decode_attention(q, k_cache, v_cache, cache_lens, lambda_full, lambda_init, *, key_padding_mask=None,
                          eps=1e-5, scale=None, out=None):
    """Differential attention of 1-16 new queries against a KV cache (inference only;
    :func:`tritonformers.kernels.diff_attention.diff_decode_attention`)."""
    _diff._validate_decode(q, k_cache, v_cache, cache_lens, lambda_full, lambda_init, key_padding_mask, eps, scale)
    result = _tf.diff_decode_attention(q, k_cache, v_cache, cache_lens, lambda_full, float(lambda_init),
                                       key_padding_mask, float(eps), None if scale is None else float(scale))
    return _into(out, result)


def local_attention(q, k, v, *, chunk_length, num_chunks_before=1, num_chunks_after=0, causal=False,
                    key_padding_mask=None, dropout_p=0.0, scale=1.0, return_lse=False):
    """Reformer local (chunked) attention (:func:`tritonformers.kernels.local_attention.local_attention`)."""
    _local._validate(q, k, v, chunk_length, num_chunks_before, num_chunks_after, key_padding_mask, dropout_p, scale)
    L = q.shape[2]
    if L == 0:
        return _local.empty_result(q, v, return_lse)
    if L <= chunk_length:  # HF's unchunked path: one chunk of length L, no neighbours
        chunk_length, num_chunks_before, num_chunks_after = L, 0, 0
    if runtime.use_triton(q, op="local_attention"):
        if q.shape[-1] > _local.MAX_HEAD_DIM:
            runtime.unsupported("local_attention", f"head dim {q.shape[-1]} (at most {_local.MAX_HEAD_DIM})")
        elif L > 0:
            q, k, v = _dense_last(q, k, v)
            out, lse = _tf.local_attention(q, k, v, _mask_int8(key_padding_mask), chunk_length, num_chunks_before,
                                           num_chunks_after, bool(causal), float(scale), float(dropout_p),
                                           _dropout_seed(dropout_p))
            return (out, lse) if return_lse else out
    return local_attention_reference(q, k, v, chunk_length=chunk_length, num_chunks_before=num_chunks_before,
                                     num_chunks_after=num_chunks_after, causal=causal,
                                     key_padding_mask=key_padding_mask, dropout_p=dropout_p, scale=scale,
                                     return_lse=return_lse)


def lsh_attention(qk, v, *, chunk_length, num_hashes=1, num_buckets=None, num_chunks_before=1, num_chunks_after=0,
                  causal=False, key_padding_mask=None, dropout_p=0.0, hash_seed=None, buckets=None,
                  return_buckets=False):
    """Reformer LSH attention: out, and with ``return_buckets`` the buckets
    (:func:`tritonformers.kernels.lsh_attention.lsh_attention`)."""
    _lsh._validate(qk, v, chunk_length, num_hashes, num_chunks_before, num_chunks_after, key_padding_mask, dropout_p,
                   buckets)
    B, H, L, D = qk.shape
    if L == 0:
        return _lsh.empty_result(qk, v, num_hashes, return_buckets)
    chunk_length, num_chunks_before, num_chunks_after, num_hashes, buckets, perm = _lsh.lsh_plan(
        qk, chunk_length, num_hashes, num_buckets, num_chunks_before, num_chunks_after, key_padding_mask, hash_seed,
        buckets)
    out = None
    if runtime.use_triton(qk, op="lsh_attention"):
        if D > _lsh.MAX_HEAD_DIM:
            runtime.unsupported("lsh_attention", f"head dim {D} (at most {_lsh.MAX_HEAD_DIM})")
        elif L > 0:
            qk_, v_ = _dense_last(qk, v)
            perm32 = perm.reshape(B * H, -1).to(torch.int32).contiguous()
            out = _tf.lsh_attention(qk_, v_, perm32, _mask_int8(key_padding_mask), num_hashes, chunk_length,
                                    num_chunks_before, num_chunks_after, bool(causal), float(dropout_p),
                                    _dropout_seed(dropout_p))[0]
    if out is None:
        out = lsh_attention_reference(qk, v, perm, chunk_length=chunk_length, num_hashes=num_hashes,
                                      num_chunks_before=num_chunks_before, num_chunks_after=num_chunks_after,
                                      causal=causal, key_padding_mask=key_padding_mask, dropout_p=dropout_p)
    return (out, buckets) if return_buckets else out


# ------------------------------------------------------------------------------------------ integer ops

def quantize(x: torch.Tensor, scale: torch.Tensor, bits: int = 8, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric quantization (:func:`tritonformers.kernels.int_ops.quantize`)."""
    _io._check_quantize_args(x, scale, bits)
    return _into(out, _tf.quantize(x, scale, bits))


def requantize(x: torch.Tensor, requant, bits: int = 8, *, residual: torch.Tensor | None = None,
               residual_requant=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Fixed-point requantization, exact (:func:`tritonformers.kernels.int_ops.requantize`)."""
    _io._check_requantize_args(x, requant, bits, residual, residual_requant)
    return _into(out, _tf.requantize(x, *requant, bits, residual, *ops.flat(residual_requant, 2)))


def int_gelu(x: torch.Tensor, constants, requant=None, bits: int = 8, *,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """I-GELU on an integer accumulator (:func:`tritonformers.kernels.int_ops.int_gelu`)."""
    _io._check_gelu_args(x, constants, requant, bits)
    return _into(out, _tf.int_gelu(x, *constants, *ops.flat(requant, 2), bits))


def int_softmax(scores: torch.Tensor, constants, mask: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """I-softmax over the last dimension (:func:`tritonformers.kernels.int_ops.int_softmax`)."""
    _io._check_softmax_args(scores, constants, mask)
    return _into(out, _tf.int_softmax(scores, *ops.flat(constants, 5), mask))


def int_layer_norm(x: torch.Tensor, shift, bias_int: torch.Tensor, requant=None, bits: int = 8, *,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Integer LayerNorm (:func:`tritonformers.kernels.int_ops.int_layer_norm`)."""
    shift_t = _io._check_layer_norm_args(x, shift, bias_int, requant, bits)
    return _into(out, _tf.int_layer_norm(x, shift_t, bias_int, *ops.flat(requant, 2), bits))


def int_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, prescale=None, gelu=None,
               requant=None, bits: int = 8, residual: torch.Tensor | None = None, residual_requant=None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Integer linear layer with its fused epilogue (:func:`tritonformers.kernels.int_gemm.int_linear`)."""
    _ig._check_linear_args(x, weight, bias, prescale, gelu, requant, bits, residual, residual_requant)
    result = _tf.int_linear(x, weight, bias, *ops.flat(prescale, 2), *ops.flat(gelu, 4), *ops.flat(requant, 2),
                            bits, residual, *ops.flat(residual_requant, 2))
    return _into(out, result)


def int_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, constants, requant=None, bits: int = 8, *,
                  mask: torch.Tensor | None = None, return_probs: bool = False, out: torch.Tensor | None = None):
    """I-BERT's integer self-attention core, fused: ctx [B, Nq, H, D] (and the int16 probabilities with
    ``return_probs``) (:func:`tritonformers.kernels.int_gemm.int_attention`)."""
    _ig._check_attention_args(q, k, v, constants, requant, bits, mask)
    ctx, probs = _tf.int_attention(q, k, v, *ops.flat(constants, 5), *ops.flat(requant, 2), bits, mask,
                                   bool(return_probs))
    ctx = _into(out, ctx)
    return (ctx, probs) if return_probs else ctx


__all__ = [
    "layer_norm", "layer_norm_reference", "rms_norm", "rms_norm_reference",
    "gelu", "gelu_reference", "swiglu", "swiglu_reference",
    "apply_rotary", "apply_rotary_reference",
    "fused_linear_cross_entropy", "fused_linear_cross_entropy_reference",
    "attention", "attention_reference", "packed_attention", "decode_attention", "decode_attention_reference",
    "alibi_slopes",
    "diff_attention", "diff_attention_reference", "diff_lambda", "diff_decode_attention",
    "diff_decode_attention_reference", "local_attention", "local_attention_reference",
    "lsh_attention", "lsh_attention_reference",
    "int_attention", "int_attention_reference", "int_linear", "int_linear_reference", "fixed_point",
    "gelu_constants", "int_gelu", "int_gelu_reference", "int_layer_norm", "int_layer_norm_reference", "int_softmax",
    "int_softmax_reference", "layer_norm_constants", "quantize", "quantize_reference", "requant_params",
    "requantize", "requantize_reference", "softmax_constants", "symmetric_scale",
]

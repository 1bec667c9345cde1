"""tritonformers' kernels as ``torch.library`` custom ops in the ``tritonformers`` namespace.

Every public op of :mod:`tritonformers.nn.functional` reaches its Triton kernel through an op registered here
(``torch.ops.tritonformers.<name>``, named after the public function), so ``torch.compile`` keeps it in one
graph as an opaque node, fake tensors and the meta device know its output shapes, dtypes and strides, and a
profile or a graph names which of ours ran. The public functions validate their arguments first (the same
``TypeError``/``ValueError`` as before, raised before the op), choose the backend, and call the op.

* Differentiable ops (norms, activations, rotary, attention, differential/local/LSH attention, the fused
  linear cross-entropy) wrap the kernel path: ``tritonformers::<name>`` runs the forward of the kernel
  module's ``autograd.Function`` and also returns what that Function saves for backward beyond the inputs
  and outputs (statistics such as the log-sum-exp), and ``tritonformers::<name>_backward`` runs its
  backward; ``register_autograd`` connects the two. The reference path stays plain PyTorch, which
  ``torch.compile`` traces (and fuses) by itself.
* Inference-only ops (decode attention, the integer ops) wrap the whole public kernel function, reference
  path included: nothing needs a backward, and an opaque op keeps their integer arithmetic out of tracing.

The Functions run here against a stand-in ``ctx`` (:class:`_Ctx`). Their non-tensor attributes (block sizes,
chunk geometry) are deterministic in the arguments' shapes, dtypes and scalars; the forward op memoises them
under that signature and the backward op reads them back, so nothing of the kernel modules is copied here.
Outputs that would be absent (a gradient nobody asked for, a statistic not saved) are empty placeholders: a
custom op returns a fixed number of tensors.
"""

from __future__ import annotations

import collections
import math
import threading
from typing import Any, Sequence

import torch

from .kernels import activations, attention, cross_entropy, diff_attention, int_gemm, int_ops, local_attention
from .kernels import lsh_attention, norms, rotary
from .kernels.int_ops import FixedPoint, GeluConstants, SoftmaxConstants

NAMESPACE = "tritonformers"
Tensor = torch.Tensor


def _op(name: str):
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())


# ----------------------------------------------------------------------------------------- Function bridge

class _Ctx:
    """Stands in for autograd's ``ctx`` when a Function's forward/backward runs inside a custom op."""

    def __init__(self, needs: Sequence[bool]):
        self.needs_input_grad = tuple(needs)
        self.saved_tensors: tuple = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def set_materialize_grads(self, value: bool) -> None:
        pass

    def mark_non_differentiable(self, *tensors) -> None:
        pass


_CTX_FIELDS = ("needs_input_grad", "saved_tensors")
_MEMO_SIZE = 4096
_memo: collections.OrderedDict = collections.OrderedDict()
_memo_lock = threading.Lock()


def _signature(fn, args) -> tuple:
    """What a Function's ctx attributes depend on: its arguments' shapes, dtypes, devices and scalars."""
    def meta(a):
        if isinstance(a, Tensor):
            return ("tensor", tuple(a.shape), a.dtype, a.device)
        return tuple(a) if isinstance(a, list) else a
    return (fn, tuple(meta(a) for a in args))


def run_forward(fn, args: Sequence, needs: Sequence[bool]):
    """``fn.forward(ctx, *args)`` with a stand-in ctx; returns (its outputs, the tensors it saved)."""
    ctx = _Ctx(needs)
    out = fn.forward(ctx, *args)
    attrs = {k: v for k, v in vars(ctx).items() if k not in _CTX_FIELDS}
    key = _signature(fn, args)
    with _memo_lock:
        _memo[key] = attrs
        _memo.move_to_end(key)
        while len(_memo) > _MEMO_SIZE:
            _memo.popitem(last=False)
    return out, ctx.saved_tensors


def run_backward(fn, args: Sequence, needs: Sequence[bool], saved: Sequence, grads: Sequence) -> tuple:
    """``fn.backward(ctx, *grads)`` with the ctx its forward on ``args`` built (attributes and ``saved``)."""
    with _memo_lock:
        attrs = _memo.get(_signature(fn, args))
    if attrs is None:
        raise RuntimeError(f"{fn.__name__}: backward without a matching forward in this process")
    ctx = _Ctx(needs)
    vars(ctx).update(attrs)
    ctx.saved_tensors = tuple(saved)
    return fn.backward(ctx, *grads)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return _empty(like) if t is None else t


def _grads_out(grads: Sequence[Tensor | None], inputs: Sequence[Tensor | None]) -> list[Tensor]:
    """A backward op's outputs: contiguous gradients (placeholders where None), never aliasing an input."""
    ptrs = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, Tensor) and t.numel()}
    out = []
    for g, like in zip(grads, inputs):
        if g is None:
            out.append(_empty(like if like is not None else inputs[0]))
            continue
        g = g.contiguous()
        out.append(g.clone() if g.numel() and g.untyped_storage().data_ptr() in ptrs else g)
    return out


def _grads_fake(inputs: Sequence[Tensor | None], needs: Sequence[bool]) -> list[Tensor]:
    ref = next(t for t in inputs if t is not None)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if (t is not None and need)
            else _empty(ref) for t, need in zip(inputs, needs)]


def _needed(grads: Sequence[Tensor], needs: Sequence[bool]) -> tuple:
    return tuple(g if need else None for g, need in zip(grads, needs))


def _rows(x: Tensor) -> int:
    return math.prod(x.shape[:-1])


# ---------------------------------------------------------------------------------------------- norms

@_op("rms_norm")
def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """RMSNorm forward on the kernel; returns (y, rstd [rows] float32)."""
    y, saved = run_forward(norms.RMSNormFunction, (x, weight, eps), (True, True, False))
    return y, saved[2]


@rms_norm.register_fake
def _(x, weight, eps):
    dtype = x.dtype if weight is None else torch.promote_types(weight.dtype, x.dtype)
    return x.new_empty(x.shape, dtype=dtype), x.new_empty((_rows(x),), dtype=torch.float32)


@_op("rms_norm_backward")
def rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, eps: float,
                      needs: list[bool]) -> list[Tensor]:
    saved = (norms.runtime.as_rows(x), weight, rstd)
    grads = run_backward(norms.RMSNormFunction, (x, weight, eps), needs, saved, (dy,))
    return _grads_out(grads[:2], (x, weight))


@rms_norm_backward.register_fake
def _(dy, x, weight, rstd, eps, needs):
    return _grads_fake((x, weight), needs[:2])


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.eps = eps


def _rms_norm_bwd(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1] and weight is not None, False]
    grads = torch.ops.tritonformers.rms_norm_backward(dy, x, weight, rstd, ctx.eps, needs)
    return (*_needed(grads, needs[:2]), None)


rms_norm.register_autograd(_rms_norm_bwd, setup_context=_rms_norm_setup)


@_op("layer_norm")
def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
               eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """LayerNorm forward on the kernel; returns (y, x + residual or a placeholder, mean, rstd)."""
    out, saved = run_forward(norms.LayerNormFunction, (x, weight, bias, residual, eps), (True,) * 4 + (False,))
    y, s = out if residual is not None else (out, _empty(x))
    return y, s, saved[3], saved[4]


@layer_norm.register_fake
def _(x, weight, bias, residual, eps):
    stat = x.new_empty((_rows(x),), dtype=torch.float32)
    return x.new_empty(x.shape), (x.new_empty(x.shape) if residual is not None else _empty(x)), stat, \
        torch.empty_like(stat)


@_op("layer_norm_backward")
def layer_norm_backward(dy: Tensor, dsum: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None,
                        residual: Tensor | None, s: Tensor, mean: Tensor, rstd: Tensor, eps: float,
                        needs: list[bool]) -> list[Tensor]:
    normed = norms.runtime.as_rows(s if residual is not None else x)
    grads = run_backward(norms.LayerNormFunction, (x, weight, bias, residual, eps), needs,
                         (normed, weight, bias, mean, rstd), (dy, dsum if residual is not None else None))
    return _grads_out(grads[:4], (x, weight, bias, residual))


@layer_norm_backward.register_fake
def _(dy, dsum, x, weight, bias, residual, s, mean, rstd, eps, needs):
    return _grads_fake((x, weight, bias, residual), needs[:4])


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, residual, eps = inputs
    ctx.save_for_backward(x, weight, bias, residual, output[1], output[2], output[3])
    ctx.eps = eps


def _layer_norm_bwd(ctx, dy, dsum, _dmean, _drstd):
    x, weight, bias, residual, s, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = [need[0], need[1] and weight is not None, need[2] and bias is not None,
             need[3] and residual is not None, False]
    dsum = dsum if residual is not None else _empty(x)
    grads = torch.ops.tritonformers.layer_norm_backward(dy, dsum, x, weight, bias, residual, s, mean, rstd, ctx.eps,
                                                        needs)
    return (*_needed(grads, needs[:4]), None)


layer_norm.register_autograd(_layer_norm_bwd, setup_context=_layer_norm_setup)


# ----------------------------------------------------------------------------------------- activations

@_op("gelu")
def gelu(x: Tensor, bias: Tensor | None, approximate: str) -> Tensor:
    """GELU of x (+ bias) on the kernel."""
    return run_forward(activations.GeluFunction, (x, bias, approximate), (True, True, False))[0]


@gelu.register_fake
def _(x, bias, approximate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_op("gelu_backward")
def gelu_backward(dy: Tensor, x: Tensor, bias: Tensor | None, approximate: str, needs: list[bool]) -> list[Tensor]:
    grads = run_backward(activations.GeluFunction, (x, bias, approximate), needs, (x, bias), (dy,))
    return _grads_out(grads[:2], (x, bias))


@gelu_backward.register_fake
def _(dy, x, bias, approximate, needs):
    return _grads_fake((x, bias), needs[:2])


def _gelu_setup(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _gelu_bwd(ctx, dy):
    x, bias = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1] and bias is not None, False]
    grads = torch.ops.tritonformers.gelu_backward(dy, x, bias, ctx.approximate, needs)
    return (*_needed(grads, needs[:2]), None)


gelu.register_autograd(_gelu_bwd, setup_context=_gelu_setup)


@_op("swiglu")
def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up on the kernel."""
    return run_forward(activations.SwiGLUFunction, (gate, up), (True, True))[0]


@swiglu.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@_op("swiglu_backward")
def swiglu_backward(dy: Tensor, gate: Tensor, up: Tensor, needs: list[bool]) -> list[Tensor]:
    grads = run_backward(activations.SwiGLUFunction, (gate, up), needs, (gate, up), (dy,))
    return _grads_out(grads, (gate, up))


@swiglu_backward.register_fake
def _(dy, gate, up, needs):
    return _grads_fake((gate, up), needs)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_bwd(ctx, dy):
    gate, up = ctx.saved_tensors
    needs = list(ctx.needs_input_grad)
    return _needed(torch.ops.tritonformers.swiglu_backward(dy, gate, up, needs), needs)


swiglu.register_autograd(_swiglu_bwd, setup_context=_swiglu_setup)


# --------------------------------------------------------------------------------------------- rotary

@_op("apply_rotary")
def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, layout: str) -> tuple[Tensor, Tensor]:
    """RoPE of q and k on the kernel (outputs laid out as ``torch.empty_like`` of the inputs)."""
    return rotary.rotary_launch(q, k, cos, sin, layout)


@apply_rotary.register_fake
def _(q, k, cos, sin, layout):
    return torch.empty_like(q), torch.empty_like(k)


@_op("apply_rotary_backward")
def apply_rotary_backward(dq: Tensor, dk: Tensor, cos: Tensor, sin: Tensor, layout: str) -> tuple[Tensor, Tensor]:
    gq, gk = rotary.rotary_launch(dq, dk, cos, sin, layout, backward=True)
    return gq, gk


@apply_rotary_backward.register_fake
def _(dq, dk, cos, sin, layout):
    return torch.empty_like(dq), torch.empty_like(dk)


def _rotary_setup(ctx, inputs, output):
    q, k, cos, sin, layout = inputs
    ctx.save_for_backward(cos, sin)
    ctx.layout = layout


def _rotary_bwd(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    gq, gk = torch.ops.tritonformers.apply_rotary_backward(dq, dk, cos, sin, ctx.layout)
    return gq, gk, None, None, None


apply_rotary.register_autograd(_rotary_bwd, setup_context=_rotary_setup)


# ------------------------------------------------------------------------------------ fused linear CE

@_op("fused_linear_cross_entropy")
def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None,
                               ignore_index: int, reduction: str, chunk_size: int | None,
                               needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused loss on rows ``hidden`` [T, d], ``target`` [T]. Returns (loss, a, b, c): for mean/sum the
    gradients of (hidden, weight, bias) it already computed, for none (lse [T], placeholder, placeholder)."""
    cross_entropy._check_target_range(target, weight.shape[0], ignore_index)
    fn_needs = tuple(needs)
    loss, saved = run_forward(cross_entropy.FusedLinearCrossEntropyFunction,
                              (hidden, weight, target, bias, ignore_index, reduction, chunk_size, fn_needs),
                              (*needs[:2], False, needs[2]))
    if reduction == "none":
        extras = (saved[4], _empty(hidden), _empty(hidden)) if saved else tuple(_empty(hidden) for _ in range(3))
    else:
        extras = tuple(_or_empty(g, hidden) for g in saved) if saved else tuple(_empty(hidden) for _ in range(3))
    return (loss, *extras)


@fused_linear_cross_entropy.register_fake
def _(hidden, weight, target, bias, ignore_index, reduction, chunk_size, needs):
    T = hidden.shape[0]
    loss = hidden.new_empty((T,) if reduction == "none" else (), dtype=torch.float32)
    if not any(needs):
        return (loss, *tuple(_empty(hidden) for _ in range(3)))
    if reduction == "none":
        return loss, hidden.new_empty((T,), dtype=torch.float32), _empty(hidden), _empty(hidden)
    grads = [torch.empty_like(t) if (t is not None and need) else _empty(hidden)
             for t, need in zip((hidden, weight, bias), needs)]
    return (loss, *grads)


@_op("fused_linear_cross_entropy_backward")
def fused_linear_cross_entropy_backward(grad: Tensor, hidden: Tensor, weight: Tensor, target: Tensor,
                                        bias: Tensor | None, a: Tensor, b: Tensor, c: Tensor, ignore_index: int,
                                        reduction: str, chunk_size: int | None, needs: list[bool]) -> list[Tensor]:
    fn = cross_entropy.FusedLinearCrossEntropyFunction
    args = (hidden, weight, target, bias, ignore_index, reduction, chunk_size, tuple(needs))
    if reduction == "none":
        saved = (hidden, weight, target, bias, a)
    else:
        saved = tuple(t if need else None for t, need in zip((a, b, c), needs))
    grads = run_backward(fn, args, (*needs[:2], False, needs[2]), saved, (grad,))
    return _grads_out((grads[0], grads[1], grads[3]), (hidden, weight, bias))


@fused_linear_cross_entropy_backward.register_fake
def _(grad, hidden, weight, target, bias, a, b, c, ignore_index, reduction, chunk_size, needs):
    return _grads_fake((hidden, weight, bias), needs)


def _flce_setup(ctx, inputs, output):
    hidden, weight, target, bias, ignore_index, reduction, chunk_size, needs = inputs
    ctx.save_for_backward(hidden, weight, target, bias, *output[1:])
    ctx.options = (ignore_index, reduction, chunk_size, needs)


def _flce_bwd(ctx, grad, *_):
    hidden, weight, target, bias, a, b, c = ctx.saved_tensors
    ignore_index, reduction, chunk_size, needs = ctx.options
    grads = torch.ops.tritonformers.fused_linear_cross_entropy_backward(
        grad, hidden, weight, target, bias, a, b, c, ignore_index, reduction, chunk_size, needs)
    gh, gw, gb = _needed(grads, needs)
    return gh, gw, None, gb, None, None, None, None


fused_linear_cross_entropy.register_autograd(_flce_bwd, setup_context=_flce_setup)


# ------------------------------------------------------------------------------------------ attention

@_op("attention")
def attention_op(q: Tensor, k: Tensor, v: Tensor, alibi_slopes: Tensor | None, positions: Tensor | None,
                 key_padding_mask: Tensor | None, causal: bool, scale: float, dropout_p: float,
                 seed: int) -> tuple[Tensor, Tensor]:
    """Flash attention on the kernel; returns (out [B, H, Nq, D] contiguous, lse [B, H, Nq] float32)."""
    args = (q, k, v, alibi_slopes, positions, key_padding_mask, causal, scale, dropout_p, seed)
    return run_forward(attention.AttentionFunction, args, (True,) * 4 + (False,) * 6)[0]


@attention_op.register_fake
def _(q, k, v, alibi_slopes, positions, key_padding_mask, causal, scale, dropout_p, seed):
    B, H, NQ, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, NQ), dtype=torch.float32)


@_op("attention_backward")
def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       alibi_slopes: Tensor | None, positions: Tensor | None, key_padding_mask: Tensor | None,
                       causal: bool, scale: float, dropout_p: float, seed: int, needs: list[bool]) -> list[Tensor]:
    args = (q, k, v, alibi_slopes, positions, key_padding_mask, causal, scale, dropout_p, seed)
    saved = (q, k, v, out, lse, alibi_slopes, positions, key_padding_mask)
    grads = run_backward(attention.AttentionFunction, args, (*needs, *(False,) * 6), saved, (dout, None))
    return _grads_out(grads[:4], (q, k, v, alibi_slopes))


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, alibi_slopes, positions, key_padding_mask, causal, scale, dropout_p, seed, needs):
    return _grads_fake((q, k, v, alibi_slopes), needs)


def _attention_setup(ctx, inputs, output):
    q, k, v, slopes, positions, kpm, causal, scale, dropout_p, seed = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], slopes, positions, kpm)
    ctx.options = (causal, scale, dropout_p, seed)


def _attention_bwd(ctx, dout, _dlse):
    q, k, v, out, lse, slopes, positions, kpm = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = [need[0], need[1], need[2], need[3] and slopes is not None]
    grads = torch.ops.tritonformers.attention_backward(dout, q, k, v, out, lse, slopes, positions, kpm,
                                                       *ctx.options, needs)
    return (*_needed(grads, needs), *(None,) * 6)


attention_op.register_autograd(_attention_bwd, setup_context=_attention_setup)


@_op("packed_attention")
def packed_attention_op(qkv: Tensor, alibi_slopes: Tensor | None, positions: Tensor | None,
                        key_padding_mask: Tensor | None, causal: bool, scale: float, dropout_p: float,
                        seed: int) -> tuple[Tensor, Tensor]:
    """Flash attention of a packed qkv [B, N, H, 3, D]; returns (out [B, H, N, D], lse [B, H, N] float32)."""
    args = (qkv, alibi_slopes, positions, key_padding_mask, causal, scale, dropout_p, seed)
    return run_forward(attention.PackedAttentionFunction, args, (True, True) + (False,) * 6)[0]


@packed_attention_op.register_fake
def _(qkv, alibi_slopes, positions, key_padding_mask, causal, scale, dropout_p, seed):
    B, N, H, _, D = qkv.shape
    return qkv.new_empty((B, H, N, D)), qkv.new_empty((B, H, N), dtype=torch.float32)


@_op("packed_attention_backward")
def packed_attention_backward(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, alibi_slopes: Tensor | None,
                              positions: Tensor | None, key_padding_mask: Tensor | None, causal: bool, scale: float,
                              dropout_p: float, seed: int, needs: list[bool]) -> list[Tensor]:
    args = (qkv, alibi_slopes, positions, key_padding_mask, causal, scale, dropout_p, seed)
    saved = (qkv, out, lse, alibi_slopes, positions, key_padding_mask)
    grads = run_backward(attention.PackedAttentionFunction, args, (*needs, *(False,) * 6), saved, (dout, None))
    return _grads_out(grads[:2], (qkv, alibi_slopes))


@packed_attention_backward.register_fake
def _(dout, qkv, out, lse, alibi_slopes, positions, key_padding_mask, causal, scale, dropout_p, seed, needs):
    return _grads_fake((qkv, alibi_slopes), needs)


def _packed_attention_setup(ctx, inputs, output):
    qkv, slopes, positions, kpm, causal, scale, dropout_p, seed = inputs
    ctx.save_for_backward(qkv, output[0], output[1], slopes, positions, kpm)
    ctx.options = (causal, scale, dropout_p, seed)


def _packed_attention_bwd(ctx, dout, _dlse):
    qkv, out, lse, slopes, positions, kpm = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = [need[0], need[1] and slopes is not None]
    grads = torch.ops.tritonformers.packed_attention_backward(dout, qkv, out, lse, slopes, positions, kpm,
                                                              *ctx.options, needs)
    return (*_needed(grads, needs), *(None,) * 6)


packed_attention_op.register_autograd(_packed_attention_bwd, setup_context=_packed_attention_setup)


@_op("decode_attention")
def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, alibi_slopes: Tensor | None,
                     key_padding_mask: Tensor | None, scale: float | None) -> Tensor:
    """:func:`tritonformers.kernels.attention.decode_attention` (kernel or reference, as the backend says)."""
    return attention.decode_attention(q, k_cache, v_cache, cache_lens, alibi_slopes=alibi_slopes,
                                      key_padding_mask=key_padding_mask, scale=scale).contiguous()


@decode_attention.register_fake
def _(q, k_cache, v_cache, cache_lens, alibi_slopes, key_padding_mask, scale):
    return q.new_empty(q.shape)


# ----------------------------------------------------------------------------- differential attention

@_op("diff_attention")
def diff_attention_op(q: Tensor, k: Tensor, v: Tensor, lambda_full: Tensor, lambda_init: float, causal: bool,
                      key_padding_mask: Tensor | None, eps: float, scale: float,
                      needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Differential attention on the kernel: (out [B, N, H/2, 2D], o1, o2, lse1, lse2); the last four are
    placeholders unless a gradient is needed (``needs`` for q, k, v, lambda_full)."""
    args = (q, k, v, lambda_full, lambda_init, causal, key_padding_mask, eps, scale)
    out, saved = run_forward(diff_attention.DiffAttentionFunction, args, (*needs, *(False,) * 5))
    extras = saved[4:8] if saved else tuple(_empty(q) for _ in range(4))
    return (out, *extras)


@diff_attention_op.register_fake
def _(q, k, v, lambda_full, lambda_init, causal, key_padding_mask, eps, scale, needs):
    B, H, NQ, D = q.shape
    out = q.new_empty((B, NQ, H // 2, 2 * D))
    if not any(needs):
        return (out, *tuple(_empty(q) for _ in range(4)))
    lse = q.new_empty((B, H // 2, NQ), dtype=torch.float32)
    return out, torch.empty_like(out), torch.empty_like(out), lse, torch.empty_like(lse)


@_op("diff_attention_backward")
def diff_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lambda_full: Tensor, o1: Tensor,
                            o2: Tensor, lse1: Tensor, lse2: Tensor, lambda_init: float, causal: bool,
                            key_padding_mask: Tensor | None, eps: float, scale: float,
                            needs: list[bool]) -> list[Tensor]:
    args = (q, k, v, lambda_full, lambda_init, causal, key_padding_mask, eps, scale)
    saved = (q, k, v, lambda_full, o1, o2, lse1, lse2, key_padding_mask)
    grads = run_backward(diff_attention.DiffAttentionFunction, args, (*needs, *(False,) * 5), saved, (dout,))
    return _grads_out(grads[:4], (q, k, v, lambda_full))


@diff_attention_backward.register_fake
def _(dout, q, k, v, lambda_full, o1, o2, lse1, lse2, lambda_init, causal, key_padding_mask, eps, scale, needs):
    return _grads_fake((q, k, v, lambda_full), needs)


def _diff_setup(ctx, inputs, output):
    q, k, v, lambda_full, lambda_init, causal, kpm, eps, scale, needs = inputs
    ctx.save_for_backward(q, k, v, lambda_full, *output[1:], kpm)
    ctx.options = (lambda_init, causal, kpm is not None, eps, scale)


def _diff_bwd(ctx, dout, *_):
    q, k, v, lambda_full, o1, o2, lse1, lse2, kpm = ctx.saved_tensors
    lambda_init, causal, _, eps, scale = ctx.options
    needs = list(ctx.needs_input_grad[:4])
    grads = torch.ops.tritonformers.diff_attention_backward(dout, q, k, v, lambda_full, o1, o2, lse1, lse2,
                                                            lambda_init, causal, kpm, eps, scale, needs)
    return (*_needed(grads, needs), *(None,) * 6)


diff_attention_op.register_autograd(_diff_bwd, setup_context=_diff_setup)


@_op("diff_decode_attention")
def diff_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, lambda_full: Tensor,
                          lambda_init: float, key_padding_mask: Tensor | None, eps: float,
                          scale: float | None) -> Tensor:
    """:func:`tritonformers.kernels.diff_attention.diff_decode_attention` (kernel or reference)."""
    return diff_attention.diff_decode_attention(q, k_cache, v_cache, cache_lens, lambda_full, lambda_init,
                                                key_padding_mask=key_padding_mask, eps=eps,
                                                scale=scale).contiguous()


@diff_decode_attention.register_fake
def _(q, k_cache, v_cache, cache_lens, lambda_full, lambda_init, key_padding_mask, eps, scale):
    B, H, NQ, D = q.shape
    return q.new_empty((B, NQ, H // 2, 2 * D))


# ------------------------------------------------------------------------------ local and LSH attention

@_op("local_attention")
def local_attention_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, chunk_length: int,
                       num_chunks_before: int, num_chunks_after: int, causal: bool, scale: float, dropout_p: float,
                       seed: int) -> tuple[Tensor, Tensor]:
    """Reformer local attention on the kernel; returns (out [B, H, L, D], lse [B, H, L] float32)."""
    args = (q, k, v, key_padding_mask, chunk_length, num_chunks_before, num_chunks_after, causal, scale,
            dropout_p, seed)
    return run_forward(local_attention.LocalAttentionFunction, args, (True,) * 3 + (False,) * 8)[0]


@local_attention_op.register_fake
def _(q, k, v, key_padding_mask, chunk_length, num_chunks_before, num_chunks_after, causal, scale, dropout_p, seed):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@_op("local_attention_backward")
def local_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                             key_padding_mask: Tensor | None, chunk_length: int, num_chunks_before: int,
                             num_chunks_after: int, causal: bool, scale: float, dropout_p: float, seed: int,
                             needs: list[bool]) -> list[Tensor]:
    args = (q, k, v, key_padding_mask, chunk_length, num_chunks_before, num_chunks_after, causal, scale,
            dropout_p, seed)
    grads = run_backward(local_attention.LocalAttentionFunction, args, (*needs, *(False,) * 8),
                         (q, k, v, out, lse, key_padding_mask), (dout, None))
    return _grads_out(grads[:3], (q, k, v))


@local_attention_backward.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, chunk_length, num_chunks_before, num_chunks_after, causal, scale,
      dropout_p, seed, needs):
    return _grads_fake((q, k, v), needs)


def _local_setup(ctx, inputs, output):
    q, k, v, kpm, *options = inputs
    ctx.save_for_backward(q, k, v, *output, kpm)
    ctx.options = options


def _local_bwd(ctx, dout, _dlse):
    q, k, v, out, lse, kpm = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    grads = torch.ops.tritonformers.local_attention_backward(dout, q, k, v, out, lse, kpm, *ctx.options, needs)
    return (*_needed(grads, needs), *(None,) * 8)


local_attention_op.register_autograd(_local_bwd, setup_context=_local_setup)


@_op("lsh_attention")
def lsh_attention_op(qk: Tensor, v: Tensor, perm: Tensor, key_padding_mask: Tensor | None, num_hashes: int,
                     chunk_length: int, num_chunks_before: int, num_chunks_after: int, causal: bool, dropout_p: float,
                     seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Reformer LSH attention on the kernel over a sort permutation ``perm`` [B*H, num_hashes*L] int32;
    returns (out [B, H, L, D], per-round outputs [B*H, num_hashes*L, D], per-round lse float32)."""
    args = (qk, v, perm, key_padding_mask, num_hashes, chunk_length, num_chunks_before, num_chunks_after, causal,
            dropout_p, seed)
    out, saved = run_forward(lsh_attention.LSHAttentionFunction, args, (True, True) + (False,) * 9)
    return out, saved[4], saved[5]


@lsh_attention_op.register_fake
def _(qk, v, perm, key_padding_mask, num_hashes, chunk_length, num_chunks_before, num_chunks_after, causal,
      dropout_p, seed):
    B, H, L, D = qk.shape
    return (qk.new_empty(qk.shape), qk.new_empty((B * H, num_hashes * L, D)),
            qk.new_empty((B * H, num_hashes * L), dtype=torch.float32))


@_op("lsh_attention_backward")
def lsh_attention_backward(dout: Tensor, qk: Tensor, v: Tensor, perm: Tensor, key_padding_mask: Tensor | None,
                           o_r: Tensor, lse_r: Tensor, num_hashes: int, chunk_length: int, num_chunks_before: int,
                           num_chunks_after: int, causal: bool, dropout_p: float, seed: int,
                           needs: list[bool]) -> list[Tensor]:
    args = (qk, v, perm, key_padding_mask, num_hashes, chunk_length, num_chunks_before, num_chunks_after, causal,
            dropout_p, seed)
    grads = run_backward(lsh_attention.LSHAttentionFunction, args, (*needs, *(False,) * 9),
                         (qk, v, perm, key_padding_mask, o_r, lse_r), (dout,))
    return _grads_out(grads[:2], (qk, v))


@lsh_attention_backward.register_fake
def _(dout, qk, v, perm, key_padding_mask, o_r, lse_r, num_hashes, chunk_length, num_chunks_before,
      num_chunks_after, causal, dropout_p, seed, needs):
    return _grads_fake((qk, v), needs)


def _lsh_setup(ctx, inputs, output):
    qk, v, perm, kpm, *options = inputs
    ctx.save_for_backward(qk, v, perm, kpm, output[1], output[2])
    ctx.options = options


def _lsh_bwd(ctx, dout, *_):
    qk, v, perm, kpm, o_r, lse_r = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:2])
    # contiguous: the kernel's combine backward assumes a unit stride on D (a .sum() gives an expanded dout)
    grads = torch.ops.tritonformers.lsh_attention_backward(dout.contiguous(), qk, v, perm, kpm, o_r, lse_r,
                                                           *ctx.options, needs)
    return (*_needed(grads, needs), *(None,) * 9)


lsh_attention_op.register_autograd(_lsh_bwd, setup_context=_lsh_setup)


# ------------------------------------------------------------------------------------------ integer ops
# The integer constants travel as flat tensors (a custom op's schema has no named tuples).

def _fixed(multiplier: Tensor | None, shift: Tensor | None) -> FixedPoint | None:
    return None if multiplier is None else FixedPoint(multiplier, shift)


def _int_out(bits: int, requant: bool, default: torch.dtype) -> torch.dtype:
    return int_ops.int_dtype(bits) if requant else default


@_op("quantize")
def quantize(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Symmetric quantization (:func:`tritonformers.kernels.int_ops.quantize`)."""
    return int_ops.quantize(x, scale, bits).contiguous()


@quantize.register_fake
def _(x, scale, bits):
    return x.new_empty(x.shape, dtype=int_ops.int_dtype(bits))


@_op("requantize")
def requantize(x: Tensor, multiplier: Tensor, shift: Tensor, bits: int, residual: Tensor | None,
               residual_multiplier: Tensor | None, residual_shift: Tensor | None) -> Tensor:
    """Fixed-point requantization (:func:`tritonformers.kernels.int_ops.requantize`)."""
    return int_ops.requantize(x, FixedPoint(multiplier, shift), bits, residual=residual,
                              residual_requant=_fixed(residual_multiplier, residual_shift)).contiguous()


@requantize.register_fake
def _(x, multiplier, shift, bits, residual, residual_multiplier, residual_shift):
    return x.new_empty(x.shape, dtype=int_ops.int_dtype(bits))


@_op("int_gelu")
def int_gelu(x: Tensor, b_int: Tensor, c_int: Tensor, shift_int: Tensor, gelu_scale: Tensor,
             multiplier: Tensor | None, shift: Tensor | None, bits: int) -> Tensor:
    """I-GELU (:func:`tritonformers.kernels.int_ops.int_gelu`)."""
    return int_ops.int_gelu(x, GeluConstants(b_int, c_int, shift_int, gelu_scale), _fixed(multiplier, shift),
                            bits).contiguous()


@int_gelu.register_fake
def _(x, b_int, c_int, shift_int, gelu_scale, multiplier, shift, bits):
    return x.new_empty(x.shape, dtype=_int_out(bits, multiplier is not None, torch.int64))


def _softmax_constants(x0_int, b_int, c_int, e16_multiplier, e16_shift) -> SoftmaxConstants:
    return SoftmaxConstants(x0_int, b_int, c_int, FixedPoint(e16_multiplier, e16_shift))


@_op("int_softmax")
def int_softmax(scores: Tensor, x0_int: Tensor, b_int: Tensor, c_int: Tensor, e16_multiplier: Tensor,
                e16_shift: Tensor, mask: Tensor | None) -> Tensor:
    """I-softmax (:func:`tritonformers.kernels.int_ops.int_softmax`)."""
    constants = _softmax_constants(x0_int, b_int, c_int, e16_multiplier, e16_shift)
    return int_ops.int_softmax(scores, constants, mask).contiguous()


@int_softmax.register_fake
def _(scores, x0_int, b_int, c_int, e16_multiplier, e16_shift, mask):
    return scores.new_empty(scores.shape, dtype=torch.int16)


@_op("int_layer_norm")
def int_layer_norm(x: Tensor, shift: Tensor, bias_int: Tensor, multiplier: Tensor | None,
                   requant_shift: Tensor | None, bits: int) -> Tensor:
    """Integer LayerNorm (:func:`tritonformers.kernels.int_ops.int_layer_norm`)."""
    return int_ops.int_layer_norm(x, shift, bias_int, _fixed(multiplier, requant_shift), bits).contiguous()


@int_layer_norm.register_fake
def _(x, shift, bias_int, multiplier, requant_shift, bits):
    return x.new_empty(x.shape, dtype=_int_out(bits, multiplier is not None, torch.int64))


@_op("int_linear")
def int_linear(x: Tensor, weight: Tensor, bias: Tensor | None, prescale_multiplier: Tensor | None,
               prescale_shift: Tensor | None, gelu_b: Tensor | None, gelu_c: Tensor | None,
               gelu_shift: Tensor | None, gelu_scale: Tensor | None, multiplier: Tensor | None,
               shift: Tensor | None, bits: int, residual: Tensor | None, residual_multiplier: Tensor | None,
               residual_shift: Tensor | None) -> Tensor:
    """Integer linear layer with its fused epilogue (:func:`tritonformers.kernels.int_gemm.int_linear`)."""
    gelu = None if gelu_b is None else GeluConstants(gelu_b, gelu_c, gelu_shift, gelu_scale)
    return int_gemm.int_linear(x, weight, bias, prescale=_fixed(prescale_multiplier, prescale_shift), gelu=gelu,
                               requant=_fixed(multiplier, shift), bits=bits, residual=residual,
                               residual_requant=_fixed(residual_multiplier, residual_shift)).contiguous()


@int_linear.register_fake
def _(x, weight, bias, prescale_multiplier, prescale_shift, gelu_b, gelu_c, gelu_shift, gelu_scale, multiplier,
      shift, bits, residual, residual_multiplier, residual_shift):
    default = torch.int64 if gelu_b is not None else torch.int32
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=_int_out(bits, multiplier is not None, default))


@_op("int_attention")
def int_attention(q: Tensor, k: Tensor, v: Tensor, x0_int: Tensor, b_int: Tensor, c_int: Tensor,
                  e16_multiplier: Tensor, e16_shift: Tensor, multiplier: Tensor | None, shift: Tensor | None,
                  bits: int, mask: Tensor | None, return_probs: bool) -> tuple[Tensor, Tensor]:
    """I-BERT's integer attention core (:func:`tritonformers.kernels.int_gemm.int_attention`); returns
    (ctx [B, Nq, H, D], probabilities int16 [B, H, Nq, Nk] or a placeholder)."""
    constants = _softmax_constants(x0_int, b_int, c_int, e16_multiplier, e16_shift)
    result = int_gemm.int_attention(q, k, v, constants, _fixed(multiplier, shift), bits, mask=mask,
                                    return_probs=return_probs)
    ctx, probs = result if return_probs else (result, q.new_empty(0, dtype=torch.int16))
    return ctx.contiguous(), probs.contiguous()


@int_attention.register_fake
def _(q, k, v, x0_int, b_int, c_int, e16_multiplier, e16_shift, multiplier, shift, bits, mask, return_probs):
    B, H, NQ, D = q.shape
    ctx = q.new_empty((B, NQ, H, D), dtype=_int_out(bits, multiplier is not None, torch.int32))
    probs = q.new_empty((B, H, NQ, k.shape[2]) if return_probs else (0,), dtype=torch.int16)
    return ctx, probs


def flat(params: Any, size: int) -> tuple:
    """A named tuple of integer constants (FixedPoint, GeluConstants, SoftmaxConstants) as its ``size`` flat
    tensors, nested tuples included; None as ``size`` Nones."""
    if params is None:
        return (None,) * size
    out = []
    for t in params:
        out.extend(flat(t, len(t)) if isinstance(t, tuple) else (t,))
    return tuple(out)


OPS = ("rms_norm", "layer_norm", "gelu", "swiglu", "apply_rotary", "fused_linear_cross_entropy", "attention",
       "packed_attention", "decode_attention", "diff_attention", "diff_decode_attention", "local_attention",
       "lsh_attention", "quantize", "requantize", "int_gelu", "int_softmax", "int_layer_norm", "int_linear",
       "int_attention")
"""The public ops registered as ``torch.ops.tritonformers.<name>`` (each differentiable one has a
``<name>_backward`` op too)."""

__all__ = ["NAMESPACE", "OPS", "run_forward", "run_backward", "flat"]

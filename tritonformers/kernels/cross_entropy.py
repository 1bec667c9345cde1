"""Fused linear cross-entropy: ``cross_entropy(hidden @ weight.T + bias, target)`` without the [T, V] logits.

A language-model head followed by its loss materialises [tokens, vocabulary] logits several times over
(model dtype, its float32 upcast, the log-softmax saved for backward and each gradient): 20 GB and more for
BLOOM's 250,880-token vocabulary at 8K tokens. Here the tokens are cut into chunks of ``C`` rows so that one
[C, V] logits buffer lives at a time:

1. ``logits = hidden[chunk] @ weight.T (+ bias)`` with cuBLAS, in the input dtype (HF computes the LM head
   in the model dtype and upcasts afterwards, so the logits are rounded to that dtype first);
2. one Triton kernel reads each row in float32, computes its log-sum-exp online, the token's loss, and, when
   gradients are wanted, overwrites the logits buffer in place with ``d loss / d logits = (softmax - onehot)
   * scale`` (rounded to the logits dtype, as autograd's backward through ``.float()`` rounds it);
3. ``grad_hidden[chunk] = dlogits @ weight`` and ``grad_weight += dlogits.T @ hidden[chunk]`` (float32
   accumulator across chunks), ``grad_bias += dlogits.sum(0)``.

For ``mean``/``sum`` the backward of the loss is the scalar ``grad_output`` times these gradients, so they
are computed during the forward (saving a second logits GEMM) and scaled in ``backward``. For ``none`` the
upstream gradient differs per token and only arrives in ``backward``: the forward keeps the per-token
log-sum-exp, and ``backward`` recomputes each chunk's logits and writes ``(softmax - onehot) * grad[t]``.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import runtime

REDUCTIONS = ("mean", "sum", "none")

# One chunk's logits buffer, in bytes: large enough that the three GEMMs per chunk run near peak (the
# grad_weight GEMM has K = chunk rows and streams a float32 [V, d] accumulator each chunk), small next to the
# unfused path's several [T, V] float32 copies. 1 GiB = 2048 rows of bf16 logits at V = 250,880.
CHUNK_BYTES = 1 << 30
# Chunk row counts are rounded to this multiple so every GEMM tile is full.
CHUNK_ALIGN = 128


# --------------------------------------------------------------------------------------------- Triton kernel

@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr, target_ptr, loss_ptr, lse_ptr, scale_ptr,
    V, stride_row, ignore_index,
    COMPUTE_LSE: tl.constexpr, WRITE_GRAD: tl.constexpr, ROW_SCALE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Cross-entropy of one logits row per program, and optionally its gradient in place.

    logits: [R, V] (row stride ``stride_row``, unit column stride), float32/float16/bfloat16, read in float32;
    target: [R] int64; loss, lse: [R] float32; scale: [1] float32 or, with ROW_SCALE, [R] float32.

    With COMPUTE_LSE: ``lse[r] = log(sum_v exp(x[r, v]))`` by an online max/sum over blocks of BLOCK_V
    columns, and ``loss[r] = lse[r] - x[r, target[r]]``; otherwise ``lse[r]`` is read (saved by a forward).
    With WRITE_GRAD: ``x[r, v] <- (exp(x[r, v] - lse[r]) - [v == target[r]]) * scale`` in the logits dtype.
    A row whose target is ``ignore_index`` gets loss 0, lse 0 and an all-zero gradient row, and its logits
    are never read.
    """
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(target_ptr + row)
    valid = target != ignore_index
    # Columns of the row that are read: none for an ignored row.
    v_read = tl.where(valid, V, 0)

    if COMPUTE_LSE:
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], tl.float32)
        for start in range(0, v_read, BLOCK_V):
            offs = start + cols
            x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # One exp per element: rescale the running sum once per block, not per lane.
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = tl.where(valid, m + tl.log(tl.where(valid, s, 1.0)), 0.0)
        # Read before the gradient pass overwrites the row.
        x_target = tl.load(row_ptr + target, mask=valid, other=0.0).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - x_target, 0.0))
        tl.store(lse_ptr + row, lse)
    else:
        lse = tl.load(lse_ptr + row)

    if WRITE_GRAD:
        if ROW_SCALE:
            scale = tl.load(scale_ptr + row)
        else:
            scale = tl.load(scale_ptr)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            x = tl.load(row_ptr + offs, mask=offs < v_read, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            g = tl.where(offs == target, p - 1.0, p) * scale
            g = tl.where(valid, g, 0.0)
            tl.store(row_ptr + offs, g.to(logits_ptr.dtype.element_ty), mask=offs < V)


# ----------------------------------------------------------------------------------------------- launchers

def _block_config(V: int, element_size: int, on_gpu: bool) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for the row kernel.

    The kernel streams each row twice (log-sum-exp, then gradient), so a block of 16-32 KB per iteration keeps
    enough loads in flight per SM; a big vocabulary's chunk has >= 1000 rows = programs, enough to fill the
    GPU without splitting a row.
    Not autotuned: the gradient pass overwrites its input, so a benchmark repeat would read gradients as
    logits (and restore_value would copy a whole chunk each trial). Under the interpreter a small block keeps
    several loop iterations (and a masked tail) in tiny tests.
    """
    if not on_gpu:
        return min(runtime.next_power_of_2(V), 64), 1
    block = min(runtime.next_power_of_2(V), 16384 // element_size)
    # 16-32 elements per thread at the largest block: four 16-byte loads in flight per thread per pass.
    return block, min(8, max(1, block // 256))


def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int,
                       loss: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                       grad_scale: torch.Tensor | None = None, row_scale: bool = False) -> None:
    """Launch the row kernel on ``logits`` [R, V] (unit column stride) with ``target`` [R] int64.

    * ``loss`` and ``lse`` given ([R] float32, written): compute the per-row loss and log-sum-exp.
    * ``lse`` alone: read it (the statistics of an earlier forward).
    * ``grad_scale`` given (float32, [1] or with ``row_scale`` [R]): overwrite ``logits`` in place with the
      gradient of ``scale * loss`` with respect to the logits.
    """
    R, V = logits.shape
    if R == 0:
        return
    if logits.stride(1) != 1:
        raise ValueError("logits must have unit column stride")
    compute_lse = loss is not None
    if lse is None:
        raise ValueError("lse is required: it is written with loss, read without")
    write_grad = grad_scale is not None
    block_v, num_warps = _block_config(V, logits.element_size(), runtime.on_gpu(logits))
    with _on_device(logits):
        _cross_entropy_rows_kernel[(R,)](
            logits, target, loss if compute_lse else lse, lse, grad_scale if write_grad else lse,
            V, logits.stride(0), ignore_index,
            COMPUTE_LSE=compute_lse, WRITE_GRAD=write_grad, ROW_SCALE=row_scale, BLOCK_V=block_v,
            num_warps=num_warps,
        )


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (cuda:1 inputs, say)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------- chunked glue

def _chunk_rows(T: int, V: int, element_size: int, chunk_size: int | None) -> int:
    """Rows per chunk: ``chunk_size`` if given, else as many as fit CHUNK_BYTES, balanced across the chunks
    and rounded to a multiple of CHUNK_ALIGN where the budget allows (8192 x 250,880 bf16 -> 4 x 2048)."""
    if chunk_size is not None:
        return max(1, min(chunk_size, T))
    cap = max(1, CHUNK_BYTES // (V * element_size))
    if cap >= T:
        return max(T, 1)
    n_chunks = -(-T // cap)
    rows = -(-T // n_chunks)
    if cap >= CHUNK_ALIGN:
        rows = min(-(-rows // CHUNK_ALIGN) * CHUNK_ALIGN, cap // CHUNK_ALIGN * CHUNK_ALIGN)
    return rows


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  buf: torch.Tensor) -> torch.Tensor:
    """``F.linear(h, weight, bias)`` written into ``buf`` (same rounding: addmm with the bias, as F.linear)."""
    out = buf[: h.shape[0]]
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


@functools.lru_cache(maxsize=None)
def _fp32_accumulating_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether cuBLAS can add a half-precision product into a float32 tensor in place on this torch.

    Recent torch accepts ``addmm(acc, a, b, out_dtype=float32, out=acc)`` with a float32 ``acc``; earlier
    releases with ``out_dtype`` require ``acc`` in the input dtype. Probed once per device and dtype, checking
    the result, so such a torch takes the fallback instead of failing.
    """
    acc = torch.ones(2, 2, dtype=torch.float32, device=device)
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=dtype, device=device)
    try:
        torch.mm(a, a, out_dtype=torch.float32, out=acc)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError) as err:
        if isinstance(err, torch.OutOfMemoryError):
            raise
        return False
    return bool(torch.equal(acc, 2 * (a.float() @ a.float())))


def _accumulate_weight_grad(acc: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor, first: bool) -> None:
    """``acc (+)= dlogits.T @ h`` with ``acc`` float32 [V, d] and half or float32 operands.

    On CUDA cuBLAS reads and writes the float32 accumulator in its epilogue, so chunking adds no rounding to
    the weight dtype. Without that (an older torch) each chunk's product is rounded once to the input dtype
    and summed in float32: one rounding per chunk of a partial sum, as accurate as the unfused GEMM's single
    rounding to within a small factor. On the CPU (interpreter tests, tiny) the operands are upcast.
    """
    a = dlogits.t()
    if a.dtype == acc.dtype:
        if first:
            torch.mm(a, h, out=acc)
        else:
            acc.addmm_(a, h)
        return
    if acc.is_cuda and _fp32_accumulating_gemm(acc.device, a.dtype):
        if first:
            torch.mm(a, h, out_dtype=acc.dtype, out=acc)
        else:
            torch.addmm(acc, a, h, out_dtype=acc.dtype, out=acc)
        return
    part = torch.mm(a, h) if acc.is_cuda else torch.mm(a.to(acc.dtype), h.to(acc.dtype))
    if first:
        acc.copy_(part)
    else:
        acc.add_(part)


def _backprop_chunk(dlogits, h, weight, grad_hidden, gw_acc, gb_acc, start: int, first: bool) -> None:
    """Chain rule through the chunk's linear layer: the hidden rows, the weight and bias accumulators."""
    n = h.shape[0]
    if grad_hidden is not None:
        torch.mm(dlogits, weight, out=grad_hidden[start:start + n])
    if gw_acc is not None:
        _accumulate_weight_grad(gw_acc, dlogits, h, first)
    if gb_acc is not None:
        part = torch.sum(dlogits, dim=0, dtype=torch.float32)
        if first:
            gb_acc.copy_(part)
        else:
            gb_acc.add_(part)


def _grad_buffers(hidden, weight, bias, needs, single_chunk: bool):
    """Gradient outputs for the inputs in ``needs`` (hidden, weight, bias): grad_hidden in the hidden dtype;
    float32 accumulators for weight and bias when several chunks add into them, else the parameter dtype
    (one GEMM, rounded once, exactly as the unfused backward)."""
    need_h, need_w, need_b = needs
    grad_hidden = torch.empty_like(hidden) if need_h else None
    acc_dtype = weight.dtype if single_chunk else torch.float32
    gw_acc = torch.empty(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
    gb_acc = torch.empty(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
    return grad_hidden, gw_acc, gb_acc


def _finish_grads(weight, bias, gw_acc, gb_acc):
    grad_weight = None if gw_acc is None else gw_acc.to(weight.dtype)  # no copy when already that dtype
    grad_bias = None if gb_acc is None else gb_acc.to(bias.dtype)
    return grad_weight, grad_bias


def _run_chunks(hidden, weight, bias, target, ignore_index, rows, loss, lse, grad_scale, row_scale,
                grads) -> None:
    """The chunk loop; its [rows, V] logits buffer is freed when it returns."""
    T, V = hidden.shape[0], weight.shape[0]
    buf = torch.empty((min(rows, T), V), dtype=hidden.dtype, device=hidden.device)
    for start in range(0, T, rows):
        stop = min(start + rows, T)
        h = hidden[start:stop]
        logits = _chunk_logits(h, weight, bias, buf)
        cross_entropy_rows(
            logits, target[start:stop], ignore_index=ignore_index,
            loss=None if loss is None else loss[start:stop], lse=lse[start:stop],
            grad_scale=None if grad_scale is None else (grad_scale[start:stop] if row_scale else grad_scale),
            row_scale=row_scale,
        )
        if grad_scale is not None:
            _backprop_chunk(logits, h, weight, *grads, start=start, first=start == 0)


def _chunked_pass(hidden, weight, bias, target, ignore_index, rows, *, loss=None, lse=None,
                  grad_scale=None, row_scale=False, needs=(False, False, False)):
    """Run every chunk: logits GEMM, the row kernel, and (with ``grad_scale``) the gradient GEMMs.

    Returns ``(grad_hidden, grad_weight, grad_bias)`` (None where not needed or without ``grad_scale``).
    """
    if grad_scale is None or not any(needs):
        _run_chunks(hidden, weight, bias, target, ignore_index, rows, loss, lse, None, False, None)
        return None, None, None
    grad_hidden, gw_acc, gb_acc = _grad_buffers(hidden, weight, bias, needs, rows >= hidden.shape[0])
    if hidden.shape[0] == 0:
        for g in (grad_hidden, gw_acc, gb_acc):
            if g is not None:
                g.zero_()
    _run_chunks(hidden, weight, bias, target, ignore_index, rows, loss, lse, grad_scale, row_scale,
                (grad_hidden, gw_acc, gb_acc))
    return (grad_hidden, *_finish_grads(weight, bias, gw_acc, gb_acc))


# ---------------------------------------------------------------------------------------- autograd Function

class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Chunked ``cross_entropy(linear(hidden, weight, bias).float(), target)`` on 2-D hidden [T, d],
    weight [V, d], 1-D target [T] int64, bias [V] or None; returns a float32 scalar or [T] for ``none``.

    ``needs`` = which of (hidden, weight, bias) want a gradient. For mean/sum the gradients are computed in
    forward and saved (T*d + V*d + V values, never [T, V]); for none the per-token lse [T] is saved and the
    backward recomputes the logits chunk by chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, bias, ignore_index, reduction, chunk_size, needs):
        with torch.autocast(hidden.device.type, enabled=False):
            return FusedLinearCrossEntropyFunction._forward(
                ctx, hidden, weight, target, bias, ignore_index, reduction, chunk_size, needs)

    @staticmethod
    def _forward(ctx, hidden, weight, target, bias, ignore_index, reduction, chunk_size, needs):
        T, V = hidden.shape[0], weight.shape[0]
        rows = _chunk_rows(T, V, hidden.element_size(), chunk_size)
        valid = target != ignore_index
        n_valid = valid.sum().to(torch.float32)
        loss = torch.empty(T, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(T, dtype=torch.float32, device=hidden.device)
        precompute = reduction != "none" and any(needs)
        grad_scale = None
        if precompute:
            grad_scale = (1.0 / n_valid if reduction == "mean" else torch.ones_like(n_valid)).reshape(1)
        grads = _chunked_pass(hidden, weight, bias, target, ignore_index, rows, loss=loss, lse=lse,
                              grad_scale=grad_scale, needs=needs)
        ctx.reduction, ctx.ignore_index, ctx.rows, ctx.needs = reduction, ignore_index, rows, needs
        if reduction == "none":
            if any(needs):
                ctx.save_for_backward(hidden, weight, target, bias, lse)
            return loss
        if any(needs):
            ctx.save_for_backward(*grads)
        total = loss.sum()
        return total / n_valid if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            hidden, weight, target, bias, lse = ctx.saved_tensors
            row_grad = grad_output.to(torch.float32).contiguous()
            with torch.autocast(hidden.device.type, enabled=False):
                grad_hidden, grad_weight, grad_bias = _chunked_pass(
                    hidden, weight, bias, target, ctx.ignore_index, ctx.rows, lse=lse,
                    grad_scale=row_grad, row_scale=True, needs=ctx.needs)
        else:
            # Out of place: a retained graph may run this backward again.
            grad_hidden, grad_weight, grad_bias = (
                None if g is None else g * grad_output for g in ctx.saved_tensors)
        return grad_hidden, grad_weight, None, grad_bias, None, None, None, None


# ------------------------------------------------------------------------------------- public entry points

def _validate(hidden, weight, target, bias, ignore_index, reduction, chunk_size) -> None:
    runtime.check_tensor(hidden, "hidden", min_ndim=1)
    runtime.check_tensor(weight, "weight", ndim=2)
    runtime.check_tensor(target, "target", dtypes=(torch.int64,))
    if bias is not None:
        runtime.check_tensor(bias, "bias", ndim=1)
    runtime.check_same_dtype(hidden=hidden, weight=weight, bias=bias)
    runtime.check_same_device(hidden=hidden, weight=weight, target=target, bias=bias)
    V, d = weight.shape
    if hidden.shape[-1] != d:
        raise ValueError(f"hidden's last dimension ({hidden.shape[-1]}) must equal weight's second "
                         f"dimension d={d} (weight is [V, d] = {list(weight.shape)})")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target must have shape {list(hidden.shape[:-1])} (hidden's leading dimensions), "
                         f"got {list(target.shape)}")
    if bias is not None:
        runtime.check_shape(bias, "bias", (V,))
    if V == 0:
        raise ValueError("weight must have at least one row (class)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _autocast_inputs(hidden, weight, bias):
    """Under autocast, the dtype F.linear would compute the logits in (the reference's rounding); the
    kernel path then runs with autocast off, since its out= GEMMs would not follow it."""
    if not isinstance(hidden, torch.Tensor) or not torch.is_autocast_enabled(hidden.device.type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(hidden.device.type)

    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    return cast(hidden), cast(weight), cast(bias)


def _check_target_range(target: torch.Tensor, V: int, ignore_index: int) -> None:
    """Raise ValueError if a target other than ignore_index lies outside [0, V) (one reduction, one sync)."""
    if target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= V))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(f"target holds {value}, outside the class range [0, {V}) and not "
                         f"ignore_index={ignore_index}")


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               bias: torch.Tensor | None = None, ignore_index: int = -100,
                               reduction: str = "mean", *, chunk_size: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), target)`` without materialising the logits.

    hidden [..., d] and weight [V, d] (and bias [V]) share one float dtype; target [...] int64 holds class
    indices in [0, V) or ``ignore_index``. The logits are rounded to the input dtype and the softmax taken in
    float32, as HF's LM losses do. Returns a float32 scalar for ``mean`` (nan when every target is ignored,
    as torch) and ``sum``, or float32 losses shaped like ``target`` for ``none`` (0 at ignored positions).
    ``chunk_size`` (tokens per chunk) overrides the default, which keeps one chunk's logits near 1 GiB.
    Gradients flow to hidden, weight and bias.
    """
    from ..nn import functional  # the one dispatcher: validation, backend, the custom op

    return functional.fused_linear_cross_entropy(hidden, weight, target, bias, ignore_index, reduction,
                                                 chunk_size=chunk_size)


def fused_linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                                         reduction: str = "mean") -> torch.Tensor:
    """The eager oracle: HF's ``lm_head`` in the input dtype, upcast, then ``F.cross_entropy``.

    Leading dimensions are flattened (as HF's loss does); ``none`` returns losses shaped like ``target``.
    """
    logits = F.linear(hidden, weight, bias).float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)
    return loss.view(target.shape) if reduction == "none" else loss


__all__ = [
    "fused_linear_cross_entropy", "fused_linear_cross_entropy_reference", "FusedLinearCrossEntropyFunction",
    "cross_entropy_rows",
]

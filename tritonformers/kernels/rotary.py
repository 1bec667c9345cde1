"""Rotary position embedding (RoPE) with HuggingFace's rotate-half convention, for q and k in one launch.

``q' = q * cos + rotate_half(q) * sin`` with ``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``
(transformers' ``apply_rotary_pos_emb``; the halves, not interleaved pairs). Writing x = [x1, x2],
cos = [c1, c2], sin = [s1, s2] over the two halves of the head dim D:

    q'1 = x1 * c1 - x2 * s1        q'2 = x2 * c2 + x1 * s2

Rounding as HF: with q, cos, sin in one dtype, each product rounds to the dtype, then the sum does; the
kernel computes in float32 and rounds at the same three places (and is compiled without FMA
contraction, so float32 is the same sequence of roundings too). The result matches HF bit for bit.

Gradients: the map is linear in q, with transpose dq1 = g1 * c1 + g2 * s2, dq2 = g2 * c2 - g1 * s1, i.e.
the forward rotation with sin replaced by -[s2, s1] (for HF's cos/sin, whose halves are equal, simply
sin negated), rounded as autograd rounds HF's graph. cos and sin are constants (HF builds them from
position ids under no_grad): the Triton path gives them no gradient and refuses inputs that ask for one.

Layouts: "bhnd" = q/k [B, H, N, D] (HF's, after the head transpose) and "bnhd" = [B, N, H, D]; any
strides (a transposed view is read in place). cos/sin are [B or 1, N, D] or [N, D], broadcast over
heads; q and k may have different head counts (GQA). One program handles one (batch, position) pair
and a block of heads of q or of k, so the cos/sin row is read once per head block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import runtime

LAYOUTS = ("bhnd", "bnhd")
_TILE_ELEMENTS = 2048  # elements (both halves) per program


# ---------------------------------------------------------------------------------------------- kernels

@triton.jit
def _rnd(v, DT: tl.constexpr):
    """Round a float32 value to dtype DT and widen it back (a no-op for float32): one torch op's rounding."""
    return v.to(DT).to(tl.float32)


@triton.jit
def _rotate_heads(X, Y, b, n, head0, H, sx_b, sx_h, sx_n, sx_d, sy_b, sy_h, sy_n, sy_d,
                  c1, c2, s1, s2, HALF, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate heads head0 .. head0 + BLOCK_H - 1 of X at (b, n) into Y: y1 = x1*c1 - x2*s1, y2 = x2*c2 + x1*s2.

    c1, c2, s1, s2 are float32 [BLOCK_HALF] rows; every product and the sum round to X's dtype.
    """
    DT: tl.constexpr = X.dtype.element_ty
    h = head0 + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    mask = (h < H)[:, None] & (d < HALF)[None, :]
    px = X + b * sx_b + n * sx_n + h[:, None] * sx_h + d[None, :] * sx_d
    x1 = tl.load(px, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(px + HALF * sx_d, mask=mask, other=0.0).to(tl.float32)
    y1 = _rnd(x1 * c1[None, :], DT) - _rnd(x2 * s1[None, :], DT)
    y2 = _rnd(x2 * c2[None, :], DT) + _rnd(x1 * s2[None, :], DT)
    py = Y + b * sy_b + n * sy_n + h[:, None] * sy_h + d[None, :] * sy_d
    tl.store(py, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(py + HALF * sy_d, y2.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(Q, K, COS, SIN, QO, KO, N, HQ, HK, q_blocks, HALF,
                   sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d,
                   sqo_b, sqo_h, sqo_n, sqo_d, sko_b, sko_h, sko_n, sko_d,
                   sc_b, sc_n, sc_d, ss_b, ss_n, ss_d,
                   BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """RoPE of one (batch, position) row for a block of q heads (axis-1 pid < q_blocks) or k heads.

    Q [B, HQ, N, D] and K [B, HK, N, D] are addressed through their (b, h, n, d) strides (any layout),
    outputs QO/KO likewise; COS/SIN [B or 1, N, D] through (b, n, d) strides (b stride 0 broadcasts).
    Axis 0 of the grid runs over b * N + n. With BACKWARD the transpose is applied (module docstring):
    sin's halves are swapped and negated.
    """
    row = tl.program_id(0)
    hb = tl.program_id(1)
    b = (row // N).to(tl.int64)
    n = (row % N).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    dm = d < HALF
    pc = COS + b * sc_b + n * sc_n + d * sc_d
    ps = SIN + b * ss_b + n * ss_n + d * ss_d
    c1 = tl.load(pc, mask=dm, other=0.0).to(tl.float32)
    c2 = tl.load(pc + HALF * sc_d, mask=dm, other=0.0).to(tl.float32)
    s1 = tl.load(ps, mask=dm, other=0.0).to(tl.float32)
    s2 = tl.load(ps + HALF * ss_d, mask=dm, other=0.0).to(tl.float32)
    if BACKWARD:
        s1, s2 = -s2, -s1
    if hb < q_blocks:
        _rotate_heads(Q, QO, b, n, hb * BLOCK_H, HQ, sq_b, sq_h, sq_n, sq_d, sqo_b, sqo_h, sqo_n, sqo_d,
                      c1, c2, s1, s2, HALF, BLOCK_H, BLOCK_HALF)
    else:
        _rotate_heads(K, KO, b, n, (hb - q_blocks) * BLOCK_H, HK, sk_b, sk_h, sk_n, sk_d,
                      sko_b, sko_h, sko_n, sko_d, c1, c2, s1, s2, HALF, BLOCK_H, BLOCK_HALF)


# ---------------------------------------------------------------------------------------------- launchers

def _bhnd_strides(t: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """The (b, h, n, d) strides of a q/k tensor in ``layout``."""
    s = t.stride()
    return (s[0], s[1], s[2], s[3]) if layout == "bhnd" else (s[0], s[2], s[1], s[3])


def _bnd_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """The (b, n, d) strides of cos/sin [B or 1, N, D] or [N, D]; a batch of 1 (or none) broadcasts."""
    if t.dim() == 2:
        return 0, t.stride(0), t.stride(1)
    return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1), t.stride(2)


def _dims(t: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(B, H, N, D) of a q/k tensor in ``layout``."""
    b, a1, a2, d = t.shape
    return (b, a1, a2, d) if layout == "bhnd" else (b, a2, a1, d)


def rotary_launch(q: torch.Tensor | None, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                  layout: str = "bhnd", *, backward: bool = False, q_out: torch.Tensor | None = None,
                  k_out: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launch the RoPE kernel (or its transpose with ``backward``) on q and k together.

    Either of q, k may be None (it is skipped). Outputs have the inputs' shapes and, where they are dense,
    their memory layout (``torch.empty_like``); ``q_out``/``k_out`` take preallocated ones (any strides).
    Inputs must already be validated (``apply_rotary`` does it).
    """
    ref = q if q is not None else k
    qo = None if q is None else (torch.empty_like(q) if q_out is None else _check_like(q_out, "q_out", q))
    ko = None if k is None else (torch.empty_like(k) if k_out is None else _check_like(k_out, "k_out", k))
    B, _, N, D = _dims(ref, layout)
    hq = 0 if q is None else _dims(q, layout)[1]
    hk = 0 if k is None else _dims(k, layout)[1]
    if B * N == 0 or D == 0 or hq + hk == 0:
        return qo, ko
    half = D // 2
    block_half = runtime.next_power_of_2(half)
    block_h = min(runtime.next_power_of_2(max(hq, hk)), max(1, _TILE_ELEMENTS // (2 * block_half)))
    q_blocks, k_blocks = triton.cdiv(hq, block_h), triton.cdiv(hk, block_h)
    qq, kk = (q if q is not None else k), (k if k is not None else q)
    qqo, kko = (qo if qo is not None else ko), (ko if ko is not None else qo)
    _rotary_kernel[(B * N, q_blocks + k_blocks)](
        qq, kk, cos, sin, qqo, kko, N, hq, hk, q_blocks, half,
        *_bhnd_strides(qq, layout), *_bhnd_strides(kk, layout),
        *_bhnd_strides(qqo, layout), *_bhnd_strides(kko, layout), *_bnd_strides(cos), *_bnd_strides(sin),
        BACKWARD=backward, BLOCK_H=block_h, BLOCK_HALF=block_half,
        num_warps=4 if block_h * block_half >= 512 else 2, enable_fp_fusion=False)
    return qo, ko


def _check_like(out: torch.Tensor, name: str, like: torch.Tensor) -> torch.Tensor:
    runtime.check_tensor(out, name, dtypes=(like.dtype,))
    if out.shape != like.shape or out.device != like.device:
        raise ValueError(f"{name} must have shape {list(like.shape)} on {like.device}, "
                         f"got {list(out.shape)} on {out.device}")
    return out


# ---------------------------------------------------------------------------------------------- autograd

class RotaryFunction(torch.autograd.Function):
    """(q', k') = RoPE(q, k) with constant cos/sin; saves only cos and sin."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, layout):
        ctx.save_for_backward(cos, sin)
        ctx.layout = layout
        ctx.set_materialize_grads(False)
        return rotary_launch(q, k, cos, sin, layout)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[:2]
        dq = dq if need_q else None
        dk = dk if need_k else None
        if dq is None and dk is None:
            return None, None, None, None, None
        gq, gk = rotary_launch(dq, dk, cos, sin, ctx.layout, backward=True)
        return gq, gk, None, None, None


# ---------------------------------------------------------------------------------------------- public ops

def _check_rotary_args(q, k, cos, sin, layout) -> None:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    runtime.check_tensor(q, "q", ndim=4)
    runtime.check_tensor(k, "k", ndim=4)
    runtime.check_tensor(cos, "cos", ndim=(2, 3))
    runtime.check_tensor(sin, "sin", ndim=(2, 3))
    runtime.check_same_dtype(q=q, k=k)
    runtime.check_same_dtype(cos=cos, sin=sin)
    runtime.check_same_device(q=q, k=k, cos=cos, sin=sin)
    B, _, N, D = _dims(q, layout)
    kb, _, kn, kd = _dims(k, layout)
    if (kb, kn, kd) != (B, N, D):
        raise ValueError(f"k must match q in batch, sequence length and head dim ({layout}): "
                         f"q {list(q.shape)}, k {list(k.shape)}")
    if D % 2:
        raise ValueError(f"the head dim of q and k must be even for rotate-half, got {D}")
    if cos.shape != sin.shape:
        raise ValueError(f"sin must have cos's shape {list(cos.shape)}, got {list(sin.shape)}")
    want = [None, N, D] if cos.dim() == 3 else [N, D]
    runtime.check_shape(cos, "cos", want)
    if cos.dim() == 3 and cos.shape[0] not in (1, B):
        raise ValueError(f"cos/sin batch must be 1 or q's batch {B}, got {cos.shape[0]}")


def tables_like(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """cos/sin in q's dtype: autocast hands float32 tables next to bf16/fp16 q and k, and the rotation is
    computed in q's dtype (as HF's, whose rotary module casts its tables to the activations' dtype)."""
    return (cos, sin) if cos.dtype == q.dtype else (cos.to(q.dtype), sin.to(q.dtype))


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 layout: str = "bhnd") -> tuple[torch.Tensor, torch.Tensor]:
    """HF's rotary embedding: ``(q*cos + rotate_half(q)*sin, k*cos + rotate_half(k)*sin)``.

    q [B, Hq, N, D] and k [B, Hk, N, D] ("bhnd", default) or [B, N, Hq, D] / [B, N, Hk, D] ("bnhd"), any
    strides, D even; cos/sin [B or 1, N, D] or [N, D], broadcast over heads. q and k share one float dtype,
    cos and sin another or the same (autocast): the tables are cast to q's. All on one device. Differentiable in q and k; cos/sin are constants on the Triton path (one that
    requires grad there is unsupported: an error under the "triton" backend, the reference under "auto").
    Raises TypeError/ValueError naming the bad argument.
    """
    from ..nn import functional  # the one dispatcher: validation, backend, the custom op

    return functional.apply_rotary(q, k, cos, sin, layout)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``rotate_half``: cat(-x2, x1) over the two halves of the last dim."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           layout: str = "bhnd") -> tuple[torch.Tensor, torch.Tensor]:
    """Eager RoPE, transformers' ``apply_rotary_pos_emb`` (unsqueeze_dim 1 for "bhnd", 2 for "bnhd")."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    dim = 1 if layout == "bhnd" else 2
    cos, sin = cos.unsqueeze(dim), sin.unsqueeze(dim)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


__all__ = ["LAYOUTS", "apply_rotary", "apply_rotary_reference", "RotaryFunction", "rotary_launch"]

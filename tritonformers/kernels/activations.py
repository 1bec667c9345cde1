"""GELU (erf, tanh and BLOOM's variants, with an optional fused bias) and SwiGLU.

Both ops are elementwise over the last dimension of their input, viewed as a [M, N] matrix of rows
(without a copy whenever the rows have a uniform stride, e.g. a ``chunk`` of a fused projection). Each
kernel program owns a [BLOCK_M, BLOCK_N] tile; math is float32 and the rounding to the input dtype
follows the op order HuggingFace runs, so that half-precision results match it bit for bit where the
notes below say so.

GELU modes:

* ``"none"``: torch's exact ``F.gelu``: ``x/2 * (1 + erf(x/sqrt(2)))``, float32 math, one rounding.
* ``"tanh"``: torch's ``F.gelu(approximate="tanh")``, float32 math, one rounding.
* ``"bloom"``: BLOOM's ``x*0.5*(1+tanh(0.79788456*x*(1+0.044715*x*x)))`` (truncated constants,
  transformers' ``bloom_gelu_forward``), evaluated in HF's Python op order with a rounding to the input
  dtype after every op, and the backward is HF's hand-written ``bloom_gelu_back`` (0.1070322243),
  which HF runs in the input dtype too, op by op; the kernels emulate both. The kernels are compiled
  without FMA contraction so the float32 path is the same sequence of roundings as well.

Fused bias (``gelu(x, bias=b)``): the pre-activation is ``p = round_to_dtype(x + b)`` (what
``x + bias`` gives in x's dtype), then ``y = GELU(p)`` exactly as without a bias. The reference computes
``gelu_reference(x + bias)``. Gradients: dp = GELU'(p) * dy (rounded to the dtype, as autograd's
tensor), dx = dp, dbias = column sums of dp accumulated in float32 then rounded to the bias dtype.
This is ``gelu(F.linear(h, W) + b)``; HF's ``gelu(F.linear(h, W, b))`` adds the bias inside the GEMM
before its single rounding, so in half precision the two pre-activations can differ by one ulp.

SwiGLU: ``y = silu(gate) * up`` with silu's output rounded to the dtype before the product (as HF's
``act_fn(gate_proj(x)) * up_proj(x)``); backward as autograd: d_up = dy * round(silu(gate)),
d_gate = silu'(gate) * round(dy * up).

One more torch detail the "bloom" backward reproduces: its ``0.79788456 + t`` reads the Python scalar
in float32 on CUDA but narrowed to the tensor dtype on CPU (``_bloom_add_scalar``); the multiplications
read it in float32 on both.

On CUDA, tanh and exp come from libdevice (the CUDA math library functions, ~1 ulp, that torch's CUDA
kernels call too; ``tl.exp`` would be the approximate ex2); under the Triton interpreter, which has no
libdevice, they are computed in float64 and rounded. Measured on CPU: "bloom" in float16 equals HF bit
for bit, forward and backward, on every float16 value in [-12, 12]; in float32 it differs from HF only
where torch's CPU tanh is not correctly rounded (1 ulp, ~0.1% of inputs).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .. import runtime

GELU_MODES = ("none", "tanh", "bloom")
_MODE_ID = {"none": 0, "tanh": 1, "bloom": 2}

_TILE_ELEMENTS = 4096  # elements per program: enough bytes in flight per SM for a memory-bound op
_MAX_BLOCK_N = 1024
_PROGRAMS_PER_SM = 4  # bias-gradient backward: programs per SM that stride over the row tiles
_SUM_BLOCK_P, _SUM_BLOCK_N = 32, 128


# ---------------------------------------------------------------------------------------------- math helpers

@triton.jit
def _rnd(v, DT: tl.constexpr):
    """Round a float32 value to dtype DT and widen it back (a no-op for float32): one torch op's rounding."""
    return v.to(DT).to(tl.float32)


@triton.jit
def _tanh(z, LIBDEVICE: tl.constexpr):
    """tanh of float32 z: libdevice on CUDA; float64 math under the interpreter (no libdevice there)."""
    if LIBDEVICE:
        return libdevice.tanh(z)
    else:
        a = tl.abs(z.to(tl.float64))
        e = tl.exp(-2.0 * a)
        t = (1.0 - e) / (1.0 + e)
        return tl.where(z < 0, -t, t).to(tl.float32)


@triton.jit
def _exp(z, LIBDEVICE: tl.constexpr):
    """exp of float32 z, accurate to ~1 ulp (tl.exp lowers to the approximate ex2 on CUDA)."""
    if LIBDEVICE:
        return libdevice.exp(z)
    else:
        return tl.exp(z.to(tl.float64)).to(tl.float32)


@triton.jit
def _gelu_fwd_math(x, MODE: tl.constexpr, DT: tl.constexpr, LIBDEVICE: tl.constexpr):
    """GELU of the float32 tile x (already a value of dtype DT); the result is rounded once on store."""
    if MODE == 0:  # torch's gelu: x * 0.5 * (1 + erf(x * M_SQRT1_2))
        y = x * 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
    elif MODE == 1:  # torch's tanh gelu: 0.5 * x * (1 + tanh(kBeta * (x + kKappa * x^3)))
        inner = 0.7978845608028654 * (x + 0.044715 * (x * x * x))
        y = 0.5 * x * (1.0 + _tanh(inner, LIBDEVICE))
    else:  # BLOOM, HF's op order: (x*0.5) * (1.0 + tanh((0.79788456*x) * (1 + ((0.044715*x)*x))))
        c = _rnd(1.0 + _rnd(_rnd(0.044715 * x, DT) * x, DT), DT)
        th = _rnd(_tanh(_rnd(_rnd(0.79788456 * x, DT) * c, DT), LIBDEVICE), DT)
        y = _rnd(x * 0.5, DT) * _rnd(1.0 + th, DT)
    return y


@triton.jit
def _gelu_bwd_math(x, dy, slope0, MODE: tl.constexpr, DT: tl.constexpr, LIBDEVICE: tl.constexpr):
    """d GELU(x)/dx * dy for float32 tiles x, dy (values of dtype DT); rounded once on store.

    ``slope0`` is BLOOM's additive 0.79788456 as torch's ``0.79788456 + t`` reads it on the device
    being emulated (see ``_bloom_add_scalar``).
    """
    if MODE == 0:  # torch's gelu_backward: dy * (cdf + x * pdf)
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        pdf = _exp(-0.5 * x * x, LIBDEVICE) * 0.3989422804014327
        dx = dy * (cdf + x * pdf)
    elif MODE == 1:  # torch's tanh gelu_backward
        x_sq = x * x
        th = _tanh(0.7978845608028654 * (x + 0.044715 * (x_sq * x)), LIBDEVICE)
        left = 0.5 * x
        right_derivative = left * (1.0 - th * th) * (0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x_sq))
        dx = dy * (0.5 * (1.0 + th) + right_derivative)
    else:  # HF's bloom_gelu_back in the input dtype, op by op:
        # ff = 0.5*x*((1 - th*th) * (0.79788456 + 0.1070322243*x*x)) + 0.5*(1 + th); return ff * g
        c = _rnd(1.0 + _rnd(_rnd(0.044715 * x, DT) * x, DT), DT)
        th = _rnd(_tanh(_rnd(_rnd(0.79788456 * x, DT) * c, DT), LIBDEVICE), DT)
        slope = _rnd(slope0 + _rnd(_rnd(0.1070322243 * x, DT) * x, DT), DT)
        p = _rnd(_rnd(1.0 - _rnd(th * th, DT), DT) * slope, DT)
        ff = _rnd(_rnd(_rnd(0.5 * x, DT) * p, DT) + _rnd(0.5 * _rnd(1.0 + th, DT), DT), DT)
        dx = ff * dy
    return dx


@triton.jit
def _silu(g, LIBDEVICE: tl.constexpr):
    """torch's silu in float32: g / (1 + exp(-g))."""
    return g / (1.0 + _exp(-g, LIBDEVICE))


# ---------------------------------------------------------------------------------------------- kernels

@triton.jit
def _tile(pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row indices (int64), column indices and the in-bounds mask of tile (pid_m, pid_n) of [M, N]."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    return rows.to(tl.int64), cols, mask


@triton.jit
def _gelu_fwd_kernel(X, BIAS, Y, M, N, stride_xm, stride_xn, stride_ym,
                     MODE: tl.constexpr, HAS_BIAS: tl.constexpr, LIBDEVICE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Y[m, n] = GELU(X[m, n] (+ BIAS[n])) for one [BLOCK_M, BLOCK_N] tile.

    X is [M, N] with strides (stride_xm, stride_xn), BIAS [N] in X's dtype, Y [M, N] with row stride
    stride_ym and unit column stride. MODE 0/1/2 = "none"/"tanh"/"bloom" (module docstring).
    """
    rows, cols, mask = _tile(tl.program_id(0), tl.program_id(1), M, N, BLOCK_M, BLOCK_N)
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_BIAS:
        b = tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)
        x = _rnd(x + b[None, :], X.dtype.element_ty)
    y = _gelu_fwd_math(x, MODE, X.dtype.element_ty, LIBDEVICE)
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(X, BIAS, DY, DX, DB_PART, M, N, tiles_m, slope0,
                     stride_xm, stride_xn, stride_dym, stride_dyn, stride_dxm,
                     MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DB: tl.constexpr,
                     LIBDEVICE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """DX = GELU'(p) * DY with p = X (+ BIAS) for the row tiles pid0, pid0 + P, ... of column block pid1.

    X, DY are [M, N] (any row/column strides), DX [M, N] with row stride stride_dxm and unit column
    stride, BIAS [N]. With HAS_DB the program's float32 column sums of round_to_dtype(DX) go to row pid0
    of DB_PART [P, N] (P = programs along axis 0), reduced afterwards.
    """
    pid, pid_n = tl.program_id(0), tl.program_id(1)
    DT: tl.constexpr = X.dtype.element_ty
    cols0 = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        b = tl.load(BIAS + cols0, mask=cols0 < N, other=0.0).to(tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tile in range(pid, tiles_m, tl.num_programs(0)):
        rows, cols, mask = _tile(tile, pid_n, M, N, BLOCK_M, BLOCK_N)
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
        x = x.to(tl.float32)
        if HAS_BIAS:
            x = _rnd(x + b[None, :], DT)
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0)
        dx = _gelu_bwd_math(x, dy.to(tl.float32), slope0, MODE, DT, LIBDEVICE).to(DX.dtype.element_ty)
        tl.store(DX + rows[:, None] * stride_dxm + cols[None, :], dx, mask=mask)
        if HAS_DB:
            db_acc += tl.where(mask, dx.to(tl.float32), 0.0)
    if HAS_DB:
        tl.store(DB_PART + pid * N + cols0, tl.sum(db_acc, axis=0), mask=cols0 < N)


@triton.jit
def _sum_rows_kernel(PART, OUT, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT[n] = sum_p PART[p, n] for the float32 row-major [P, N] partials; one program per BLOCK_N columns."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        mask = (rows < P)[:, None] & (cols < N)[None, :]
        acc += tl.load(PART + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=cols < N)


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, M, N, stride_gm, stride_gn, stride_um, stride_un, stride_ym,
                       LIBDEVICE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Y = round(silu(G)) * U for one tile; G, U [M, N] (any strides), Y [M, N] (row stride stride_ym)."""
    rows, cols, mask = _tile(tl.program_id(0), tl.program_id(1), M, N, BLOCK_M, BLOCK_N)
    g = tl.load(G + rows[:, None] * stride_gm + cols[None, :] * stride_gn, mask=mask, other=0.0)
    u = tl.load(U + rows[:, None] * stride_um + cols[None, :] * stride_un, mask=mask, other=0.0)
    s = _rnd(_silu(g.to(tl.float32), LIBDEVICE), G.dtype.element_ty)
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], (s * u.to(tl.float32)).to(Y.dtype.element_ty),
             mask=mask)


@triton.jit
def _swiglu_bwd_kernel(G, U, DY, DG, DU, M, N, stride_gm, stride_gn, stride_um, stride_un,
                       stride_dym, stride_dyn, stride_dgm, stride_dum,
                       LIBDEVICE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Gradients of y = round(silu(g)) * u for one tile, as autograd forms them in the input dtype.

    DU = DY * round(silu(G)); DG = silu'(G) * round(DY * U) with torch's silu_backward formula
    dy * sigmoid * (1 + g * (1 - sigmoid)). G, U, DY are [M, N] (any strides); DG, DU [M, N] with row
    strides stride_dgm, stride_dum and unit column stride.
    """
    rows, cols, mask = _tile(tl.program_id(0), tl.program_id(1), M, N, BLOCK_M, BLOCK_N)
    DT: tl.constexpr = G.dtype.element_ty
    g = tl.load(G + rows[:, None] * stride_gm + cols[None, :] * stride_gn, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_um + cols[None, :] * stride_un, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0)
    dy = dy.to(tl.float32)
    denom = 1.0 + _exp(-g, LIBDEVICE)
    sig = 1.0 / denom
    du = dy * _rnd(g / denom, DT)
    ds = _rnd(dy * u, DT)
    dg = ds * sig * (1.0 + g * (1.0 - sig))
    tl.store(DU + rows[:, None] * stride_dum + cols[None, :], du.to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + rows[:, None] * stride_dgm + cols[None, :], dg.to(DG.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- launchers

def rows_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D [M, N] view (N = last dim) with arbitrary strides, copying only if no view exists.

    Unlike ``runtime.as_rows`` this keeps strided views (a ``chunk`` of a fused gate/up projection, a
    transposed activation) without a copy; the kernels take both strides.
    """
    n = t.shape[-1] if t.dim() else 1
    try:
        return t.view(-1, n)
    except RuntimeError:
        return t.contiguous().view(-1, n)


def _tile_shape(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of width n: ~_TILE_ELEMENTS per program."""
    block_n = min(runtime.next_power_of_2(n), _MAX_BLOCK_N)
    block_m = max(1, _TILE_ELEMENTS // block_n)
    return block_m, block_n, 8 if block_m * block_n >= 4096 else 4


def _libdevice(t: torch.Tensor) -> bool:
    return runtime.on_gpu(t)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _row_programs(t: torch.Tensor, tiles_m: int, tiles_n: int) -> int:
    """Programs along the rows for the bias-gradient backward: a few per SM in all, at most one per tile."""
    if runtime.on_gpu(t):
        want = triton.cdiv(_PROGRAMS_PER_SM * _sm_count(t.device.index or 0), tiles_n)
    else:
        want = 2  # interpreter: exercises the strided loop and the partial sums at little cost
    return max(1, min(tiles_m, want))


def _bloom_add_scalar(x: torch.Tensor) -> float:
    """BLOOM backward's additive constant as torch's ``0.79788456 + t`` reads it for t like ``x``.

    torch's CPU ``add`` narrows a Python scalar to the tensor's dtype first (TensorIterator casts CPU
    inputs to the common dtype; CPU ``mul`` instead reads the original scalar in float32), while CUDA's
    add and mul both read it in float32. The kernel follows the device whose HF run it emulates.
    """
    return 0.79788456 if x.is_cuda else _narrowed(0.79788456, x.dtype)


@functools.lru_cache(maxsize=None)
def _narrowed(value: float, dtype: torch.dtype) -> float:
    return float(torch.tensor(value, dtype=dtype))


def gelu_fwd(x: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none", *,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the GELU forward: ``out = GELU(x (+ bias))``, x [..., N] (any strides), bias [N].

    Returns ``out`` (shape of x, contiguous, x's dtype; optionally preallocated).
    """
    y = runtime.check_out(out, "out", x)
    if x.numel() == 0:
        return y
    x2, y2 = rows_view(x), y.view(-1, x.shape[-1])
    m, n = x2.shape
    block_m, block_n, warps = _tile_shape(n)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _gelu_fwd_kernel[grid](x2, x2 if bias is None else bias, y2, m, n, x2.stride(0), x2.stride(1), y2.stride(0),
                           MODE=_MODE_ID[approximate], HAS_BIAS=bias is not None, LIBDEVICE=_libdevice(x),
                           BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, enable_fp_fusion=False)
    return y


def gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none", *,
             compute_dbias: bool = True, dx: torch.Tensor | None = None,
             dbias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the GELU backward. ``x`` [..., N] is the forward input, ``bias`` [N] the fused bias.

    Returns ``(dx, dbias)``: dx shaped like x in x's dtype, dbias [N] in the bias dtype (None without
    a bias or when not asked for). ``dx``/``dbias`` take preallocated outputs.
    """
    dx = runtime.check_out(dx, "dx", x)
    want_db = bias is not None and compute_dbias
    if x.numel() == 0:
        return dx, (runtime.check_out(dbias, "dbias", bias).zero_() if want_db else None)
    x2, dy2, dx2 = rows_view(x), rows_view(dy), dx.view(-1, x.shape[-1])
    m, n = x2.shape
    slope0 = _bloom_add_scalar(x)
    block_m, block_n, warps = _tile_shape(n)
    tiles_m, tiles_n = triton.cdiv(m, block_m), triton.cdiv(n, block_n)
    programs = _row_programs(x, tiles_m, tiles_n) if want_db else tiles_m
    part = torch.empty((programs, n), dtype=torch.float32, device=x.device) if want_db else None
    _gelu_bwd_kernel[(programs, tiles_n)](
        x2, x2 if bias is None else bias, dy2, dx2, x2 if part is None else part, m, n, tiles_m, slope0,
        x2.stride(0), x2.stride(1), dy2.stride(0), dy2.stride(1), dx2.stride(0),
        MODE=_MODE_ID[approximate], HAS_BIAS=bias is not None, HAS_DB=want_db, LIBDEVICE=_libdevice(x),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, enable_fp_fusion=False)
    if not want_db:
        return dx, None
    db = runtime.check_out(dbias, "dbias", bias)
    _sum_rows_kernel[(triton.cdiv(n, _SUM_BLOCK_N),)](part, db, programs, n,
                                                      BLOCK_P=_SUM_BLOCK_P, BLOCK_N=_SUM_BLOCK_N,
                                                      enable_fp_fusion=False)
    return dx, db


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the SwiGLU forward: ``out = round(silu(gate)) * up``; gate, up [..., N] (any strides)."""
    y = runtime.check_out(out, "out", gate)
    if gate.numel() == 0:
        return y
    g2, u2, y2 = rows_view(gate), rows_view(up), y.view(-1, gate.shape[-1])
    m, n = g2.shape
    block_m, block_n, warps = _tile_shape(n)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _swiglu_fwd_kernel[grid](g2, u2, y2, m, n, g2.stride(0), g2.stride(1), u2.stride(0), u2.stride(1),
                             y2.stride(0), LIBDEVICE=_libdevice(gate), BLOCK_M=block_m, BLOCK_N=block_n,
                             num_warps=warps, enable_fp_fusion=True)
    return y


def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, *, dgate: torch.Tensor | None = None,
               dup: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the SwiGLU backward; returns ``(dgate, dup)`` shaped like gate (optionally preallocated)."""
    dg = runtime.check_out(dgate, "dgate", gate)
    du = runtime.check_out(dup, "dup", gate)
    if gate.numel() == 0:
        return dg, du
    g2, u2, dy2 = rows_view(gate), rows_view(up), rows_view(dy)
    dg2, du2 = dg.view(-1, gate.shape[-1]), du.view(-1, gate.shape[-1])
    m, n = g2.shape
    block_m, block_n, warps = _tile_shape(n)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _swiglu_bwd_kernel[grid](g2, u2, dy2, dg2, du2, m, n, g2.stride(0), g2.stride(1), u2.stride(0),
                             u2.stride(1), dy2.stride(0), dy2.stride(1), dg2.stride(0), du2.stride(0),
                             LIBDEVICE=_libdevice(gate), BLOCK_M=block_m, BLOCK_N=block_n,
                             num_warps=warps, enable_fp_fusion=True)
    return dg, du


# ---------------------------------------------------------------------------------------------- autograd

class GeluFunction(torch.autograd.Function):
    """y = GELU(x (+ bias)); saves only the inputs (the pre-activation is recomputed in backward)."""

    @staticmethod
    def forward(ctx, x, bias, approximate):
        ctx.save_for_backward(x, bias)
        ctx.approximate = approximate
        return gelu_fwd(x, bias, approximate)

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        need_x, need_b, _ = ctx.needs_input_grad
        if not (need_x or need_b):
            return None, None, None
        dx, db = gelu_bwd(dy, x, bias, ctx.approximate, compute_dbias=need_b)
        return (dx if need_x else None), db, None


class SwiGLUFunction(torch.autograd.Function):
    """y = silu(gate) * up; saves the two inputs."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        need_g, need_u = ctx.needs_input_grad
        if not (need_g or need_u):
            return None, None
        dg, du = swiglu_bwd(dy, gate, up)
        return (dg if need_g else None), (du if need_u else None)


# ---------------------------------------------------------------------------------------------- public ops

def _check_gelu_args(x, approximate, bias) -> None:
    runtime.check_tensor(x, "x", min_ndim=1)
    if not isinstance(approximate, str) or approximate not in GELU_MODES:
        raise ValueError(f"approximate must be one of {GELU_MODES}, got {approximate!r}")
    if bias is not None:
        runtime.check_tensor(bias, "bias", ndim=1)
        runtime.check_same_device(x=x, bias=bias)
        runtime.check_shape(bias, "bias", [x.shape[-1]])


def bias_like(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The bias in x's dtype: under autocast a float32 bias meets a bf16/fp16 activation, and the Linear it
    belongs to would have rounded it to that dtype too."""
    return bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)


def gelu(x: torch.Tensor, approximate: str = "none", bias: torch.Tensor | None = None) -> torch.Tensor:
    """GELU of ``x + bias`` (bias optional, fused into the kernel), shaped like x [..., N].

    ``approximate``: "none" (torch's exact erf GELU), "tanh" (torch's tanh approximation) or "bloom"
    (BLOOM's truncated constants with HF's per-op rounding and hand-written backward; module docstring).
    ``bias`` [N] on x's device (another float dtype, as under autocast, is cast to x's); the pre-activation is
    ``x + bias`` rounded to x's dtype.
    Differentiable in x and bias. Raises TypeError/ValueError naming the bad argument.
    """
    from ..nn import functional  # the one dispatcher: validation, backend, the custom op

    return functional.gelu(x, approximate, bias)


class _BloomGeluReference(torch.autograd.Function):
    """transformers' ``GeLUFunction`` (models/bloom/modeling_bloom.py), formulas copied verbatim."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        tanh_out = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
        # sqrt(2/pi) * 3 * 0.044715 -> 0.1070322243
        ff = 0.5 * x * ((1 - tanh_out * tanh_out) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + tanh_out)
        return ff * g


def gelu_reference(x: torch.Tensor, approximate: str = "none", bias: torch.Tensor | None = None) -> torch.Tensor:
    """Eager GELU: ``F.gelu(x + bias, approximate)``, or HF's ``GeLUFunction`` for "bloom"; all in x's dtype."""
    if approximate not in GELU_MODES:
        raise ValueError(f"approximate must be one of {GELU_MODES}, got {approximate!r}")
    if bias is not None:
        x = x + bias
    if approximate == "bloom":
        return _BloomGeluReference.apply(x)
    return F.gelu(x, approximate=approximate)


def _check_swiglu_args(gate, up) -> None:
    runtime.check_tensor(gate, "gate", min_ndim=1)
    runtime.check_tensor(up, "up", min_ndim=1)
    runtime.check_same_dtype(gate=gate, up=up)
    runtime.check_same_device(gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"up must have gate's shape {list(gate.shape)}, got {list(up.shape)}")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: ``silu(gate) * up`` for gate, up of one shape [..., N] and dtype, as HF's Llama MLP.

    silu's output is rounded to the dtype before the product, as in HF. Differentiable in both inputs.
    Raises TypeError/ValueError naming the bad argument.
    """
    from ..nn import functional  # the one dispatcher: validation, backend, the custom op

    return functional.swiglu(gate, up)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Eager SwiGLU: ``F.silu(gate) * up`` in the input dtype (HF's ``act_fn(gate) * up``)."""
    return F.silu(gate) * up


__all__ = [
    "GELU_MODES", "gelu", "gelu_reference", "swiglu", "swiglu_reference", "GeluFunction", "SwiGLUFunction",
    "gelu_fwd", "gelu_bwd", "swiglu_fwd", "swiglu_bwd", "rows_view",
]

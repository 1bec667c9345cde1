"""I-BERT's integer GEMMs: int8 x int8 -> int32 linear layers with a fused integer epilogue, and the
integer attention (Q K^T and P V as integer GEMMs with IntSoftmax in between). Representation, constants
and the exact fixed-point arithmetic are those of :mod:`.int_ops`.

``int_linear`` (QuantLinear + what follows it): ``acc = x @ W^T`` (int8 tensor-core MMA into int32), then
in registers, in this order and each optional:

1. prescale ``acc = rhe(acc * m_p / 2**e_p)`` (per tensor: the stale-scale emulation of HF's layers >= 1,
   HF's QuantAct keeps the previous layer's scale);
2. ``+ bias`` (int32, per output channel);
3. IntGELU (per channel constants, int64 result);
4. requantization ``clamp(rhe(v * m[n] / 2**e[n]) + rhe(r * m1 / 2**e1), -2**(b-1), 2**(b-1) - 1)``
   with per-channel (or per-tensor) fixed points, ``r`` an optional integer residual (QuantAct's identity).

Without GELU and requantization the output is the int32 ``acc + bias`` (two's-complement wrap, as an int32
accumulator). Tiles are autotuned (Hopper: 128x128x128 / 128x256x128 with 3-4 stages, grouped ordering
for L2 reuse); the interpreter runs the first config.

``int_attention``: per (batch, head, block of queries) three sweeps over the keys recompute the exact
int32 scores (cheap at I-BERT's sequence lengths, and no N x N matrix in memory): the row max, then the
row sum of the 16-bit exponents, then ``p = floor(e16 * floor(2**32 / sum) / 2**24)`` and ``ctx += p @ v``
(p in [0, 256] does not fit int8, so this dot runs in fp16 with fp32 accumulation, exact: every product
and partial sum is an integer below 2**24). The epilogue requantizes ``ctx`` (scale s_v / 256) and
writes the heads concatenated, [B, Nq, H, D]. The floor in ``p`` depends on the whole row, so an online
(one-sweep) softmax cannot reproduce it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
import triton.testing
from triton.tools.tensor_descriptor import TensorDescriptor

from .. import runtime
from .int_ops import (FixedPoint, GeluConstants, SoftmaxConstants, _check_bits, _check_params, _gelu_requant_residual,
                      _int_gelu_math_reference, _into, _mul_round_shift_narrow, _requant_reference,
                      _softmax_e16, _stride, int_dtype, int_softmax_reference, mul_round_shift_reference,
                      narrow_params, requant_bounds)

MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------- configs

def _gemm_configs(pre_hook=None) -> list:
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps); the first also serves the interpreter
        (128, 128, 128, 4, 8), (128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 64, 4, 4),
        (128, 64, 128, 4, 4), (64, 128, 128, 4, 4), (64, 64, 128, 4, 4), (128, 64, 128, 4, 8),
        (64, 128, 128, 4, 8), (64, 64, 128, 3, 4), (64, 64, 128, 3, 8),
    ]
    return runtime.autotune_configs([
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w,
                      pre_hook=pre_hook)
        for bm, bn, bk, s, w in shapes])


def _prune_gemm(configs, named_args, **kwargs):
    """The int64 epilogue holds several int64 copies of each accumulator value: at most 64 values per
    thread for a plain requantization, 32 with a GELU (96-bit requantization), a residual or a prescale
    (sm_90 ptxas: no spills at these sizes)."""
    args = {**named_args, **kwargs}
    if not (args["HAS_GELU"] or args["HAS_REQUANT"] or args["HAS_PRESCALE"]):
        return configs
    per_thread = 32 if args["HAS_GELU"] or args["HAS_RES"] or args["HAS_PRESCALE"] else 64
    if args["HAS_GELU"] and (args["HAS_RES"] or args["HAS_PRESCALE"]):
        per_thread = 16  # combinations I-BERT never asks for
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= per_thread * 32 * c.num_warps]
    return kept or configs[:1]


def _attention_configs() -> list:
    return runtime.autotune_configs([
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w)
        for bm, bn, s, w in [(64, 64, 2, 4), (128, 64, 2, 8), (64, 32, 3, 4), (32, 64, 2, 4), (32, 32, 2, 4)]])


def _prune_attention(configs, named_args, **kwargs):
    """Storing the probabilities or a head dim of 128 adds live registers: <= 2048 scores per tile then."""
    args = {**named_args, **kwargs}
    if not (args["STORE_P"] or args["BLOCK_D"] > 64):
        return configs
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 2048]
    return kept or configs[:1]


# ---------------------------------------------------------------------------------------------- kernels

@triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K", "HAS_BIAS", "HAS_PRESCALE", "HAS_GELU",
                                                "HAS_REQUANT", "HAS_RES"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _int_linear_kernel(X, W, BIAS, R, Y, PM, PE, GB, GC, GS, QM, QE, RM, RE,
                       M, N, K, stride_xm, stride_wn, stride_rm, lo, hi, gelu_stride, quant_stride, res_stride,
                       M_BUCKET,
                       HAS_BIAS: tl.constexpr, HAS_PRESCALE: tl.constexpr, HAS_GELU: tl.constexpr,
                       HAS_REQUANT: tl.constexpr, HAS_RES: tl.constexpr, EVEN_K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of Y [M, N] = epilogue(X [M, K] int8 @ W[N, K]^T int8), int32 MMA.

    X rows have stride stride_xm, W rows stride_wn, both K-contiguous (the layout int8 wgmma wants).
    Grouped ordering: GROUP_M row tiles share each column sweep so W tiles stay in L2. Fixed points:
    PM/PE, RM/RE and (without GELU) QM/QE are :func:`narrow_params`; after the GELU the requantization
    takes the general 96-bit form (values pass 2**32).
    """
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # wrapped (in-bounds) row/column indices keep the main-loop loads unmasked
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    rk = tl.arange(0, BLOCK_K)
    a_ptr = X + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :]
    b_ptr = W + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptr)
            b = tl.load(b_ptr)
        else:
            k_ok = rk < K - kk * BLOCK_K
            a = tl.load(a_ptr, mask=k_ok[None, :], other=0)
            b = tl.load(b_ptr, mask=k_ok[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # triton 3.6 asserts acc dtype == out_dtype (default fp32)
        a_ptr += BLOCK_K
        b_ptr += BLOCK_K
    _linear_epilogue(acc, pid_m, pid_n, M, N, BIAS, R, Y, PM, PE, GB, GC, GS, QM, QE, RM, RE, stride_rm, lo, hi,
                     gelu_stride, quant_stride, res_stride, HAS_BIAS, HAS_PRESCALE, HAS_GELU, HAS_REQUANT, HAS_RES,
                     BLOCK_M, BLOCK_N)


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of the linear tile index: grouped ordering, GROUP_M row tiles share each
    column sweep so the W tiles stay in L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (tile // group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (tile % group) % group_m, (tile % group) // group_m


@triton.jit
def _linear_epilogue(acc, pid_m, pid_n, M, N, BIAS, R, Y, PM, PE, GB, GC, GS, QM, QE, RM, RE, stride_rm, lo, hi,
                     gelu_stride, quant_stride, res_stride, HAS_BIAS: tl.constexpr, HAS_PRESCALE: tl.constexpr,
                     HAS_GELU: tl.constexpr, HAS_REQUANT: tl.constexpr, HAS_RES: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The integer epilogue of one int32 accumulator tile (module docstring, steps 1-4), stored to Y [M, N]."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    if HAS_PRESCALE or HAS_GELU or HAS_REQUANT:
        v = acc.to(tl.int64)
        if HAS_PRESCALE:
            v = _mul_round_shift_narrow(v, tl.load(PM), tl.load(PE))
        if HAS_BIAS:
            v += tl.load(BIAS + cols, mask=col_ok, other=0).to(tl.int64)[None, :]
        v = _gelu_requant_residual(v, rows64, cols, col_ok, mask, GB, GC, GS, gelu_stride, QM, QE, quant_stride,
                                   R, stride_rm, RM, RE, res_stride, lo, hi, HAS_GELU, HAS_REQUANT, HAS_GELU,
                                   HAS_RES)
        out = v.to(Y.dtype.element_ty)
    else:
        if HAS_BIAS:
            acc += tl.load(BIAS + cols, mask=col_ok, other=0)[None, :]
        out = acc
    tl.store(Y + rows64[:, None] * N + cols[None, :], out, mask=mask)


def _set_tma_blocks(nargs):
    """Config pre-hook: the TMA descriptors load the tile shapes of the config being run."""
    nargs["X_DESC"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["W_DESC"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


@triton.autotune(configs=_gemm_configs(pre_hook=_set_tma_blocks),
                 key=["M_BUCKET", "N", "K", "HAS_BIAS", "HAS_PRESCALE", "HAS_GELU", "HAS_REQUANT", "HAS_RES"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.jit
def _int_linear_tma_kernel(X_DESC, W_DESC, BIAS, R, Y, PM, PE, GB, GC, GS, QM, QE, RM, RE,
                           M, N, K, stride_rm, lo, hi, gelu_stride, quant_stride, res_stride, M_BUCKET,
                           HAS_BIAS: tl.constexpr, HAS_PRESCALE: tl.constexpr, HAS_GELU: tl.constexpr,
                           HAS_REQUANT: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """:func:`_int_linear_kernel`'s tiles, persistent (about one program per SM, each striding over the tile
    index, the loops flattened so the next tile's loads overlap this tile's epilogue) with X and W read by
    TMA descriptors (Hopper's tensor memory accelerator: bulk copies, out-of-range elements read as 0)."""
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=True):
        pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for kk in range(k_steps):
            a = X_DESC.load([pid_m * BLOCK_M, kk * BLOCK_K])
            b = W_DESC.load([pid_n * BLOCK_N, kk * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        _linear_epilogue(acc, pid_m, pid_n, M, N, BIAS, R, Y, PM, PE, GB, GC, GS, QM, QE, RM, RE, stride_rm, lo,
                         hi, gelu_stride, quant_stride, res_stride, HAS_BIAS, HAS_PRESCALE, HAS_GELU, HAS_REQUANT,
                         HAS_RES, BLOCK_M, BLOCK_N)


@triton.jit
def _int_scores(q, K, kb, cols, d_ok, NK, skn, BLOCK_D: tl.constexpr):
    """int32 scores [BLOCK_M, BLOCK_N] of the query tile against keys ``cols`` (int8 MMA)."""
    kt = tl.load(K + kb + cols.to(tl.int64)[None, :] * skn + tl.arange(0, BLOCK_D)[:, None],
                 mask=d_ok[:, None] & (cols < NK)[None, :], other=0)
    return tl.dot(q, kt)


@triton.autotune(configs=_attention_configs(), key=["NK", "BLOCK_D", "HAS_MASK", "STORE_P"],
                 prune_configs_by={"early_config_prune": _prune_attention})
@triton.jit
def _int_attention_kernel(Q, K, V, MASK, P, Y, X0, BI, CI, EM, EE, OM, OE,
                          H, NQ, NK, D, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                          smb, smh, smq, smk, syb, syn, syh, spb, sph, spq, lo, hi,
                          HAS_MASK: tl.constexpr, STORE_P: tl.constexpr, HAS_REQUANT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Integer attention for one (batch, head, BLOCK_M queries): q, k, v int8 [B, H, N, D] (strided,
    D contiguous); mask (optional, uint8, strides smb/smh/smq/smk, 0 = broadcast) true = attend.

    Sweep 1: row max of the kept int32 scores. Sweep 2: sum of e16 (IntSoftmax's 16-bit exponent; masked
    keys as HF's clamped -inf). Sweep 3: p = floor(e16 * floor(2**32 / sum) / 2**24) (int16 to P when
    STORE_P) and ctx += p @ v. Epilogue: ctx requantized (per-tensor OM/OE) to Y [B, Nq, H, D], or int32.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < NQ
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    qb = b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    kb = b.to(tl.int64) * skb + h.to(tl.int64) * skh
    vb = b.to(tl.int64) * svb + h.to(tl.int64) * svh
    mb = b.to(tl.int64) * smb + h.to(tl.int64) * smh
    q = tl.load(Q + qb + rows.to(tl.int64)[:, None] * sqn + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0)
    x0 = tl.load(X0)
    bi = tl.load(BI)
    ci = tl.load(CI)
    em = tl.load(EM)
    ee = tl.load(EE)

    mx = tl.full([BLOCK_M], -(2 ** 31), tl.int32)
    for start in range(0, NK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        s = _int_scores(q, K, kb, cols, d_ok, NK, skn, BLOCK_D)
        keep = (cols < NK)[None, :]
        if HAS_MASK:
            keep = keep & (tl.load(MASK + mb + rows[:, None] * smq + cols[None, :] * smk,
                                   mask=row_ok[:, None] & (cols < NK)[None, :], other=0) != 0)
        mx = tl.maximum(mx, tl.max(tl.where(keep, s, -(2 ** 31)), axis=1))
    # a row with no kept key keeps mx = -2**31 (scores never reach it: |s| <= D * 2**14)
    has_key = mx > -(2 ** 31)
    mx64 = mx.to(tl.int64)

    total = tl.zeros([BLOCK_M], tl.int64)
    for start in range(0, NK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        s = _int_scores(q, K, kb, cols, d_ok, NK, skn, BLOCK_D)
        keep = (cols < NK)[None, :]
        if HAS_MASK:
            keep = keep & (tl.load(MASK + mb + rows[:, None] * smq + cols[None, :] * smk,
                                   mask=row_ok[:, None] & (cols < NK)[None, :], other=0) != 0)
        xi = tl.where(keep, s.to(tl.int64) - mx64[:, None], 30 * x0)
        e16 = tl.where((cols < NK)[None, :], _softmax_e16(xi, x0, bi, ci, em, ee), 0)
        total += tl.sum(e16, axis=1)
    total = tl.where(has_key, total, 0)
    factor = tl.where(total > 0, (1 << 32) // tl.maximum(total, 1), 0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, NK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < NK
        s = _int_scores(q, K, kb, cols, d_ok, NK, skn, BLOCK_D)
        keep = col_ok[None, :]
        if HAS_MASK:
            keep = keep & (tl.load(MASK + mb + rows[:, None] * smq + cols[None, :] * smk,
                                   mask=row_ok[:, None] & col_ok[None, :], other=0) != 0)
        xi = tl.where(keep, s.to(tl.int64) - mx64[:, None], 30 * x0)
        e16 = tl.where(col_ok[None, :], _softmax_e16(xi, x0, bi, ci, em, ee), 0)
        p = (e16 * factor[:, None]) >> 24
        if STORE_P:
            pb = b.to(tl.int64) * spb + h.to(tl.int64) * sph
            tl.store(P + pb + rows.to(tl.int64)[:, None] * spq + cols[None, :], p.to(tl.int16),
                     mask=row_ok[:, None] & col_ok[None, :])
        v = tl.load(V + vb + cols.to(tl.int64)[:, None] * svn + d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                    other=0)
        acc = tl.dot(p.to(tl.int32).to(tl.float16), v.to(tl.float16), acc)

    ctx = acc.to(tl.int64)
    if HAS_REQUANT:
        ctx = tl.minimum(tl.maximum(_mul_round_shift_narrow(ctx, tl.load(OM), tl.load(OE)), lo), hi)
    yb = b.to(tl.int64) * syb + h.to(tl.int64) * syh
    tl.store(Y + yb + rows.to(tl.int64)[:, None] * syn + d[None, :], ctx.to(Y.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------------- references

def int_matmul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact integer ``a @ b`` as int64 (int64 GEMM on the CPU; float64 on CUDA, exact below 2**53)."""
    if a.is_cuda:
        return torch.matmul(a.to(torch.float64), b.to(torch.float64)).to(torch.int64)
    return torch.matmul(a.to(torch.int64), b.to(torch.int64))


def int_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                         prescale: FixedPoint | None = None, gelu: GeluConstants | None = None,
                         requant: FixedPoint | None = None, bits: int = 8, residual: torch.Tensor | None = None,
                         residual_requant: FixedPoint | None = None) -> torch.Tensor:
    """:func:`int_linear` in torch integer arithmetic (same epilogue order and output dtypes)."""
    _check_linear_args(x, weight, bias, prescale, gelu, requant, bits, residual, residual_requant)
    v = int_matmul_reference(x, weight.t())
    if prescale is not None:
        v = mul_round_shift_reference(v, prescale.multiplier, prescale.shift)
    if bias is not None:
        v = v + bias.long()
    if gelu is not None:
        v = _int_gelu_math_reference(v, gelu)
    if requant is not None:
        return _requant_reference(v, requant, bits, residual, residual_requant)
    return v if gelu is not None else v.to(torch.int32)


def int_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, constants: SoftmaxConstants,
                            requant: FixedPoint | None = None, bits: int = 8, *, mask: torch.Tensor | None = None,
                            return_probs: bool = False):
    """:func:`int_attention` by the unfused integer ops: scores = q k^T, int_softmax, ctx = p v, requant."""
    _check_attention_args(q, k, v, constants, requant, bits, mask)
    scores = int_matmul_reference(q, k.transpose(-1, -2)).to(torch.int32)
    p = int_softmax_reference(scores, constants, mask)
    ctx = int_matmul_reference(p, v)
    ctx = _requant_reference(ctx, requant, bits) if requant is not None else ctx.to(torch.int32)
    ctx = ctx.transpose(1, 2).contiguous()
    return (ctx, p) if return_probs else ctx


# ---------------------------------------------------------------------------------------------- validation

def _check_linear_args(x, weight, bias, prescale, gelu, requant, bits, residual, residual_requant) -> None:
    runtime.check_tensor(x, "x", dtypes=(torch.int8,), min_ndim=1)
    runtime.check_tensor(weight, "weight", dtypes=(torch.int8,), ndim=2)
    _check_bits(bits)
    runtime.check_same_device(x=x, weight=weight, bias=bias, residual=residual)
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal weight's in_features ({k})")
    if bias is not None:
        runtime.check_tensor(bias, "bias", dtypes=(torch.int32,), ndim=1)
        if bias.numel() != n:
            raise ValueError(f"bias must have {n} elements, got {bias.numel()}")
    if prescale is not None:
        _check_params(prescale, "prescale", FixedPoint, 1, x.device)
    if gelu is not None:
        _check_params(gelu, "gelu", GeluConstants, n, x.device)
    if requant is not None:
        _check_params(requant, "requant", FixedPoint, n, x.device)
    if residual is not None:
        if requant is None:
            raise ValueError("a residual is added by the requantization: pass requant too")
        runtime.check_tensor(residual, "residual", dtypes=(torch.int8, torch.int16, torch.int32))
        if tuple(residual.shape) != (*x.shape[:-1], n):
            raise ValueError(f"residual must have shape {[*x.shape[:-1], n]}, got {list(residual.shape)}")
        if residual_requant is None:
            raise ValueError("a residual needs residual_requant (its FixedPoint)")
        _check_params(residual_requant, "residual_requant", FixedPoint, n, x.device)
    elif residual_requant is not None:
        raise ValueError("residual_requant was given without a residual")


def _check_attention_args(q, k, v, constants, requant, bits, mask) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        runtime.check_tensor(t, name, dtypes=(torch.int8,), ndim=4)
    runtime.check_same_device(q=q, k=k, v=v, mask=mask)
    _check_bits(bits)
    b, h, nq, d = q.shape
    if k.shape[:2] != (b, h) or k.shape[3] != d:
        raise ValueError(f"k must have shape [{b}, {h}, Nk, {d}], got {list(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {list(k.shape)}, got {list(v.shape)}")
    _check_params(constants, "constants", SoftmaxConstants, 1, q.device)
    if requant is not None:
        _check_params(requant, "requant", FixedPoint, 1, q.device)
    if mask is not None:
        runtime.check_tensor(mask, "mask", dtypes=(torch.bool,))
        shape = (b, h, nq, k.shape[2])
        try:
            ok = mask.dim() <= 4 and torch.broadcast_shapes(mask.shape, shape) == shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"mask of shape {list(mask.shape)} must broadcast to the scores {list(shape)}")


# ---------------------------------------------------------------------------------------------- launchers

def _linear_launch(x, weight, bias, prescale, gelu, requant, bits, residual, residual_requant, out):
    n, k = weight.shape
    dtype = int_dtype(bits) if requant is not None else torch.int64 if gelu is not None else torch.int32
    y = runtime.check_out(out, "out", x, shape=(*x.shape[:-1], n), dtype=dtype)
    if y.numel() == 0:
        return y
    if k == 0:
        return _into(y, int_linear_reference(x, weight, bias, prescale=prescale, gelu=gelu, requant=requant,
                                             bits=bits, residual=residual, residual_requant=residual_requant))
    x2 = runtime.as_rows(x)
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    m = x2.shape[0]
    r2 = runtime.as_rows(residual) if residual is not None else x2
    lo, hi = requant_bounds(bits)
    dummy = (x2, x2, x2)
    pm, pe = narrow_params(prescale) if prescale is not None else dummy[:2]
    gb, gc, gs = gelu[:3] if gelu is not None else dummy
    qm, qe = (requant if gelu is not None else narrow_params(requant)) if requant is not None else dummy[:2]
    rm, re = narrow_params(residual_requant) if residual_requant is not None else dummy[:2]

    epilogue = (bias if bias is not None else x2, r2, y.view(m, n), pm, pe, gb, gc, gs, qm, qe, rm, re)
    sizes = (m, n, k)
    scalars = (r2.stride(0), lo, hi, _stride(gb), _stride(qm), _stride(rm), runtime.next_power_of_2(m))
    flags = dict(HAS_BIAS=bias is not None, HAS_PRESCALE=prescale is not None, HAS_GELU=gelu is not None,
                 HAS_REQUANT=requant is not None, HAS_RES=residual is not None)

    def tiled():
        _int_linear_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](
            x2, w, *epilogue, *sizes, x2.stride(0), w.stride(0), *scalars, **flags)

    def tma():
        # placeholder block shapes: each config's pre-hook sets its own
        descriptors = [TensorDescriptor.from_tensor(t, [16, 32]) for t in (x2, w)]
        programs = _persistent_programs(x2.device)
        _int_linear_tma_kernel[lambda meta: (min(programs, triton.cdiv(m, meta["BLOCK_M"])
                                                 * triton.cdiv(n, meta["BLOCK_N"])),)](
            *descriptors, *epilogue, *sizes, *scalars, **flags)

    key = (x2.device, runtime.next_power_of_2(m), n, k, *flags.values())
    _choose_linear_kernel(key, {"tiled": tiled, "tma": tma} if _tma_ok(x2, w) else {"tiled": tiled})()
    return y


LINEAR_KERNELS = ("tiled", "tma")
_force_linear_kernel: str | None = None  # tests pin one of LINEAR_KERNELS; None = measured choice
_linear_choice: dict = {}


def _tma_ok(x2: torch.Tensor, w: torch.Tensor) -> bool:
    """TMA descriptors need a Hopper (or later) GPU, 16-byte aligned bases and row strides (int8: multiples
    of 16 elements)."""
    if _force_linear_kernel == "tma":
        return True
    return (x2.is_cuda and runtime.on_gpu(x2) and torch.cuda.get_device_capability(x2.device)[0] >= 9
            and all(t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 for t in (x2, w)))


def _persistent_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, each striding over several tiles
    return torch.cuda.get_device_properties(device).multi_processor_count


def _choose_linear_kernel(key, launchers: dict):
    """The launcher to run for ``key`` (device, M bucket, N, K, epilogue flags): the pinned one, the only one,
    or the faster of the two, timed once per key after each has autotuned its tiles (both are exact, so the
    choice changes speed only). Never timed inside a CUDA-graph capture: the tiled kernel serves it."""
    if _force_linear_kernel is not None:
        return launchers[_force_linear_kernel]
    if len(launchers) == 1:
        return launchers["tiled"]
    choice = _linear_choice.get(key)
    if choice is None:
        if key[0].type == "cuda" and torch.cuda.is_current_stream_capturing():
            return launchers["tiled"]
        times = {name: triton.testing.do_bench(launch, warmup=5, rep=20) for name, launch in launchers.items()}
        choice = _linear_choice[key] = min(times, key=times.get)
    return launchers[choice]


def _attention_launch(q, k, v, constants, requant, bits, mask, return_probs, out):
    b, h, nq, d = q.shape
    nk = k.shape[2]
    dtype = int_dtype(bits) if requant is not None else torch.int32
    y = runtime.check_out(out, "out", q, shape=(b, nq, h, d), dtype=dtype)
    probs = torch.empty((b, h, nq, nk), dtype=torch.int16, device=q.device) if return_probs else None
    if y.numel() == 0 or nk == 0:
        y.zero_()
        return (y, probs.zero_()) if return_probs else y
    q, k, v = (t if t.stride(3) == 1 else t.contiguous() for t in (q, k, v))
    if mask is not None:
        mk = mask.view(torch.uint8)
        mk = mk.reshape((1,) * (4 - mk.dim()) + tuple(mk.shape)).expand(b, h, nq, nk)
        mstrides = mk.stride()
    else:
        mk, mstrides = q, (0, 0, 0, 0)
    lo, hi = requant_bounds(bits)
    om, oe = narrow_params(requant) if requant is not None else (constants.x0_int, constants.x0_int)
    p = probs if probs is not None else y
    pstrides = probs.stride()[:3] if probs is not None else (0, 0, 0)
    block_d = max(32, runtime.next_power_of_2(d))  # an int8 MMA needs K >= 32
    c = constants

    def grid(meta):
        return (triton.cdiv(nq, meta["BLOCK_M"]), b * h)

    _int_attention_kernel[grid](
        q, k, v, mk, p, y, c.x0_int, c.b_int, c.c_int, c.e16.multiplier, c.e16.shift, om, oe,
        h, nq, nk, d, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *mstrides, y.stride(0), y.stride(1), y.stride(2), *pstrides, lo, hi,
        HAS_MASK=mask is not None, STORE_P=return_probs, HAS_REQUANT=requant is not None, BLOCK_D=block_d)
    return (y, probs) if return_probs else y


# ---------------------------------------------------------------------------------------------- public ops

def int_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               prescale: FixedPoint | None = None, gelu: GeluConstants | None = None,
               requant: FixedPoint | None = None, bits: int = 8, residual: torch.Tensor | None = None,
               residual_requant: FixedPoint | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Integer linear layer: ``x @ weight^T`` (int8 x int8 -> int32) with the fused epilogue of the module
    docstring.

    x: int8 [..., K] (K contiguous); weight: int8 [N, K]; bias: int32 [N]; prescale: per-tensor
    :class:`FixedPoint`; gelu: :class:`GeluConstants` (per channel N or per tensor) of the accumulator's
    scale; requant: per-channel/per-tensor FixedPoint to ``bits``; residual: integer [..., N] with its
    per-tensor/per-channel ``residual_requant`` (needs ``requant``). Returns [..., N]: int32 (no GELU, no
    requant), int64 (GELU without requant), else the int dtype of ``bits``.
    """
    _check_linear_args(x, weight, bias, prescale, gelu, requant, bits, residual, residual_requant)
    if runtime.use_triton(x, op="int_linear"):
        return _linear_launch(x, weight, bias, prescale, gelu, requant, bits, residual, residual_requant, out)
    return _into(out, int_linear_reference(x, weight, bias, prescale=prescale, gelu=gelu, requant=requant,
                                           bits=bits, residual=residual, residual_requant=residual_requant))


def int_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, constants: SoftmaxConstants,
                  requant: FixedPoint | None = None, bits: int = 8, *, mask: torch.Tensor | None = None,
                  return_probs: bool = False, out: torch.Tensor | None = None):
    """I-BERT's integer self-attention core, fused: ``p = IntSoftmax(q k^T)``, ``ctx = p v``, requantized.

    q: int8 [B, H, Nq, D]; k, v: int8 [B, H, Nk, D] (any strides with D contiguous, e.g. views of a
    [B, N, H*D] projection); constants: :func:`softmax_constants` (s_q s_k / sqrt(d), the 16-bit act's
    scale); requant: per-tensor FixedPoint of ``s_v / 256 -> s_out`` (None: int32 ctx); mask: bool
    broadcastable to [B, H, Nq, Nk], true = attend. Returns ctx [B, Nq, H, D] (heads concatenated:
    ``.view(B, Nq, H * D)``), and with ``return_probs`` also p int16 [B, H, Nq, Nk] (scale 1/256).
    """
    _check_attention_args(q, k, v, constants, requant, bits, mask)
    if runtime.use_triton(q, op="int_attention"):
        if q.shape[3] <= MAX_HEAD_DIM:
            return _attention_launch(q, k, v, constants, requant, bits, mask, return_probs, out)
        runtime.unsupported("int_attention", f"head dim above {MAX_HEAD_DIM} (got {q.shape[3]})")
    result = int_attention_reference(q, k, v, constants, requant, bits, mask=mask, return_probs=return_probs)
    if return_probs:
        return _into(out, result[0]), result[1]
    return _into(out, result)


__all__ = ["int_linear", "int_linear_reference", "int_attention", "int_attention_reference",
           "int_matmul_reference", "MAX_HEAD_DIM"]

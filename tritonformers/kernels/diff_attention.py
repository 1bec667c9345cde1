"""Fused differential attention (DiffLlama), forward and backward.

For head pair j = 0..H/2-1 with r = H / Hkv query heads per KV head, g = j // r and g' = g + Hkv/2
(transformers' DiffLlamaAttention: heads pair j with j + H/2, not 2j with 2j+1):

    A_j = softmax(scale * q_j k_g^T + mask)            B_j = softmax(scale * q_{j+H/2} k_{g'}^T + mask)
    W_g = [v_g | v_g']  (width 2D)                      Y_j = A_j W_g - lambda * B_j W_g
    out[b, n, j, :] = (1 - lambda_init) * Y_j / sqrt(mean(Y_j^2) + eps)       (RMSNorm over 2D, no weight)

q [B, H, N, D] (after RoPE), k/v [B, Hkv, Nk, D] (Hkv even, H a multiple of Hkv), lambda a scalar tensor
(``diff_lambda`` computes it from the four lambda vectors with HF's roundings), key_padding_mask [B, Nk]
(1 = real token), causal aligned bottom-right. Output [B, N, H/2, 2D]: viewed as [B, N, H*D] it is the
input of o_proj. One program per (batch, pair, query block) streams each K/V tile once for both
softmax maps; the combination, the norm and the scale run in the epilogue, so neither A·W nor B·W is
written unless gradients are needed (then both are saved, in the model dtype, with the two log-sum-exps).
In half precision the epilogue rounds where HF rounds (each attention output, lambda * B·W, the
difference, the normalised value, the scaled result), so it tracks HF's eager output to the last bit
wherever the attention outputs agree.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import runtime
from .attention import attention_reference, check_scale
from .flash import (MAX_HEAD_DIM, bhn_strides, block_d, decode_autotuned, decode_splits, dot_precision,
                    masked_scores, multiprocessors, online_softmax_step, probabilities, softmax_attention_reference)



@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """Round float32 values to the model dtype and back (HF rounds after every op in that dtype)."""
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def _diff_epilogue(acc1a, acc1b, l1, acc2a, acc2b, l2, lam, eps, out_scale, HEAD_DIM: tl.constexpr,
                   DT: tl.constexpr):
    """From the two maps' unnormalised accumulators (halves a: v_g, b: v_g') and row sums to the output
    halves (model dtype), rounding where HF rounds; also returns the normalised attention outputs O1, O2."""
    inv1 = tl.where(l1 > 0.0, 1.0 / tl.where(l1 > 0.0, l1, 1.0), 0.0)
    inv2 = tl.where(l2 > 0.0, 1.0 / tl.where(l2 > 0.0, l2, 1.0), 0.0)
    o1a = _round(acc1a * inv1[:, None], DT)
    o1b = _round(acc1b * inv1[:, None], DT)
    o2a = _round(acc2a * inv2[:, None], DT)
    o2b = _round(acc2b * inv2[:, None], DT)
    lam = lam.to(tl.float32)
    ya = _round(o1a - _round(lam * o2a, DT), DT)
    yb = _round(o1b - _round(lam * o2b, DT), DT)
    rstd = 1.0 / tl.sqrt((tl.sum(ya * ya, 1) + tl.sum(yb * yb, 1)) / (2 * HEAD_DIM) + eps)
    outa = (_round(ya * rstd[:, None], DT) * out_scale).to(DT)
    outb = (_round(yb * rstd[:, None], DT) * out_scale).to(DT)
    return outa, outb, o1a, o1b, o2a, o2b


@triton.jit
def _diff_fwd_kernel(
    Q, K, V, LAMBDA, OUT, O1, O2, LSE1, LSE2, KPM,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    HP, R, HKV_HALF, NQ, NK, sm_scale, out_scale, eps,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, SAVE_O: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (query block, b * HP + j): both softmax maps of pair j over shared K/V tiles, then the epilogue.

    OUT/O1/O2 are [B, NQ, HP, 2 * HEAD_DIM] contiguous; LSE1/LSE2 [B, HP, NQ] float32.
    """
    pid_m = tl.program_id(0)
    pid_bj = tl.program_id(1)
    b = pid_bj // HP
    j = pid_bj % HP
    g = j // R
    g2 = g + HKV_HALF
    DT = Q.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < NQ
    q_rows = offs_m[:, None] * sqn + offs_d[None, :]
    q_mask = row_ok[:, None] & d_ok[None, :]
    q1 = tl.load(Q + b * sqb + j * sqh + q_rows, mask=q_mask, other=0.0)
    q2 = tl.load(Q + b * sqb + (j + HP) * sqh + q_rows, mask=q_mask, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634

    m1 = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    m2 = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    l2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc1a = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # A_j @ v_g
    acc1b = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # A_j @ v_g'
    acc2a = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # B_j @ v_g
    acc2b = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # B_j @ v_g'
    hi = NK
    if CAUSAL:
        hi = tl.minimum(NK, tl.maximum((pid_m + 1) * BLOCK_M + NK - NQ, 0))
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kT_mask = d_ok[:, None] & (cols < NK)[None, :]
        k1T = tl.load(K + b * skb + g * skh + cols[None, :] * skn + offs_d[:, None], mask=kT_mask, other=0.0)
        k2T = tl.load(K + b * skb + g2 * skh + cols[None, :] * skn + offs_d[:, None], mask=kT_mask, other=0.0)
        v_mask = (cols < NK)[:, None] & d_ok[None, :]
        va = tl.load(V + b * svb + g * svh + cols[:, None] * svn + offs_d[None, :], mask=v_mask, other=0.0)
        vb = tl.load(V + b * svb + g2 * svh + cols[:, None] * svn + offs_d[None, :], mask=v_mask, other=0.0)

        s1 = masked_scores(q1, k1T, offs_m, cols, b, NQ, NK, NK, 0.0, KPM, KPM, qk_scale,
                           CAUSAL, False, False, HAS_KPM, DT, PRECISION)
        p1, alpha1, m1_new, l1 = online_softmax_step(s1, m1, l1, False)
        p1 = p1.to(DT)
        acc1a = acc1a * alpha1[:, None] + tl.dot(p1, va, input_precision=PRECISION)
        acc1b = acc1b * alpha1[:, None] + tl.dot(p1, vb, input_precision=PRECISION)
        m1 = m1_new

        s2 = masked_scores(q2, k2T, offs_m, cols, b, NQ, NK, NK, 0.0, KPM, KPM, qk_scale,
                           CAUSAL, False, False, HAS_KPM, DT, PRECISION)
        p2, alpha2, m2_new, l2 = online_softmax_step(s2, m2, l2, False)
        p2 = p2.to(DT)
        acc2a = acc2a * alpha2[:, None] + tl.dot(p2, va, input_precision=PRECISION)
        acc2b = acc2b * alpha2[:, None] + tl.dot(p2, vb, input_precision=PRECISION)
        m2 = m2_new

    outa, outb, o1a, o1b, o2a, o2b = _diff_epilogue(acc1a, acc1b, l1, acc2a, acc2b, l2, tl.load(LAMBDA), eps,
                                                    out_scale, HEAD_DIM, DT)
    out_rows = ((b * NQ + offs_m[:, None]) * HP + j) * (2 * HEAD_DIM) + offs_d[None, :]
    tl.store(OUT + out_rows, outa, mask=q_mask)
    tl.store(OUT + out_rows + HEAD_DIM, outb, mask=q_mask)
    if SAVE_O:
        tl.store(O1 + out_rows, o1a.to(DT), mask=q_mask)
        tl.store(O1 + out_rows + HEAD_DIM, o1b.to(DT), mask=q_mask)
        tl.store(O2 + out_rows, o2a.to(DT), mask=q_mask)
        tl.store(O2 + out_rows + HEAD_DIM, o2b.to(DT), mask=q_mask)
        lse1 = tl.where(l1 > 0.0, m1 * 0.6931471805599453 + tl.log(tl.where(l1 > 0.0, l1, 1.0)), float("-inf"))
        lse2 = tl.where(l2 > 0.0, m2 * 0.6931471805599453 + tl.log(tl.where(l2 > 0.0, l2, 1.0)), float("-inf"))
        tl.store(LSE1 + pid_bj * NQ + offs_m, lse1, mask=row_ok)
        tl.store(LSE2 + pid_bj * NQ + offs_m, lse2, mask=row_ok)


@triton.jit
def _diff_bwd_prep_kernel(
    DOUT, O1, O2, LAMBDA, DO1, DO2, DELTA1, DELTA2, DLAMBDA_PART,
    HP, NQ, out_scale, eps,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Back through the epilogue: with Y = O1 - lambda O2 and r = rsqrt(mean(Y^2) + eps),
    dY = c r (dout - Y r^2 mean(dout Y)); dO1 = dY, dO2 = -lambda dY (stored in the model dtype for the dots),
    delta_k = rowsum(dO_k O_k), and this block's share of dlambda = -sum(dY O2).
    """
    pid_m = tl.program_id(0)
    pid_bj = tl.program_id(1)
    b = pid_bj // HP
    j = pid_bj % HP
    DT = O1.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < NQ
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = ((b * NQ + offs_m[:, None]) * HP + j) * (2 * HEAD_DIM) + offs_d[None, :]
    lam = tl.load(LAMBDA).to(tl.float32)
    o1a = tl.load(O1 + rows, mask=mask, other=0.0).to(tl.float32)
    o1b = tl.load(O1 + rows + HEAD_DIM, mask=mask, other=0.0).to(tl.float32)
    o2a = tl.load(O2 + rows, mask=mask, other=0.0).to(tl.float32)
    o2b = tl.load(O2 + rows + HEAD_DIM, mask=mask, other=0.0).to(tl.float32)
    dya = tl.load(DOUT + rows, mask=mask, other=0.0).to(tl.float32)
    dyb = tl.load(DOUT + rows + HEAD_DIM, mask=mask, other=0.0).to(tl.float32)
    ya = _round(o1a - _round(lam * o2a, DT), DT)
    yb = _round(o1b - _round(lam * o2b, DT), DT)
    n = 2 * HEAD_DIM
    rstd = 1.0 / tl.sqrt((tl.sum(ya * ya, 1) + tl.sum(yb * yb, 1)) / n + eps)
    proj = (tl.sum(dya * ya, 1) + tl.sum(dyb * yb, 1)) / n * rstd * rstd
    dYa = out_scale * rstd[:, None] * (dya - ya * proj[:, None])
    dYb = out_scale * rstd[:, None] * (dyb - yb * proj[:, None])
    tl.store(DO1 + rows, dYa.to(DT), mask=mask)
    tl.store(DO1 + rows + HEAD_DIM, dYb.to(DT), mask=mask)
    tl.store(DO2 + rows, (-lam * dYa).to(DT), mask=mask)
    tl.store(DO2 + rows + HEAD_DIM, (-lam * dYb).to(DT), mask=mask)
    tl.store(DELTA1 + pid_bj * NQ + offs_m, tl.sum(dYa * o1a, 1) + tl.sum(dYb * o1b, 1), mask=row_ok)
    tl.store(DELTA2 + pid_bj * NQ + offs_m, -lam * (tl.sum(dYa * o2a, 1) + tl.sum(dYb * o2b, 1)), mask=row_ok)
    dlam = -(tl.sum(tl.sum(dYa * o2a, 1), 0) + tl.sum(tl.sum(dYb * o2b, 1), 0))
    tl.store(DLAMBDA_PART + pid_bj * tl.num_programs(0) + pid_m, dlam)


@triton.jit
def _diff_bwd_dkdv_kernel(
    Q, K, V, DO1, DO2, LSE1, LSE2, DELTA1, DELTA2, DK, DV, KPM,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    HP, R, HKV_HALF, NQ, NK, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (key block, b * HKV_HALF + g): dK/dV of KV heads g and g' from the r pairs of group g.

    k_g meets the first maps A_j, k_g' the second maps B_j; v_g and v_g' meet both (W = [v_g | v_g']).
    DK/DV are [B, Hkv, NK, HEAD_DIM] contiguous.
    """
    pid_n = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // HKV_HALF
    g = pid_bg % HKV_HALF
    g2 = g + HKV_HALF
    DT = Q.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kT_mask = d_ok[:, None] & (offs_n < NK)[None, :]
    k1T = tl.load(K + b * skb + g * skh + offs_n[None, :] * skn + offs_d[:, None], mask=kT_mask, other=0.0)
    k2T = tl.load(K + b * skb + g2 * skh + offs_n[None, :] * skn + offs_d[:, None], mask=kT_mask, other=0.0)
    vaT = tl.load(V + b * svb + g * svh + offs_n[None, :] * svn + offs_d[:, None], mask=kT_mask, other=0.0)
    vbT = tl.load(V + b * svb + g2 * svh + offs_n[None, :] * svn + offs_d[:, None], mask=kT_mask, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    dk1 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dva = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dvb = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    if CAUSAL:
        lo = tl.maximum(pid_n * BLOCK_N - (NK - NQ), 0) // BLOCK_M * BLOCK_M
    for jj in range(0, R):
        j = g * R + jj
        for start_m in range(lo, NQ, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < NQ
            mask = row_ok[:, None] & d_ok[None, :]
            do_rows = ((b * NQ + rows[:, None]) * HP + j) * (2 * HEAD_DIM) + offs_d[None, :]
            for half in tl.static_range(0, 2):  # half 0: the first map (q_j, k_g); half 1: the second (q_{j+HP}, k_g')
                kT = k1T if half == 0 else k2T
                DO = DO1 if half == 0 else DO2
                stat = (b * HP + j) * NQ + rows
                q = tl.load(Q + b * sqb + (j + half * HP) * sqh + rows[:, None] * sqn + offs_d[None, :],
                            mask=mask, other=0.0)
                doa = tl.load(DO + do_rows, mask=mask, other=0.0)
                dob = tl.load(DO + do_rows + HEAD_DIM, mask=mask, other=0.0)
                lse = tl.load((LSE1 if half == 0 else LSE2) + stat, mask=row_ok, other=0.0) * 1.4426950408889634
                delta = tl.load((DELTA1 if half == 0 else DELTA2) + stat, mask=row_ok, other=0.0)
                s = masked_scores(q, kT, rows, offs_n, b, NQ, NK, NK, 0.0, KPM, KPM, qk_scale,
                                  CAUSAL, False, False, HAS_KPM, DT, PRECISION)
                p = probabilities(s, lse)
                pT = tl.trans(p.to(DT))
                dva += tl.dot(pT, doa, input_precision=PRECISION)
                dvb += tl.dot(pT, dob, input_precision=PRECISION)
                dp = tl.dot(doa, vaT, input_precision=PRECISION) + tl.dot(dob, vbT, input_precision=PRECISION)
                dsT = tl.trans((p * (dp - delta[:, None])).to(DT))
                if half == 0:
                    dk1 += tl.dot(dsT, q, input_precision=PRECISION)
                else:
                    dk2 += tl.dot(dsT, q, input_precision=PRECISION)

    HKV = 2 * HKV_HALF
    out_mask = (offs_n < NK)[:, None] & d_ok[None, :]
    base = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + (b * HKV + g) * NK * HEAD_DIM + base, (dk1 * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DK + (b * HKV + g2) * NK * HEAD_DIM + base, (dk2 * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + (b * HKV + g) * NK * HEAD_DIM + base, dva.to(DV.dtype.element_ty), mask=out_mask)
    tl.store(DV + (b * HKV + g2) * NK * HEAD_DIM + base, dvb.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _diff_bwd_dq_kernel(
    Q, K, V, DO1, DO2, LSE1, LSE2, DELTA1, DELTA2, DQ, KPM,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    HP, R, HKV_HALF, NQ, NK, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (query block, b * HP + j): dq of query heads j and j + HP. DQ is [B, H, NQ, HEAD_DIM]."""
    pid_m = tl.program_id(0)
    pid_bj = tl.program_id(1)
    b = pid_bj // HP
    j = pid_bj % HP
    g = j // R
    g2 = g + HKV_HALF
    DT = Q.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < NQ
    mask = row_ok[:, None] & d_ok[None, :]
    q_rows = offs_m[:, None] * sqn + offs_d[None, :]
    q1 = tl.load(Q + b * sqb + j * sqh + q_rows, mask=mask, other=0.0)
    q2 = tl.load(Q + b * sqb + (j + HP) * sqh + q_rows, mask=mask, other=0.0)
    do_rows = ((b * NQ + offs_m[:, None]) * HP + j) * (2 * HEAD_DIM) + offs_d[None, :]
    do1a = tl.load(DO1 + do_rows, mask=mask, other=0.0)
    do1b = tl.load(DO1 + do_rows + HEAD_DIM, mask=mask, other=0.0)
    do2a = tl.load(DO2 + do_rows, mask=mask, other=0.0)
    do2b = tl.load(DO2 + do_rows + HEAD_DIM, mask=mask, other=0.0)
    stat = pid_bj * NQ + offs_m
    lse1 = tl.load(LSE1 + stat, mask=row_ok, other=0.0) * 1.4426950408889634
    lse2 = tl.load(LSE2 + stat, mask=row_ok, other=0.0) * 1.4426950408889634
    delta1 = tl.load(DELTA1 + stat, mask=row_ok, other=0.0)
    delta2 = tl.load(DELTA2 + stat, mask=row_ok, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    dq1 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = NK
    if CAUSAL:
        hi = tl.minimum(NK, tl.maximum((pid_m + 1) * BLOCK_M + NK - NQ, 0))
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kT_mask = d_ok[:, None] & (cols < NK)[None, :]
        k1T = tl.load(K + b * skb + g * skh + cols[None, :] * skn + offs_d[:, None], mask=kT_mask, other=0.0)
        k2T = tl.load(K + b * skb + g2 * skh + cols[None, :] * skn + offs_d[:, None], mask=kT_mask, other=0.0)
        vaT = tl.load(V + b * svb + g * svh + cols[None, :] * svn + offs_d[:, None], mask=kT_mask, other=0.0)
        vbT = tl.load(V + b * svb + g2 * svh + cols[None, :] * svn + offs_d[:, None], mask=kT_mask, other=0.0)
        s1 = masked_scores(q1, k1T, offs_m, cols, b, NQ, NK, NK, 0.0, KPM, KPM, qk_scale,
                           CAUSAL, False, False, HAS_KPM, DT, PRECISION)
        p1 = probabilities(s1, lse1)
        dp1 = tl.dot(do1a, vaT, input_precision=PRECISION) + tl.dot(do1b, vbT, input_precision=PRECISION)
        ds1 = (p1 * (dp1 - delta1[:, None])).to(DT)
        dq1 += tl.dot(ds1, tl.trans(k1T), input_precision=PRECISION)
        s2 = masked_scores(q2, k2T, offs_m, cols, b, NQ, NK, NK, 0.0, KPM, KPM, qk_scale,
                           CAUSAL, False, False, HAS_KPM, DT, PRECISION)
        p2 = probabilities(s2, lse2)
        dp2 = tl.dot(do2a, vaT, input_precision=PRECISION) + tl.dot(do2b, vbT, input_precision=PRECISION)
        ds2 = (p2 * (dp2 - delta2[:, None])).to(DT)
        dq2 += tl.dot(ds2, tl.trans(k2T), input_precision=PRECISION)
    dq_rows = offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + (b * 2 * HP + j) * NQ * HEAD_DIM + dq_rows, (dq1 * sm_scale).to(DQ.dtype.element_ty), mask=mask)
    tl.store(DQ + (b * 2 * HP + j + HP) * NQ * HEAD_DIM + dq_rows, (dq2 * sm_scale).to(DQ.dtype.element_ty),
             mask=mask)


@triton.jit
def _diff_decode_split_kernel(
    Q, K, V, LENS, KPM, O_PART, ML_PART,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    HP, R, HKV_HALF, NQ, NMAX, GROUPS, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KPM: tl.constexpr, PRECISION: tl.constexpr, SPLIT_FACTOR: tl.constexpr,
):
    """Differential flash-decoding, step 1. Program (split, b * HKV_HALF + g): the R pairs of KV group g times
    the NQ new queries form the tile rows (row m = pair g*R + m // NQ, query m % NQ), so k_g, k_g', v_g, v_g'
    are read once per group; the split's share of the key tiles (:func:`decode_splits`, autotuned with
    ``SPLIT_FACTOR``; ``GROUPS`` = B * HKV_HALF only keys the tuning) of the first LENS[b] slots, causal
    bottom-right.
    Writes both maps' unnormalised accumulators (O_PART [.., 4, BLOCK_M, BLOCK_D]) and (max, sum) pairs
    (ML_PART [.., 4, BLOCK_M]), float32. The grid depends only on the capacity: CUDA-graph friendly."""
    split = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // HKV_HALF
    g = pid_bg % HKV_HALF
    g2 = g + HKV_HALF
    DT = Q.dtype.element_ty
    n_keys = tl.minimum(tl.maximum(tl.load(LENS + b).to(tl.int32), 0), NMAX)  # never past the cache
    rows = tl.arange(0, BLOCK_M)
    pair = g * R + rows // NQ
    query = rows % NQ
    row_ok = rows < R * NQ
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_mask = row_ok[:, None] & d_ok[None, :]
    q1 = tl.load(Q + b * sqb + pair[:, None] * sqh + query[:, None] * sqn + offs_d[None, :], mask=q_mask, other=0.0)
    q2 = tl.load(Q + b * sqb + (pair + HP)[:, None] * sqh + query[:, None] * sqn + offs_d[None, :], mask=q_mask,
                 other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    m1 = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    m2 = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    l2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc1a = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc1b = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc2a = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc2b = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    keys_per_split = tl.cdiv(tl.cdiv(NMAX, BLOCK_N), tl.num_programs(0)) * BLOCK_N
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n_keys)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        kT_mask = d_ok[:, None] & col_ok[None, :]
        k1T = tl.load(K + b * skb + g * skh + cols[None, :] * skn + offs_d[:, None], mask=kT_mask, other=0.0)
        k2T = tl.load(K + b * skb + g2 * skh + cols[None, :] * skn + offs_d[:, None], mask=kT_mask, other=0.0)
        v_mask = col_ok[:, None] & d_ok[None, :]
        va = tl.load(V + b * svb + g * svh + cols[:, None] * svn + offs_d[None, :], mask=v_mask, other=0.0)
        vb = tl.load(V + b * svb + g2 * svh + cols[:, None] * svn + offs_d[None, :], mask=v_mask, other=0.0)
        s1 = masked_scores(q1, k1T, query, cols, b, NQ, n_keys, NMAX, 0.0, KPM, KPM, qk_scale,
                           True, False, False, HAS_KPM, DT, PRECISION)
        s1 = tl.where(col_ok[None, :], s1, float("-inf"))
        p1, alpha1, m1, l1 = online_softmax_step(s1, m1, l1, False)
        p1 = p1.to(DT)
        acc1a = acc1a * alpha1[:, None] + tl.dot(p1, va, input_precision=PRECISION)
        acc1b = acc1b * alpha1[:, None] + tl.dot(p1, vb, input_precision=PRECISION)
        s2 = masked_scores(q2, k2T, query, cols, b, NQ, n_keys, NMAX, 0.0, KPM, KPM, qk_scale,
                           True, False, False, HAS_KPM, DT, PRECISION)
        s2 = tl.where(col_ok[None, :], s2, float("-inf"))
        p2, alpha2, m2, l2 = online_softmax_step(s2, m2, l2, False)
        p2 = p2.to(DT)
        acc2a = acc2a * alpha2[:, None] + tl.dot(p2, va, input_precision=PRECISION)
        acc2b = acc2b * alpha2[:, None] + tl.dot(p2, vb, input_precision=PRECISION)
    part = (pid_bg * tl.num_programs(0) + split) * 4
    tile = rows[:, None] * BLOCK_D + offs_d[None, :]
    tl.store(O_PART + (part + 0) * BLOCK_M * BLOCK_D + tile, acc1a)
    tl.store(O_PART + (part + 1) * BLOCK_M * BLOCK_D + tile, acc1b)
    tl.store(O_PART + (part + 2) * BLOCK_M * BLOCK_D + tile, acc2a)
    tl.store(O_PART + (part + 3) * BLOCK_M * BLOCK_D + tile, acc2b)
    tl.store(ML_PART + (part + 0) * BLOCK_M + rows, m1)
    tl.store(ML_PART + (part + 1) * BLOCK_M + rows, l1)
    tl.store(ML_PART + (part + 2) * BLOCK_M + rows, m2)
    tl.store(ML_PART + (part + 3) * BLOCK_M + rows, l2)


@triton.jit
def _merge_splits(O_PART, ML_PART, pid_bg, NUM_SPLITS, which, rows, tile, BLOCK_M: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """One map's partials merged over the splits: (acc for v_g, acc for v_g', row sum), all at one max."""
    m_all = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for split in range(0, NUM_SPLITS):
        m_all = tl.maximum(m_all, tl.load(ML_PART + ((pid_bg * NUM_SPLITS + split) * 4 + 2 * which) * BLOCK_M + rows))
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    acc_a = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_all = tl.zeros([BLOCK_M], dtype=tl.float32)
    for split in range(0, NUM_SPLITS):
        part = (pid_bg * NUM_SPLITS + split) * 4 + 2 * which
        w = tl.exp2(tl.load(ML_PART + part * BLOCK_M + rows) - m_safe)
        l_all += w * tl.load(ML_PART + (part + 1) * BLOCK_M + rows)
        acc_a += w[:, None] * tl.load(O_PART + part * BLOCK_M * BLOCK_D + tile)
        acc_b += w[:, None] * tl.load(O_PART + (part + 1) * BLOCK_M * BLOCK_D + tile)
    return acc_a, acc_b, l_all


@triton.jit
def _diff_decode_combine_kernel(O_PART, ML_PART, LAMBDA, OUT, HP, R, HKV_HALF, NQ, NUM_SPLITS, out_scale, eps,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Differential flash-decoding, step 2: per (b, g) merge the splits of both maps and run the epilogue;
    OUT is [B, NQ, HP, 2 * HEAD_DIM]."""
    pid_bg = tl.program_id(0)
    b = pid_bg // HKV_HALF
    g = pid_bg % HKV_HALF
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tile = rows[:, None] * BLOCK_D + offs_d[None, :]
    acc1a, acc1b, l1 = _merge_splits(O_PART, ML_PART, pid_bg, NUM_SPLITS, 0, rows, tile, BLOCK_M, BLOCK_D)
    acc2a, acc2b, l2 = _merge_splits(O_PART, ML_PART, pid_bg, NUM_SPLITS, 1, rows, tile, BLOCK_M, BLOCK_D)
    DT = OUT.dtype.element_ty
    outa, outb, _, _, _, _ = _diff_epilogue(acc1a, acc1b, l1, acc2a, acc2b, l2, tl.load(LAMBDA), eps, out_scale,
                                            HEAD_DIM, DT)
    pair = g * R + rows // NQ
    query = rows % NQ
    mask = (rows < R * NQ)[:, None] & (offs_d < HEAD_DIM)[None, :]
    out_rows = ((b * NQ + query[:, None]) * HP + pair[:, None]) * (2 * HEAD_DIM) + offs_d[None, :]
    tl.store(OUT + out_rows, outa, mask=mask)
    tl.store(OUT + out_rows + HEAD_DIM, outb, mask=mask)


# ---------------------------------------------------------------------------------------------- launchers

def _prune_decode(configs, named_args, **kwargs):
    """Above 32 rows (query heads per KV head x new queries) the four accumulators want 8 warps and at most
    128 x 64 scores per tile."""
    rows = {**named_args, **kwargs}["BLOCK_M"]
    if rows <= 32:
        return configs
    kept = [c for c in configs if c.num_warps == 8 and c.kwargs["BLOCK_N"] * rows <= 128 * 64]
    return kept or [triton.Config({"BLOCK_N": 32, "SPLIT_FACTOR": 4}, num_warps=8, num_stages=2)]


# float32 queries: four accumulators of CUDA-core dots; key tiles of 16-32 keep them out of local memory on sm_90
_DECODE_FP32 = {64: [(32, 8, 3, 4), (32, 4, 4, 8), (32, 4, 2, 4)], 128: [(32, 8, 3, 4), (32, 8, 2, 8), (16, 8, 3, 4)]}
_diff_decode_split = decode_autotuned(_diff_decode_split_kernel, ["NMAX", "GROUPS", "HEAD_DIM", "BLOCK_M", "HAS_KPM"],
                                      prune=_prune_decode, fp32_configs=_DECODE_FP32)


def _blocks(q: torch.Tensor, backward: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): four accumulators per program, so smaller tiles than flash.
    float32 operands (CUDA-core dots, operands in registers) take the tiles that spill least on sm_90
    (bench/compile_sm90.py): none in the forward, a few hundred bytes in the backward above head dim 64."""
    if not runtime.on_gpu(q):
        return 32, 32, 4, 1
    head_dim = q.shape[-1]
    if q.dtype == torch.float32:
        return (16, 16, 8, 1) if backward and head_dim > 64 else (32, 16, 8, 1)
    return (64, 64, 4, 2) if head_dim <= 64 else (64, 32, 8, 2)


def _geometry(q, k):
    B, H, NQ, D = q.shape
    HKV, NK = k.shape[1], k.shape[2]
    return B, H, NQ, D, HKV, NK, H // 2, H // HKV, HKV // 2


def diff_attention_forward(q, k, v, lambda_full, *, lambda_init, causal, key_padding_mask, eps, scale,
                           save_for_backward):
    """Launch the forward kernel. Returns (out [B, N, H/2, 2D], o1, o2, lse1, lse2); the last four are None
    unless ``save_for_backward``."""
    B, H, NQ, D, HKV, NK, HP, R, HKV_HALF = _geometry(q, k)
    BLOCK_M, BLOCK_N, warps, stages = _blocks(q)
    out = torch.empty((B, NQ, HP, 2 * D), dtype=q.dtype, device=q.device)
    saved = [torch.empty_like(out), torch.empty_like(out),
             torch.empty((B, HP, NQ), dtype=torch.float32, device=q.device),
             torch.empty((B, HP, NQ), dtype=torch.float32, device=q.device)] if save_for_backward else [None] * 4
    o1, o2, lse1, lse2 = saved
    _diff_fwd_kernel[(triton.cdiv(NQ, BLOCK_M), B * HP)](
        q, k, v, lambda_full, out, o1 if save_for_backward else out, o2 if save_for_backward else out,
        lse1 if save_for_backward else out, lse2 if save_for_backward else out,
        key_padding_mask if key_padding_mask is not None else out,
        *bhn_strides(q), *bhn_strides(k), *bhn_strides(v), HP, R, HKV_HALF, NQ, NK, scale, 1.0 - lambda_init, eps,
        HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CAUSAL=bool(causal),
        HAS_KPM=key_padding_mask is not None, SAVE_O=bool(save_for_backward), PRECISION=dot_precision(q.dtype),
        num_warps=warps, num_stages=stages)
    return out, o1, o2, lse1, lse2


def diff_attention_backward(dout, q, k, v, lambda_full, o1, o2, lse1, lse2, *, lambda_init, causal,
                            key_padding_mask, eps, scale):
    """Launch the three backward kernels. Returns (dq, dk, dv, dlambda as a float32 0-dim tensor)."""
    B, H, NQ, D, HKV, NK, HP, R, HKV_HALF = _geometry(q, k)
    BLOCK_M, BLOCK_N, warps, stages = _blocks(q, backward=True)
    BLOCK_D = block_d(D)
    n_mblocks = triton.cdiv(NQ, BLOCK_M)
    do1, do2 = torch.empty_like(o1), torch.empty_like(o2)
    delta1, delta2 = torch.empty_like(lse1), torch.empty_like(lse2)
    dlam_part = torch.empty((B * HP, n_mblocks), dtype=torch.float32, device=q.device)
    _diff_bwd_prep_kernel[(n_mblocks, B * HP)](
        dout, o1, o2, lambda_full, do1, do2, delta1, delta2, dlam_part, HP, NQ, 1.0 - lambda_init, eps,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, num_warps=warps)
    dq = torch.empty((B, H, NQ, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, HKV, NK, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, HKV, NK, D), dtype=v.dtype, device=v.device)
    kpm = key_padding_mask if key_padding_mask is not None else lse1
    common = (*bhn_strides(q), *bhn_strides(k), *bhn_strides(v), HP, R, HKV_HALF, NQ, NK, scale)
    meta = dict(HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CAUSAL=bool(causal),
                HAS_KPM=key_padding_mask is not None, PRECISION=dot_precision(q.dtype), num_warps=warps,
                num_stages=stages)
    _diff_bwd_dkdv_kernel[(triton.cdiv(NK, BLOCK_N), B * HKV_HALF)](
        q, k, v, do1, do2, lse1, lse2, delta1, delta2, dk, dv, kpm, *common, **meta)
    _diff_bwd_dq_kernel[(n_mblocks, B * HP)](
        q, k, v, do1, do2, lse1, lse2, delta1, delta2, dq, kpm, *common, **meta)
    return dq, dk, dv, dlam_part.sum()


class DiffAttentionFunction(torch.autograd.Function):
    """Fused differential attention; saves q, k, v, both attention outputs (model dtype) and both lse."""

    @staticmethod
    def forward(ctx, q, k, v, lambda_full, lambda_init, causal, key_padding_mask, eps, scale):
        options = dict(lambda_init=lambda_init, causal=causal, key_padding_mask=key_padding_mask, eps=eps,
                       scale=scale)
        needs_grad = any(ctx.needs_input_grad[:4])
        out, o1, o2, lse1, lse2 = diff_attention_forward(q, k, v, lambda_full, save_for_backward=needs_grad,
                                                         **options)
        if needs_grad:
            ctx.save_for_backward(q, k, v, lambda_full, o1, o2, lse1, lse2, key_padding_mask)
            ctx.options = dict(lambda_init=lambda_init, causal=causal, eps=eps, scale=scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, lambda_full, o1, o2, lse1, lse2, key_padding_mask = ctx.saved_tensors
        dq, dk, dv, dlam = diff_attention_backward(dout.contiguous(), q, k, v, lambda_full, o1, o2, lse1, lse2,
                                                   key_padding_mask=key_padding_mask, **ctx.options)
        return dq, dk, dv, dlam.to(lambda_full.dtype).reshape(lambda_full.shape), None, None, None, None, None


# ------------------------------------------------------------------------------------------ public ops

def lambda_init_for_layer(layer_idx: int) -> float:
    """DiffLlama's lambda_init = 0.8 - 0.6 exp(-0.3 layer_idx), 0-based layer index (a Python float)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


def diff_lambda(lambda_q1, lambda_k1, lambda_q2, lambda_k2, lambda_init: float) -> torch.Tensor:
    """lambda = exp(sum(lq1 * lk1)) - exp(sum(lq2 * lk2)) + lambda_init, with HF's roundings: products in the
    parameter dtype, sums and exp in float32, each exp cast back, the rest in the parameter dtype (0-dim)."""
    dtype = lambda_q1.dtype
    lambda_1 = torch.exp(torch.sum(lambda_q1 * lambda_k1, dim=-1, dtype=torch.float32)).to(dtype)
    lambda_2 = torch.exp(torch.sum(lambda_q2 * lambda_k2, dim=-1, dtype=torch.float32)).to(dtype)
    return lambda_1 - lambda_2 + lambda_init


def _validate(q, k, v, lambda_full, lambda_init, key_padding_mask, eps, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        runtime.check_tensor(t, name, ndim=4)
    runtime.check_tensor(lambda_full, "lambda_full")
    if lambda_full.numel() != 1:
        raise ValueError(f"lambda_full must hold one value (a 0-dim tensor), got shape {list(lambda_full.shape)}")
    runtime.check_same_device(q=q, k=k, v=v, lambda_full=lambda_full, key_padding_mask=key_padding_mask)
    runtime.check_same_dtype(q=q, k=k, v=v)
    B, H, NQ, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k and v must both have shape [{B}, Hkv, Nk, {D}], got {list(k.shape)} and {list(v.shape)}")
    HKV = k.shape[1]
    if HKV % 2 or H % HKV or H % 2:
        raise ValueError(f"differential attention needs an even number of key/value heads dividing the query "
                         f"heads; got {H} query heads (q) and {HKV} key/value heads (k)")
    runtime.check_padding_mask(key_padding_mask, "key_padding_mask", (B, k.shape[2]))
    if not isinstance(lambda_init, (int, float)):
        raise TypeError(f"lambda_init must be a Python number, got {type(lambda_init).__name__}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    check_scale(scale)


def diff_attention(q, k, v, lambda_full, lambda_init, *, causal=True, key_padding_mask=None, eps=1e-5,
                   scale=None):
    """Differential attention (see the module docstring). Returns [B, N, H/2, 2D] in q's dtype.

    q [B, H, N, D], k/v [B, Hkv, Nk, D], lambda_full a one-element tensor (``diff_lambda``),
    lambda_init a Python float (``lambda_init_for_layer``), key_padding_mask [B, Nk] (1 = real token),
    eps the group norm's epsilon (``rms_norm_eps``), scale default D^-1/2. Gradients flow to q, k, v and
    lambda_full (and through ``diff_lambda`` to the four lambda vectors).
    """
    from ..nn import functional  # the one dispatcher: validation, backend, the custom op

    return functional.diff_attention(q, k, v, lambda_full, lambda_init, causal=causal,
                                     key_padding_mask=key_padding_mask, eps=eps, scale=scale)


def diff_attention_reference(q, k, v, lambda_full, lambda_init, *, causal=True, key_padding_mask=None, eps=1e-5,
                             scale=None):
    """HF's eager data flow (transformers' DiffLlamaAttention): V split over its KV heads into halves, each tiled
    twice; two GQA attentions (float32 softmax, probabilities cast back before P·V); concatenation; head
    halves paired; P - lambda N; RMSNorm over 2D in float32, cast back; times (1 - lambda_init)."""
    kw = dict(causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    return _diff_combine(q, k, v, lambda_full, lambda_init, eps,
                         lambda q_, k_, v_: attention_reference(q_, k_, v_, **kw))


def _diff_combine(q, k, v, lambda_full, lambda_init, eps, attend):
    """The differential data flow around an attention function ``attend(q, k, v) -> [B, H, N, D]``."""
    B, H, NQ, D = q.shape
    HKV = k.shape[1]
    r = H // HKV
    va, vb = v[:, : HKV // 2], v[:, HKV // 2:]
    k_rep = k.repeat_interleave(r, dim=1)
    v1 = torch.cat([va, va], dim=1).repeat_interleave(r, dim=1)
    v2 = torch.cat([vb, vb], dim=1).repeat_interleave(r, dim=1)
    o = torch.cat([attend(q, k_rep, v1), attend(q, k_rep, v2)], dim=-1).transpose(1, 2)  # [B, N, H, 2D]
    y = o[:, :, : H // 2] - lambda_full.reshape(()) * o[:, :, H // 2:]
    y = torch.nn.functional.rms_norm(y.float(), (2 * D,), eps=eps).to(q.dtype)
    return (1 - lambda_init) * y


# ---------------------------------------------------------------------------------------------- decoding

MAX_DECODE_ROWS = 128  # (query heads per KV head) x (new queries) per program


def diff_decode_attention(q, k_cache, v_cache, cache_lens, lambda_full, lambda_init, *, key_padding_mask=None,
                          eps=1e-5, scale=None, out=None):
    """Differential attention of 1-16 new queries per sequence against a preallocated KV cache (inference).

    q [B, H, Nq, D]; k_cache/v_cache [B, Hkv, Nmax, D] whose first ``cache_lens[b]`` slots are valid and already
    hold the new tokens' (rotated) keys and values, the new queries being the last Nq of them (causal
    bottom-right); cache_lens [B] int32/int64 in [Nq, Nmax] (checked on the host; device lengths are clamped
    to [0, Nmax] in the kernel instead of read back, which would synchronise);
    key_padding_mask [B, Nmax] (1 = real token). Returns [B, Nq, H/2, 2D] (or writes ``out``), as
    :func:`diff_attention` on the valid prefix would. Keys are split across programs and each program serves a
    whole KV group, so K/V are read once per step; the launch depends only on shapes (CUDA-graph friendly).
    """
    _validate_decode(q, k_cache, v_cache, cache_lens, lambda_full, lambda_init, key_padding_mask, eps, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if runtime.use_triton(q, op="diff_decode_attention"):
        rows = (q.shape[1] // k_cache.shape[1]) * q.shape[2]
        if q.shape[-1] > MAX_HEAD_DIM:
            runtime.unsupported("diff_decode_attention", f"head dim {q.shape[-1]} (at most {MAX_HEAD_DIM})")
        elif rows > MAX_DECODE_ROWS:
            runtime.unsupported("diff_decode_attention", f"{rows} query rows per KV group (at most {MAX_DECODE_ROWS})")
        else:
            return _diff_decode_launch(q, k_cache, v_cache, cache_lens, lambda_full.reshape(()), float(lambda_init),
                                       key_padding_mask, float(eps), scale, out)
    result = diff_decode_attention_reference(q, k_cache, v_cache, cache_lens, lambda_full, lambda_init,
                                             key_padding_mask=key_padding_mask, eps=eps, scale=scale)
    return runtime.write_out(out, "out", result)


def diff_decode_attention_reference(q, k_cache, v_cache, cache_lens, lambda_full, lambda_init, *,
                                    key_padding_mask=None, eps=1e-5, scale=None):
    """Eager oracle of :func:`diff_decode_attention`: the differential data flow over each row's valid prefix
    (no host synchronisation, so it can be captured in a CUDA graph too)."""
    NQ, NMAX = q.shape[2], k_cache.shape[2]
    i = torch.arange(NQ, device=q.device)[None, :, None]
    j = torch.arange(NMAX, device=q.device)[None, None, :]
    lens = cache_lens.to(torch.long)[:, None, None]
    visible = ((j < lens) & (j <= lens - NQ + i))[:, None]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.bool()[:, None, None, :]
    def attend(q_, k_, v_):
        return softmax_attention_reference(q_, k_, v_, scale, None, visible, torch.float32, 0.0, None)[0]
    return _diff_combine(q, k_cache, v_cache, lambda_full, lambda_init, eps, attend)


def _validate_decode(q, k_cache, v_cache, cache_lens, lambda_full, lambda_init, key_padding_mask, eps, scale):
    _validate(q, k_cache, v_cache, lambda_full, lambda_init, key_padding_mask, eps, scale)
    runtime.check_tensor(cache_lens, "cache_lens", dtypes=(torch.int32, torch.int64), ndim=1)
    runtime.check_shape(cache_lens, "cache_lens", (q.shape[0],))
    runtime.check_same_device(q=q, cache_lens=cache_lens)
    if not 1 <= q.shape[2] <= 16:
        raise ValueError(f"q must hold 1 to 16 new queries per sequence, got {q.shape[2]}")
    runtime.check_cache_lens(cache_lens, "cache_lens", q.shape[2], k_cache.shape[2])


def _diff_decode_launch(q, k_cache, v_cache, cache_lens, lambda_full, lambda_init, key_padding_mask, eps, scale,
                        out):
    B, H, NQ, D, HKV, NMAX, HP, R, HKV_HALF = _geometry(q, k_cache)
    out = runtime.check_out(out, "out", q, shape=(B, NQ, HP, 2 * D))
    BLOCK_M, BLOCK_D = max(16, runtime.next_power_of_2(R * NQ)), block_d(D)
    groups, sms = B * HKV_HALF, multiprocessors(q)

    def splits(meta):
        return decode_splits(NMAX, meta["BLOCK_N"], meta["SPLIT_FACTOR"], groups, sms)

    most = max(splits(c.kwargs) for c in _diff_decode_split.configs)
    o_part = torch.empty((groups, most, 4, BLOCK_M, BLOCK_D), dtype=torch.float32, device=q.device)
    ml_part = torch.empty((groups, most, 4, BLOCK_M), dtype=torch.float32, device=q.device)
    kpm = None if key_padding_mask is None else runtime.derived_once(key_padding_mask, "mask_int8", runtime.int8_mask)
    k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (k_cache, v_cache))
    _diff_decode_split[lambda meta: (splits(meta), groups)](
        q, k_cache, v_cache, cache_lens, kpm if kpm is not None else ml_part, o_part, ml_part,
        *bhn_strides(q), *bhn_strides(k_cache), *bhn_strides(v_cache), HP, R, HKV_HALF, NQ, NMAX, groups, scale,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, HAS_KPM=kpm is not None, PRECISION=dot_precision(q.dtype))
    _diff_decode_combine_kernel[(groups,)](  # the partials are laid out by the split count of the config that ran
        o_part, ml_part, lambda_full, out, HP, R, HKV_HALF, NQ, splits(_diff_decode_split.best_config.all_kwargs()),
        1.0 - lambda_init, eps,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, num_warps=4)
    return out

"""Flash attention with ALiBi, causal and key-padding masks, dropout and the log-sum-exp.

    S[b, h, i, j] = scale * q[b, h, i] . k[b, h, j] + slope[h] * pos[b, j]          (ALiBi, BLOOM's form)
    S[b, h, i, j] = -inf  where key j is padding, or (causal) j > i + (Nk - Nq), or j >= Nk
    P = softmax_j(S) (float32),  out = dropout(P) @ v,   lse[b, h, i] = logsumexp_j S[b, h, i, j]

q [B, H, Nq, D], k/v [B, H, Nk, D] (any strides with a unit last stride), key_padding_mask [B, Nk]
(true/1 = a real token, HF's attention_mask), alibi_slopes [H] float32. ALiBi adds ``slope * pos`` with
``pos = (cumsum(mask) - 1) * mask`` when a mask is given, else the key index; as HF does, the product is
formed in float32 and rounded to the model dtype before it is added (transformers' BLOOM build_alibi_tensor). Causal
masking is aligned bottom-right when Nq < Nk (prefill after a cache). A query row with no visible key
outputs 0 and has lse = -inf. Nothing of size Nq x Nk is ever stored: forward saves the output and the
lse; backward recomputes the probabilities block by block (FlashAttention-2).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import runtime
from .flash import (MAX_HEAD_DIM, autotuned, bhn_strides, block_d, decode_autotuned, decode_splits, dot_precision,
                    dropout_keep, interior_key_tiles_end, interior_query_tiles_start, load_rows, masked_scores,
                    multiprocessors, online_softmax_step, probabilities, softmax_attention_reference, softmax_delta)


# ------------------------------------------------------------------------------------------------ kernels

@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_base, v_base, start_n, offs_m, offs_n, d_ok, skn, svn, b, bh, NQ, NK, slope,
              POS, KPM, qk_scale, dropout_p, seed, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr,
              HAS_POS: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
              EVEN_D: tl.constexpr, BOUNDS: tl.constexpr):
    """One key tile of the forward's online softmax: returns the updated (acc, m_i, l_i). Interior tiles
    (``BOUNDS=False``) load k and v without masks (only the head-dim mask when D is not a power of two)."""
    cols = start_n + offs_n
    if BOUNDS:
        k = tl.load(k_base + cols[None, :] * skn, mask=d_ok[:, None] & (cols < NK)[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * svn, mask=(cols < NK)[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        k = tl.load(k_base + cols[None, :] * skn)
        v = tl.load(v_base + cols[:, None] * svn)
    else:
        k = tl.load(k_base + cols[None, :] * skn, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * svn, mask=d_ok[None, :], other=0.0)
    s = masked_scores(q, k, offs_m, cols, b, NQ, NK, NK, slope, POS, KPM, qk_scale,
                      CAUSAL, HAS_ALIBI, HAS_POS, HAS_KPM, q.dtype, PRECISION, BOUNDS)
    p, alpha, m_new, l_i = online_softmax_step(s, m_i, l_i, False)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, bh, offs_m, cols, NQ, NK, dropout_p)
        p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, SLOPES, POS, KPM,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    H, NQ, NK, sm_scale, dropout_p, seed, N_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_POS: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
):
    """One program = BLOCK_M query rows of one (batch, head); online softmax over key blocks.
    (N_BUCKET, a power of two of the sequence length, only keys the autotuner.)"""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                mask=(offs_m < NQ)[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * skb + h * skh + offs_d[:, None]
    v_base = V + b * svb + h * svh + offs_d[None, :]
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h)
    qk_scale = sm_scale * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = NK
    if CAUSAL:
        hi = tl.minimum(NK, tl.maximum((pid_m + 1) * BLOCK_M + NK - NQ, 0))
    # interior key tiles first (no bounds or causal mask), then the diagonal and tail tiles
    interior = tl.minimum(interior_key_tiles_end(pid_m * BLOCK_M, NQ, NK, CAUSAL, BLOCK_M, BLOCK_N), hi)
    for start_n in range(0, interior, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, start_n, offs_m, offs_n, d_ok, skn, svn, b, bh,
                                  NQ, NK, slope, POS, KPM, qk_scale, dropout_p, seed, CAUSAL, HAS_ALIBI, HAS_POS,
                                  HAS_KPM, HAS_DROPOUT, PRECISION, EVEN_D, False)
    for start_n in range(interior, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, start_n, offs_m, offs_n, d_ok, skn, svn, b, bh,
                                  NQ, NK, slope, POS, KPM, qk_scale, dropout_p, seed, CAUSAL, HAS_ALIBI, HAS_POS,
                                  HAS_KPM, HAS_DROPOUT, PRECISION, EVEN_D, True)

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, m_i * 0.6931471805599453 + tl.log(tl.where(has_key, l_i, 1.0)), float("-inf"))
    row_ok = offs_m < NQ
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh * NQ + offs_m, lse, mask=row_ok)


@triton.jit
def _dkdv_tile(dk, dv, kT, vT, q_base, do_base, LSE, DELTA, start_m, offs_m, offs_n, offs_d, d_ok, sqn, sdn, b, bh,
               NQ, NK, slope, POS, KPM, qk_scale, dropout_p, seed, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr,
               HAS_POS: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
               EVEN_D: tl.constexpr, BOUNDS: tl.constexpr):
    """One query tile of the key-major backward: dV += P~^T dO, dK += dS^T Q (dS unscaled)."""
    rows = start_m + offs_m
    q = load_rows(q_base, rows, offs_d, sqn, NQ, d_ok, EVEN_D, BOUNDS)
    do = load_rows(do_base, rows, offs_d, sdn, NQ, d_ok, EVEN_D, BOUNDS)
    if BOUNDS:
        lse_log2 = tl.load(LSE + bh * NQ + rows, mask=rows < NQ, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + bh * NQ + rows, mask=rows < NQ, other=0.0)
    else:
        lse_log2 = tl.load(LSE + bh * NQ + rows) * 1.4426950408889634
        delta = tl.load(DELTA + bh * NQ + rows)
    s = masked_scores(q, kT, rows, offs_n, b, NQ, NK, NK, slope, POS, KPM, qk_scale,
                      CAUSAL, HAS_ALIBI, HAS_POS, HAS_KPM, q.dtype, PRECISION, BOUNDS)
    p = probabilities(s, lse_log2)
    dp = tl.dot(do, vT, input_precision=PRECISION)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, bh, rows, offs_n, NQ, NK, dropout_p)
        p_kept = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    else:
        p_kept = p
    dv += tl.dot(tl.trans(p_kept.to(do.dtype)), do, input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, SLOPES, POS, KPM,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn,
    H, NQ, NK, sm_scale, dropout_p, seed, N_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_POS: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
):
    """One program = BLOCK_N keys of one (batch, head): dV = P~^T dO and dK = scale * dS^T Q over query blocks.

    Query tiles crossing the causal diagonal or the end of the sequence are masked; the others
    (``interior_query_tiles_start`` on) are not. dK and dV are written with the strides (sgb, sgh, sgn): [B, H,
    NK, D] contiguous, or two slots of a packed [B, N, H, 3, D] gradient (:class:`PackedAttentionFunction`).
    """
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = d_ok[:, None] & (offs_n < NK)[None, :]
    kT = tl.load(K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None], mask=kv_mask, other=0.0)
    vT = tl.load(V + b * svb + h * svh + offs_n[None, :] * svn + offs_d[:, None], mask=kv_mask, other=0.0)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h)
    qk_scale = sm_scale * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    if CAUSAL:
        lo = tl.maximum(pid_n * BLOCK_N - (NK - NQ), 0) // BLOCK_M * BLOCK_M
    full_end = NQ // BLOCK_M * BLOCK_M
    start = tl.maximum(interior_query_tiles_start(pid_n * BLOCK_N, NQ, NK, CAUSAL, BLOCK_M, BLOCK_N), lo)
    if (pid_n + 1) * BLOCK_N > NK:  # a partial key block: every tile needs the key bound
        start = full_end
    start = tl.minimum(start, full_end)
    for start_m in range(lo, start, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, kT, vT, q_base, do_base, LSE, DELTA, start_m, offs_m, offs_n, offs_d, d_ok,
                            sqn, sdn, b, bh, NQ, NK, slope, POS, KPM, qk_scale, dropout_p, seed, CAUSAL, HAS_ALIBI,
                            HAS_POS, HAS_KPM, HAS_DROPOUT, PRECISION, EVEN_D, True)
    for start_m in range(start, full_end, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, kT, vT, q_base, do_base, LSE, DELTA, start_m, offs_m, offs_n, offs_d, d_ok,
                            sqn, sdn, b, bh, NQ, NK, slope, POS, KPM, qk_scale, dropout_p, seed, CAUSAL, HAS_ALIBI,
                            HAS_POS, HAS_KPM, HAS_DROPOUT, PRECISION, EVEN_D, False)
    for start_m in range(tl.maximum(full_end, lo), NQ, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, kT, vT, q_base, do_base, LSE, DELTA, start_m, offs_m, offs_n, offs_d, d_ok,
                            sqn, sdn, b, bh, NQ, NK, slope, POS, KPM, qk_scale, dropout_p, seed, CAUSAL, HAS_ALIBI,
                            HAS_POS, HAS_KPM, HAS_DROPOUT, PRECISION, EVEN_D, True)

    out_offs = b * sgb + h * sgh + offs_n[:, None] * sgn + offs_d[None, :]
    out_mask = (offs_n < NK)[:, None] & d_ok[None, :]
    tl.store(DK + out_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _dq_tile(dq, dslope, q, do, lse_log2, delta, K_BASE, V_BASE, start_n, offs_m, offs_n, offs_d, d_ok, skn, svn, b,
             bh, NQ, NK, slope, POS, KPM, qk_scale, dropout_p, seed, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr,
             HAS_POS: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, NEED_DSLOPE: tl.constexpr,
             PRECISION: tl.constexpr, EVEN_D: tl.constexpr, BOUNDS: tl.constexpr):
    """One key tile of the query-major backward: dQ += dS K (unscaled), dslope += sum_j dS_ij pos_j."""
    cols = start_n + offs_n
    if BOUNDS:
        kv_mask = d_ok[:, None] & (cols < NK)[None, :]
        kT = tl.load(K_BASE + cols[None, :] * skn + offs_d[:, None], mask=kv_mask, other=0.0)
        vT = tl.load(V_BASE + cols[None, :] * svn + offs_d[:, None], mask=kv_mask, other=0.0)
    elif EVEN_D:
        kT = tl.load(K_BASE + cols[None, :] * skn + offs_d[:, None])
        vT = tl.load(V_BASE + cols[None, :] * svn + offs_d[:, None])
    else:
        kT = tl.load(K_BASE + cols[None, :] * skn + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        vT = tl.load(V_BASE + cols[None, :] * svn + offs_d[:, None], mask=d_ok[:, None], other=0.0)
    s = masked_scores(q, kT, offs_m, cols, b, NQ, NK, NK, slope, POS, KPM, qk_scale,
                      CAUSAL, HAS_ALIBI, HAS_POS, HAS_KPM, q.dtype, PRECISION, BOUNDS)
    p = probabilities(s, lse_log2)
    dp = tl.dot(do, vT, input_precision=PRECISION)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, bh, offs_m, cols, NQ, NK, dropout_p)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(q.dtype), tl.trans(kT), input_precision=PRECISION)
    if NEED_DSLOPE:
        if HAS_POS:
            pos = tl.load(POS + b * NK + cols, mask=cols < NK, other=0).to(tl.float32)
        else:
            pos = cols.to(tl.float32)
        dslope += tl.sum(ds * pos[None, :], 1)
    return dq, dslope


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, SLOPES, POS, KPM, DSLOPE,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn,
    H, NQ, NK, sm_scale, dropout_p, seed, N_BUCKET, dslope_stride,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_POS: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, NEED_DSLOPE: tl.constexpr, PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
):
    """One program = BLOCK_M queries: dQ = scale * dS K, and (when the slopes want a gradient) this block's
    sum_ij dS_ij * pos_j to DSLOPE[bh, pid_m] (rows ``dslope_stride`` apart).

    dQ is written with the strides (sgb, sgh, sgn), as dK and dV are.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < NQ
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :],
                 mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    lse_log2 = tl.load(LSE + bh * NQ + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * NQ + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h)
    qk_scale = sm_scale * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dslope = tl.zeros([BLOCK_M], dtype=tl.float32)
    hi = NK
    if CAUSAL:
        hi = tl.minimum(NK, tl.maximum((pid_m + 1) * BLOCK_M + NK - NQ, 0))
    interior = tl.minimum(interior_key_tiles_end(pid_m * BLOCK_M, NQ, NK, CAUSAL, BLOCK_M, BLOCK_N), hi)
    if (pid_m + 1) * BLOCK_M > NQ:  # a partial query block: rows past NQ must stay masked everywhere
        interior = 0
    for start_n in range(0, interior, BLOCK_N):
        dq, dslope = _dq_tile(dq, dslope, q, do, lse_log2, delta, k_base, v_base, start_n, offs_m, offs_n, offs_d,
                              d_ok, skn, svn, b, bh, NQ, NK, slope, POS, KPM, qk_scale, dropout_p, seed, CAUSAL,
                              HAS_ALIBI, HAS_POS, HAS_KPM, HAS_DROPOUT, NEED_DSLOPE, PRECISION, EVEN_D, False)
    for start_n in range(interior, hi, BLOCK_N):
        dq, dslope = _dq_tile(dq, dslope, q, do, lse_log2, delta, k_base, v_base, start_n, offs_m, offs_n, offs_d,
                              d_ok, skn, svn, b, bh, NQ, NK, slope, POS, KPM, qk_scale, dropout_p, seed, CAUSAL,
                              HAS_ALIBI, HAS_POS, HAS_KPM, HAS_DROPOUT, NEED_DSLOPE, PRECISION, EVEN_D, True)

    tl.store(DQ + b * sgb + h * sgh + offs_m[:, None] * sgn + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if NEED_DSLOPE:
        tl.store(DSLOPE + bh * dslope_stride + pid_m, tl.sum(dslope, 0))


@triton.jit
def _decode_split_kernel(
    Q, K, V, LENS, SLOPES, POS, KPM, O_PART, M_PART, L_PART,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, NQ, NMAX, BH, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_POS: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT_FACTOR: tl.constexpr,
):
    """Flash-decoding, step 1: program (split, bh) attends all NQ new queries to its share of the cache's key
    tiles (the capacity's tiles over the splits, :func:`decode_splits`), within the first LENS[b] slots,
    causal bottom-right, and writes its unnormalised partial output, row max and row sum (float32).

    The grid depends only on the cache capacity, never on LENS (a device tensor): CUDA-graph friendly.
    ``SPLIT_FACTOR`` (autotuned, with the tile and warps) sets the split count through the grid; ``BH``
    (batch x heads) only keys the autotuning.
    """
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    n_keys = tl.minimum(tl.maximum(tl.load(LENS + b).to(tl.int32), 0), NMAX)  # never past the cache
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                mask=(offs_m < NQ)[:, None] & d_ok[None, :], other=0.0)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h)
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    keys_per_split = tl.cdiv(tl.cdiv(NMAX, BLOCK_N), tl.num_programs(0)) * BLOCK_N
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n_keys)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        k = tl.load(K + b * skb + h * skh + cols[None, :] * skn + offs_d[:, None],
                    mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        s = masked_scores(q, k, offs_m, cols, b, NQ, n_keys, NMAX, slope, POS, KPM, qk_scale,
                          True, HAS_ALIBI, HAS_POS, HAS_KPM, Q.dtype.element_ty, PRECISION)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        p, alpha, m_new, l_i = online_softmax_step(s, m_i, l_i, False)
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty), v, input_precision=PRECISION)
        m_i = m_new
    part = bh * tl.num_programs(0) + split
    tl.store(O_PART + (part * BLOCK_M + offs_m[:, None]) * BLOCK_D + offs_d[None, :], acc)
    tl.store(M_PART + part * BLOCK_M + offs_m, m_i)
    tl.store(L_PART + part * BLOCK_M + offs_m, l_i)


@triton.jit
def _decode_combine_kernel(O_PART, M_PART, L_PART, O, sob, soh, son, H, NQ, NUM_SPLITS,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Flash-decoding, step 2: merge the splits' partials (log2-domain maxima) into out [B, H, NQ, D]."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_all = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for split in range(0, NUM_SPLITS):
        m_all = tl.maximum(m_all, tl.load(M_PART + (bh * NUM_SPLITS + split) * BLOCK_M + offs_m))
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    l_all = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for split in range(0, NUM_SPLITS):
        part = bh * NUM_SPLITS + split
        w = tl.exp2(tl.load(M_PART + part * BLOCK_M + offs_m) - m_safe)
        l_all += w * tl.load(L_PART + part * BLOCK_M + offs_m)
        acc += w[:, None] * tl.load(O_PART + (part * BLOCK_M + offs_m[:, None]) * BLOCK_D + offs_d[None, :])
    out = acc / tl.where(l_all > 0.0, l_all, 1.0)[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=(offs_m < NQ)[:, None] & (offs_d < HEAD_DIM)[None, :])


# ---------------------------------------------------------------------------------------------- launchers

_TUNE_KEY = ["N_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_ALIBI", "HAS_KPM", "HAS_DROPOUT"]
# forward: BLOCK_M queries per program, BLOCK_N keys per step; dK/dV: BLOCK_N keys per program, BLOCK_M
# queries per step; dQ: as the forward (FlashAttention-2's split, the Triton tutorial's tile shapes among them)
_FWD_TILES = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2)]
_DKDV_TILES = [(128, 64, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 128, 8, 2)]
_DQ_TILES = [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)]
_MIN_DQ_BLOCK_M = 32  # sizes the dslope partials whatever tile the autotuner picks
# float32 operands, {max head dim: tiles}: the tiles above spill 100-10,000 bytes per thread there (CUDA-core
# dots, operands in registers); these spill at most a few dozen on sm_90 (bench/compile_sm90.py, triton 3.6, 3.9)
_FWD_TILES_FP32 = {64: [(64, 32, 8, 2), (32, 64, 8, 2), (64, 32, 8, 3), (32, 32, 8, 2)],
                   128: [(32, 64, 8, 2), (32, 64, 8, 3), (16, 64, 8, 2), (32, 16, 8, 2)]}
_DKDV_TILES_FP32 = {64: [(32, 32, 8, 1), (64, 16, 8, 1), (32, 16, 8, 1), (16, 32, 8, 1)],
                    128: [(32, 16, 8, 1), (16, 16, 8, 2), (16, 16, 8, 1)]}
_DQ_TILES_FP32 = {64: [(64, 32, 8, 2), (64, 32, 8, 3), (32, 64, 8, 2), (64, 16, 8, 1)],
                  128: [(32, 64, 8, 2), (64, 16, 8, 2), (32, 16, 8, 2)]}  # BLOCK_M >= _MIN_DQ_BLOCK_M


_attn_fwd = autotuned(_attn_fwd_kernel, _FWD_TILES, _TUNE_KEY, fp32_tiles=_FWD_TILES_FP32)
_attn_bwd_dkdv = autotuned(_attn_bwd_dkdv_kernel, _DKDV_TILES, _TUNE_KEY, fp32_tiles=_DKDV_TILES_FP32)
_attn_bwd_dq = autotuned(_attn_bwd_dq_kernel, _DQ_TILES, _TUNE_KEY, fp32_tiles=_DQ_TILES_FP32)

# float32 queries: the decode configs without the two that spill at head dim 128 (CUDA-core dots)
_DECODE_FP32 = [(64, 4, 3, 2), (64, 4, 4, 4), (64, 4, 3, 8), (128, 8, 3, 4), (128, 8, 2, 8), (64, 8, 4, 4)]
_decode_split = decode_autotuned(_decode_split_kernel, ["NMAX", "BH", "HEAD_DIM", "HAS_ALIBI", "HAS_KPM"],
                                 fp32_configs={128: _DECODE_FP32})


def _flags(alibi_slopes, positions, key_padding_mask, causal, dropout_p) -> dict:
    return dict(CAUSAL=bool(causal), HAS_ALIBI=alibi_slopes is not None, HAS_POS=positions is not None,
                HAS_KPM=key_padding_mask is not None, HAS_DROPOUT=dropout_p > 0.0)


def attention_forward(q, k, v, *, causal, alibi_slopes, positions, key_padding_mask, scale, dropout_p, seed,
                      out=None):
    """Launch the forward kernel. Returns (out [B, H, Nq, D] contiguous, lse [B, H, Nq] float32)."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    out = runtime.check_out(out, "out", q)
    lse = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    dummy = lse  # any pointer for the unused optional inputs (their loads are compiled out)
    _attn_fwd[lambda meta: (triton.cdiv(NQ, meta["BLOCK_M"]), B * H)](
        q, k, v, out, lse,
        alibi_slopes if alibi_slopes is not None else dummy,
        positions if positions is not None else dummy,
        key_padding_mask if key_padding_mask is not None else dummy,
        *bhn_strides(q), *bhn_strides(k), *bhn_strides(v), *bhn_strides(out),
        H, NQ, NK, scale, dropout_p, seed, runtime.next_power_of_2(max(NQ, NK)),
        HEAD_DIM=D, BLOCK_D=block_d(D), PRECISION=dot_precision(q.dtype), EVEN_D=D == block_d(D),
        **_flags(alibi_slopes, positions, key_padding_mask, causal, dropout_p),
    )
    return out, lse


def attention_backward(do, q, k, v, out, lse, *, causal, alibi_slopes, positions, key_padding_mask, scale,
                       dropout_p, seed, need_dslopes=True, grads=None):
    """Launch the three backward kernels. Returns (dq, dk, dv, dslopes or None); the slope partials are only
    computed when ``need_dslopes`` (and ALiBi is on). ``grads`` = (dq, dk, dv) are the buffers to write, shaped
    as q, k, v, dk and dv with the same strides (e.g. the slots of a packed gradient); by default contiguous."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    BLOCK_D = block_d(D)
    delta = softmax_delta(out, do)

    if grads is None:
        dq = torch.empty((B, H, NQ, D), dtype=q.dtype, device=q.device)
        dk = torch.empty((B, H, NK, D), dtype=k.dtype, device=k.device)
        dv = torch.empty((B, H, NK, D), dtype=v.dtype, device=v.device)
    else:
        dq, dk, dv = grads
    if not (dk.stride() == dv.stride() and dq.stride(-1) == dk.stride(-1) == 1):
        raise ValueError("attention_backward: dk and dv must share their strides, all grads a unit last stride")
    need_dslopes = need_dslopes and alibi_slopes is not None
    dslope_stride = triton.cdiv(NQ, _MIN_DQ_BLOCK_M)
    dslope_part = torch.zeros((B * H, dslope_stride) if need_dslopes else (1,), dtype=torch.float32,
                              device=q.device)
    dummy = delta
    optional = (alibi_slopes if alibi_slopes is not None else dummy,
                positions if positions is not None else dummy,
                key_padding_mask if key_padding_mask is not None else dummy)
    strides = (*bhn_strides(q), *bhn_strides(k), *bhn_strides(v), *bhn_strides(do))
    bucket = runtime.next_power_of_2(max(NQ, NK))
    meta = dict(HEAD_DIM=D, BLOCK_D=BLOCK_D, PRECISION=dot_precision(q.dtype), EVEN_D=D == BLOCK_D,
                **_flags(alibi_slopes, positions, key_padding_mask, causal, dropout_p))
    _attn_bwd_dkdv[lambda m: (triton.cdiv(NK, m["BLOCK_N"]), B * H)](
        q, k, v, do, dk, dv, lse, delta, *optional, *strides, *bhn_strides(dk), H, NQ, NK, scale, dropout_p, seed,
        bucket, **meta)
    _attn_bwd_dq[lambda m: (triton.cdiv(NQ, m["BLOCK_M"]), B * H)](
        q, k, v, do, dq, lse, delta, *optional, dslope_part, *strides, *bhn_strides(dq), H, NQ, NK, scale,
        dropout_p, seed, bucket, dslope_stride, NEED_DSLOPE=need_dslopes, **meta)
    dslopes = dslope_part.view(B, H, dslope_stride).sum(dim=(0, 2)) if need_dslopes else None
    return dq, dk, dv, dslopes


class AttentionFunction(torch.autograd.Function):
    """Flash attention; saves q, k, v, out and the float32 lse (never the Nq x Nk probabilities)."""

    @staticmethod
    def forward(ctx, q, k, v, alibi_slopes, positions, key_padding_mask, causal, scale, dropout_p, seed):
        out, lse = attention_forward(q, k, v, causal=causal, alibi_slopes=alibi_slopes, positions=positions,
                                     key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p,
                                     seed=seed)
        ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, positions, key_padding_mask)
        ctx.options = dict(causal=causal, scale=scale, dropout_p=dropout_p, seed=seed)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, alibi_slopes, positions, key_padding_mask = ctx.saved_tensors
        dq, dk, dv, dslopes = attention_backward(
            dout.contiguous(), q, k, v, out, lse, alibi_slopes=alibi_slopes, positions=positions,
            key_padding_mask=key_padding_mask, need_dslopes=ctx.needs_input_grad[3], **ctx.options)
        return dq, dk, dv, dslopes, None, None, None, None, None, None


def split_packed_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, N, D]: views (no copy) of a packed ``qkv`` [B, N, H, 3, D] (BLOOM's fused projection)."""
    return tuple(qkv[:, :, :, i].transpose(1, 2) for i in range(3))


class PackedAttentionFunction(torch.autograd.Function):
    """Self-attention on a packed ``qkv`` [B, N, H, 3, D]: the backward writes dq, dk and dv straight into one
    [B, N, H, 3, D] gradient, where three views of the projection output would have autograd zero-fill and
    add three full-size buffers."""

    @staticmethod
    def forward(ctx, qkv, alibi_slopes, positions, key_padding_mask, causal, scale, dropout_p, seed):
        q, k, v = split_packed_qkv(qkv)
        out, lse = attention_forward(q, k, v, causal=causal, alibi_slopes=alibi_slopes, positions=positions,
                                     key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p,
                                     seed=seed)
        ctx.save_for_backward(qkv, out, lse, alibi_slopes, positions, key_padding_mask)
        ctx.options = dict(causal=causal, scale=scale, dropout_p=dropout_p, seed=seed)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        qkv, out, lse, alibi_slopes, positions, key_padding_mask = ctx.saved_tensors
        dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        _, _, _, dslopes = attention_backward(
            dout.contiguous(), *split_packed_qkv(qkv), out, lse, alibi_slopes=alibi_slopes, positions=positions,
            key_padding_mask=key_padding_mask, need_dslopes=ctx.needs_input_grad[1], grads=split_packed_qkv(dqkv),
            **ctx.options)
        return dqkv, dslopes, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------ public ops

def alibi_positions(key_padding_mask: torch.Tensor | None, num_keys: int, device) -> torch.Tensor | None:
    """Key positions for ALiBi: ``(cumsum(mask) - 1) * mask`` [B, Nk] int32, or None for the key index."""
    if key_padding_mask is None:
        return None
    m = key_padding_mask.to(torch.int32)
    return ((torch.cumsum(m, dim=-1) - 1) * m).to(torch.int32)


def _validate(q, k, v, alibi_slopes, key_padding_mask, scale, dropout_p):
    for name, t in (("q", q), ("k", k), ("v", v)):
        runtime.check_tensor(t, name, ndim=4)
    runtime.check_same_device(q=q, k=k, v=v, alibi_slopes=alibi_slopes, key_padding_mask=key_padding_mask)
    runtime.check_same_dtype(q=q, k=k, v=v)
    B, H, NQ, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k must have shape [{B}, {H}, Nk, {D}] to match q {list(q.shape)}, got {list(k.shape)}")
    _validate_options(alibi_slopes, key_padding_mask, scale, H, (B, k.shape[2]))
    runtime.check_probability(dropout_p, "dropout_p")


def _validate_options(alibi_slopes, key_padding_mask, scale, num_heads, mask_shape):
    if alibi_slopes is not None:
        runtime.check_tensor(alibi_slopes, "alibi_slopes", dtypes=(torch.float32,))
        runtime.check_shape(alibi_slopes, "alibi_slopes", (num_heads,))
    runtime.check_padding_mask(key_padding_mask, "key_padding_mask", mask_shape)
    check_scale(scale)


def check_scale(scale) -> None:
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")


def attention(q, k, v, *, causal=False, alibi_slopes=None, key_padding_mask=None, scale=None, dropout_p=0.0,
              return_lse=False):
    """Fused attention (see the module docstring for the math). Returns out [B, H, Nq, D] in q's dtype,
    or ``(out, lse)`` with ``lse`` [B, H, Nq] float32 (natural log) when ``return_lse``.

    Gradients flow to q, k, v and alibi_slopes. ``dropout_p`` applies to the probabilities (use it in
    training only); its seed is drawn from torch's default generator, so ``torch.manual_seed`` makes it
    reproducible.
    """
    from ..nn import functional  # the one dispatcher: validation, backend choice, the custom op

    return functional.attention(q, k, v, causal=causal, alibi_slopes=alibi_slopes,
                                key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p,
                                return_lse=return_lse)


def packed_attention(qkv, *, causal=False, alibi_slopes=None, key_padding_mask=None, scale=None, dropout_p=0.0,
                     return_lse=False):
    """:func:`attention` of the q, k, v packed in ``qkv`` [B, N, H, 3, D] (see :func:`split_packed_qkv`), whose
    backward writes one packed gradient (:class:`PackedAttentionFunction`)."""
    from ..nn import functional

    return functional.packed_attention(qkv, causal=causal, alibi_slopes=alibi_slopes,
                                       key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p,
                                       return_lse=return_lse)


def attention_reference(q, k, v, *, causal=False, alibi_slopes=None, key_padding_mask=None, scale=None,
                        dropout_p=0.0, return_lse=False, softmax_dtype=torch.float32, dropout_mask=None):
    """Eager attention as HF's BLOOM computes it: scores in the model dtype plus the ALiBi bias rounded to
    that dtype, softmax in ``softmax_dtype`` (float32 for BLOOM; FSMT passes its model dtype), probabilities
    cast back, dropout, then ``P @ v``. Rows with no visible key give 0 (and lse -inf).

    ``dropout_mask`` [B, H, Nq, Nk] bool (keep) replaces the random draw, so tests can feed the kernel's.
    """
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    visible = torch.ones(B, 1, NQ, NK, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.bool()[:, None, None, :]
    if causal:
        i = torch.arange(NQ, device=q.device)[:, None]
        j = torch.arange(NK, device=q.device)[None, :]
        visible = visible & (j <= i + (NK - NQ))
    bias = _alibi_bias(alibi_slopes, key_padding_mask, B, NK, q.dtype, q.device)
    out, lse = softmax_attention_reference(q, k, v, scale, bias, visible, softmax_dtype, dropout_p, dropout_mask)
    return (out, lse) if return_lse else out


def _alibi_bias(alibi_slopes, key_padding_mask, B, NK, dtype, device):
    """HF's ALiBi bias [B, H, 1, Nk]: slope * position in float32, rounded to the model dtype (or None)."""
    if alibi_slopes is None:
        return None
    pos = alibi_positions(key_padding_mask, NK, device)
    pos = torch.arange(NK, device=device).expand(B, NK) if pos is None else pos
    return (alibi_slopes.float()[None, :, None] * pos.float()[:, None, :]).to(dtype)[:, :, None, :]


MAX_DECODE_QUERIES = 16


def decode_attention(q, k_cache, v_cache, cache_lens, *, alibi_slopes=None, key_padding_mask=None, scale=None,
                     out=None):
    """Attention of 1-16 new queries per sequence against a preallocated KV cache (inference only).

    q [B, H, Nq, D]; k_cache/v_cache [B, H, Nmax, D] whose first ``cache_lens[b]`` slots are valid and
    already hold the new tokens' keys/values (the new queries are the last Nq of them: causal bottom-right);
    cache_lens [B] int32/int64, each in [Nq, Nmax]: checked when on the host; on the device not read back
    (that would synchronise each step) but clamped to [0, Nmax] in the kernel, so it never reads past the cache.
    key_padding_mask [B, Nmax] (1 = real token, HF's attention_mask padded to the capacity) masks pads and
    gives ALiBi its positions, as in :func:`attention`. Returns out [B, H, Nq, D] (or writes ``out``).

    The key axis is split across programs (flash-decoding) so small batches still fill the GPU; the launch
    depends only on shapes, so a decode step can be captured in a CUDA graph.
    """
    _validate_decode(q, k_cache, v_cache, cache_lens, alibi_slopes, key_padding_mask, scale)
    if runtime.use_triton(q, op="decode_attention"):
        if q.shape[-1] > MAX_HEAD_DIM:
            runtime.unsupported("decode_attention", f"head dim {q.shape[-1]} (at most {MAX_HEAD_DIM})")
        else:
            return _decode_launch(q, k_cache, v_cache, cache_lens, alibi_slopes, key_padding_mask, scale, out)
    result = decode_attention_reference(q, k_cache, v_cache, cache_lens, alibi_slopes=alibi_slopes,
                                        key_padding_mask=key_padding_mask, scale=scale)
    return runtime.write_out(out, "out", result)


def decode_attention_reference(q, k_cache, v_cache, cache_lens, *, alibi_slopes=None, key_padding_mask=None,
                               scale=None):
    """Eager oracle of :func:`decode_attention` (same masks, bias rounding and float32 softmax)."""
    B, H, NQ, _ = q.shape
    NMAX = k_cache.shape[2]
    i = torch.arange(NQ, device=q.device)[None, :, None]
    j = torch.arange(NMAX, device=q.device)[None, None, :]
    lens = cache_lens.to(torch.long)[:, None, None]
    visible = ((j < lens) & (j <= lens - NQ + i))[:, None]  # [B, 1, NQ, NMAX]
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.bool()[:, None, None, :]
    bias = _alibi_bias(alibi_slopes, key_padding_mask, B, NMAX, q.dtype, q.device)
    return softmax_attention_reference(q, k_cache, v_cache, scale, bias, visible, torch.float32, 0.0, None)[0]


def _validate_decode(q, k_cache, v_cache, cache_lens, alibi_slopes, key_padding_mask, scale):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        runtime.check_tensor(t, name, ndim=4)
    runtime.check_tensor(cache_lens, "cache_lens", dtypes=(torch.int32, torch.int64), ndim=1)
    runtime.check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_lens=cache_lens,
                              alibi_slopes=alibi_slopes, key_padding_mask=key_padding_mask)
    runtime.check_same_dtype(q=q, k_cache=k_cache, v_cache=v_cache)
    B, H, NQ, D = q.shape
    if not 1 <= NQ <= MAX_DECODE_QUERIES:
        raise ValueError(f"q must hold 1 to {MAX_DECODE_QUERIES} new queries per sequence, got {NQ}")
    if k_cache.shape != v_cache.shape or k_cache.shape[:2] != (B, H) or k_cache.shape[3] != D:
        raise ValueError(f"k_cache and v_cache must both have shape [{B}, {H}, Nmax, {D}], got "
                         f"{list(k_cache.shape)} and {list(v_cache.shape)}")
    runtime.check_shape(cache_lens, "cache_lens", (B,))
    runtime.check_cache_lens(cache_lens, "cache_lens", NQ, k_cache.shape[2])
    _validate_options(alibi_slopes, key_padding_mask, scale, H, (B, k_cache.shape[2]))


def _decode_launch(q, k_cache, v_cache, cache_lens, alibi_slopes, key_padding_mask, scale, out):
    B, H, NQ, D = q.shape
    NMAX = k_cache.shape[2]
    out = runtime.check_out(out, "out", q)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    BLOCK_M, BLOCK_D = MAX_DECODE_QUERIES, block_d(D)
    sms = multiprocessors(q)

    def splits(meta):
        return decode_splits(NMAX, meta["BLOCK_N"], meta["SPLIT_FACTOR"], B * H, sms)

    most = max(splits(c.kwargs) for c in _decode_split.configs)
    o_part = torch.empty((B * H, most, BLOCK_M, BLOCK_D), dtype=torch.float32, device=q.device)
    m_part = torch.empty((B * H, most, BLOCK_M), dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    positions = kpm = None
    if key_padding_mask is not None:  # derived once per decode step, not once per layer
        if alibi_slopes is not None:
            positions = runtime.derived_once(key_padding_mask, "alibi_positions",
                                             lambda m: alibi_positions(m, NMAX, q.device))
        kpm = runtime.derived_once(key_padding_mask, "mask_int8", runtime.int8_mask)
    k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (k_cache, v_cache))
    _decode_split[lambda meta: (splits(meta), B * H)](
        q, k_cache, v_cache, cache_lens,
        alibi_slopes if alibi_slopes is not None else m_part, positions if positions is not None else m_part,
        kpm if kpm is not None else m_part, o_part, m_part, l_part,
        *bhn_strides(q), *bhn_strides(k_cache), *bhn_strides(v_cache), H, NQ, NMAX, B * H, scale,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, HAS_ALIBI=alibi_slopes is not None,
        HAS_POS=positions is not None, HAS_KPM=kpm is not None, PRECISION=dot_precision(q.dtype))
    # the partials are laid out by the split count of the config that ran
    _decode_combine_kernel[(B * H,)](o_part, m_part, l_part, out, *bhn_strides(out), H, NQ,
                                     splits(_decode_split.best_config.all_kwargs()),
                                     HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, num_warps=4)
    return out


@triton.jit
def _dropout_mask_kernel(KEEP, NQ, NK, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(seed, bh, offs_m, offs_n, NQ, NK, dropout_p)
    mask = (offs_m < NQ)[:, None] & (offs_n < NK)[None, :]
    tl.store(KEEP + (bh * NQ + offs_m[:, None]) * NK + offs_n[None, :], keep.to(tl.int8), mask=mask)


def dropout_keep_mask(B, H, NQ, NK, dropout_p, seed, device) -> torch.Tensor:
    """The kernel's keep-mask [B, H, Nq, Nk] bool for a seed: the test oracle for in-kernel dropout."""
    keep = torch.empty((B, H, NQ, NK), dtype=torch.int8, device=device)
    _dropout_mask_kernel[(triton.cdiv(NQ, 32), triton.cdiv(NK, 32), B * H)](
        keep, NQ, NK, float(dropout_p), seed, BLOCK_M=32, BLOCK_N=32)
    return keep.bool()


def alibi_slopes(num_heads: int, device=None) -> torch.Tensor:
    """BLOOM's ALiBi slopes [num_heads] float32, with HF's exact float32 ops (transformers' BLOOM build_alibi_tensor)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), device=device, dtype=torch.float32)
    powers = torch.arange(1, 1 + closest, device=device, dtype=torch.int32)
    slopes = torch.pow(base, powers)
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), device=device, dtype=torch.float32)
        n_extra = min(closest, num_heads - closest)
        extra_powers = torch.arange(1, 1 + 2 * n_extra, 2, device=device, dtype=torch.int32)
        slopes = torch.cat([slopes, torch.pow(extra_base, extra_powers)], dim=0)
    return slopes

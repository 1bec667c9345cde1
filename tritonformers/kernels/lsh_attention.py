"""Reformer's LSH self-attention, forward and backward, equal to HF's LSHSelfAttention core.

qk [B, H, L, D] (the shared query/key projection) and v [B, H, L, D]; L a multiple of the chunk length c
(the model pads) unless L <= c, where HF attends over the whole sequence without hashing.

1. Hash (torch, bit-compatible with HF's einsum and first-index argmax; ``hash_seed`` reseeds before the draw):
   rotations R ~ N(0, 1) of shape [H, D, n_hashes, n_rot/2]; bucket = argmax([x R, -x R]) per round (or per
   factor of a factorised ``num_buckets``, least significant first); padded positions get an extra bucket
   when the batch has any padding; round r adds r * n_buckets'.
2. Sort (torch): a stable sort of the n_hashes * L slots by (bucket, round-major index) per (b, h).
3. Attend (Triton): sorted slots are cut into chunks of c across all rounds; each query slot attends to its
   own chunk and ``before``/``after`` neighbours (wrapping across rounds, as HF). The query is the raw qk row;
   a key is ``qk * rsqrt(mean(qk^2) + 1e-6) / sqrt(D)``; masks: padding (by original key position) and,
   if causal, key position > query position -> MASK; then the same original position -> SELF (always,
   overwriting). P = exp(S - lse) with lse rounded to the model dtype (HF's form; see local_attention).
   Rows and lse are written straight to their (round, position) slot: no unsort copy.
4. Combine (Triton): out = sum_r exp(lse_r - logsumexp_r lse) * O_r.

Gathers are index loads inside the kernels; nothing of size L x window is stored: backward recomputes the
probabilities from the lse and folds the rounds' lse gradient into the softmax delta.
"""

from __future__ import annotations

import math
from functools import reduce
from operator import mul

import torch
import triton
import triton.language as tl

from .. import runtime
from .flash import MAX_HEAD_DIM, autotuned, block_d, dot_precision, online_softmax_step, prune_to_chunk
from .local_attention import MASK_VALUES, check_chunking, look_adjacent

SELF_MASK_VALUES = {torch.float64: -1e5, torch.float32: -1e5, torch.bfloat16: -99840.0, torch.float16: -1e3}
KEY_NORM_EPS = 1e-6


# ------------------------------------------------------------------------------------------------ kernels

@triton.jit
def _gather_keys(QK, V, PERM, b, h, bh, T, L, slots, slot_ok, sb, sh, sn, vb, vh, vn, offs_d, d_ok, inv_sqrt_d,
                 HEAD_DIM: tl.constexpr):
    """Key tile of sorted slots: (normalised keys^T [D, N] in the model dtype, raw qk^T float32, v^T, positions)."""
    j = tl.load(PERM + bh * T + slots, mask=slot_ok, other=0)
    pos = j % L
    mask = d_ok[:, None] & slot_ok[None, :]
    x = tl.load(QK + b * sb + h * sh + pos[None, :] * sn + offs_d[:, None], mask=mask, other=0.0)
    DT = x.dtype
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / HEAD_DIM + 1e-6)
    # HF: x * rsqrt(mean(x^2) + eps), rounded, then / sqrt(D), rounded
    k = ((xf * rstd[None, :]).to(DT).to(tl.float32) * inv_sqrt_d).to(DT)
    vT = tl.load(V + b * vb + h * vh + pos[None, :] * vn + offs_d[:, None], mask=mask, other=0.0)
    return k, xf, rstd, vT, pos


@triton.jit
def _lsh_scores(q, kT, pos_q, pos_k, slot_ok, b, L, KPM, mask_value, self_value,
                CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr):
    """Scores of one tile with HF's masks; also the entries that carry gradient (not replaced by a constant)."""
    s = tl.dot(q, kT, input_precision=PRECISION)
    keep = tl.full(s.shape, 1, tl.int1)
    if HAS_KPM:
        key_ok = tl.load(KPM + b * L + pos_k, mask=slot_ok, other=0)
        keep = keep & (key_ok != 0)[None, :]
    if CAUSAL:
        keep = keep & (pos_k[None, :] <= pos_q[:, None])
    s = tl.where(keep, s, mask_value)
    is_self = pos_q[:, None] == pos_k[None, :]
    s = tl.where(is_self, self_value, s)
    live = keep & (is_self == 0)
    return tl.where(slot_ok[None, :], s, float("-inf")), live


@triton.jit
def _lsh_dropout_keep(seed, bh, slots_q, window_slots, T, WIDTH, dropout_p):
    return tl.rand(seed, (bh * T + slots_q[:, None]) * WIDTH + window_slots[None, :]) >= dropout_p


@triton.jit
def _lsh_fwd_kernel(
    QK, V, PERM, KPM, O_R, LSE_R,
    sb, sh, sn, vb, vh, vn,
    H, L, T, C, NCHUNKS, BEFORE, AFTER, inv_sqrt_d, mask_value, self_value, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (sorted chunk * cdiv(C, BLOCK_M) + sub-block, b * H + h). O_R [B*H, T, D] and LSE_R [B*H, T] are
    indexed by the unsorted slot j = round * L + position (what PERM holds for each sorted slot)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    sub_blocks = tl.cdiv(C, BLOCK_M)
    chunk = pid // sub_blocks
    in_chunk = (pid % sub_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    slots_q = chunk * C + in_chunk
    row_ok = in_chunk < C
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    j_q = tl.load(PERM + bh * T + slots_q, mask=row_ok, other=0)
    pos_q = j_q % L
    q = tl.load(QK + b * sb + h * sh + pos_q[:, None] * sn + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    width = C * (1 + BEFORE + AFTER)
    for o in range(0, 1 + BEFORE + AFTER):
        key_chunk = (chunk + o - BEFORE + NCHUNKS) % NCHUNKS
        for start in range(0, C, BLOCK_N):
            in_key_chunk = start + tl.arange(0, BLOCK_N)
            slot_ok = in_key_chunk < C
            kT, _, _, vT, pos_k = _gather_keys(QK, V, PERM, b, h, bh, T, L, key_chunk * C + in_key_chunk, slot_ok,
                                               sb, sh, sn, vb, vh, vn, offs_d, d_ok, inv_sqrt_d, HEAD_DIM)
            s, _ = _lsh_scores(q, kT, pos_q, pos_k, slot_ok, b, L, KPM, mask_value, self_value,
                               CAUSAL, HAS_KPM, PRECISION)
            p, alpha, m_new, l_i = online_softmax_step(s, m_i, l_i, True)
            if HAS_DROPOUT:
                keep = _lsh_dropout_keep(seed, bh, slots_q, o * C + in_key_chunk, T, width, dropout_p)
                p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty), tl.trans(vT), input_precision=PRECISION)
            m_i = m_new
    lse = (m_i + tl.log(tl.where(l_i > 0.0, l_i, 1.0))).to(QK.dtype.element_ty).to(tl.float32)
    out = acc * tl.exp(m_i - lse)[:, None]
    tl.store(O_R + (bh * T + j_q[:, None]) * HEAD_DIM + offs_d[None, :], out.to(O_R.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE_R + bh * T + j_q, lse, mask=row_ok)


@triton.jit
def _round_weights(LSE_R, bh, T, L, offs_t, t_ok, r, NH, DT: tl.constexpr):
    """exp(lse_r - logsumexp over rounds) for rows offs_t (recomputed per call: NH is small). As in HF the
    logsumexp is rounded to the model dtype first: when every round is fully masked (lse = MASK) that makes
    each weight 1, not 1 / NH."""
    m = tl.full(offs_t.shape, float("-inf"), dtype=tl.float32)
    for rr in range(0, NH):
        m = tl.maximum(m, tl.load(LSE_R + bh * T + rr * L + offs_t, mask=t_ok, other=0.0))
    total = tl.zeros(offs_t.shape, dtype=tl.float32)
    for rr in range(0, NH):
        total += tl.exp(tl.load(LSE_R + bh * T + rr * L + offs_t, mask=t_ok, other=0.0) - m)
    lse_r = tl.load(LSE_R + bh * T + r * L + offs_t, mask=t_ok, other=0.0)
    lse_all = (m + tl.log(total)).to(DT).to(tl.float32)
    return tl.exp(lse_r - lse_all)


@triton.jit
def _lsh_combine_kernel(O_R, LSE_R, OUT, L, T, NH, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """out[bh, t] = sum_r w_r[t] O_R[bh, r * L + t]; OUT [B*H, L, D]."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t < L
    mask = t_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for r in range(0, NH):
        w = _round_weights(LSE_R, bh, T, L, offs_t, t_ok, r, NH, O_R.dtype.element_ty)
        o = tl.load(O_R + (bh * T + r * L + offs_t[:, None]) * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
        acc += w[:, None] * o.to(tl.float32)
    tl.store(OUT + (bh * L + offs_t[:, None]) * HEAD_DIM + offs_d[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _lsh_combine_bwd_kernel(O_R, LSE_R, DOUT, DO_R, DELTA_R, L, T, NH, sdb, sdh, sdn, H,
                            HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Through the combination: dO_r = w_r dout; the softmax-backward row term of round r, with the
    gradient reaching lse_r through the weights folded in, is delta'_r = w_r (dout . out)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t < L
    mask = t_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    dout = tl.load(DOUT + b * sdb + h * sdh + offs_t[:, None] * sdn + offs_d[None, :], mask=mask, other=0.0)
    dout = dout.to(tl.float32)
    dot_out = tl.zeros([BLOCK_T], dtype=tl.float32)
    for r in range(0, NH):
        w = _round_weights(LSE_R, bh, T, L, offs_t, t_ok, r, NH, O_R.dtype.element_ty)
        o = tl.load(O_R + (bh * T + r * L + offs_t[:, None]) * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
        dot_out += w * tl.sum(o.to(tl.float32) * dout, 1)
    for r in range(0, NH):
        w = _round_weights(LSE_R, bh, T, L, offs_t, t_ok, r, NH, O_R.dtype.element_ty)
        rows = bh * T + r * L + offs_t
        tl.store(DO_R + rows[:, None] * HEAD_DIM + offs_d[None, :], (w[:, None] * dout).to(DO_R.dtype.element_ty),
                 mask=mask)
        tl.store(DELTA_R + rows, w * dot_out, mask=t_ok)


@triton.jit
def _lsh_round_sum_kernel(DQ_R, DK_R, DV_R, DQK, DV, L, T, NH, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """Every position is a query and a key once per round: dqk = sum_r dq_r + sum_r dk_r and dv = sum_r dv_r
    (float32 sums, one pass over the rounds' [B*H, T, D] gradients) into qk's and v's [B, H, L, D]."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t < L)[:, None] & (offs_d < HEAD_DIM)[None, :]
    dq = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    dk = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for r in range(0, NH):
        offs = (bh * T + r * L + offs_t[:, None]) * HEAD_DIM + offs_d[None, :]
        dq += tl.load(DQ_R + offs, mask=mask, other=0.0).to(tl.float32)
        dk += tl.load(DK_R + offs, mask=mask, other=0.0).to(tl.float32)
        dv += tl.load(DV_R + offs, mask=mask, other=0.0).to(tl.float32)
    out = (bh * L + offs_t[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(DQK + out, (dq + dk).to(DQK.dtype.element_ty), mask=mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _lsh_bwd_dkdv_kernel(
    QK, V, PERM, KPM, DO_R, LSE_R, DELTA_R, DK_R, DV_R,
    sb, sh, sn, vb, vh, vn,
    H, L, T, C, NCHUNKS, BEFORE, AFTER, inv_sqrt_d, mask_value, self_value, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (sorted key chunk * cdiv(C, BLOCK_N) + sub-block, b * H + h): dV and d(raw qk as a key) for BLOCK_N
    key slots, from every query chunk whose window holds them; the key normalisation's backward runs in the
    epilogue. DK_R/DV_R [B*H, T, D] are indexed by the unsorted slot."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    sub_blocks = tl.cdiv(C, BLOCK_N)
    key_chunk = pid // sub_blocks
    in_key_chunk = (pid % sub_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot_ok = in_key_chunk < C
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    slots_k = key_chunk * C + in_key_chunk
    kT, xT, rstd, vT, pos_k = _gather_keys(QK, V, PERM, b, h, bh, T, L, slots_k, slot_ok,
                                           sb, sh, sn, vb, vh, vn, offs_d, d_ok, inv_sqrt_d, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    width = C * (1 + BEFORE + AFTER)
    for o in range(0, 1 + BEFORE + AFTER):
        q_chunk = (key_chunk - o + BEFORE + NCHUNKS) % NCHUNKS
        for start in range(0, C, BLOCK_M):
            in_chunk = start + tl.arange(0, BLOCK_M)
            row_ok = in_chunk < C
            slots_q = q_chunk * C + in_chunk
            j_q = tl.load(PERM + bh * T + slots_q, mask=row_ok, other=0)
            pos_q = j_q % L
            mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(QK + b * sb + h * sh + pos_q[:, None] * sn + offs_d[None, :], mask=mask, other=0.0)
            do = tl.load(DO_R + (bh * T + j_q[:, None]) * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
            lse = tl.load(LSE_R + bh * T + j_q, mask=row_ok, other=0.0)
            delta = tl.load(DELTA_R + bh * T + j_q, mask=row_ok, other=0.0)
            s, live = _lsh_scores(q, kT, pos_q, pos_k, slot_ok, b, L, KPM, mask_value, self_value,
                                  CAUSAL, HAS_KPM, PRECISION)
            p = tl.where(row_ok[:, None], tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, vT, input_precision=PRECISION)
            if HAS_DROPOUT:
                keep = _lsh_dropout_keep(seed, bh, slots_q, o * C + in_key_chunk, T, width, dropout_p)
                p_kept = tl.where(keep, p / (1.0 - dropout_p), 0.0)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            else:
                p_kept = p
            dv += tl.dot(tl.trans(p_kept.to(DO_R.dtype.element_ty)), do, input_precision=PRECISION)
            ds = tl.where(live, p * (dp - delta[:, None]), 0.0)
            dk += tl.dot(tl.trans(ds.to(QK.dtype.element_ty)), q, input_precision=PRECISION)
    # k = x r / sqrt(D) with r = rsqrt(mean(x^2) + eps): dx = r / sqrt(D) (dk - x r^2 mean(dk x))
    x = tl.trans(xT)
    r = tl.trans(rstd[None, :])
    proj = tl.sum(dk * x, 1)[:, None] / HEAD_DIM
    dx = (dk - x * r * r * proj) * r * inv_sqrt_d
    j_k = tl.load(PERM + bh * T + slots_k, mask=slot_ok, other=0)
    out = (bh * T + j_k[:, None]) * HEAD_DIM + offs_d[None, :]
    out_mask = slot_ok[:, None] & d_ok[None, :]
    tl.store(DK_R + out, dx.to(DK_R.dtype.element_ty), mask=out_mask)
    tl.store(DV_R + out, dv.to(DV_R.dtype.element_ty), mask=out_mask)


@triton.jit
def _lsh_bwd_dq_kernel(
    QK, V, PERM, KPM, DO_R, LSE_R, DELTA_R, DQ_R,
    sb, sh, sn, vb, vh, vn,
    H, L, T, C, NCHUNKS, BEFORE, AFTER, inv_sqrt_d, mask_value, self_value, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program as in the forward: d(raw qk as a query) = dS K_normalised over the window; DQ_R [B*H, T, D]."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    sub_blocks = tl.cdiv(C, BLOCK_M)
    chunk = pid // sub_blocks
    in_chunk = (pid % sub_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    slots_q = chunk * C + in_chunk
    row_ok = in_chunk < C
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    mask = row_ok[:, None] & d_ok[None, :]
    j_q = tl.load(PERM + bh * T + slots_q, mask=row_ok, other=0)
    pos_q = j_q % L
    q = tl.load(QK + b * sb + h * sh + pos_q[:, None] * sn + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO_R + (bh * T + j_q[:, None]) * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
    lse = tl.load(LSE_R + bh * T + j_q, mask=row_ok, other=0.0)
    delta = tl.load(DELTA_R + bh * T + j_q, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    width = C * (1 + BEFORE + AFTER)
    for o in range(0, 1 + BEFORE + AFTER):
        key_chunk = (chunk + o - BEFORE + NCHUNKS) % NCHUNKS
        for start in range(0, C, BLOCK_N):
            in_key_chunk = start + tl.arange(0, BLOCK_N)
            slot_ok = in_key_chunk < C
            kT, _, _, vT, pos_k = _gather_keys(QK, V, PERM, b, h, bh, T, L, key_chunk * C + in_key_chunk, slot_ok,
                                               sb, sh, sn, vb, vh, vn, offs_d, d_ok, inv_sqrt_d, HEAD_DIM)
            s, live = _lsh_scores(q, kT, pos_q, pos_k, slot_ok, b, L, KPM, mask_value, self_value,
                                  CAUSAL, HAS_KPM, PRECISION)
            p = tl.exp(s - lse[:, None])
            dp = tl.dot(do, vT, input_precision=PRECISION)
            if HAS_DROPOUT:
                keep = _lsh_dropout_keep(seed, bh, slots_q, o * C + in_key_chunk, T, width, dropout_p)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            ds = tl.where(live, p * (dp - delta[:, None]), 0.0)
            dq += tl.dot(ds.to(QK.dtype.element_ty), tl.trans(kT), input_precision=PRECISION)
    tl.store(DQ_R + (bh * T + j_q[:, None]) * HEAD_DIM + offs_d[None, :], dq.to(DQ_R.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- hashing

def bucket_count(num_buckets) -> tuple[int, int]:
    """(rotation size, number of buckets) for an int or a factorised list of even ints."""
    factors = [num_buckets] if isinstance(num_buckets, int) else list(num_buckets)
    if not factors or any((not isinstance(f, int)) or f <= 0 or f % 2 for f in factors):
        raise ValueError(f"num_buckets must be an even positive int or a list of them, got {num_buckets!r}")
    return sum(factors), reduce(mul, factors, 1)


def auto_num_buckets(sequence_length: int, chunk_length: int, max_position_embeddings: int):
    """HF's choice when num_buckets is None: 2 * L / c rounded down to a power of two, factorised if large."""
    p = (2 * (sequence_length // chunk_length)).bit_length() - 1
    limit = 2 * max(int((max_position_embeddings // chunk_length) ** 0.5), chunk_length)
    return 2**p if 2**p <= limit else [2 ** (p // 2), 2 ** (p - p // 2)]


def lsh_plan(qk, chunk_length, num_hashes, num_buckets, num_chunks_before, num_chunks_after, key_padding_mask,
             hash_seed, buckets):
    """HF's choice between its unchunked path (L <= chunk: plain attention, no hashing, one round) and the
    hashed one: ``(chunk_length, num_chunks_before, num_chunks_after, num_hashes, buckets, perm)`` as the
    attention then runs, with the sort permutation ``perm`` [B, H, num_hashes * L]."""
    B, H, L, _ = qk.shape
    if L <= chunk_length:
        return L, 0, 0, 1, None, torch.arange(L, device=qk.device).expand(B, H, L)
    if buckets is None:
        if num_buckets is None:
            raise ValueError("num_buckets is required when buckets are not given (an even int or a list)")
        buckets = lsh_hash(qk, num_hashes, num_buckets, key_padding_mask, hash_seed)
    return chunk_length, num_chunks_before, num_chunks_after, num_hashes, buckets, lsh_sort(buckets)


def empty_result(qk: torch.Tensor, v: torch.Tensor, num_hashes: int, return_buckets: bool):
    """What a sequence of length 0 gives: out [B, H, 0, D] (a clone of v, on the autograd graph) and, with
    ``return_buckets``, buckets [B, H, num_hashes, 0]."""
    B, H = qk.shape[:2]
    buckets = torch.empty((B, H, num_hashes, 0), dtype=torch.long, device=qk.device)
    return (v.clone(), buckets) if return_buckets else v.clone()


def lsh_hash(qk: torch.Tensor, num_hashes: int, num_buckets, attention_mask=None, hash_seed=None) -> torch.Tensor:
    """HF's ``_hash_vectors``: buckets [B, H, num_hashes, L] (int64) with the per-round offsets added.

    Draws one rotation tensor [H, D, num_hashes, rot/2] in qk's dtype and device from torch's generator
    (after ``torch.manual_seed(hash_seed)`` when given), exactly as HF does, so seeded runs agree.
    """
    rotation_size, n_buckets = bucket_count(num_buckets)
    B, H, L, D = qk.shape
    vectors = qk.detach()
    if hash_seed is not None:
        torch.manual_seed(hash_seed)
    rotations = torch.randn((H, D, num_hashes, rotation_size // 2), device=qk.device, dtype=qk.dtype)
    rotated = torch.einsum("bmtd,mdhr->bmhtr", vectors, rotations)
    if isinstance(num_buckets, int) or len(num_buckets) == 1:
        buckets = _argmax_signed(rotated)
    else:
        buckets, start, product = None, 0, 1
        for factor in num_buckets:
            digit = _argmax_signed(rotated[..., start: start + factor // 2])
            start += factor // 2
            buckets = digit if buckets is None else buckets + product * digit
            product *= factor
    if attention_mask is not None:
        # HF adds an extra bucket for padded positions when there are any; as a device tensor, so that
        # hashing never waits for the GPU (a host-side `.any()` would synchronise every call)
        pad = ~attention_mask.bool()
        n_buckets = n_buckets + pad.any().to(buckets.dtype)
        buckets = torch.where(pad[:, None, None, :], n_buckets - 1, buckets)
    offsets = (torch.arange(num_hashes, device=qk.device) * n_buckets).view(1, 1, -1, 1)
    return buckets + offsets


def _argmax_signed(r: torch.Tensor) -> torch.Tensor:
    """HF's ``argmax(cat([r, -r], -1), -1)`` without the concatenated copy (twice the rotations, the largest
    tensor of the hashing): the first maximum of r if it is at least -min(r), else R + the first minimum
    (torch's max/min return the first index of the extreme, so ties resolve as in the concatenation)."""
    top, top_index = r.max(dim=-1)
    low, low_index = r.min(dim=-1)
    return torch.where(top >= -low, top_index, low_index + r.shape[-1])


def lsh_sort(buckets: torch.Tensor) -> torch.Tensor:
    """Stable sort of the flattened [B, H, n_hashes * L] buckets by (bucket, index): the permutation, int64."""
    flat = buckets.flatten(2)
    T = flat.shape[-1]
    key = flat * T + torch.arange(T, device=flat.device)
    return torch.argsort(key, dim=-1)


# ---------------------------------------------------------------------------------------------- launchers

# (BLOCK_M, BLOCK_N, warps, stages), autotuned per chunk length, head dim and masks (pruned to the chunk, as
# local attention's); the first was the fixed choice before (head dim 64 took it with 4 warps)
_TILES = [(64, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2),
          (32, 32, 4, 2)]
_KEY = ["C", "HEAD_DIM", "CAUSAL", "HAS_KPM", "HAS_DROPOUT"]
# float32 operands, {max head dim: tiles} that lower for sm_90 with at most a few spilled bytes (see
# attention._FWD_TILES_FP32)
_FWD_TILES_FP32 = {64: [(16, 64, 8, 2), (16, 16, 8, 2), (32, 16, 8, 1)],
                   128: [(32, 16, 8, 1), (16, 16, 8, 2), (32, 32, 8, 1)]}
_DKDV_TILES_FP32 = {64: [(32, 32, 8, 1), (16, 64, 8, 2)], 128: [(32, 16, 8, 1), (32, 32, 8, 1)]}
_DQ_TILES_FP32 = {64: [(32, 32, 8, 1), (32, 16, 8, 1), (16, 16, 8, 2), (16, 64, 8, 2)],
                  128: [(32, 32, 8, 1), (32, 16, 8, 1), (16, 16, 8, 2)]}
_lsh_fwd = autotuned(_lsh_fwd_kernel, _TILES, _KEY, prune_to_chunk, fp32_tiles=_FWD_TILES_FP32)
_lsh_bwd_dkdv = autotuned(_lsh_bwd_dkdv_kernel, _TILES, _KEY, prune_to_chunk, fp32_tiles=_DKDV_TILES_FP32)
_lsh_bwd_dq = autotuned(_lsh_bwd_dq_kernel, _TILES, _KEY, prune_to_chunk, fp32_tiles=_DQ_TILES_FP32)


class LSHAttentionFunction(torch.autograd.Function):
    """Chunked LSH attention over a given permutation; saves qk, v, the permutation, per-round outputs and lse."""

    @staticmethod
    def forward(ctx, qk, v, perm, key_padding_mask, num_hashes, chunk, before, after, causal, dropout_p, seed):
        B, H, L, D = qk.shape
        T = num_hashes * L
        o_r = torch.empty((B * H, T, D), dtype=qk.dtype, device=qk.device)
        lse_r = torch.empty((B * H, T), dtype=torch.float32, device=qk.device)
        geometry = dict(H=H, L=L, T=T, C=chunk, NCHUNKS=T // chunk, BEFORE=before, AFTER=after,
                        inv_sqrt_d=1.0 / math.sqrt(D), mask_value=MASK_VALUES[qk.dtype],
                        self_value=SELF_MASK_VALUES[qk.dtype], dropout_p=dropout_p, seed=seed)
        meta = dict(HEAD_DIM=D, BLOCK_D=block_d(D), CAUSAL=bool(causal), HAS_KPM=key_padding_mask is not None,
                    HAS_DROPOUT=dropout_p > 0, PRECISION=dot_precision(qk.dtype))
        kpm = key_padding_mask if key_padding_mask is not None else lse_r
        strides = (qk.stride(0), qk.stride(1), qk.stride(2), v.stride(0), v.stride(1), v.stride(2))
        _lsh_fwd[lambda m: ((T // chunk) * triton.cdiv(chunk, m["BLOCK_M"]), B * H)](
            qk, v, perm, kpm, o_r, lse_r, *strides, **geometry, **meta)
        out = torch.empty((B, H, L, D), dtype=qk.dtype, device=qk.device)
        BLOCK_T = 32
        _lsh_combine_kernel[(triton.cdiv(L, BLOCK_T), B * H)](
            o_r, lse_r, out, L, T, num_hashes, HEAD_DIM=D, BLOCK_T=BLOCK_T, BLOCK_D=block_d(D))
        ctx.save_for_backward(qk, v, perm, key_padding_mask, o_r, lse_r)
        ctx.geometry, ctx.meta, ctx.num_hashes = geometry, meta, num_hashes
        return out

    @staticmethod
    def backward(ctx, dout):
        dout = dout.contiguous()  # the combine-backward kernel reads rows with unit stride (out.sum() gives stride 0)
        qk, v, perm, key_padding_mask, o_r, lse_r = ctx.saved_tensors
        geometry, meta, nh = ctx.geometry, ctx.meta, ctx.num_hashes
        B, H, L, D = qk.shape
        T, chunk = geometry["T"], geometry["C"]
        do_r = torch.empty_like(o_r)
        delta_r = torch.empty_like(lse_r)
        BLOCK_T = 32
        _lsh_combine_bwd_kernel[(triton.cdiv(L, BLOCK_T), B * H)](
            o_r, lse_r, dout, do_r, delta_r, L, T, nh, dout.stride(0), dout.stride(1), dout.stride(2), H,
            HEAD_DIM=D, BLOCK_T=BLOCK_T, BLOCK_D=meta["BLOCK_D"])
        dq_r, dk_r, dv_r = (torch.empty_like(o_r) for _ in range(3))
        kpm = key_padding_mask if key_padding_mask is not None else lse_r
        strides = (qk.stride(0), qk.stride(1), qk.stride(2), v.stride(0), v.stride(1), v.stride(2))
        _lsh_bwd_dkdv[lambda m: ((T // chunk) * triton.cdiv(chunk, m["BLOCK_N"]), B * H)](
            qk, v, perm, kpm, do_r, lse_r, delta_r, dk_r, dv_r, *strides, **geometry, **meta)
        _lsh_bwd_dq[lambda m: ((T // chunk) * triton.cdiv(chunk, m["BLOCK_M"]), B * H)](
            qk, v, perm, kpm, do_r, lse_r, delta_r, dq_r, *strides, **geometry, **meta)
        dqk = torch.empty((B, H, L, D), dtype=qk.dtype, device=qk.device)
        dv = torch.empty((B, H, L, D), dtype=v.dtype, device=v.device)
        _lsh_round_sum_kernel[(triton.cdiv(L, BLOCK_T), B * H)](
            dq_r, dk_r, dv_r, dqk, dv, L, T, nh, HEAD_DIM=D, BLOCK_T=BLOCK_T, BLOCK_D=meta["BLOCK_D"])
        return dqk, dv, None, None, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------ public ops

def _validate(qk, v, chunk_length, num_hashes, num_chunks_before, num_chunks_after, key_padding_mask, dropout_p,
              buckets):
    runtime.check_tensor(qk, "qk", ndim=4)
    runtime.check_tensor(v, "v", ndim=4)
    runtime.check_same_device(qk=qk, v=v, key_padding_mask=key_padding_mask, buckets=buckets)
    runtime.check_same_dtype(qk=qk, v=v)
    if v.shape != qk.shape:
        raise ValueError(f"qk and v must have one shape [B, H, L, D], got {list(qk.shape)} and {list(v.shape)}")
    B, H, L, _ = qk.shape
    check_chunking(L, chunk_length, num_chunks_before, num_chunks_after)
    runtime.check_int(num_hashes, "num_hashes", 1)
    runtime.check_padding_mask(key_padding_mask, "key_padding_mask", (B, L))
    if buckets is not None:
        runtime.check_tensor(buckets, "buckets", dtypes=(torch.int64, torch.int32), ndim=4)
        runtime.check_shape(buckets, "buckets", (B, H, num_hashes, L))
    runtime.check_probability(dropout_p, "dropout_p")


def lsh_attention(qk, v, *, chunk_length, num_hashes=1, num_buckets=None, num_chunks_before=1, num_chunks_after=0,
                  causal=False, key_padding_mask=None, dropout_p=0.0, hash_seed=None, buckets=None,
                  return_buckets=False):
    """Reformer LSH attention (module docstring). qk, v [B, H, L, D] → out [B, H, L, D], and with
    ``return_buckets`` the buckets [B, H, num_hashes, L] (offsets included; None on the unchunked path).

    ``num_buckets``: an even int or a list of even ints (required unless ``buckets`` is given); ``buckets``
    reuses earlier hashing (the reversible backward, the cache) instead of drawing new rotations.
    Gradients flow to qk (as query and as key) and v.
    """
    from ..nn import functional  # the one dispatcher: validation, backend, the custom op

    return functional.lsh_attention(
        qk, v, chunk_length=chunk_length, num_hashes=num_hashes, num_buckets=num_buckets,
        num_chunks_before=num_chunks_before, num_chunks_after=num_chunks_after, causal=causal,
        key_padding_mask=key_padding_mask, dropout_p=dropout_p, hash_seed=hash_seed, buckets=buckets,
        return_buckets=return_buckets)


def lsh_attention_reference(qk, v, perm, *, chunk_length, num_hashes, num_chunks_before=1, num_chunks_after=0,
                            causal=False, key_padding_mask=None, dropout_p=0.0, dropout_mask=None,
                            return_probs=False):
    """HF's chunked LSH attention op for op, given the sort permutation ``perm`` [B, H, num_hashes * L]:
    gather, chunk, normalise keys, look_adjacent, dots, MASK then SELF, exp(dots - logsumexp), dropout, P·V,
    unsort, combine rounds. ``dropout_mask`` [B, H, N, c, window] bool (keep) replaces the random draw.
    ``return_probs`` returns ``(out, probs)`` instead: the probabilities after dropout in HF's sorted layout
    ([B, H, N, c, window], or [B, H, L, L] for one chunk of the whole sequence), HF's ``output_attentions``."""
    B, H, L, D = qk.shape
    T = perm.shape[-1]
    pos = perm % L
    index = pos[..., None].expand(B, H, T, D)
    q_sorted = torch.gather(qk, 2, index)
    v_sorted = torch.gather(v, 2, index)
    n, c = T // chunk_length, chunk_length
    variance = torch.mean(q_sorted**2, -1, keepdim=True)
    keys = q_sorted * torch.rsqrt(variance + KEY_NORM_EPS) / math.sqrt(D)
    adjacent = lambda x: look_adjacent(x, num_chunks_before, num_chunks_after)  # noqa: E731
    q_chunks = q_sorted.view(B, H, n, c, D)
    k_chunks = adjacent(keys.view(B, H, n, c, D))
    v_chunks = adjacent(v_sorted.view(B, H, n, c, D))
    pos_q = pos.view(B, H, n, c)
    pos_k = adjacent(pos.view(B, H, n, c))
    dots = torch.matmul(q_chunks, k_chunks.transpose(-1, -2))
    mask = None
    if key_padding_mask is not None:
        mask = torch.gather(key_padding_mask.bool()[:, None, :].expand(B, H, L), 2, pos_k.flatten(2)).view(pos_k.shape)
        mask = mask[:, :, :, None, :]
    if causal:
        causal_mask = pos_q[..., :, None] >= pos_k[..., None, :]
        mask = causal_mask if mask is None else mask & causal_mask
    if mask is not None:
        dots = torch.where(mask, dots, torch.tensor(MASK_VALUES[qk.dtype], dtype=dots.dtype, device=qk.device))
    is_self = pos_q[..., :, None] == pos_k[..., None, :]
    dots = torch.where(is_self, torch.tensor(SELF_MASK_VALUES[qk.dtype], dtype=dots.dtype, device=qk.device), dots)
    lse = torch.logsumexp(dots, dim=-1, keepdim=True)
    probs = torch.exp(dots - lse)
    if dropout_mask is not None:
        probs = probs * dropout_mask.to(probs.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    out_sorted = torch.matmul(probs, v_chunks).view(B, H, T, D)
    lse_sorted = lse.view(B, H, T)
    undo = torch.empty_like(perm).scatter_(-1, perm, torch.arange(T, device=perm.device).expand(B, H, T))
    out_r = torch.gather(out_sorted, 2, undo[..., None].expand(B, H, T, D))
    lse_r = torch.gather(lse_sorted, 2, undo)
    if num_hashes > 1:
        out_r = out_r.view(B, H, num_hashes, L, D)
        lse_r = lse_r.view(B, H, num_hashes, L, 1)
        weights = torch.exp(lse_r - torch.logsumexp(lse_r, dim=2, keepdim=True))
        out_r = torch.sum(out_r * weights, dim=2)
    if return_probs:
        return out_r, probs.view(B, H, L, L) if n == 1 else probs
    return out_r


@triton.jit
def _lsh_dropout_mask_kernel(KEEP, T, WIDTH, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    window = tl.arange(0, BLOCK_K)
    keep = _lsh_dropout_keep(seed, bh, slots, window, T, WIDTH, dropout_p)
    mask = (slots < T)[:, None] & (window < WIDTH)[None, :]
    tl.store(KEEP + (bh * T + slots[:, None]) * WIDTH + window[None, :], keep.to(tl.int8), mask=mask)


def lsh_dropout_keep_mask(B, H, T, chunk_length, before, after, dropout_p, seed, device) -> torch.Tensor:
    """The kernel's keep-mask as [B, H, T / c, c, window] bool for a seed (the oracle for in-kernel dropout)."""
    width = chunk_length * (1 + before + after)
    keep = torch.empty((B * H, T, width), dtype=torch.int8, device=device)
    _lsh_dropout_mask_kernel[(triton.cdiv(T, 32), B * H)](
        keep, T, width, float(dropout_p), seed, BLOCK_M=32, BLOCK_K=runtime.next_power_of_2(width))
    return keep.bool().view(B, H, T // chunk_length, chunk_length, width)

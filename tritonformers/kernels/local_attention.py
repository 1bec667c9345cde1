"""Reformer's chunked local attention, forward and backward, with HF's exact masking semantics.

q, k, v [B, H, L, D] with L = N * c (c = chunk_length; the model pads). Query chunk n attends to the key
chunks (n + o) mod N for o = -before..after, in that order (HF's look_adjacent: the wrap-around is real,
and when N < 1 + before + after a chunk appears more than once and counts more than once):

    S = scale * q k^T,   S = MASK where (key_padding_mask[b, key] == 0) or (causal and key_pos > query_pos)
    P = exp(S - logsumexp(S)),   out = dropout(P) @ v_adjacent

MASK is HF's finite constant (-1e9 in float32, -998244352 in bf16, -1e4 in fp16), so a query whose keys
are all masked averages them uniformly, exactly as HF. Masked scores are constants: they pass no
gradient to q or k. When L <= c HF takes an unchunked path (one chunk of length L, no neighbours): the
public op does the same. HF scales the keys by 1/sqrt(D) before the product; the module passes keys so
scaled with ``scale=1``. Nothing of size L x (c * (1 + before + after)) is stored: backward recomputes P
from the saved log-sum-exp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import runtime
from .flash import (MAX_HEAD_DIM, autotuned, bhn_strides, block_d, dot_precision, online_softmax_step,
                    prune_to_chunk, softmax_delta)

MASK_VALUES = {torch.float64: -1e9, torch.float32: -1e9, torch.bfloat16: -998244352.0, torch.float16: -1e4}


@triton.jit
def _local_scores(q, kT, rows, cols, slot_cols, b, L, C, KPM, scale, mask_value,
                  CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr, EVEN_C: tl.constexpr):
    """Scores of one tile (natural units: HF's finite MASK must stay exact). ``cols`` are key positions,
    ``slot_cols`` their in-chunk offsets: slots past the chunk are -inf (not keys at all; none when the tile
    divides the chunk, ``EVEN_C``); padding / causal masking gives the finite MASK."""
    s = tl.dot(q, kT, input_precision=PRECISION) * scale
    keep = tl.full(s.shape, 1, tl.int1)
    if HAS_KPM:
        if EVEN_C:
            key_ok = tl.load(KPM + b * L + cols)
        else:
            key_ok = tl.load(KPM + b * L + cols, mask=slot_cols < C, other=0)
        keep = keep & (key_ok != 0)[None, :]
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None])
    if HAS_KPM or CAUSAL:
        s = tl.where(keep, s, mask_value)
    if not EVEN_C:
        s = tl.where((slot_cols < C)[None, :], s, float("-inf"))
    return s, keep


@triton.jit
def _load_tile(ptr, offs, slot, d_ok, C, EVEN: tl.constexpr, ROWS: tl.constexpr):
    """A tile of rows ``slot`` of a chunk (masked past the chunk and the head dim unless ``EVEN``); ``ROWS``
    says whether ``slot`` indexes the first (rows) or the second (columns, transposed) axis of ``offs``."""
    if EVEN:
        return tl.load(ptr + offs)
    elif ROWS:
        return tl.load(ptr + offs, mask=(slot < C)[:, None] & d_ok[None, :], other=0.0)
    else:
        return tl.load(ptr + offs, mask=(slot < C)[None, :] & d_ok[:, None], other=0.0)


@triton.jit
def _local_dropout_keep(seed, bh, rows, slot, L, WIDTH, dropout_p):
    """Philox keep-mask indexed by (bh, query row, key slot in the row's adjacency window)."""
    return tl.rand(seed, (bh * L + rows[:, None]) * WIDTH + slot[None, :]) >= dropout_p


@triton.jit
def _local_fwd_tile(acc, m_i, l_i, q, k_base, v_base, rows, cols, slot_cols, offs_d, d_ok, skn, svn, b, bh, o, L, C,
                    width, KPM, scale, mask_value, dropout_p, seed, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, EVEN_D: tl.constexpr, EVEN_C: tl.constexpr):
    """One key tile of the forward's online softmax (natural units); returns (acc, m_i, l_i)."""
    kT = _load_tile(k_base, cols[None, :] * skn + offs_d[:, None], slot_cols, d_ok, C, EVEN_C and EVEN_D, False)
    s, _ = _local_scores(q, kT, rows, cols, slot_cols, b, L, C, KPM, scale, mask_value,
                         CAUSAL, HAS_KPM, PRECISION, EVEN_C)
    p, alpha, m_new, l_i = online_softmax_step(s, m_i, l_i, True)
    if HAS_DROPOUT:
        keep = _local_dropout_keep(seed, bh, rows, o * C + slot_cols, L, width, dropout_p)
        p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
    v = _load_tile(v_base, cols[:, None] * svn + offs_d[None, :], slot_cols, d_ok, C, EVEN_C and EVEN_D, True)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _local_fwd_kernel(
    Q, K, V, O, LSE, KPM,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    H, L, C, NCHUNKS, BEFORE, AFTER, scale, mask_value, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr, EVEN_C: tl.constexpr,
):
    """Program (chunk * sub-blocks + sub-block, b * H + h): BLOCK_M query rows of one chunk, online softmax
    over the 1 + BEFORE + AFTER adjacent key chunks. O is [B, H, L, D]; LSE [B, H, L] float32 (natural)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    sub_blocks = tl.cdiv(C, BLOCK_M)
    chunk = pid // sub_blocks
    in_chunk = (pid % sub_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = chunk * C + in_chunk
    row_ok = in_chunk < C
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    width = C * (1 + BEFORE + AFTER)
    tiles = tl.cdiv(C, BLOCK_N)
    # one flat loop over (window chunk, key tile) so the pipeliner prefetches across chunk boundaries too
    for t in range(0, (1 + BEFORE + AFTER) * tiles):
        o = t // tiles
        slot_cols = (t % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = ((chunk + o - BEFORE + NCHUNKS) % NCHUNKS) * C + slot_cols
        acc, m_i, l_i = _local_fwd_tile(acc, m_i, l_i, q, K + b * skb + h * skh, V + b * svb + h * svh,
                                        rows, cols, slot_cols, offs_d, d_ok, skn, svn, b, bh, o, L, C, width,
                                        KPM, scale, mask_value, dropout_p, seed, CAUSAL, HAS_KPM,
                                        HAS_DROPOUT, PRECISION, EVEN_D, EVEN_C)
    # HF forms P = exp(S - lse) with lse rounded to the model dtype; next to a finite MASK of -1e9 that
    # rounding swallows log(l), so a fully masked row sums its values instead of averaging them.
    lse = (m_i + tl.log(tl.where(l_i > 0.0, l_i, 1.0))).to(Q.dtype.element_ty).to(tl.float32)
    out = acc * tl.exp(m_i - lse)[:, None]
    tl.store(O + b * sob + h * soh + rows[:, None] * son + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh * L + rows, lse, mask=row_ok)


@triton.jit
def _local_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KPM,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    H, L, C, NCHUNKS, BEFORE, AFTER, scale, mask_value, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    """Program (key chunk * sub-blocks + sub-block, b * H + h): BLOCK_N keys receive dV = P~^T dO and
    dK = dS^T Q from every query chunk that sees them, i.e. chunk (key_chunk - o) mod N for each offset o
    (the same window slot the forward used, so duplicates and dropout draws line up)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    sub_blocks = tl.cdiv(C, BLOCK_N)
    key_chunk = pid // sub_blocks
    slot_cols = (pid % sub_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = key_chunk * C + slot_cols
    col_ok = slot_cols < C
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = col_ok[None, :] & d_ok[:, None]
    kT = tl.load(K + b * skb + h * skh + cols[None, :] * skn + offs_d[:, None], mask=kv_mask, other=0.0)
    vT = tl.load(V + b * svb + h * svh + cols[None, :] * svn + offs_d[:, None], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    width = C * (1 + BEFORE + AFTER)
    tiles = tl.cdiv(C, BLOCK_M)
    for t in range(0, (1 + BEFORE + AFTER) * tiles):  # flat (window offset, query tile) loop, as the forward
        o = t // tiles
        in_chunk = (t % tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = ((key_chunk - o + BEFORE + NCHUNKS) % NCHUNKS) * C + in_chunk
        row_ok = in_chunk < C
        mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + offs_d[None, :], mask=mask, other=0.0)
        lse = tl.load(LSE + bh * L + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * L + rows, mask=row_ok, other=0.0)
        s, keep_mask = _local_scores(q, kT, rows, cols, slot_cols, b, L, C, KPM, scale, mask_value,
                                     CAUSAL, HAS_KPM, PRECISION, False)
        p = tl.where(row_ok[:, None], tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        if HAS_DROPOUT:
            keep = _local_dropout_keep(seed, bh, rows, o * C + slot_cols, L, width, dropout_p)
            p_kept = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        else:
            p_kept = p
        dv += tl.dot(tl.trans(p_kept.to(DO.dtype.element_ty)), do, input_precision=PRECISION)
        ds = tl.where(keep_mask, p * (dp - delta[:, None]), 0.0)  # masked scores are constants
        dk += tl.dot(tl.trans(ds.to(Q.dtype.element_ty)), q, input_precision=PRECISION)
    out = bh * L * HEAD_DIM + cols[:, None] * HEAD_DIM + offs_d[None, :]
    out_mask = col_ok[:, None] & d_ok[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _local_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, KPM,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    H, L, C, NCHUNKS, BEFORE, AFTER, scale, mask_value, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    """Program as in the forward: dQ = dS K over the adjacent key chunks. DQ is [B, H, L, D] contiguous."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    sub_blocks = tl.cdiv(C, BLOCK_M)
    chunk = pid // sub_blocks
    in_chunk = (pid % sub_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = chunk * C + in_chunk
    row_ok = in_chunk < C
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + offs_d[None, :], mask=mask, other=0.0)
    lse = tl.load(LSE + bh * L + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * L + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    width = C * (1 + BEFORE + AFTER)
    tiles = tl.cdiv(C, BLOCK_N)
    for t in range(0, (1 + BEFORE + AFTER) * tiles):  # flat (window chunk, key tile) loop, as the forward
        o = t // tiles
        slot_cols = (t % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = ((chunk + o - BEFORE + NCHUNKS) % NCHUNKS) * C + slot_cols
        kv_mask = (slot_cols < C)[None, :] & d_ok[:, None]
        kT = tl.load(K + b * skb + h * skh + cols[None, :] * skn + offs_d[:, None], mask=kv_mask, other=0.0)
        vT = tl.load(V + b * svb + h * svh + cols[None, :] * svn + offs_d[:, None], mask=kv_mask, other=0.0)
        s, keep_mask = _local_scores(q, kT, rows, cols, slot_cols, b, L, C, KPM, scale, mask_value,
                                     CAUSAL, HAS_KPM, PRECISION, False)
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, vT, input_precision=PRECISION)
        if HAS_DROPOUT:
            keep = _local_dropout_keep(seed, bh, rows, o * C + slot_cols, L, width, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = tl.where(keep_mask, p * (dp - delta[:, None]), 0.0)
        dq += tl.dot(ds.to(K.dtype.element_ty), tl.trans(kT), input_precision=PRECISION)
    tl.store(DQ + bh * L * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- launchers

_KEY = ["C", "HEAD_DIM", "CAUSAL", "HAS_KPM", "HAS_DROPOUT"]
# the first tile of each list is what the launcher used before autotuning (head dim 128; 64 took 128 x 64 / 4 warps)
_FWD_TILES = [(64, 64, 8, 2), (128, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (32, 32, 4, 2)]
_BWD_TILES = [(64, 64, 8, 2), (128, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 2), (32, 32, 4, 2)]


_EVEN_C = {"EVEN_C": lambda a: a["C"] % a["BLOCK_M"] == 0 and a["C"] % a["BLOCK_N"] == 0}
# float32 operands, {max head dim: tiles} that spill at most a few dozen bytes on sm_90 (see attention._FWD_TILES_FP32)
_FWD_TILES_FP32 = {64: [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 1), (16, 64, 8, 2)],
                   128: [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 1), (16, 64, 8, 2)]}
_DKDV_TILES_FP32 = {64: [(32, 32, 8, 1), (32, 16, 8, 1), (16, 16, 8, 2)],
                    128: [(32, 32, 8, 1), (32, 16, 8, 1), (16, 16, 8, 2)]}
_DQ_TILES_FP32 = {64: [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 1), (16, 64, 8, 2)],
                  128: [(32, 64, 8, 2), (32, 32, 8, 1), (32, 16, 8, 1), (16, 64, 8, 2)]}
_local_fwd = autotuned(_local_fwd_kernel, _FWD_TILES, _KEY, prune_to_chunk, heuristics=_EVEN_C,
                       fp32_tiles=_FWD_TILES_FP32)
_local_bwd_dkdv = autotuned(_local_bwd_dkdv_kernel, _BWD_TILES, _KEY, prune_to_chunk, fp32_tiles=_DKDV_TILES_FP32)
_local_bwd_dq = autotuned(_local_bwd_dq_kernel, _BWD_TILES, _KEY, prune_to_chunk, fp32_tiles=_DQ_TILES_FP32)


class LocalAttentionFunction(torch.autograd.Function):
    """Chunked local attention; saves q, k, v, out and the float32 lse."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, chunk, before, after, causal, scale, dropout_p, seed):
        B, H, L, D = q.shape
        out = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
        geometry = (H, L, chunk, L // chunk, before, after, scale, MASK_VALUES[q.dtype], dropout_p, seed)
        meta = dict(HEAD_DIM=D, BLOCK_D=block_d(D), CAUSAL=bool(causal), HAS_KPM=key_padding_mask is not None,
                    HAS_DROPOUT=dropout_p > 0, PRECISION=dot_precision(q.dtype), EVEN_D=D == block_d(D))
        kpm = key_padding_mask if key_padding_mask is not None else lse
        _local_fwd[lambda m: ((L // chunk) * triton.cdiv(chunk, m["BLOCK_M"]), B * H)](
            q, k, v, out, lse, kpm, *bhn_strides(q), *bhn_strides(k), *bhn_strides(v), *bhn_strides(out), *geometry,
            **meta)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.geometry, ctx.meta = geometry, meta
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        geometry, meta = ctx.geometry, ctx.meta
        B, H, L, D = q.shape
        chunk = geometry[2]
        dout = dout.contiguous()
        delta = softmax_delta(out, dout)
        dq = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
        dk, dv = torch.empty_like(dq), torch.empty_like(dq)
        kpm = key_padding_mask if key_padding_mask is not None else lse
        strides = (*bhn_strides(q), *bhn_strides(k), *bhn_strides(v), *bhn_strides(dout))
        n_chunks = L // chunk
        _local_bwd_dkdv[lambda m: (n_chunks * triton.cdiv(chunk, m["BLOCK_N"]), B * H)](
            q, k, v, dout, dk, dv, lse, delta, kpm, *strides, *geometry, **meta)
        _local_bwd_dq[lambda m: (n_chunks * triton.cdiv(chunk, m["BLOCK_M"]), B * H)](
            q, k, v, dout, dq, lse, delta, kpm, *strides, *geometry, **meta)
        return dq, dk, dv, None, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------ public ops

def _validate(q, k, v, chunk_length, num_chunks_before, num_chunks_after, key_padding_mask, dropout_p, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        runtime.check_tensor(t, name, ndim=4)
    runtime.check_same_device(q=q, k=k, v=v, key_padding_mask=key_padding_mask)
    runtime.check_same_dtype(q=q, k=k, v=v)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must have one shape [B, H, L, D], got {list(q.shape)}, {list(k.shape)}, "
                         f"{list(v.shape)}")
    check_chunking(q.shape[2], chunk_length, num_chunks_before, num_chunks_after)
    runtime.check_padding_mask(key_padding_mask, "key_padding_mask", (q.shape[0], q.shape[2]))
    runtime.check_probability(dropout_p, "dropout_p")
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")


def check_chunking(seq_len: int, chunk_length, num_chunks_before, num_chunks_after) -> None:
    """Reformer's chunk options (shared with LSH attention): integers, and L a multiple of the chunk when longer."""
    runtime.check_int(chunk_length, "chunk_length", 1)
    runtime.check_int(num_chunks_before, "num_chunks_before", 0)
    runtime.check_int(num_chunks_after, "num_chunks_after", 0)
    if seq_len > chunk_length and seq_len % chunk_length:
        raise ValueError(f"the sequence length ({seq_len}) must be a multiple of chunk_length ({chunk_length}) "
                         "when it exceeds it (Reformer pads its inputs)")


def local_attention(q, k, v, *, chunk_length, num_chunks_before=1, num_chunks_after=0, causal=False,
                    key_padding_mask=None, dropout_p=0.0, scale=1.0, return_lse=False):
    """Reformer local attention (module docstring). q/k/v [B, H, L, D] → out [B, H, L, D] (and lse
    [B, H, L] float32 with ``return_lse``). ``scale`` multiplies q·k (HF pre-divides k by sqrt(D) and uses
    1); ``causal`` is HF's ``is_decoder``; dropout draws its seed from torch's generator."""
    from ..nn import functional  # the one dispatcher: validation, backend, the custom op

    return functional.local_attention(
        q, k, v, chunk_length=chunk_length, num_chunks_before=num_chunks_before, num_chunks_after=num_chunks_after,
        causal=causal, key_padding_mask=key_padding_mask, dropout_p=dropout_p, scale=scale, return_lse=return_lse)


def empty_result(q: torch.Tensor, v: torch.Tensor, return_lse: bool):
    """What a sequence of length 0 gives: out [B, H, 0, D] (a clone of v, so it stays on the autograd graph)
    and, with ``return_lse``, lse [B, H, 0]."""
    out = v.clone()
    return (out, torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)) if return_lse else out


def look_adjacent(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """HF's look_adjacent on the chunk axis (dim 2): [chunk n-before, ..., n, ..., n+after] (wrapping),
    concatenated along dim 3."""
    if before == 0 and after == 0:
        return x
    return torch.cat([torch.cat([x[:, :, o:], x[:, :, :o]], dim=2) for o in range(-before, after + 1)], dim=3)


def local_attention_reference(q, k, v, *, chunk_length, num_chunks_before=1, num_chunks_after=0, causal=False,
                              key_padding_mask=None, dropout_p=0.0, scale=1.0, return_lse=False, dropout_mask=None,
                              return_probs=False):
    """HF's LocalSelfAttention core, op for op: chunk, look_adjacent, dots, finite MASK, exp(dots - lse),
    dropout, P·V. ``dropout_mask`` [B, H, N, c, K] bool (keep) replaces the random draw (tests).
    ``return_probs`` returns ``(out, probs)`` instead: the probabilities after dropout in HF's layout
    ([B, H, N, c, K], or [B, H, L, L] on the unchunked path), what HF's ``output_attentions`` gives."""
    B, H, L, D = q.shape
    if L <= chunk_length:
        chunk_length, num_chunks_before, num_chunks_after = L, 0, 0
    n, c = L // chunk_length, chunk_length
    positions = torch.arange(L, device=q.device)
    qc = q.reshape(B, H, n, c, D)
    kc = look_adjacent(k.reshape(B, H, n, c, D), num_chunks_before, num_chunks_after)
    vc = look_adjacent(v.reshape(B, H, n, c, D), num_chunks_before, num_chunks_after)
    key_pos = look_adjacent(positions.view(1, 1, n, c), num_chunks_before, num_chunks_after)  # [1, 1, n, K]
    dots = torch.matmul(qc, kc.transpose(-1, -2))
    if scale != 1.0:
        dots = dots * scale
    mask = None
    if key_padding_mask is not None:
        kpm = look_adjacent(key_padding_mask.bool().view(B, 1, n, c), num_chunks_before, num_chunks_after)
        mask = kpm[:, :, :, None, :]
    if causal:
        causal_mask = positions.view(1, 1, n, c, 1) >= key_pos[:, :, :, None, :]
        mask = causal_mask if mask is None else mask & causal_mask
    if mask is not None:
        dots = torch.where(mask, dots, torch.tensor(MASK_VALUES[q.dtype], dtype=dots.dtype, device=q.device))
    lse = torch.logsumexp(dots, dim=-1, keepdim=True)
    probs = torch.exp(dots - lse)
    if dropout_mask is not None:
        probs = probs * dropout_mask.to(probs.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    out = torch.matmul(probs, vc).reshape(B, H, L, D)
    if return_probs:
        return out, probs.view(B, H, L, L) if n == 1 and num_chunks_before == num_chunks_after == 0 else probs
    return (out, lse.reshape(B, H, L).float()) if return_lse else out


@triton.jit
def _local_dropout_mask_kernel(KEEP, L, C, WIDTH, dropout_p, seed, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.arange(0, BLOCK_K)
    keep = _local_dropout_keep(seed, bh, rows, slot, L, WIDTH, dropout_p)
    mask = (rows < L)[:, None] & (slot < WIDTH)[None, :]
    tl.store(KEEP + (bh * L + rows[:, None]) * WIDTH + slot[None, :], keep.to(tl.int8), mask=mask)


def local_dropout_keep_mask(B, H, L, chunk_length, before, after, dropout_p, seed, device) -> torch.Tensor:
    """The kernel's keep-mask as [B, H, N, c, K] bool for a seed: the oracle for in-kernel dropout."""
    width = chunk_length * (1 + before + after)
    keep = torch.empty((B * H, L, width), dtype=torch.int8, device=device)
    _local_dropout_mask_kernel[(triton.cdiv(L, 32), B * H)](
        keep, L, chunk_length, width, float(dropout_p), seed, BLOCK_M=32, BLOCK_K=runtime.next_power_of_2(width))
    return keep.bool().view(B, H, L // chunk_length, chunk_length, width)

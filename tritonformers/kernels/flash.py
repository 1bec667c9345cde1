"""The flash-attention building blocks that ALiBi, differential, local and LSH attention share.

Device functions (``@triton.jit``, called from the kernels of each attention family):

* :func:`masked_scores`: one [BLOCK_M, BLOCK_N] score tile ``scale * q k^T`` (+ BLOOM's ALiBi bias) in log2
  units, with causal (bottom-right aligned), key-padding and bounds masks; interior tiles skip the index masks.
* :func:`interior_key_tiles_end` / :func:`interior_query_tiles_start`: the causal tile split, i.e. where the
  tiles that need no mask end (forward, query-major) or start (backward, key-major).
* :func:`online_softmax_step`: one key tile of the online softmax (running max and sum, rescale factor).
* :func:`probabilities`: P = exp(S - lse) in the backward, 0 for rows with no visible key.
* :func:`dropout_keep`: the Philox keep-mask of a tile, a function of the flat (bh, i, j) index.
* :func:`load_rows`: rows of a [N, D] slice, masked only where a bound can be crossed.
* :func:`softmax_delta_kernel` (launched by :func:`softmax_delta`): ``delta = rowsum(dO * O)``, the row term
  of the softmax backward ``dS = P * (dP - delta)``.

Host helpers: :func:`block_d` (head dim padded for ``tl.dot``), :func:`dot_precision` (fp32 dots in IEEE),
:func:`tile_configs` / :func:`autotuned` with :func:`prune_wide_head_tiles` or :func:`prune_to_chunk` (autotune
configs, one small tile under the interpreter; float32 operands take tiles of their own through
:func:`split_by_operand_dtype`), :func:`bhn_strides`, and :func:`softmax_attention_reference`,
the eager (out, lse) core of every family's PyTorch reference.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import runtime

MAX_HEAD_DIM = 256  # any head dim up to this; padded to a power of two >= 16 inside the kernels
DELTA_BLOCK_M = 64


# ---------------------------------------------------------------------------------------- device functions

@triton.jit
def masked_scores(q, k, offs_m, offs_n, b, NQ, NK, MASK_STRIDE, slope, POS, KPM, qk_scale,
                  CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_POS: tl.constexpr, HAS_KPM: tl.constexpr,
                  BIAS_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BOUNDS: tl.constexpr = True):
    """Masked scores of one [BLOCK_M, BLOCK_N] tile in log2 units (S * log2(e)); -inf where masked.

    Keys at or past NK are masked; POS/KPM rows are MASK_STRIDE apart (NK, or the cache capacity).
    ``BOUNDS=False`` is for interior tiles (all keys < NK and, when causal, all visible to every row of
    the tile): only the padding mask is applied there, so most tiles skip the index arithmetic.
    """
    s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
    if HAS_ALIBI:
        if HAS_POS:
            pos = tl.load(POS + b * MASK_STRIDE + offs_n, mask=offs_n < NK, other=0).to(tl.float32)
        else:
            pos = offs_n.to(tl.float32)
        # slope * pos in float32, rounded to the model dtype (HF's alibi tensor), then in log2 units.
        bias = (slope * pos).to(BIAS_DTYPE).to(tl.float32) * 1.4426950408889634
        s = s + bias[None, :]
    if BOUNDS:
        valid = (offs_n < NK)[None, :] & (offs_m < NQ)[:, None]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + (NK - NQ))
        if HAS_KPM:
            key_ok = tl.load(KPM + b * MASK_STRIDE + offs_n, mask=offs_n < NK, other=0)
            valid = valid & (key_ok != 0)[None, :]
        s = tl.where(valid, s, float("-inf"))
    elif HAS_KPM:
        key_ok = tl.load(KPM + b * MASK_STRIDE + offs_n)
        s = tl.where((key_ok != 0)[None, :], s, float("-inf"))
    return s


@triton.jit
def interior_key_tiles_end(start_m, NQ, NK, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """End of the key tiles [0, end) that are interior for the query rows [start_m, start_m + BLOCK_M): inside
    NK and, when causal, visible to every one of those rows (key j visible to row i iff j <= i + NK - NQ)."""
    end = NK // BLOCK_N * BLOCK_N
    if CAUSAL:
        end = tl.minimum(end, tl.maximum(start_m + NK - NQ + 1, 0) // BLOCK_N * BLOCK_N)
    return end


@triton.jit
def interior_query_tiles_start(start_n, NQ, NK, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr):
    """Start of the query tiles [start, NQ // BLOCK_M * BLOCK_M) that see all keys [start_n, start_n + BLOCK_N)
    (the backward's key-major loop): with causal masking a query tile starting at i sees them all when
    i + NK - NQ >= start_n + BLOCK_N - 1. Always a multiple of BLOCK_M."""
    if CAUSAL:
        start = tl.maximum(start_n + BLOCK_N - 1 - (NK - NQ), 0)
        return (start + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    else:
        return 0


@triton.jit
def online_softmax_step(s, m_i, l_i, NATURAL: tl.constexpr):
    """One key tile of an online softmax. ``s`` are scores (log2 units, or natural with NATURAL); returns the
    tile's unnormalised probabilities, the factor rescaling what was accumulated, and the new max and sum.
    Rows with nothing visible yet (max -inf) keep zeros instead of NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    if NATURAL:
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
    else:
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def dropout_keep(seed, bh, offs_m, offs_n, NQ, NK, dropout_p):
    """Philox keep-mask of one tile; the offset is the flat (bh, i, j) index (wraps past 2^32, harmless)."""
    offsets = (bh * NQ + offs_m[:, None]) * NK + offs_n[None, :]
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def softmax_delta_kernel(O, DO, DELTA, sob, soh, son, sdb, sdh, sdn, H, NQ,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] (float32), the softmax-backward row term."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < NQ)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * NQ + offs_m, delta, mask=offs_m < NQ)


@triton.jit
def probabilities(s, lse_log2):
    """P = exp(S - lse) from log2-unit scores; rows whose lse is -inf (no visible key) give 0."""
    return tl.exp2(s - tl.where(lse_log2 == float("-inf"), 0.0, lse_log2)[:, None])


@triton.jit
def load_rows(ptr, rows, offs_d, stride, NQ, d_ok, EVEN_D: tl.constexpr, BOUNDS: tl.constexpr):
    """[len(rows), BLOCK_D] rows of a [N, D] slice (masked only where a bound can be crossed)."""
    if BOUNDS:
        return tl.load(ptr + rows[:, None] * stride + offs_d[None, :], mask=(rows < NQ)[:, None] & d_ok[None, :],
                       other=0.0)
    elif EVEN_D:
        return tl.load(ptr + rows[:, None] * stride + offs_d[None, :])
    else:
        return tl.load(ptr + rows[:, None] * stride + offs_d[None, :], mask=d_ok[None, :], other=0.0)


# ---------------------------------------------------------------------------------------------- host helpers

def tuning_on_gpu() -> bool:
    """Whether autotune config lists are the GPU's (else: one small tile under the interpreter)."""
    return torch.cuda.is_available() and not runtime.interpreter_enabled()


def tile_configs(gpu_tiles: list) -> list:
    """Autotune configs from (BLOCK_M, BLOCK_N, warps, stages); one small tile under the interpreter (its
    cost is per program, and autotuning needs CUDA)."""
    if not tuning_on_gpu():
        gpu_tiles = [(32, 32, 4, 1)]
    return runtime.autotune_configs([triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
                                     for m, n, w, st in gpu_tiles])


def operand_dtype(named_args: dict) -> torch.dtype | None:
    """The dtype of a kernel's first tensor argument (the queries, in every attention kernel here)."""
    return next((a.dtype for a in named_args.values() if isinstance(a, torch.Tensor)), None)


def split_by_operand_dtype(prune, half_configs: list, fp32_pools: dict):
    """An ``early_config_prune`` that hands ``prune`` the half-precision configs, or for float32 operands the
    pool of ``fp32_pools`` ({max head dim: configs}) that covers ``BLOCK_D`` (the widest for wider heads).

    Why float32 gets tiles of its own: its "ieee" dots (:func:`dot_precision`) run on the CUDA cores with both
    operands held in registers, so the tensor-core tiles of bf16/fp16 spill hundreds to thousands of bytes per
    thread on sm_90; the fp32 pools are the tiles that lower without spilling (``bench/compile_sm90.py``)."""
    widths = sorted(fp32_pools)

    def choose(configs, named_args, **kwargs):
        if operand_dtype(named_args) != torch.float32:
            return prune(half_configs, named_args, **kwargs)
        width = {**named_args, **kwargs}["BLOCK_D"]
        return prune(fp32_pools[next((w for w in widths if width <= w), widths[-1])], named_args, **kwargs)
    return choose


def prune_wide_head_tiles(configs, named_args, **kwargs):
    """Head dims above 128 keep the tiles of at most 64 x 64 (registers and shared memory)."""
    if {**named_args, **kwargs}["BLOCK_D"] <= 128:
        return configs
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    return kept or configs[-1:]


def prune_to_chunk(configs, named_args, **kwargs):
    """Chunked (local, LSH) attention: tiles no wider than the chunk ``C`` (as a power of two >= 16), and at most
    64 x 64 above a head dim of 128; if none is left, the smallest tile shrunk to the chunk."""
    args = {**named_args, **kwargs}
    cap = max(16, runtime.next_power_of_2(args["C"]))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap and c.kwargs["BLOCK_N"] <= cap
            and (args["BLOCK_D"] <= 128 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64)]
    if kept:
        return kept
    small = min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
    return [triton.Config({"BLOCK_M": min(small.kwargs["BLOCK_M"], cap), "BLOCK_N": min(small.kwargs["BLOCK_N"], cap)},
                          num_warps=small.num_warps, num_stages=small.num_stages)]


def autotuned(fn, tiles: list, key: list, prune=prune_wide_head_tiles, heuristics: dict | None = None,
              fp32_tiles: dict | None = None):
    """``fn`` autotuned over ``tiles`` (see :func:`tile_configs`) on ``key``, pruned by ``prune``; optional
    ``triton.heuristics`` (derived constexprs such as an even-tile flag) apply under the autotuner.
    ``fp32_tiles`` ({max head dim: tiles}): the tiles float32 operands take instead (see
    :func:`split_by_operand_dtype`); the autotuner keys on the argument dtypes, so each dtype keeps its own pick."""
    if heuristics:
        fn = triton.heuristics(heuristics)(fn)
    configs, prune = _with_fp32_pools(tile_configs(tiles), prune, fp32_tiles, tile_configs)
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})(fn)


def _with_fp32_pools(configs: list, prune, fp32_entries: dict | None, make_configs):
    """(configs, prune) with the float32 pools ``make_configs(entries)`` per max head dim appended and the prune
    split by operand dtype; unchanged without pools or off the GPU (one config for every dtype there)."""
    if not fp32_entries or not tuning_on_gpu():
        return configs, prune
    pools = {width: make_configs(entries) for width, entries in fp32_entries.items()}
    return configs + [c for pool in pools.values() for c in pool], split_by_operand_dtype(prune, configs, pools)


# flash-decoding split kernels: (BLOCK_N, warps, stages, programs per SM the split count aims at); the first was
# the fixed choice before. A decode step is memory-bound: the tile, the pipelining depth and the split count set
# how many key bytes are in flight per SM. Autotuned on the first (eager) step, so a CUDA-graph capture finds
# the choice cached.
DECODE_CONFIGS = [(64, 4, 3, 2), (64, 4, 4, 4), (64, 4, 3, 8), (128, 8, 3, 4), (128, 4, 2, 2), (128, 8, 2, 8),
                  (64, 8, 4, 4), (32, 4, 4, 8)]


def decode_autotuned(fn, key: list, prune=None, fp32_configs: dict | None = None):
    """``fn`` (a split kernel with ``BLOCK_N`` and ``SPLIT_FACTOR`` constexprs) autotuned over
    :data:`DECODE_CONFIGS`; under the interpreter one small config with 3 splits (:func:`decode_splits`).
    ``fp32_configs`` ({max head dim: configs as in DECODE_CONFIGS}): what float32 queries take instead."""
    if runtime.interpreter_enabled():
        configs = [triton.Config({"BLOCK_N": 32, "SPLIT_FACTOR": 1}, num_warps=4, num_stages=1)]
    else:
        configs = _decode_configs(DECODE_CONFIGS)
        if fp32_configs:
            configs, prune = _with_fp32_pools(configs, prune or _keep_all, fp32_configs, _decode_configs)
    return triton.autotune(configs=configs, key=key,
                           prune_configs_by={"early_config_prune": prune} if prune else None)(fn)


def _decode_configs(entries: list) -> list:
    return runtime.autotune_configs([triton.Config({"BLOCK_N": n, "SPLIT_FACTOR": f}, num_warps=w, num_stages=st)
                                     for n, w, st, f in entries])


def _keep_all(configs, named_args, **kwargs):
    return configs


def decode_splits(nmax: int, block_n: int, factor: int, programs: int, sms: int | None) -> int:
    """Splits of the cache's key tiles per program row (``programs`` rows: batch x heads or KV groups): enough
    for about ``factor`` programs per SM when the rows alone cannot fill the GPU (at most one split per tile);
    3 on the CPU (``sms`` None), so the interpreter exercises the combine step. A split kernel derives its key
    range from the split count: ``cdiv(cdiv(nmax, block_n), splits) * block_n`` keys each."""
    n_blocks = triton.cdiv(nmax, block_n)
    want = triton.cdiv(factor * sms, programs) if sms is not None else 3
    per_split = triton.cdiv(n_blocks, max(1, min(n_blocks, want)))
    return triton.cdiv(n_blocks, per_split)


def multiprocessors(t: torch.Tensor) -> int | None:
    """The SM count of ``t``'s GPU (132, an H100/H200, when lowering without a device); None on the CPU."""
    if not runtime.on_gpu(t):
        return None
    return torch.cuda.get_device_properties(t.device).multi_processor_count if t.is_cuda else 132


def block_d(head_dim: int) -> int:
    return max(16, runtime.next_power_of_2(head_dim))  # tl.dot needs a reduction dim of at least 16


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for operands of ``dtype``: "ieee" for float32, whose 1e-4 parity contract
    tf32 (Triton's default for float32 dots) would miss. Half-precision dots are native whatever is passed:
    "tf32" there is only the default spelled out, not a rounding of fp16/bf16 operands."""
    return "ieee" if dtype == torch.float32 else "tf32"


def bhn_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def softmax_delta(out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """delta [B, H, N] float32 = sum_d dout * out for out/dout [B, H, N, D] (unit last stride)."""
    B, H, N, D = out.shape
    delta = torch.empty((B, H, N), dtype=torch.float32, device=out.device)
    block_m = DELTA_BLOCK_M if runtime.on_gpu(out) else 32
    softmax_delta_kernel[(triton.cdiv(N, block_m), B * H)](
        out, dout, delta, *bhn_strides(out), *bhn_strides(dout), H, N,
        HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_M=block_m)
    return delta


# ------------------------------------------------------------------------------------------------- reference

def softmax_attention_reference(q, k, v, scale, bias, visible, softmax_dtype, dropout_p, dropout_mask):
    """The shared eager core: (out, lse) of softmax(scale * q k^T + bias, masked by ``visible``) @ v."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    scores = scores.to(softmax_dtype).masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores.float(), dim=-1)
    has_key = visible.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1).masked_fill(~has_key, 0.0).to(q.dtype)
    if dropout_mask is not None:
        probs = probs * dropout_mask.to(probs.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v), lse

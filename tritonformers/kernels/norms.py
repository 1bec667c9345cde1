"""LayerNorm (with an optional fused residual add) and RMSNorm (HuggingFace's LlamaRMSNorm semantics).

Both normalise over the last dimension of ``x``, viewed as a contiguous [M, N] matrix of rows. Every
kernel holds a tile of ``BLOCK_M`` whole rows (``BLOCK_N = next_power_of_2(N)``) in registers, so the
statistics and the output take a single read of the input and a single write; math is float32.

* Forward: one program per tile of rows; it writes the output and the per-row float32 statistics
  (mean and 1/std for LayerNorm, 1/rms for RMSNorm), which are all that backward saves besides the
  input and the parameters.
* Backward: a fixed number of programs (a few per SM) walk the row tiles with a stride, write dx for
  each row and accumulate dweight/dbias for their rows in float32 registers; each program stores one
  row of partial sums, and a small column-sum kernel reduces those [programs, N] partials.

Widths up to :data:`MAX_WIDTH` are supported; wider rows are reported through ``runtime.unsupported``.
"""

from __future__ import annotations

import functools
import numbers

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import runtime

MAX_WIDTH = 32768
"""The widest row the kernels take: a whole row lives in registers (the backward already spills some at
16384 on sm_90, per ptxas), so wider rows would need a looped two-pass kernel."""

_TILE_ELEMENTS = 4096  # narrow rows are packed into tiles of about this many elements, enough work per program
_MAX_ROWS_PER_TILE = 16
_STAGES = (1, 2)  # backward: 2 = the next row tile's loads issued while this one reduces (software pipelining)
_PROGRAMS_PER_SM = (2, 4, 8)  # backward: programs per SM striding over the row tiles, autotuned (the H200 run
# of 2026-12-04 measured LayerNorm faster with 8 than with 2, RMSNorm slower)
_SUM_BLOCK_P, _SUM_BLOCK_N = 32, 64  # partial-sum reduction on the GPU: many programs of narrow columns


# ---------------------------------------------------------------------------------------------- configs

def _warp_configs() -> list:
    return runtime.autotune_configs([triton.Config({}, num_warps=w) for w in (4, 8, 16, 2, 1, 32)])


def _prune_warps(configs, named_args, **kwargs):
    """Keep warp counts that give each thread 4-32 elements of the tile (fewer wastes, more spills)."""
    args = {**named_args, **kwargs}
    elements = args["BLOCK_M"] * args["BLOCK_N"]
    per_thread = [elements / (32 * c.num_warps) for c in configs]
    kept = [c for c, e in zip(configs, per_thread) if 4 <= e <= 32]
    if kept:
        return kept
    return [min(zip(configs, per_thread), key=lambda ce: abs(ce[1] - 16))[0]]


def _autotune(fn):
    return triton.autotune(configs=_warp_configs(), key=["N", "BLOCK_M"],
                           prune_configs_by={"early_config_prune": _prune_warps})(fn)


def _autotune_backward(fn):
    """As :func:`_autotune`, also choosing the programs per SM (``PER_SM``: the grid size, see
    :func:`_backward_grid`) and the software-pipelining depth of their row loop (``STAGES``)."""
    configs = runtime.autotune_configs([triton.Config({"PER_SM": p, "STAGES": st}, num_warps=c.num_warps)
                                        for c in _warp_configs() for p in _PROGRAMS_PER_SM for st in _STAGES])
    return triton.autotune(configs=configs, key=["N", "BLOCK_M"],
                           prune_configs_by={"early_config_prune": _prune_warps})(fn)


def _row_tile(n: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for rows of width ``n``: whole rows, several per tile when they are narrow."""
    block_n = runtime.next_power_of_2(n)
    block_m = max(1, min(_MAX_ROWS_PER_TILE, _TILE_ELEMENTS // block_n))
    return block_m, block_n


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _backward_grid(device: torch.device, tiles: int) -> tuple:
    """(the most programs any config launches, the grid for a config): about as many programs as fit on the
    GPU at once (``PER_SM`` per multiprocessor), so each keeps its parameter-gradient sums in registers over
    many rows and the [programs, N] partials stay small."""
    if device.type == "cuda" and not runtime.interpreter_enabled():
        index = device.index if device.index is not None else torch.cuda.current_device()
        sms = _sm_count(index)
        most = max(1, min(tiles, max(_PROGRAMS_PER_SM) * sms))
        return most, lambda meta: (max(1, min(tiles, meta["PER_SM"] * sms)),)
    programs = max(1, min(tiles, 4))  # interpreter: the cost is per (program x tile) either way
    return programs, lambda meta: (programs,)


def _launched_programs(kernel, grid) -> int:
    """How many programs the autotuned backward kernel just ran (its partials rows to reduce)."""
    return grid(kernel.best_config.all_kwargs())[0]


# ---------------------------------------------------------------------------------------------- kernels

@_autotune
@triton.jit
def _layer_norm_fwd_kernel(X, R, W, B, Y, S, MEAN, RSTD, M, N, eps,
                           HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """LayerNorm of a tile of BLOCK_M rows of the row-major [M, N] input.

    With HAS_R: s = round_to_dtype(x + r) is written to S (the residual stream) and normalised, as
    ``layer_norm(x + r)`` in the input dtype does. Then mean = sum(s) / N, var = sum((s - mean)^2) / N
    (biased), rstd = 1 / sqrt(var + eps), y = (s - mean) * rstd * w + b, all in float32; Y gets y in its
    dtype, MEAN and RSTD [M] the float32 statistics.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_R:
        s = (x + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + offs, s, mask=mask)
        x = s.to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / N + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@_autotune_backward
@triton.jit
def _layer_norm_bwd_kernel(X, W, MEAN, RSTD, DY, DS, DX, DR, DW_PART, DB_PART, M, N,
                           HAS_W: tl.constexpr, HAS_DS: tl.constexpr, HAS_DX: tl.constexpr,
                           HAS_DR: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PER_SM: tl.constexpr,
                           STAGES: tl.constexpr):
    """LayerNorm backward over the row tiles pid, pid + P, ... of the [M, N] input X (P programs).

    With xhat = (x - mean) * rstd and g = dy * w:
    dx = rstd * (g - xhat * mean(g * xhat) - mean(g)) (+ ds, the gradient reaching the residual sum),
    written to DX and, for the residual, DR. The program's sums of dy * xhat and dy over its rows go to
    row pid of DW_PART / DB_PART [P, N] (float32), reduced afterwards.
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tile in tl.range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0), num_stages=STAGES):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_DX or HAS_DR:
            g = dy * w[None, :] if HAS_W else dy
            c1 = tl.sum(g * xhat, axis=1) / N
            c2 = tl.sum(g, axis=1) / N
            dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            if HAS_DS:
                dx += tl.load(DS + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_DX:
                tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_DR:
                tl.store(DR + offs, dx.to(DR.dtype.element_ty), mask=mask)
        if HAS_DW:
            dw_acc += dy * xhat
        if HAS_DB:
            db_acc += dy
    if HAS_DW:
        tl.store(DW_PART + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    if HAS_DB:
        tl.store(DB_PART + pid * N + cols, tl.sum(db_acc, axis=0), mask=col_ok)


@_autotune
@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, M, N, eps,
                         HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """HuggingFace RMSNorm of a tile of BLOCK_M rows of the row-major [M, N] input.

    rstd = 1 / sqrt(sum(x^2) / N + eps) in float32 (to RSTD [M]); n = round_to_x_dtype(x * rstd);
    y = round_to_y_dtype(w * n) with the product in float32, which is exactly ``weight * n`` in torch's
    promoted dtype of (weight, x); without a weight y = n.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
    y = (x * rstd[:, None]).to(X.dtype.element_ty)
    if HAS_W:
        y = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :] * y.to(tl.float32)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@_autotune_backward
@triton.jit
def _rms_norm_bwd_kernel(X, W, RSTD, DY, DX, DW_PART, M, N,
                         HAS_W: tl.constexpr, HAS_DX: tl.constexpr, HAS_DW: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PER_SM: tl.constexpr,
                         STAGES: tl.constexpr):
    """RMSNorm backward over the row tiles pid, pid + P, ... of the [M, N] input X (P programs).

    With nhat = x * rstd and g = dy * w (dy without a weight): dx = rstd * (g - nhat * mean(g * nhat)),
    the rounding of nhat to x's dtype treated as identity, as autograd does. The program's sum of
    dy * round_to_x_dtype(nhat) (the value the weight multiplied) goes to row pid of DW_PART [P, N].
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tile in tl.range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0), num_stages=STAGES):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        nhat = x * rstd[:, None]
        if HAS_DX:
            g = dy * w[None, :] if HAS_W else dy
            c = tl.sum(g * nhat, axis=1) / N
            dx = (g - nhat * c[:, None]) * rstd[:, None]
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DW:
            dw_acc += dy * nhat.to(X.dtype.element_ty).to(tl.float32)
    if HAS_DW:
        tl.store(DW_PART + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)


@triton.jit
def _sum_rows_kernel(PART, OUT, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT[n] = sum_p PART[p, n] for the float32 row-major [P, N] partials; one program per BLOCK_N columns."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        mask = (rows < P)[:, None] & col_ok[None, :]
        acc += tl.load(PART + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=col_ok)


# ---------------------------------------------------------------------------------------------- launchers

def _check_rows(x: torch.Tensor, name: str) -> tuple[int, int]:
    runtime.check_tensor(x, name, ndim=2)
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (use runtime.as_rows)")
    m, n = x.shape
    if not 0 < n <= MAX_WIDTH:
        raise ValueError(f"{name}: rows of width {n} are outside the kernel's range 1..{MAX_WIDTH}")
    return m, n


def _check_like(t: torch.Tensor | None, name: str, x: torch.Tensor) -> None:
    if t is not None and (tuple(t.shape) != tuple(x.shape) or not t.is_contiguous()):
        raise ValueError(f"{name} must be a contiguous tensor of shape {list(x.shape)}, got {list(t.shape)}")


def _partials(programs: int, n: int, device: torch.device, wanted: bool) -> torch.Tensor | None:
    """The [programs, N] float32 buffer of per-program parameter-gradient sums (None when not wanted)."""
    return torch.empty((programs, n), dtype=torch.float32, device=device) if wanted else None


def _reduce_partials(part: torch.Tensor | None, like: torch.Tensor | None, out: torch.Tensor | None,
                     name: str) -> torch.Tensor | None:
    """Column sums of the [P, N] float32 partials into a [N] tensor of ``like``'s dtype (or ``out``)."""
    if part is None:
        return None
    out = runtime.check_out(out, name, like)
    programs, n = part.shape
    if runtime.on_gpu(part):
        block_p, block_n = _SUM_BLOCK_P, _SUM_BLOCK_N
    else:  # interpreter: few, wide programs (its cost is per program, not per element)
        block_p, block_n = runtime.next_power_of_2(programs), runtime.next_power_of_2(n)
    _sum_rows_kernel[(triton.cdiv(n, block_n),)](part, out, programs, n, BLOCK_P=block_p, BLOCK_N=block_n)
    return out


def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                   residual: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                   residual_out: torch.Tensor | None = None, mean: torch.Tensor | None = None,
                   rstd: torch.Tensor | None = None):
    """Launch the LayerNorm forward on contiguous rows ``x`` [M, N] (and ``residual`` [M, N]).

    Returns ``(y, s, mean, rstd)``: y [M, N] in x's dtype, s = x + residual [M, N] (None without a
    residual), mean and rstd [M] float32. ``out``/``residual_out``/``mean``/``rstd`` are optional
    preallocated outputs.
    """
    m, n = _check_rows(x, "x")
    _check_like(residual, "residual", x)
    y = runtime.check_out(out, "out", x)
    s = runtime.check_out(residual_out, "residual_out", x) if residual is not None else None
    mean = runtime.check_out(mean, "mean", x, shape=(m,), dtype=torch.float32)
    rstd = runtime.check_out(rstd, "rstd", x, shape=(m,), dtype=torch.float32)
    if m == 0:
        return y, s, mean, rstd
    block_m, block_n = _row_tile(n)
    _layer_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
        x, x if residual is None else residual, x if weight is None else weight, x if bias is None else bias,
        y, x if s is None else s, mean, rstd, m, n, float(eps),
        HAS_R=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n)
    return y, s, mean, rstd


def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                   rstd: torch.Tensor, *, dsum: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   compute_dx: bool = True, compute_dresidual: bool = False, compute_dweight: bool = True,
                   compute_dbias: bool = True, dx: torch.Tensor | None = None,
                   dresidual: torch.Tensor | None = None, dweight: torch.Tensor | None = None,
                   dbias: torch.Tensor | None = None):
    """Launch the LayerNorm backward on contiguous rows.

    ``x`` [M, N] is the tensor that was normalised (x + residual when there was one), ``dy`` [M, N] the
    gradient of the output, ``dsum`` [M, N] that of the residual sum (added to dx). ``bias`` gives only
    the dtype of dbias. Returns ``(dx, dresidual, dweight, dbias)``, each None unless asked for (dweight
    needs a weight, dbias a bias); dresidual equals dx. The ``d*`` keywords take preallocated outputs.
    """
    m, n = _check_rows(x, "x")
    _check_like(dy, "dy", x)
    _check_like(dsum, "dsum", x)
    device = x.device
    dx = runtime.check_out(dx, "dx", x) if compute_dx else None
    dres = runtime.check_out(dresidual, "dresidual", x) if compute_dresidual else None
    block_m, block_n = _row_tile(n)
    programs, grid = _backward_grid(device, triton.cdiv(m, block_m))
    dw_part = _partials(programs, n, device, compute_dweight and weight is not None)
    db_part = _partials(programs, n, device, compute_dbias and bias is not None)
    if m > 0:
        _layer_norm_bwd_kernel[grid](
            x, x if weight is None else weight, mean, rstd, dy, x if dsum is None else dsum,
            x if dx is None else dx, x if dres is None else dres,
            mean if dw_part is None else dw_part, mean if db_part is None else db_part, m, n,
            HAS_W=weight is not None, HAS_DS=dsum is not None, HAS_DX=dx is not None, HAS_DR=dres is not None,
            HAS_DW=dw_part is not None, HAS_DB=db_part is not None, BLOCK_M=block_m, BLOCK_N=block_n)
        used = _launched_programs(_layer_norm_bwd_kernel, grid)
        dw_part, db_part = (None if p is None else p[:used] for p in (dw_part, db_part))
    else:
        for p in (dw_part, db_part):
            if p is not None:
                p.zero_()
    return (dx, dres, _reduce_partials(dw_part, weight, dweight, "dweight"),
            _reduce_partials(db_part, bias, dbias, "dbias"))


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, eps: float, *, out: torch.Tensor | None = None,
                 rstd: torch.Tensor | None = None):
    """Launch the RMSNorm forward on contiguous rows ``x`` [M, N].

    Returns ``(y, rstd)``: y [M, N] in the promoted dtype of (weight, x) (x's dtype without a weight),
    rstd [M] float32. ``out``/``rstd`` are optional preallocated outputs.
    """
    m, n = _check_rows(x, "x")
    y_dtype = x.dtype if weight is None else torch.promote_types(weight.dtype, x.dtype)
    y = runtime.check_out(out, "out", x, dtype=y_dtype)
    rstd = runtime.check_out(rstd, "rstd", x, shape=(m,), dtype=torch.float32)
    if m == 0:
        return y, rstd
    block_m, block_n = _row_tile(n)
    _rms_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
        x, x if weight is None else weight, y, rstd, m, n, float(eps),
        HAS_W=weight is not None, BLOCK_M=block_m, BLOCK_N=block_n)
    return y, rstd


def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor, *,
                 compute_dx: bool = True, compute_dweight: bool = True, dx: torch.Tensor | None = None,
                 dweight: torch.Tensor | None = None):
    """Launch the RMSNorm backward on contiguous rows ``x`` and ``dy`` [M, N].

    Returns ``(dx, dweight)``: dx [M, N] in x's dtype, dweight [N] in the weight's dtype, each None
    unless asked for (dweight needs a weight). The ``d*`` keywords take preallocated outputs.
    """
    m, n = _check_rows(x, "x")
    _check_like(dy, "dy", x)
    dx = runtime.check_out(dx, "dx", x) if compute_dx else None
    block_m, block_n = _row_tile(n)
    programs, grid = _backward_grid(x.device, triton.cdiv(m, block_m))
    dw_part = _partials(programs, n, x.device, compute_dweight and weight is not None)
    if m > 0:
        _rms_norm_bwd_kernel[grid](
            x, x if weight is None else weight, rstd, dy, x if dx is None else dx,
            rstd if dw_part is None else dw_part, m, n,
            HAS_W=weight is not None, HAS_DX=dx is not None, HAS_DW=dw_part is not None,
            BLOCK_M=block_m, BLOCK_N=block_n)
        if dw_part is not None:
            dw_part = dw_part[:_launched_programs(_rms_norm_bwd_kernel, grid)]
    elif dw_part is not None:
        dw_part.zero_()
    return dx, _reduce_partials(dw_part, weight, dweight, "dweight")


# ---------------------------------------------------------------------------------------------- autograd

class LayerNormFunction(torch.autograd.Function):
    """y = LayerNorm(x [+ residual]); with a residual the outputs are (y, x + residual)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps):
        shape = x.shape
        x2 = runtime.as_rows(x)
        r2 = None if residual is None else runtime.as_rows(residual)
        y, s, mean, rstd = layer_norm_fwd(x2, weight, bias, eps, r2)
        ctx.save_for_backward(x2 if s is None else s, weight, bias, mean, rstd)
        ctx.set_materialize_grads(False)
        if s is None:
            return y.view(shape)
        return y.view(shape), s.view(shape)

    @staticmethod
    def backward(ctx, dy, dsum=None):
        normed, weight, bias, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b, need_r, _ = ctx.needs_input_grad
        if dy is None:  # only the residual sum was used: its gradient passes straight through
            ds = dsum.to(normed.dtype)
            return (ds if need_x else None), None, None, (ds.clone() if need_r else None), None
        dy2 = runtime.as_rows(dy)
        ds2 = None if dsum is None else runtime.as_rows(dsum)
        dx, dres, dw, db = layer_norm_bwd(
            dy2, normed, weight, mean, rstd, dsum=ds2, bias=bias, compute_dx=need_x,
            compute_dresidual=need_r, compute_dweight=need_w, compute_dbias=need_b)
        dx = None if dx is None else dx.view(dy.shape)
        dres = None if dres is None else dres.view(dy.shape)
        return dx, dw, db, dres, None


class RMSNormFunction(torch.autograd.Function):
    """y = weight * round_to_x_dtype(x * rsqrt(mean(x^2) + eps)), HuggingFace's RMSNorm."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = runtime.as_rows(x)
        y, rstd = rms_norm_fwd(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        need_x, need_w, _ = ctx.needs_input_grad
        dx, dw = rms_norm_bwd(runtime.as_rows(dy), x2, weight, rstd, compute_dx=need_x, compute_dweight=need_w)
        return (None if dx is None else dx.view(dy.shape)), dw, None


# ---------------------------------------------------------------------------------------------- public ops

def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    if not eps >= 0 or eps == float("inf"):
        raise ValueError(f"eps must be a finite non-negative number, got {eps}")
    return float(eps)


def check_residual(x: torch.Tensor, residual: torch.Tensor | None):
    """(x, residual), checked; two float dtypes (autocast hands a bf16 activation next to a float32
    residual) are promoted to the wider one first, as ``x + residual`` in torch would."""
    if residual is None:
        return x, None
    runtime.check_tensor(residual, "residual")
    runtime.check_same_device(x=x, residual=residual)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {list(x.shape)}, got {list(residual.shape)}")
    wide = torch.promote_types(x.dtype, residual.dtype)
    return x.to(wide), residual.to(wide)


def _check_param(p, name: str, x: torch.Tensor) -> None:
    if p is None:
        return
    runtime.check_tensor(p, name)
    runtime.check_shape(p, name, (x.shape[-1],))
    runtime.check_same_device(x=x, **{name: p})


def _check_input(x) -> None:
    runtime.check_tensor(x, "x", min_ndim=1)
    if x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")


def _kernel_fits(x: torch.Tensor, op: str) -> bool:
    if x.shape[-1] > MAX_WIDTH:
        runtime.unsupported(op, f"rows wider than {MAX_WIDTH} (got {x.shape[-1]})")
        return False
    return True


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5,
               residual: torch.Tensor | None = None):
    """LayerNorm over the last dimension, optionally fused with the pre-norm residual add.

    ``x`` [..., N] float32/float16/bfloat16; ``weight``/``bias`` [N] or None (no scale / no shift);
    ``residual`` [..., N] like x or None (of another float dtype under autocast: both are promoted to the
    wider one first). Computes s = x + residual (rounded to x's dtype), then
    ``(s - mean) / sqrt(var + eps) * weight + bias`` with the biased variance in float32, output in x's
    dtype, as ``torch.nn.functional.layer_norm``. Returns y, or ``(y, s)`` when a residual is given;
    gradients flow to x, residual, weight and bias (and from both outputs).
    """
    from ..nn import functional  # the one dispatcher: validation, backend, the custom op

    return functional.layer_norm(x, weight, bias, eps, residual)


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         eps: float = 1e-5, residual: torch.Tensor | None = None):
    """Eager :func:`layer_norm`: ``F.layer_norm(x [+ residual])`` in x's dtype, as HF's ``nn.LayerNorm``."""
    if residual is not None:
        s = x + residual
        return F.layer_norm(s, (s.shape[-1],), weight, bias, eps), s
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """HuggingFace's RMSNorm (LlamaRMSNorm, DiffLlamaRMSNorm) over the last dimension.

    ``x`` [..., N] float32/float16/bfloat16, ``weight`` [N] or None (no scale, DiffLlama's group norm).
    ``n = (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)`` with x32 = x in float32, then ``weight * n``
    in the promoted dtype of (weight, x): a float32 weight with bf16 input gives a float32 output.
    Gradients flow to x and weight.
    """
    from ..nn import functional  # the one dispatcher: validation, backend, the custom op

    return functional.rms_norm(x, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Eager :func:`rms_norm`, line for line HuggingFace's ``LlamaRMSNorm.forward``."""
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    normed = (x32 * torch.rsqrt(variance + eps)).to(x.dtype)
    return normed if weight is None else weight * normed


__all__ = [
    "MAX_WIDTH", "layer_norm", "layer_norm_reference", "rms_norm", "rms_norm_reference",
    "layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "rms_norm_bwd", "LayerNormFunction", "RMSNormFunction",
]

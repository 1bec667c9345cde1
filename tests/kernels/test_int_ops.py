"""I-BERT's integer kernels (kernels/int_ops.py, kernels/int_gemm.py).

* Triton vs the torch integer references: bit-exact, for every option, with poisoned ``out=`` buffers.
* The exact helpers (fixed point, 96-bit multiply-round-shift, integer Newton sqrt) vs Python integers.
* The references vs transformers' quant_modules on the same inputs: bit-exact where HF's arithmetic is
  integer-valued (FixedPointMul, the quantizer, the GEMM, GELU/LN after their requantization); the
  softmax differs by +-1 on a few elements (HF's float32 ``exp / exp_sf``, specs/ibert.md section 6).
* Bad inputs raise TypeError/ValueError before any launch.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import triton
import triton.language as tl
from transformers.models.ibert import quant_modules as hq

from tests.helpers import DEVICE, poison
from tritonformers import runtime
from tritonformers.kernels import int_gemm as ig
from tritonformers.kernels import int_ops as io

FP = io.FixedPoint


def _triton(fn, *args, **kwargs):
    with runtime.use_backend("triton"):
        return fn(*args, **kwargs)


def _torch(fn, *args, **kwargs):
    with runtime.use_backend("torch"):
        return fn(*args, **kwargs)


def _equal(a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, f"{msg}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    diff = (a.long() != b.long()).sum().item()
    assert diff == 0, f"{msg}: {diff} of {a.numel()} elements differ"


def _rhe_div(p: int, e: int) -> int:
    """Python-integer oracle: round half to even of p / 2**e (e >= 0)."""
    q, r = divmod(p, 1 << e)
    return q + (2 * r > (1 << e) or (2 * r == (1 << e) and q & 1))


def _scales(n: int, lo: float = 1e-3, hi: float = 5e-2) -> torch.Tensor:
    return (torch.rand(n) * (hi - lo) + lo).to(DEVICE)


def _ints(shape, bound: int, dtype=torch.int32) -> torch.Tensor:
    return torch.randint(-bound, bound + 1, shape, dtype=torch.int64).to(dtype).to(DEVICE)


def _hf_requant(x_int: torch.Tensor, sx, bits, sz, identity=None, s_id=None) -> torch.Tensor:
    """HF's FixedPointMul on the real values of integer inputs, as integers."""
    idf = None if identity is None else identity.double().float() * s_id
    out = hq.FixedPointMul.apply(x_int.float() * sx, sx, bits, sz, idf, s_id)
    return out.long()


# ------------------------------------------------------------------------------------ exact helpers

def test_fixed_point_matches_batch_frexp():
    torch.manual_seed(1)
    r = torch.rand(2000, dtype=torch.float64) * 10.0 ** torch.randint(-14, 4, (2000,)).double()
    r = r * (torch.randint(0, 2, (2000,)) * 2 - 1)
    k = torch.randint(2 ** 30, 2 ** 31, (200,), dtype=torch.int64).double()
    ties = (k + 0.5) / 2 ** 31 * 2.0 ** torch.randint(-40, 5, (200,)).double()  # mant * 2**31 ends in .5
    r = torch.cat([r, ties, -ties, torch.tensor([0.0, 1.0, 0.5, 2.0 ** -40, 1 - 2 ** -53], dtype=torch.float64)])
    m, e = hq.batch_frexp(r)
    fp = io.fixed_point(r.to(DEVICE))
    assert torch.equal(fp.multiplier.cpu(), m.long()) and torch.equal(fp.shift.cpu().double(), e)
    assert fp.multiplier.abs().max().item() == 2 ** 31  # the mantissa that rounds up to 2**31 occurs
    torch.testing.assert_close(io.requant_params(torch.tensor([0.3]), torch.tensor([0.1])).shift,
                               torch.tensor([29]), rtol=0, atol=0)


def _edge_fixed_points(n: int, gen: random.Random):
    ms, es = [], []
    for _ in range(n):
        big = gen.randint(2 ** 30, 2 ** 31)
        ms.append(gen.choice([0, 2 ** 31, -2 ** 31, 2 ** 30, big, -big]))
        es.append(gen.choice([gen.randint(-3, 100), 0, 1, 31, 32, 33, 62, 63, 64, 94, 95, gen.randint(25, 60)]))
    return ms, es


def test_mul_round_shift_reference_is_exact():
    gen = random.Random(0)
    xs = [gen.choice([gen.randint(-2 ** 62, 2 ** 62), gen.randint(-2 ** 33, 2 ** 33), gen.randint(-300, 300)])
          for _ in range(3000)]
    ms, es = _edge_fixed_points(3000, gen)
    for e in range(31, 80):  # exact ties x * m = (2k + 1) * 2**(e - 1)
        for k in (0, 1, -1, -2, 2):
            xs.append((2 * k + 1) << (e - 31))
            ms.append(2 ** 30)
            es.append(e)
    x, m, e = (torch.tensor(v) for v in (xs, ms, es))
    want = [max(-2 ** 62, min(2 ** 62, _rhe_div(a * b, c))) if c >= 0 else
            (0 if a * b == 0 else (2 ** 62 if a * b > 0 else -2 ** 62)) for a, b, c in zip(xs, ms, es)]
    assert io.mul_round_shift_reference(x, m, e).tolist() == want


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_requantize_kernel_matches_reference_on_edge_fixed_points(dtype):
    """Triton's 96-bit (int64 input) and narrow (int32 input, normalized shifts) paths vs the exact reference
    over shifts -3..100, multipliers 0 / +-2**30..2**31 and inputs up to 2**62 (clamped to 32 bits)."""
    gen = random.Random(1)
    c = 96
    ms, es = _edge_fixed_points(c, gen)
    fp = FP(torch.tensor(ms, device=DEVICE), torch.tensor(es, device=DEVICE))
    bound = 2 ** 62 if dtype == torch.int64 else 2 ** 31 - 1
    x = torch.tensor([[gen.randint(-bound, bound) for _ in range(c)] for _ in range(4)] +
                     [[gen.randint(-300, 300) for _ in range(c)] for _ in range(4)], dtype=dtype, device=DEVICE)
    for bits in (8, 32):
        out = poison(torch.empty(x.shape, dtype=io.int_dtype(bits), device=DEVICE))
        got = _triton(io.requantize, x, fp, bits, out=out)
        assert got is out
        _equal(got, io.requantize_reference(x, fp, bits), f"bits {bits}")


def test_isqrt_exact():
    gen = random.Random(2)
    roots = [gen.randint(0, 3 * 2 ** 30) for _ in range(200)] + [1, 2, 3, 2 ** 31 - 1, 3037000499]
    values = [r * r + d for r in roots for d in (-1, 0, 1) if r * r + d >= 0 and r * r + d < 2 ** 63]
    values += [gen.randint(0, 2 ** 62) for _ in range(300)] + [0, 1, 2, 3, 4, 2 ** 62, 2 ** 63 - 1]
    n = torch.tensor(values, dtype=torch.int64)
    want = [math.isqrt(v) for v in values]
    assert io.isqrt_reference(n).tolist() == want

    @triton.jit
    def kernel(N, OUT, L, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(OUT + i, io._isqrt(tl.load(N + i, mask=i < L, other=0)), mask=i < L)

    out = poison(torch.empty_like(n)).to(DEVICE)
    with runtime.use_backend("triton"):
        runtime.use_triton(out, op="isqrt")  # raises where the interpreter is off on a CPU machine
    kernel[(1,)](n.to(DEVICE), out, len(values), BLOCK=triton.next_power_of_2(len(values)))
    assert out.cpu().tolist() == want


# ------------------------------------------------------------------------------------ quantize / requantize

QUANTIZE_CASES = [  # (shape, per-row scale, bits, dtype)
    ([40, 72], True, 8, torch.float32),    # a weight, one scale per output row
    ([50], True, 32, torch.float32),       # a bias, one scale per element
    ([3, 7, 33], False, 16, torch.float32),  # an activation, per tensor
    ([5, 130], False, 8, torch.float16),
]


@pytest.mark.parametrize("shape,per_row,bits,dtype", QUANTIZE_CASES)
def test_quantize_matches_hf(shape, per_row, bits, dtype):
    x = (torch.randn(shape) * 3).to(dtype).to(DEVICE)
    scale = _scales(shape[0]) if per_row else _scales(1)
    if bits == 32:  # values beyond 2**24 (float32 integers); HF's clamp to 2**31 - 2 would round to 2**31
        scale = scale * 1e-4
        x[0] = 2.5 * scale[0]  # an exact tie, rounded to even
    got = _triton(io.quantize, x, scale, bits, out=poison(torch.empty(shape, dtype=io.int_dtype(bits), device=DEVICE)))
    ref = io.quantize_reference(x, scale, bits)
    _equal(got, ref, "triton vs reference")
    hf = hq.SymmetricQuantFunction.apply(x.float(), bits, False, scale)
    _equal(ref, hf.to(ref.dtype), "reference vs HF")
    n = 2 ** (bits - 1) - 1
    assert ref.min() >= -n and ref.max() <= n - 1


REQUANT_CASES = [  # (x dtype, bound, channels, per-channel, bits, residual dtype)
    (torch.int32, 2 ** 17, 48, True, 8, None),          # a linear layer's accumulator -> int8
    (torch.int16, 2 ** 15, 40, False, 22, torch.int8),  # a residual add into the 22-bit LN input
    (torch.int8, 127, 33, False, 16, torch.int8),       # the embedding sums (16 bit)
    (torch.int32, 2 ** 21, 24, True, 8, torch.int16),
]


@pytest.mark.parametrize("dtype,bound,c,per_channel,bits,res_dtype", REQUANT_CASES)
def test_requantize_matches_hf(dtype, bound, c, per_channel, bits, res_dtype):
    x = _ints([3, 11, c], bound, dtype)
    sx = _scales(c if per_channel else 1, 1e-5, 1e-3)
    sz = _scales(1, 1e-2, 5e-2) if bits == 8 else _scales(1, 1e-6, 1e-5)
    fp = io.requant_params(sx, sz)
    res = res_fp = s_id = None
    if res_dtype is not None:
        res = _ints([3, 11, c], 127 if res_dtype == torch.int8 else 2 ** 15 - 1, res_dtype)
        s_id = _scales(1, 1e-2, 3e-2)
        res_fp = io.requant_params(s_id, sz)
    out = poison(torch.empty(x.shape, dtype=io.int_dtype(bits), device=DEVICE))
    got = _triton(io.requantize, x, fp, bits, residual=res, residual_requant=res_fp, out=out)
    ref = io.requantize_reference(x, fp, bits, res, res_fp)
    _equal(got, ref, "triton vs reference")
    _equal(ref.long(), _hf_requant(x, sx, bits, sz, res, s_id), "reference vs HF FixedPointMul")


# ------------------------------------------------------------------------------------ IntGELU

def _gelu_inputs(rows: int, c: int, per_channel: bool):
    scale = _scales(c if per_channel else 1, 5e-5, 3e-4)
    x = (torch.randn(rows, c, device=DEVICE) * 3 / scale).round().to(torch.int32)
    x[0, : c // 2] = 0
    x[1] = (torch.randn(c, device=DEVICE) * 20 / scale).round().to(torch.int32)  # the clip region beyond -b
    return x, scale


@pytest.mark.parametrize("rows,c,per_channel", [(9, 72, True), (5, 300, False)])
def test_int_gelu_matches_reference_and_hf(rows, c, per_channel):
    x, scale = _gelu_inputs(rows, c, per_channel)
    consts = io.gelu_constants(scale)
    raw = _triton(io.int_gelu, x, consts, out=poison(torch.empty(x.shape, dtype=torch.int64, device=DEVICE)))
    _equal(raw, io.int_gelu_reference(x, consts), "int64 output")
    # HF's IntGELU on the same accumulator, then its 8-bit QuantAct calibrated on that output
    hf_y, hf_s = hq.IntGELU(quant_mode=True)(x.float() * scale, scale)
    torch.testing.assert_close(consts.scale, hf_s, rtol=0, atol=0)
    assert consts.scale.max() < 0  # I-BERT's GELU scale is negative
    sz = io.symmetric_scale(8, hf_y.min().view(1), hf_y.max().view(1))
    fp = io.requant_params(consts.scale, sz)
    q = _triton(io.int_gelu, x, consts, fp, 8)
    _equal(q, io.int_gelu_reference(x, consts, fp, 8), "fused requantization")
    _equal(q.long(), hq.FixedPointMul.apply(hf_y, hf_s, 8, sz).long().view(q.shape), "int8 vs HF")
    # HF evaluates the polynomial on unrounded float32 x / S: its internal integers are close, not equal
    torch.testing.assert_close(raw.double(), (hf_y / hf_s).double(), rtol=1e-3, atol=1.0)


# ------------------------------------------------------------------------------------ IntSoftmax

def _softmax_setup(shape, sf_value=4e-4, calibrated=True, mask=None):
    """Scores [..., Nk], HF's IntSoftmax calibrated on them (train pass), our constants from its ranges."""
    scores = _ints(shape, 9000)
    sf = torch.tensor([sf_value], device=DEVICE)
    hf = hq.IntSoftmax(8, quant_mode=True).to(DEVICE)
    additive = None if mask is None else torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    real = scores.float() * sf if additive is None else scores.float() * sf + additive
    if calibrated:  # (a fully masked row would be NaN in HF: calibrate without the mask then)
        hf.train()
        hf(real if mask is None or mask.any(-1).all() else scores.float() * sf, sf)
    hf.eval()
    act_scale = io.symmetric_scale(16, hf.act.x_min, hf.act.x_max)
    return scores, sf, io.softmax_constants(sf, act_scale), hf, real


SOFTMAX_CASES = [  # (shape, mask kind)
    ([2, 3, 17, 40], None),
    ([2, 3, 17, 40], "keys"),       # [B, 1, 1, Nk] padding, one sequence shorter
    ([2, 2, 9, 33], "full"),        # a full [B, H, Nq, Nk] mask with a fully masked row
    ([5, 300], "row"),              # 2-D scores, a [Nk] mask
]


def _make_mask(shape, kind):
    if kind is None:
        return None
    if kind == "keys":
        m = torch.ones(shape[0], 1, 1, shape[-1], dtype=torch.bool)
        m[1, ..., 25:] = False
    elif kind == "full":
        m = torch.rand(shape) > 0.3
        m[0, 1, 4] = False
    else:
        m = torch.rand(shape[-1]) > 0.2
    return m.to(DEVICE)


@pytest.mark.parametrize("shape,kind", SOFTMAX_CASES)
def test_int_softmax_matches_reference(shape, kind):
    mask = _make_mask(shape, kind)
    scores, _, consts, _, _ = _softmax_setup(shape, mask=mask)
    out = poison(torch.empty(shape, dtype=torch.int16, device=DEVICE))
    got = _triton(io.int_softmax, scores, consts, mask, out=out)
    ref = io.int_softmax_reference(scores, consts, mask)
    _equal(got, ref, "triton vs reference")
    assert ref.min() >= 0 and ref.max() <= 256 and ref.sum(-1).max() <= 256
    if mask is not None:
        keep = mask.expand(shape)
        assert ref[~keep].abs().max() == 0, "a calibrated 16-bit act zeroes the masked keys"
        empty = ~keep.any(-1)
        assert ref[empty].abs().sum() == 0, "rows without a kept key give zeros"


@pytest.mark.parametrize("calibrated", [True, False])
def test_int_softmax_vs_hf(calibrated):
    """HF scales the scores by sf, subtracts a float max and divides the float32 exp by exp_sf (~1e33):
    its 16-bit exponents differ from the exact integer ones by 1 on ~0.1-0.3% of keys, which moves p by 1
    on ~0.01%. Uncalibrated (act range 1e-5), every exponent saturates: uniform weights, masked keys
    included, as in HF."""
    shape = [2, 3, 24, 40]
    mask = _make_mask(shape, "keys")
    scores, sf, consts, hf, real = _softmax_setup(shape, calibrated=calibrated, mask=mask)
    ours = io.int_softmax_reference(scores, consts, mask)
    p, _ = hf(real, sf)
    diff = ours.long() - (p * 256).round().long()
    assert torch.equal(p * 256, (p * 256).round())  # HF's p is integral
    assert diff.abs().max() <= 1 and (diff != 0).float().mean() < 1e-3, f"{(diff != 0).sum()} differ"
    _equal(_triton(io.int_softmax, scores, consts, mask), ours, "triton")


# ------------------------------------------------------------------------------------ IntLayerNorm

LN_CASES = [  # (rows, C, input bound, shift, bits of the fused requantization)
    (13, 96, 2 ** 21, 7, 8),   # the 22-bit attention/FFN LN input, calibrated shift
    (6, 48, 2 ** 15, 2, 8),    # the 16-bit embedding LN
    (5, 100, 2 ** 21, 0, 16),  # shift 0: the variance passes 2**32 (HF's eval never checks it)
]


def _ln_params(c):
    gamma = torch.randn(c) * 0.5 + 1
    gamma[:3] = -gamma[:3]  # negative scales flip signs through the multiplier
    gamma[3] = 1e-3  # a tiny gamma: large |beta / gamma|
    return gamma.to(DEVICE), (torch.randn(c) * 0.2).to(DEVICE)


@pytest.mark.parametrize("rows,c,bound,shift,bits", LN_CASES)
def test_int_layer_norm_matches_reference_and_hf(rows, c, bound, shift, bits):
    x = _ints([rows, c], bound)
    x[2] = x[2, 0]  # a constant row: std 0
    gamma, beta = _ln_params(c)
    bias_int, out_scale = io.layer_norm_constants(gamma, beta)
    shift_t = torch.tensor([float(shift)], device=DEVICE)  # HF's float buffer
    out = poison(torch.empty(x.shape, dtype=torch.int64, device=DEVICE))
    raw = _triton(io.int_layer_norm, x, shift_t, bias_int, out=out)
    ref = io.int_layer_norm_reference(x, shift, bias_int)
    _equal(raw, ref, "int64 output")
    _equal(ref[2], bias_int, "constant row")
    # HF's module in eval with the same shift, then a QuantAct of the given width calibrated on its output
    s_in = torch.tensor([3e-6], device=DEVICE)
    hf = hq.IntLayerNorm(c, 1e-5, quant_mode=True).to(DEVICE).eval()
    hf.weight.data, hf.bias.data, hf.shift = gamma.clone(), beta.clone(), shift_t.clone()
    keep = torch.ones(rows, dtype=torch.bool)
    keep[2] = False  # HF gives NaN on the constant row
    y, sy = hf((x[keep].float() * s_in)[None], s_in)
    torch.testing.assert_close(out_scale, sy, rtol=0, atol=0)
    sz = io.symmetric_scale(bits, y.min().view(1), y.max().view(1))
    fp = io.requant_params(out_scale, sz)
    q = _triton(io.int_layer_norm, x, shift, bias_int, fp, bits)
    _equal(q, io.int_layer_norm_reference(x, shift, bias_int, fp, bits), "fused requantization")
    hf_q = hq.FixedPointMul.apply(y, sy, bits, sz).long()[0]
    diff = (q[keep].long() - hf_q).abs()
    # HF's float32 mean/variance/sqrt: identical after requantization but for a rare 1-LSB flip
    assert diff.max() <= 1 and (diff != 0).float().mean() <= 2e-3
    torch.testing.assert_close(ref[keep].double(), (y[0] / sy).double(), rtol=2e-3, atol=2.0)


def test_int_layer_norm_large_variance_needs_int64():
    """Eval never grows the shift: sum(y**2) reaches ~2**49 here (HF: float32), exact in int64."""
    c = 512
    x = _ints([3, c], 2 ** 21)
    bias_int = torch.zeros(c, dtype=torch.int64, device=DEVICE)
    ref = io.int_layer_norm_reference(x, 0, bias_int)
    _equal(_triton(io.int_layer_norm, x, 0, bias_int), ref, "shift 0")
    y = x.long() - x.long().sum(-1, keepdim=True).div(c).round().long()
    assert (y * y).sum(-1).max() > 2 ** 48
    # out ~ y * 2**30 / sqrt(sum(y**2)), up to the integer factor floor(2**31 / std) (~77 here: 1% steps)
    torch.testing.assert_close((ref.double() / 2 ** 30).pow(2).sum(-1), torch.ones(3, device=DEVICE,
                               dtype=torch.float64), rtol=0.03, atol=0)


# ------------------------------------------------------------------------------------ int8 GEMM

LINEAR_CASES = [  # (x shape, N, bias, prescale, gelu, requant bits, per-channel requant, residual dtype)
    ([37, 72], 50, True, False, False, None, False, None),      # plain int32 accumulator + bias
    ([2, 9, 200], 40, True, False, False, 8, True, None),       # K beyond one tile, not a multiple
    ([21, 64], 96, True, False, True, 8, True, None),           # the FFN: GELU + requant in the epilogue
    ([19, 72], 48, True, True, False, 22, False, torch.int8),   # stale-scale prescale + 22-bit residual add
    ([7, 40], 33, False, False, True, None, True, None),        # a bare GELU: int64
    ([130, 24], 20, False, False, False, 16, False, None),      # no bias, per-tensor 16-bit
]


def _linear_inputs(xshape, n, bias, prescale, gelu, bits, per_channel, res_dtype):
    k = xshape[-1]
    x = _ints(xshape, 127, torch.int8)
    x[..., 0] = -128
    w = _ints([n, k], 126, torch.int8)
    w[0, :] = 126
    kw = {}
    b = _ints([n], 2 ** 20) if bias else None
    acc_scale = _scales(n, 1e-5, 1e-4)
    if prescale:
        kw["prescale"] = io.requant_params(torch.tensor([0.031], device=DEVICE), torch.tensor([0.027], device=DEVICE))
    if gelu:
        kw["gelu"] = io.gelu_constants(acc_scale)
        acc_scale = kw["gelu"].scale
    if bits is not None:
        sz = _scales(1, 1e-2, 5e-2) if bits == 8 else _scales(1, 1e-7, 1e-6)
        src = acc_scale if per_channel else acc_scale[:1]
        kw["requant"] = io.requant_params(src * (1e-4 if gelu else 1.0), sz)
        kw["bits"] = bits
    if res_dtype is not None:
        kw["residual"] = _ints([*xshape[:-1], n], 127, res_dtype)
        kw["residual_requant"] = io.requant_params(torch.tensor([0.02], device=DEVICE), sz)
    return x, w, b, kw


@pytest.mark.parametrize("case", LINEAR_CASES, ids=[str(i) for i in range(len(LINEAR_CASES))])
def test_int_linear_matches_reference(case):
    x, w, b, kw = _linear_inputs(*case)
    ref = ig.int_linear_reference(x, w, b, **kw)
    out = poison(torch.empty(ref.shape, dtype=ref.dtype, device=DEVICE))
    got = _triton(ig.int_linear, x, w, b, out=out, **kw)
    assert got is out
    _equal(got, ref, "triton vs reference")
    if not kw:  # the plain accumulator is the exact integer product
        want = x.long() @ w.long().t() + b.long()
        _equal(ref, want.to(torch.int32), "reference vs int64 matmul")


TMA_CASES = [  # K a multiple of 16 (TMA's 16-byte row alignment); M, N, K not multiples of the tiles
    ([37, 96], 50, True, False, False, None, False, None),
    ([2, 9, 160], 40, True, False, False, 8, True, None),       # two K steps, the second read past K as 0
    ([21, 64], 96, True, False, True, 8, True, None),
    ([19, 48], 48, True, True, False, 22, False, torch.int8),
    ([300, 32], 140, False, False, False, 16, False, None),     # 6 tiles over 4 persistent programs
]


@pytest.mark.parametrize("case", TMA_CASES, ids=[str(i) for i in range(len(TMA_CASES))])
def test_int_linear_tma_persistent_kernel_matches_reference(case, monkeypatch):
    """The Hopper variant (TMA descriptor loads, persistent tile loop) gives the tiled kernel's exact integers."""
    monkeypatch.setattr(ig, "_force_linear_kernel", "tma")
    x, w, b, kw = _linear_inputs(*case)
    _equal(_triton(ig.int_linear, x, w, b, **kw), ig.int_linear_reference(x, w, b, **kw), "tma vs reference")


def test_int_linear_kernel_choice():
    """TMA needs 16-byte row strides (K % 16 for int8) on a CUDA tensor; with one eligible kernel nothing is
    timed or cached."""
    unaligned = torch.zeros(4, 24, dtype=torch.int8, device=DEVICE)
    assert not ig._tma_ok(unaligned, torch.zeros(8, 24, dtype=torch.int8, device=DEVICE))
    aligned = torch.zeros(4, 32, dtype=torch.int8)
    assert not ig._tma_ok(aligned, torch.zeros(8, 32, dtype=torch.int8))  # a CPU tensor
    picked = ig._choose_linear_kernel(("key",), {"tiled": lambda: "tiled"})
    assert picked() == "tiled" and ("key",) not in ig._linear_choice


def test_int_linear_matches_hf_quant_linear():
    """QuantLinear's float emulation (x / s_in through F.linear on integer-valued floats) is exact here:
    its accumulator and HF's FixedPointMul requantization equal the integer GEMM's."""
    k, n = 80, 36
    hf = hq.QuantLinear(k, n, per_channel=True, quant_mode=True).to(DEVICE)
    hf.weight.data.normal_(0, 0.1)
    hf.bias.data.normal_(0, 0.1)
    s_in = torch.tensor([0.021], device=DEVICE)
    x = _ints([3, 5, k], 127, torch.int8)
    y, sy = hf(x.float() * s_in, s_in)
    w = hf.weight_integer.to(torch.int8)
    b = hf.bias_integer.to(torch.int32)
    acc = _triton(ig.int_linear, x, w, b)
    _equal(acc, (y / sy).round().to(torch.int32), "accumulator")
    sz = io.symmetric_scale(8, y.min().view(1), y.max().view(1))
    q = _triton(ig.int_linear, x, w, b, requant=io.requant_params(sy, sz))
    _equal(q.long(), hq.FixedPointMul.apply(y, sy, 8, sz).long(), "requantized")


# ------------------------------------------------------------------------------------ integer attention

ATTENTION_CASES = [  # (B, H, Nq, Nk, D, mask kind, return probs, strided q/k/v, requant)
    (2, 2, 37, 37, 24, "keys", True, True, True),
    (1, 3, 20, 45, 16, "full", False, False, True),
    (2, 1, 9, 70, 32, None, True, False, False),
]


def _attention_inputs(b, h, nq, nk, d, kind, strided):
    if strided:  # views of [B, N, H * D] projections, as the model produces them
        q = _ints([b, nq, h * d], 127, torch.int8).view(b, nq, h, d).transpose(1, 2)
        k = _ints([b, nk, h * d], 127, torch.int8).view(b, nk, h, d).transpose(1, 2)
        v = _ints([b, nk, h * d], 127, torch.int8).view(b, nk, h, d).transpose(1, 2)
    else:
        q, k, v = (_ints(s, 127, torch.int8) for s in ([b, h, nq, d], [b, h, nk, d], [b, h, nk, d]))
    mask = None
    if kind == "keys":
        mask = torch.ones(b, 1, 1, nk, dtype=torch.bool, device=DEVICE)
        mask[-1, ..., nk - 7:] = False
    elif kind == "full":
        mask = torch.rand(b, h, nq, nk, device=DEVICE) > 0.3
        mask[0, 0, 3] = False
    return q, k, v, mask


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=[str(i) for i in range(len(ATTENTION_CASES))])
def test_int_attention_matches_reference(case):
    b, h, nq, nk, d, kind, probs, strided, requant = case
    q, k, v, mask = _attention_inputs(b, h, nq, nk, d, kind, strided)
    sf = torch.tensor([0.03 * 0.028 / math.sqrt(d)], device=DEVICE)
    act = torch.tensor([1.5e12 * (0.03 * 0.028 / math.sqrt(d) / 3e-4) ** -2 / 32767], device=DEVICE)
    consts = io.softmax_constants(sf, act)
    fp = None
    if requant:
        fp = io.requant_params(torch.tensor([0.03 / 256], device=DEVICE), torch.tensor([0.02], device=DEVICE))
    ref = ig.int_attention_reference(q, k, v, consts, fp, mask=mask, return_probs=probs)
    out_dtype = torch.int8 if requant else torch.int32
    out = poison(torch.empty(b, nq, h, d, dtype=out_dtype, device=DEVICE))
    got = _triton(ig.int_attention, q, k, v, consts, fp, mask=mask, return_probs=probs, out=out)
    if probs:
        _equal(got[0], ref[0], "context")
        _equal(got[1], ref[1], "probabilities")
        assert got[0] is out
    else:
        _equal(got, ref, "context")
    # the reference is the unfused integer pipeline
    p = io.int_softmax_reference(ig.int_matmul_reference(q, k.transpose(-1, -2)).to(torch.int32), consts, mask)
    assert (p > 0).any()


# ------------------------------------------------------------------------------------ validation

def test_bad_inputs_raise():
    x8 = _ints([4, 16], 127, torch.int8)
    w8 = _ints([8, 16], 127, torch.int8)
    fp1 = io.requant_params(torch.tensor([0.01], device=DEVICE), torch.tensor([0.02], device=DEVICE))
    with pytest.raises(TypeError, match="x must have dtype int8"):
        ig.int_linear(x8.float(), w8)
    with pytest.raises(TypeError, match="weight must have dtype int8"):
        ig.int_linear(x8, w8.int())
    with pytest.raises(ValueError, match="last dimension"):
        ig.int_linear(x8, _ints([8, 12], 127, torch.int8))
    with pytest.raises(TypeError, match="bias must have dtype int32"):
        ig.int_linear(x8, w8, torch.zeros(8, device=DEVICE))
    with pytest.raises(ValueError, match="1 or 8 elements"):
        ig.int_linear(x8, w8, requant=FP(torch.zeros(3, dtype=torch.int64, device=DEVICE),
                                         torch.zeros(3, dtype=torch.int64, device=DEVICE)))
    with pytest.raises(ValueError, match="pass requant too"):
        ig.int_linear(x8, w8, residual=_ints([4, 8], 5, torch.int8), residual_requant=fp1)
    with pytest.raises(TypeError, match="requant must be a FixedPoint"):
        io.requantize(x8, (1, 2))
    with pytest.raises(ValueError, match="bits must be in 2..32"):
        io.requantize(x8, fp1, 40)
    with pytest.raises(TypeError, match="x must have dtype"):
        io.requantize(x8.float(), fp1)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        io.requantize(x8, fp1, residual=x8[:2], residual_requant=fp1)
    with pytest.raises(TypeError, match="x must have dtype float32"):
        io.quantize(x8, torch.ones(1, device=DEVICE))
    with pytest.raises(ValueError, match="one per row"):
        io.quantize(torch.randn(4, 16, device=DEVICE), torch.ones(3, device=DEVICE))
    consts = io.softmax_constants(torch.tensor([1e-3], device=DEVICE), torch.tensor([1e9], device=DEVICE))
    s32 = _ints([2, 5, 6], 100)
    with pytest.raises(TypeError, match="scores must have dtype int32"):
        io.int_softmax(s32.float(), consts)
    with pytest.raises(TypeError, match="mask must have dtype bool"):
        io.int_softmax(s32, consts, torch.ones(6, device=DEVICE))
    with pytest.raises(ValueError, match="must broadcast"):
        io.int_softmax(s32, consts, torch.ones(3, 6, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="x must have dtype"):
        io.int_gelu(x8.long(), io.gelu_constants(torch.ones(1, device=DEVICE)))
    with pytest.raises(ValueError, match="bias_int must have 16 elements"):
        io.int_layer_norm(x8.int(), 0, torch.zeros(3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="shift must be in 0..62"):
        io.int_layer_norm(x8.int(), -1, torch.zeros(16, dtype=torch.int64, device=DEVICE))
    q = _ints([1, 2, 5, 8], 100, torch.int8)
    with pytest.raises(TypeError, match="q must have dtype int8"):
        ig.int_attention(q.float(), q, q, consts)
    with pytest.raises(ValueError, match="k must have shape"):
        ig.int_attention(q, q[:, :1], q, consts)


# ------------------------------------------------------------------------------------ large shapes (GPU)

@pytest.mark.slow
@pytest.mark.cuda
def test_int_linear_large_shapes():
    for m, n, k in [(4096, 4096, 4096), (1024, 3072, 768), (1024, 768, 3072), (1000, 1000, 1000)]:
        x = _ints([m, k], 127, torch.int8)
        w = _ints([n, k], 127, torch.int8)
        got = _triton(ig.int_linear, x, w)
        if m > 16 and k % 8 == 0 and n % 8 == 0:
            _equal(got, torch._int_mm(x, w.t()), f"{m}x{n}x{k} vs torch._int_mm")
        else:
            _equal(got, ig.int_linear_reference(x, w), f"{m}x{n}x{k}")
        xs, ws, b, kw = _linear_inputs([m, k], n, True, False, True, 8, True, None)
        _equal(_triton(ig.int_linear, xs, ws, b, **kw), ig.int_linear_reference(xs, ws, b, **kw), "GELU epilogue")


@pytest.mark.slow
@pytest.mark.cuda
def test_int_attention_and_rows_large_shapes():
    for b, h, n, d in [(8, 12, 128, 64), (2, 16, 512, 64)]:
        q, k, v, mask = _attention_inputs(b, h, n, n, d, "keys", True)
        sf = torch.tensor([3e-4], device=DEVICE)
        consts = io.softmax_constants(sf, torch.tensor([1e12], device=DEVICE))
        fp = io.requant_params(torch.tensor([0.03 / 256], device=DEVICE), torch.tensor([0.02], device=DEVICE))
        got = _triton(ig.int_attention, q, k, v, consts, fp, mask=mask, return_probs=True)
        ref = ig.int_attention_reference(q, k, v, consts, fp, mask=mask, return_probs=True)
        _equal(got[0], ref[0], "context")
        _equal(got[1], ref[1], "probs")
    scores, _, consts, _, _ = _softmax_setup([4, 12, 512, 512])
    _equal(_triton(io.int_softmax, scores, consts), io.int_softmax_reference(scores, consts), "softmax rows 512")
    x = _ints([4096, 1024], 2 ** 21)
    gamma, beta = _ln_params(1024)
    bias_int, _ = io.layer_norm_constants(gamma, beta)
    _equal(_triton(io.int_layer_norm, x, 7, bias_int), io.int_layer_norm_reference(x, 7, bias_int), "LN 1024")

"""LayerNorm (with the fused residual add) and HF RMSNorm: kernels vs references, modules vs torch and HF."""

import pytest
import torch

from tests.helpers import DEVICE, FLOAT_DTYPES, assert_close, nan_like, randn
from tritonformers import runtime
from tritonformers.kernels import norms
from tritonformers.nn.normalization import LayerNorm, RMSNorm

LOW = (torch.float16, torch.bfloat16)

# (shape, weight, bias, residual): pairwise over the options, non-power-of-two widths and row counts.
LN_CASES = [
    ([3, 5, 48], True, True, True),
    ([7, 100], True, True, False),
    ([1, 257], True, False, True),
    ([33, 64], False, False, False),
    ([33, 64], False, True, True),
    ([7, 100], False, False, True),
    ([2, 3, 4, 20], True, False, False),
]
# (shape, weight): None, the input dtype, or float32 (HF's promotion: a float32 output).
RMS_CASES = [
    ([3, 5, 48], "same"),
    ([7, 100], None),
    ([1, 257], "float32"),
    ([33, 64], "same"),
    ([5, 128], None),
]


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def _run(fn, inputs, upstream):
    """Outputs of ``fn(*inputs)`` and the gradients of sum(output * upstream) for every input that is a leaf."""
    leaves = _leaves(*inputs)
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(outs, wrt, upstream[:len(outs)])
    return [o.detach() for o in outs], list(grads)


def _upcast(inputs):
    return [None if t is None else t.float() for t in inputs]


def _check(fn, reference, inputs, upstream, dtype):
    """Forward vs the reference in the input dtype (HF's roundings); gradients vs the reference run in
    float32 on the same values (the kernels accumulate in float32, the low-precision reference does not)."""
    with runtime.use_backend("triton"):
        outs, grads = _run(fn, inputs, upstream)
    ref_outs, _ = _run(reference, inputs, upstream)
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert o.dtype == r.dtype, f"output {i}: dtype {o.dtype} != {r.dtype}"
        assert_close(o, r, dtype, msg=f"output {i}")
    _, ref_grads = _run(reference, _upcast(inputs), [u.float() for u in upstream])
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close(g, r, dtype, msg=f"gradient {i}")


def _ln_inputs(shape, weight, bias, residual, dtype, param_dtype=None):
    n = shape[-1]
    param_dtype = param_dtype or dtype
    return [randn(*shape, dtype=dtype, scale=2.0, offset=0.5),
            randn(n, dtype=param_dtype, offset=1.0) if weight else None,
            randn(n, dtype=param_dtype) if bias else None,
            randn(*shape, dtype=dtype) if residual else None]


def _ln(x, w, b, r):
    return norms.layer_norm(x, w, b, 1e-5, residual=r)


def _ln_ref(x, w, b, r):
    return norms.layer_norm_reference(x, w, b, 1e-5, residual=r)


# --------------------------------------------------------------------------------------------- LayerNorm


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,weight,bias,residual", LN_CASES)
def test_layer_norm_matches_reference(shape, weight, bias, residual, dtype):
    inputs = _ln_inputs(shape, weight, bias, residual, dtype)
    upstream = [randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)]
    _check(_ln, _ln_ref, inputs, upstream, dtype)


@pytest.mark.parametrize("dtype", [d for d in FLOAT_DTYPES if d != torch.float32])
def test_layer_norm_float32_params_with_low_precision_input(dtype):
    inputs = _ln_inputs([9, 40], True, True, True, dtype, param_dtype=torch.float32)
    upstream = [randn(9, 40, dtype=dtype), randn(9, 40, dtype=dtype)]
    _check(_ln, _ln_ref, inputs, upstream, dtype)


def test_layer_norm_non_contiguous():
    x = randn(48, 5, 3).permute(2, 1, 0)
    r = randn(3, 48, 5).transpose(1, 2)
    w, b = randn(48, offset=1.0), randn(48)
    upstream = [randn(48, 5, 3).permute(2, 1, 0), randn(5, 3, 48).transpose(0, 1)]
    assert not x.is_contiguous() and not r.is_contiguous() and not upstream[0].is_contiguous()
    _check(_ln, _ln_ref, [x, w, b, r], upstream, torch.float32)


def test_layer_norm_gradients_of_a_subset():
    """Frozen parameters, a residual without grad, and only the residual sum used downstream."""
    x, r = randn(10, 36, requires_grad=True), randn(10, 36)
    w, b = randn(36, offset=1.0), randn(36)
    dy = randn(10, 36)
    with runtime.use_backend("triton"):
        y, s = norms.layer_norm(x, w, b, residual=r)
        (dx,) = torch.autograd.grad(y, x, dy)
        (dx_sum_only,) = torch.autograd.grad(norms.layer_norm(x, w, b, residual=r)[1], x, dy)
    y_ref, s_ref = norms.layer_norm_reference(x, w, b, residual=r)
    assert_close(y, y_ref)
    assert_close(s, s_ref)
    assert_close(dx, torch.autograd.grad(y_ref, x, dy)[0])
    assert_close(dx_sum_only, dy)


def test_layer_norm_launchers_write_every_output():
    """Forward and backward launchers into NaN-filled buffers, with the strided backward loop
    (more row tiles than backward programs under the interpreter)."""
    m, n = 70, 100
    x, r, dy, ds = (randn(m, n) for _ in range(4))
    w, b = randn(n, offset=1.0), randn(n)
    y, s, mean, rstd = norms.layer_norm_fwd(x, w, b, 1e-5, r, out=nan_like(x), residual_out=nan_like(x),
                                            mean=nan_like(x, (m,)), rstd=nan_like(x, (m,)))
    leaves = _leaves(x, w, b, r)
    y_ref, s_ref = norms.layer_norm_reference(*leaves[:3], 1e-5, residual=leaves[3])
    assert_close(y, y_ref)
    assert_close(s, s_ref)
    assert_close(mean, s_ref.mean(-1))
    assert_close(rstd, torch.rsqrt(s_ref.var(-1, unbiased=False) + 1e-5))
    dx, dres, dw, db = norms.layer_norm_bwd(dy, s, w, mean, rstd, dsum=ds, bias=b, compute_dresidual=True,
                                            dx=nan_like(x), dresidual=nan_like(x), dweight=nan_like(w),
                                            dbias=nan_like(b))
    ref = torch.autograd.grad((y_ref, s_ref), leaves, (dy, ds))
    for got, want, name in zip((dx, dw, db, dres), ref, ("dx", "dweight", "dbias", "dresidual")):
        assert_close(got, want, msg=name)


def test_layer_norm_widest_supported_row():
    inputs = [randn(2, 16384, scale=3.0), randn(16384), randn(16384), None]
    _check(_ln, _ln_ref, inputs, [randn(2, 16384)], torch.float32)


def test_layer_norm_no_rows():
    x, w, b = randn(0, 24, requires_grad=True), randn(24, requires_grad=True), randn(24, requires_grad=True)
    with runtime.use_backend("triton"):
        y = norms.layer_norm(x, w, b)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
    assert y.shape == (0, 24) and dx.shape == (0, 24)
    assert torch.equal(dw, torch.zeros(24)) and torch.equal(db, torch.zeros(24))


# --------------------------------------------------------------------------------------------- RMSNorm


def _rms(x, w):
    return norms.rms_norm(x, w, 1e-6)


def _rms_ref(x, w):
    return norms.rms_norm_reference(x, w, 1e-6)


def _rms_inputs(shape, weight, dtype):
    w_dtype = {"same": dtype, "float32": torch.float32}.get(weight)
    return [randn(*shape, dtype=dtype, scale=2.0, offset=0.3),
            None if weight is None else randn(shape[-1], dtype=w_dtype, offset=1.0)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,weight", RMS_CASES)
def test_rms_norm_matches_reference(shape, weight, dtype):
    inputs = _rms_inputs(shape, weight, dtype)
    out_dtype = torch.float32 if weight == "float32" else dtype
    _check(_rms, _rms_ref, inputs, [randn(*shape, dtype=out_dtype)], dtype)


@pytest.mark.parametrize("dtype", [d for d in FLOAT_DTYPES if d != torch.float32])
def test_rms_norm_reproduces_hf_rounding(dtype):
    """The normalised value is rounded to x's dtype before the weight multiply: nearly every element is
    bit-identical to HF's computation in half precision (one may round the other way where the float32
    statistics differ in the last bit, as sums in another order do)."""
    x, w = randn(33, 96, dtype=dtype, scale=3.0), randn(96, dtype=dtype, offset=1.0)
    with runtime.use_backend("triton"):
        y = norms.rms_norm(x, w)
    y_ref = norms.rms_norm_reference(x, w)
    assert (y == y_ref).float().mean() > 0.99
    assert_close(y, y_ref)


def test_rms_norm_non_contiguous():
    x = randn(48, 5, 3).permute(2, 1, 0)
    dy = randn(5, 3, 48).transpose(0, 1)
    assert not x.is_contiguous() and not dy.is_contiguous()
    _check(_rms, _rms_ref, [x, randn(48, offset=1.0)], [dy], torch.float32)


def test_rms_norm_launchers_write_every_output():
    m, n = 70, 100
    x, w, dy = randn(m, n), randn(n, offset=1.0), randn(m, n)
    y, rstd = norms.rms_norm_fwd(x, w, 1e-6, out=nan_like(x), rstd=nan_like(x, (m,)))
    leaves = _leaves(x, w)
    y_ref = norms.rms_norm_reference(*leaves, 1e-6)
    assert_close(y, y_ref)
    assert_close(rstd, torch.rsqrt(x.pow(2).mean(-1) + 1e-6))
    dx, dw = norms.rms_norm_bwd(dy, x, w, rstd, dx=nan_like(x), dweight=nan_like(w))
    dx_ref, dw_ref = torch.autograd.grad(y_ref, leaves, dy)
    assert_close(dx, dx_ref, msg="dx")
    assert_close(dw, dw_ref, msg="dweight")


def test_rms_norm_widest_supported_row():
    _check(_rms, _rms_ref, [randn(2, 16384, scale=3.0), randn(16384)], [randn(2, 16384)], torch.float32)


def test_rms_norm_frozen_weight():
    x, w, dy = randn(6, 40, requires_grad=True), randn(40), randn(6, 40)
    with runtime.use_backend("triton"):
        (dx,) = torch.autograd.grad(norms.rms_norm(x, w), x, dy)
    assert_close(dx, torch.autograd.grad(norms.rms_norm_reference(x, w), x, dy)[0])


# --------------------------------------------------------------------------------------------- modules


def _module_grads(module, x, dy):
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(out, [x] + params, dy)
    return out.detach(), grads


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_rms_norm_module_matches_llama(backend, dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(48, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        hf.weight.copy_(randn(48, offset=1.0))
    hf = hf.to(dtype)
    ours = RMSNorm(48, eps=1e-5, device=DEVICE, dtype=dtype)
    ours.load_state_dict(hf.state_dict())
    x, dy = randn(4, 7, 48, dtype=dtype, scale=2.0), randn(4, 7, 48, dtype=dtype)
    out, grads = _module_grads(ours, x, dy)
    out_hf, grads_hf = _module_grads(hf, x, dy)
    if dtype == torch.float32:
        torch.testing.assert_close(out, out_hf, atol=1e-6, rtol=1e-6)
    assert_close(out, out_hf)
    for g, g_hf, name in zip(grads, grads_hf, ("dx", "dweight")):
        assert_close(g, g_hf, scale=1.0 if dtype == torch.float32 else 4.0, msg=name)


def test_rms_norm_module_promotes_like_hf(backend):
    """A float32 weight with float16 hidden states gives float32 outputs, as in HF."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(64).to(DEVICE)
    with torch.no_grad():
        hf.weight.copy_(randn(64, offset=1.0))
    ours = RMSNorm(64, device=DEVICE)
    ours.load_state_dict(hf.state_dict())
    x = randn(5, 64, dtype=torch.float16, scale=2.0)
    out, out_hf = ours(x), hf(x)
    assert out.dtype == out_hf.dtype == torch.float32
    assert (out == out_hf).float().mean() > 0.99
    assert_close(out, out_hf, torch.float16)


def test_rms_norm_module_without_weight_is_torch_rms_norm(backend):
    """DiffLlama's group norm: ``torch.nn.RMSNorm(2D, eps, elementwise_affine=False)``."""
    ours = RMSNorm(64, eps=1e-5, elementwise_affine=False)
    assert ours.weight is None and ours.state_dict() == {}
    x = randn(3, 4, 64, scale=2.0)
    assert_close(ours(x), torch.nn.RMSNorm(64, eps=1e-5, elementwise_affine=False)(x))


def test_rms_norm_module_state_dict_and_repr():
    m = RMSNorm(16, eps=1e-5)
    assert list(m.state_dict()) == ["weight"] and torch.equal(m.weight, torch.ones(16))
    assert m.eps == m.variance_epsilon == 1e-5 and "eps=1e-05" in repr(m)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_layer_norm_module_matches_torch(backend, dtype, affine, bias):
    ref = torch.nn.LayerNorm(40, eps=1e-5, elementwise_affine=affine, bias=bias, device=DEVICE)
    if affine:
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(randn(*p.shape, offset=1.0))
    ref = ref.to(dtype)
    ours = LayerNorm(40, eps=1e-5, elementwise_affine=affine, bias=bias, device=DEVICE, dtype=dtype)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    x, dy = randn(3, 9, 40, dtype=dtype, scale=2.0, offset=0.5), randn(3, 9, 40, dtype=dtype)
    out, grads = _module_grads(ours, x, dy)
    out_ref, grads_ref = _module_grads(ref, x, dy)
    assert_close(out, out_ref)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert_close(g, g_ref, scale=1.0 if dtype == torch.float32 else 2.0, msg=f"gradient {i}")


def test_layer_norm_module_residual_and_multi_dim_shape(backend):
    ref = torch.nn.LayerNorm((5, 12), device=DEVICE)
    with torch.no_grad():
        ref.weight.copy_(randn(5, 12, offset=1.0))
        ref.bias.copy_(randn(5, 12))
    ours = LayerNorm((5, 12), device=DEVICE)
    ours.load_state_dict(ref.state_dict())
    x, r = randn(3, 5, 12), randn(3, 5, 12)
    assert_close(ours(x), ref(x))
    y, s = ours(x, r)
    assert_close(s, x + r)
    assert_close(y, ref(x + r))
    with pytest.raises(ValueError, match="normalized_shape"):
        ours(randn(3, 12, 5))


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call,exc,match", [
    (lambda x, w: norms.layer_norm(x.long(), w, None), TypeError, "x must have dtype"),
    (lambda x, w: norms.layer_norm(x.tolist(), w, None), TypeError, "x must be a torch.Tensor"),
    (lambda x, w: norms.layer_norm(x[0, 0, 0], None, None), ValueError, "x must have at least 1"),
    (lambda x, w: norms.layer_norm(x[..., :0], None, None), ValueError, "non-empty last dimension"),
    (lambda x, w: norms.layer_norm(x, w[:-1], None), ValueError, "weight must have shape"),
    (lambda x, w: norms.layer_norm(x, w.int(), None), TypeError, "weight must have dtype"),
    (lambda x, w: norms.layer_norm(x, None, w[None]), ValueError, "bias must have shape"),
    (lambda x, w: norms.layer_norm(x, w.to("meta"), None), ValueError, "weight is on meta"),
    (lambda x, w: norms.layer_norm(x, w, w, residual=x[:1]), ValueError, "residual must have x's shape"),
    (lambda x, w: norms.layer_norm(x, w, w, residual=x.to(torch.int32)), TypeError, "residual"),
    (lambda x, w: norms.layer_norm(x, w, w, residual=1.0), TypeError, "residual must be a torch.Tensor"),
    (lambda x, w: norms.layer_norm(x, w, w, eps=-1e-5), ValueError, "eps must be a finite non-negative"),
    (lambda x, w: norms.layer_norm(x, w, w, eps=float("nan")), ValueError, "eps"),
    (lambda x, w: norms.layer_norm(x, w, w, eps="1e-5"), TypeError, "eps must be a real number"),
    (lambda x, w: norms.rms_norm(x.int(), w), TypeError, "x must have dtype"),
    (lambda x, w: norms.rms_norm(x, w[:3]), ValueError, "weight must have shape"),
    (lambda x, w: norms.rms_norm(x, w.bool()), TypeError, "weight must have dtype"),
    (lambda x, w: norms.rms_norm(x, w.to("meta")), ValueError, "weight is on meta"),
    (lambda x, w: norms.rms_norm(x, w, eps=True), TypeError, "eps must be a real number"),
    (lambda x, w: norms.rms_norm(x, w, eps=-1.0), ValueError, "eps must be a finite non-negative"),
    (lambda x, w: RMSNorm(0), ValueError, "hidden_size must be a positive int"),
])
def test_bad_arguments_raise(backend, call, exc, match):
    with pytest.raises(exc, match=match):
        call(randn(2, 3, 8), randn(8))


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_too_wide_rows(op):
    x = randn(1, norms.MAX_WIDTH + 1)
    fn = getattr(norms, op)
    with runtime.use_backend("triton"), pytest.raises(ValueError, match="does not support rows wider"):
        fn(x, None, None) if op == "layer_norm" else fn(x)
    with runtime.use_backend("torch"):
        y = fn(x, None, None) if op == "layer_norm" else fn(x)
    assert torch.isfinite(y).all()


def test_launchers_reject_bad_buffers():
    x = randn(4, 8)
    with pytest.raises(ValueError, match="x must be contiguous"):
        norms.rms_norm_fwd(randn(8, 4).t(), None, 1e-6)
    with pytest.raises(ValueError, match="out must have shape"):
        norms.layer_norm_fwd(x, None, None, 1e-5, out=nan_like(x, (4, 9)))
    with pytest.raises(TypeError, match="out must have dtype"):
        norms.rms_norm_fwd(x, randn(8), 1e-6, out=nan_like(x, dtype=torch.float16))


# --------------------------------------------------------------------------------------------- CUDA, large


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n", [(16384, 4096), (64, 16384), (16, norms.MAX_WIDTH), (4096, 128)])
def test_large_shapes_on_cuda(dtype, m, n):
    ln_inputs = _ln_inputs([m, n], True, True, True, dtype)
    _check(_ln, _ln_ref, ln_inputs, [randn(m, n, dtype=dtype), randn(m, n, dtype=dtype)], dtype)
    _check(_rms, _rms_ref, _rms_inputs([m, n], "same", dtype), [randn(m, n, dtype=dtype)], dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layer_norm_promotes_an_autocast_residual(backend):
    """Autocast hands a half-precision activation next to a float32 residual: both are promoted, as
    ``x + residual`` in torch is, and the result equals the float32 computation."""
    x, r, w = randn(4, 32, dtype=torch.float16), randn(4, 32), randn(32)
    with runtime.use_backend(backend):
        y, s = norms.layer_norm(x, w, w, residual=r)
        y32, s32 = norms.layer_norm(x.float(), w, w, residual=r)
    assert y.dtype == s.dtype == torch.float32
    torch.testing.assert_close(y, y32, rtol=0, atol=0)
    torch.testing.assert_close(s, s32, rtol=0, atol=0)

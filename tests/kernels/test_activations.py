"""GELU (none / tanh / bloom, with and without the fused bias) and SwiGLU: kernels vs references vs HF."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import DEVICE, FLOAT_DTYPES, assert_close, nan_like, randn
from tritonformers import runtime
from tritonformers.kernels import activations as act
from tritonformers.nn.activation import GELU, SwiGLU

HALF = (torch.float16, torch.bfloat16)

# (approximate, bias, shape): pairwise over modes x bias, non-power-of-two widths and row counts.
GELU_CASES = [
    ("none", False, [5, 37]),
    ("none", True, [2, 3, 96]),
    ("tanh", True, [5, 37]),
    ("tanh", False, [4, 256]),
    ("bloom", False, [2, 3, 96]),
    ("bloom", True, [4, 256]),
    ("bloom", True, [5, 37]),
]
SWIGLU_SHAPES = [[5, 37], [2, 3, 96], [4, 256]]


def _grads(out, inputs, upstream):
    return torch.autograd.grad(out, [t for t in inputs if t is not None], upstream)


def _gelu_inputs(shape, dtype, with_bias):
    # scale 3 puts elements in the tails (|x| up to ~10), where the tanh saturates
    x = randn(*shape, dtype=dtype, scale=3.0, requires_grad=True)
    bias = randn(shape[-1], dtype=dtype, requires_grad=True) if with_bias else None
    return x, bias


# ---------------------------------------------------------------------------------------------- GELU

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("approximate,with_bias,shape", GELU_CASES)
def test_gelu_kernel_matches_reference(approximate, with_bias, shape, dtype):
    x, bias = _gelu_inputs(shape, dtype, with_bias)
    with runtime.use_backend("triton"):
        y = act.gelu(x, approximate, bias)
    y_ref = act.gelu_reference(x, approximate, bias)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y_ref, msg="y")
    dy = randn(*shape, dtype=dtype)
    got, want = _grads(y, [x, bias], dy), _grads(y_ref, [x, bias], dy)
    for g, w, name in zip(got, want, ["dx", "dbias"]):
        # dbias sums up to 16 rounded rows: allow for the summation order
        assert_close(g, w, scale=4.0 if name == "dbias" else 1.0, msg=name)
    if approximate == "bloom" and dtype in HALF:  # the per-op rounding emulation makes these exact
        assert torch.equal(y, y_ref)
        assert torch.equal(got[0], want[0])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gelu_reference_is_torch_and_hf(dtype):
    x = randn(7, 33, dtype=dtype, scale=3.0)
    b = randn(33, dtype=dtype)
    assert torch.equal(act.gelu_reference(x, "none"), F.gelu(x))
    assert torch.equal(act.gelu_reference(x, "tanh", b), F.gelu(x + b, approximate="tanh"))
    from transformers.models.bloom.modeling_bloom import bloom_gelu_forward
    assert torch.equal(act.gelu_reference(x, "bloom", b), bloom_gelu_forward(x + b))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_bloom_gelu_hf_parity(backend, dtype):
    """BLOOM's GELU against transformers' BloomGelu (GeLUFunction): forward and its hand-written backward."""
    from transformers.models.bloom.modeling_bloom import BloomGelu, bloom_gelu_back, bloom_gelu_forward
    x = torch.linspace(-8, 8, 64 * 96).reshape(64, 96)[:, torch.randperm(96)]  # dense grid of the range
    x = (x + 0.01 * torch.randn(64, 96)).to(device=DEVICE, dtype=dtype).requires_grad_(True)
    dy = randn(64, 96, dtype=dtype)
    y = GELU("bloom")(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    x_hf = x.detach().clone().requires_grad_(True)
    y_hf = BloomGelu()(x_hf)
    (dx_hf,) = torch.autograd.grad(y_hf, x_hf, dy)
    assert torch.equal(y_hf, bloom_gelu_forward(x.detach()))
    assert torch.equal(dx_hf, bloom_gelu_back(dy, (x.detach(),)))
    if dtype in HALF or backend == "torch":
        assert torch.equal(y, y_hf), f"forward mismatch rate {(y != y_hf).float().mean().item():.2e}"
        assert torch.equal(dx, dx_hf), f"backward mismatch rate {(dx != dx_hf).float().mean().item():.2e}"
    else:  # float32: torch's tanh is not correctly rounded (1 ulp on ~0.1% of inputs), libdevice's may differ
        assert_close(y, y_hf, scale=0.1)
        assert_close(dx, dx_hf, scale=0.1)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gelu_module_matches_torch(backend, dtype):
    x = randn(6, 40, dtype=dtype, scale=2.0, requires_grad=True)
    b = randn(40, dtype=dtype, requires_grad=True)
    for mode in ("none", "tanh"):
        y = GELU(mode)(x, b)
        y_torch = torch.nn.GELU(approximate=mode)(x + b)
        assert_close(y, y_torch, msg=mode)
        dy = randn(6, 40, dtype=dtype)
        for got, want in zip(_grads(y, [x, b], dy), _grads(y_torch, [x, b], dy)):
            assert_close(got, want, scale=4.0, msg=mode)
    assert "bloom" in repr(GELU("bloom"))


def test_gelu_launchers_write_every_element():
    x = randn(2, 3, 37, dtype=torch.float16, scale=3.0)
    b = randn(37, dtype=torch.float16)
    dy = randn(2, 3, 37, dtype=torch.float16)
    for mode in act.GELU_MODES:
        ref_x = x.detach().clone().requires_grad_(True)
        ref_b = b.detach().clone().requires_grad_(True)
        y_ref = act.gelu_reference(ref_x, mode, ref_b)
        dx_ref, db_ref = torch.autograd.grad(y_ref, [ref_x, ref_b], dy)
        y = act.gelu_fwd(x, b, mode, out=nan_like(x))
        dx, db = act.gelu_bwd(dy, x, b, mode, dx=nan_like(x), dbias=nan_like(b))
        assert_close(y, y_ref, msg=mode)
        assert_close(dx, dx_ref, msg=mode)
        assert_close(db, db_ref, scale=4.0, msg=mode)


@pytest.mark.parametrize("approximate", act.GELU_MODES)
def test_gelu_strided_input(approximate):
    """A transposed activation is read in place; only one of x and bias needing a gradient."""
    x = randn(37, 12, scale=3.0).t().requires_grad_(True)  # [12, 37], column stride 12
    b = randn(37)
    with runtime.use_backend("triton"):
        y = act.gelu(x, approximate, b)
    y_ref = act.gelu_reference(x, approximate, b)
    assert_close(y, y_ref)
    dy = randn(12, 37).t().contiguous().t()  # a non-contiguous upstream gradient too
    assert_close(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(y_ref, x, dy)[0])
    bg = b.clone().requires_grad_(True)
    with runtime.use_backend("triton"):
        y2 = act.gelu(x.detach(), approximate, bg)
    (db,) = torch.autograd.grad(y2, bg, dy)
    (db_ref,) = torch.autograd.grad(act.gelu_reference(x.detach(), approximate, bg), bg, dy)
    assert_close(db, db_ref, scale=4.0)


def test_gelu_empty():
    x = torch.empty(0, 16, device=DEVICE, requires_grad=True)
    b = randn(16, requires_grad=True)
    with runtime.use_backend("triton"):
        y = act.gelu(x, "bloom", b)
    assert y.shape == (0, 16)
    dx, db = torch.autograd.grad(y.sum(), [x, b])
    assert dx.shape == (0, 16) and torch.equal(db, torch.zeros_like(db))


@pytest.mark.parametrize("approximate", act.GELU_MODES)
def test_gelu_broadcast_upstream_gradient(approximate):
    """``y.sum().backward()`` hands backward an expanded (all-zero-stride) gradient."""
    x = randn(3, 5, 24, scale=3.0, requires_grad=True)
    b = randn(24, requires_grad=True)
    with runtime.use_backend("triton"):
        got = torch.autograd.grad(act.gelu(x, approximate, b).sum(), [x, b])
    want = torch.autograd.grad(act.gelu_reference(x, approximate, b).sum(), [x, b])
    assert_close(got[0], want[0])
    assert_close(got[1], want[1], scale=4.0)


def test_gelu_bad_inputs():
    x = randn(4, 8)
    with pytest.raises(TypeError, match="x"):
        act.gelu([1.0, 2.0])
    with pytest.raises(TypeError, match="x"):
        act.gelu(torch.ones(4, 8, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="x"):
        act.gelu(torch.tensor(1.0, device=DEVICE))
    with pytest.raises(ValueError, match="approximate"):
        act.gelu(x, "erf")
    with pytest.raises(ValueError, match="approximate"):
        act.gelu(x, None)
    with pytest.raises(ValueError, match="bias"):
        act.gelu(x, "none", randn(7))
    with pytest.raises(ValueError, match="bias"):
        act.gelu(x, "none", randn(1, 8))
    with pytest.raises(TypeError, match="bias"):
        act.gelu(x, "none", [0.0] * 8)
    with pytest.raises(TypeError, match="bias"):
        act.gelu(x, "none", torch.ones(8, dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gelu_takes_an_autocast_bias_of_another_float_dtype(backend):
    """Under autocast a float32 bias meets a half-precision activation: it is rounded to x's dtype, as the
    Linear it belongs to would round it, and its gradient comes back in float32."""
    x = randn(4, 8, dtype=torch.float16)
    bias = randn(8).requires_grad_(True)
    with runtime.use_backend(backend):
        got = act.gelu(x, "bloom", bias)
        want = act.gelu(x, "bloom", bias.detach().half())
    assert got.dtype == torch.float16 and torch.equal(got, want)
    got.float().sum().backward()
    assert bias.grad.dtype == torch.float32 and torch.isfinite(bias.grad).all()
    with pytest.raises(ValueError, match="approximate"):
        GELU("exact")


@pytest.mark.cuda
def test_gelu_device_mismatch():
    with pytest.raises(ValueError, match="bias"):
        act.gelu(randn(4, 8), "none", torch.randn(8))


# ---------------------------------------------------------------------------------------------- SwiGLU

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SWIGLU_SHAPES)
def test_swiglu_kernel_matches_reference(shape, dtype):
    gate = randn(*shape, dtype=dtype, scale=3.0, requires_grad=True)
    up = randn(*shape, dtype=dtype, requires_grad=True)
    with runtime.use_backend("triton"):
        y = act.swiglu(gate, up)
    y_ref = act.swiglu_reference(gate, up)
    assert_close(y, y_ref, msg="y")
    dy = randn(*shape, dtype=dtype)
    for got, want, name in zip(_grads(y, [gate, up], dy), _grads(y_ref, [gate, up], dy), ["dgate", "dup"]):
        assert_close(got, want, msg=name)
    if dtype in HALF:  # silu's output rounds to the dtype before the product, as in HF
        assert torch.equal(y, y_ref)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_swiglu_hf_parity(backend, dtype):
    """SwiGLU module against HF's MLP activation: ``ACT2FN["silu"](gate) * up`` on chunks of one projection."""
    from transformers.activations import ACT2FN
    fused = randn(3, 5, 2 * 48, dtype=dtype, scale=2.0, requires_grad=True)
    gate, up = fused.chunk(2, dim=-1)  # strided views, read in place by the kernel
    y = SwiGLU()(gate, up)
    y_hf = ACT2FN["silu"](gate) * up
    assert_close(y, y_hf)
    dy = randn(3, 5, 48, dtype=dtype)
    assert_close(torch.autograd.grad(y, fused, dy)[0], torch.autograd.grad(y_hf, fused, dy)[0])


def test_swiglu_launchers_write_every_element():
    gate = randn(5, 37, dtype=torch.float16, scale=3.0)
    up = randn(5, 37, dtype=torch.float16)
    dy = randn(5, 37, dtype=torch.float16)
    g_ref, u_ref = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    y_ref = act.swiglu_reference(g_ref, u_ref)
    dg_ref, du_ref = torch.autograd.grad(y_ref, [g_ref, u_ref], dy)
    y = act.swiglu_fwd(gate, up, out=nan_like(gate))
    dg, du = act.swiglu_bwd(dy, gate, up, dgate=nan_like(gate), dup=nan_like(gate))
    assert_close(y, y_ref)
    assert_close(dg, dg_ref)
    assert_close(du, du_ref)


def test_swiglu_one_input_needs_grad():
    gate = randn(4, 40, scale=2.0, requires_grad=True)
    up = randn(4, 40)
    with runtime.use_backend("triton"):
        y = act.swiglu(gate, up)
    dy = randn(4, 40)
    assert_close(torch.autograd.grad(y, gate, dy)[0], torch.autograd.grad(act.swiglu_reference(gate, up), gate, dy)[0])


def test_swiglu_bad_inputs():
    g = randn(4, 8)
    with pytest.raises(TypeError, match="gate"):
        act.swiglu("gate", g)
    with pytest.raises(TypeError, match="up"):
        act.swiglu(g, torch.ones(4, 8, dtype=torch.int64, device=DEVICE))
    with pytest.raises(TypeError, match="up"):
        act.swiglu(g, randn(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="up"):
        act.swiglu(g, randn(4, 9))
    with pytest.raises(ValueError, match="gate"):
        act.swiglu(torch.tensor(1.0, device=DEVICE), torch.tensor(1.0, device=DEVICE))


@pytest.mark.cuda
def test_swiglu_device_mismatch():
    with pytest.raises(ValueError, match="up"):
        act.swiglu(randn(4, 8), torch.randn(4, 8))


# ---------------------------------------------------------------------------------------------- large (GPU)

@pytest.mark.slow
@pytest.mark.cuda  # far too big for the interpreter
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("approximate", act.GELU_MODES)
def test_gelu_large(approximate, dtype):
    x, bias = _gelu_inputs([2, 1000, 4096 + 64], dtype, True)
    with runtime.use_backend("triton"):
        y = act.gelu(x, approximate, bias)
    y_ref = act.gelu_reference(x, approximate, bias)
    assert_close(y, y_ref)
    dy = randn(*x.shape, dtype=dtype)
    got, want = _grads(y, [x, bias], dy), _grads(y_ref, [x, bias], dy)
    assert_close(got[0], want[0])
    # dbias sums 2000 rows: compare relative to the column's magnitude
    assert_close(got[1], want[1], scale=20.0 if dtype in HALF else 10.0)
    if approximate == "bloom" and dtype in HALF:
        assert torch.equal(y, y_ref) and torch.equal(got[0], want[0])


@pytest.mark.slow
@pytest.mark.cuda  # far too big for the interpreter
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_swiglu_large(dtype):
    gate = randn(4096, 5504, dtype=dtype, scale=3.0, requires_grad=True)
    up = randn(4096, 5504, dtype=dtype, requires_grad=True)
    with runtime.use_backend("triton"):
        y = act.swiglu(gate, up)
    y_ref = act.swiglu_reference(gate, up)
    assert_close(y, y_ref)
    dy = randn(4096, 5504, dtype=dtype)
    for got, want in zip(_grads(y, [gate, up], dy), _grads(y_ref, [gate, up], dy)):
        assert_close(got, want)


@pytest.mark.parametrize("dtype", [d for d in FLOAT_DTYPES if d in HALF])
def test_bloom_gelu_exact_on_every_value(dtype):
    """BLOOM's GELU in half precision, forward and backward, bit-exact on every finite value in [-12, 12]."""
    bits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    x = bits[torch.isfinite(bits) & (bits.abs() <= 12)].to(DEVICE)
    x = x[: x.numel() // 256 * 256].reshape(-1, 256).requires_grad_(True)
    dy = randn(*x.shape, dtype=dtype)
    with runtime.use_backend("triton"):
        y = act.gelu(x, "bloom")
    y_ref = act.gelu_reference(x, "bloom")
    assert torch.equal(y, y_ref), f"forward mismatch rate {(y != y_ref).float().mean().item():.2e}"
    dx, dx_ref = _grads(y, [x], dy)[0], _grads(y_ref, [x], dy)[0]
    assert torch.equal(dx, dx_ref), f"backward mismatch rate {(dx != dx_ref).float().mean().item():.2e}"

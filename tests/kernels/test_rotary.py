"""Rotary position embedding: kernel vs reference vs transformers' apply_rotary_pos_emb, both layouts, GQA."""

import pytest
import torch

from tests.helpers import DEVICE, FLOAT_DTYPES, nan_like, randn
from tritonformers import runtime
from tritonformers.kernels import rotary

# (layout, B, Hq, Hk, N, D, cos batch): pairwise over layouts, GQA ratios, cos shapes, odd N and D.
CASES = [
    ("bhnd", 2, 4, 2, 5, 64, "B"),
    ("bnhd", 1, 3, 1, 7, 80, "1"),
    ("bhnd", 1, 2, 2, 3, 32, "none"),
    ("bnhd", 2, 4, 4, 4, 128, "B"),
    ("bhnd", 1, 6, 2, 9, 80, "1"),
    ("bnhd", 2, 2, 1, 3, 32, "none"),
    ("bhnd", 1, 2, 1, 2, 256, "B"),
]


def _cos_sin(batch, n, d, dtype, offset=0):
    """HF's default RoPE tables (fp32 math, cast to dtype): [batch, n, d] with positions offset per row."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    pos = torch.arange(n, dtype=torch.float32)[None] + offset * torch.arange(batch, dtype=torch.float32)[:, None]
    emb = torch.cat([pos[..., None] * inv_freq] * 2, dim=-1)
    return emb.cos().to(device=DEVICE, dtype=dtype), emb.sin().to(device=DEVICE, dtype=dtype)


def _case_tensors(layout, b, hq, hk, n, d, cos_kind, dtype):
    cb = {"B": b, "1": 1, "none": 1}[cos_kind]
    cos, sin = _cos_sin(cb, n, d, dtype, offset=3)
    if cos_kind == "none":
        cos, sin = cos[0], sin[0]
    shape = (lambda h: (b, h, n, d)) if layout == "bhnd" else (lambda h: (b, n, h, d))
    q = randn(*shape(hq), dtype=dtype, requires_grad=True)
    k = randn(*shape(hk), dtype=dtype, requires_grad=True)
    return q, k, cos, sin


def _hf(q, k, cos, sin, layout):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1 if layout == "bhnd" else 2)


def _run(fn, q, k, cos, sin, layout, dq, dk):
    qo, ko = fn(q, k, cos, sin, layout)
    return (qo, ko) + torch.autograd.grad((qo, ko), (q, k), (dq, dk))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout,b,hq,hk,n,d,cos_kind", CASES)
def test_rotary_matches_hf(layout, b, hq, hk, n, d, cos_kind, dtype, backend):
    """Forward and gradients bit-exact against HF: the kernel rounds each product, then the sum, as HF."""
    q, k, cos, sin = _case_tensors(layout, b, hq, hk, n, d, cos_kind, dtype)
    dq, dk = randn(*q.shape, dtype=dtype), randn(*k.shape, dtype=dtype)
    got = _run(rotary.apply_rotary, q, k, cos, sin, layout, dq, dk)
    want = _run(_hf, q, k, cos, sin, layout, dq, dk)
    for g, w, name in zip(got, want, ["q'", "k'", "dq", "dk"]):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert torch.isfinite(g).all(), name
        assert torch.equal(g, w), f"{name}: mismatch rate {(g != w).float().mean().item():.2e}"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", rotary.LAYOUTS)
def test_rotary_general_cos_sin(layout, dtype):
    """cos/sin whose two halves differ (not HF's tables): the backward is the exact transpose."""
    q, k, _, _ = _case_tensors(layout, 2, 4, 2, 5, 48, "B", dtype)
    cos, sin = randn(2, 5, 48, dtype=dtype), randn(2, 5, 48, dtype=dtype)
    dq, dk = randn(*q.shape, dtype=dtype), randn(*k.shape, dtype=dtype)
    with runtime.use_backend("triton"):
        got = _run(rotary.apply_rotary, q, k, cos, sin, layout, dq, dk)
    want = _run(rotary.apply_rotary_reference, q, k, cos, sin, layout, dq, dk)
    for g, w, name in zip(got, want, ["q'", "k'", "dq", "dk"]):
        assert torch.equal(g, w), f"{name}: mismatch rate {(g != w).float().mean().item():.2e}"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_rotary_strided_inputs(dtype):
    """HF's own q/k: a projection viewed [B, N, H, D] and transposed to [B, H, N, D], read in place."""
    b, n, hq, hk, d = 2, 5, 4, 2, 64
    proj = randn(b, n, (hq + 2 * hk) * d, dtype=dtype, requires_grad=True)  # fused qkv, like many models
    q = proj[..., : hq * d].view(b, n, hq, d).transpose(1, 2)
    k = proj[..., hq * d: (hq + hk) * d].view(b, n, hk, d).transpose(1, 2)
    cos, sin = _cos_sin(b, n, d, dtype)
    cos = cos.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous cos/sin as well
    dq, dk = randn(b, hq, n, d, dtype=dtype), randn(b, hk, n, d, dtype=dtype)
    with runtime.use_backend("triton"):
        qo, ko = rotary.apply_rotary(q, k, cos, sin)
    qh, kh = _hf(q, k, cos, sin, "bhnd")
    assert torch.equal(qo, qh) and torch.equal(ko, kh)
    (g,) = torch.autograd.grad((qo, ko), proj, (dq, dk))
    (gh,) = torch.autograd.grad((qh, kh), proj, (dq, dk))
    assert torch.equal(g, gh)


def test_rotary_launcher_writes_every_element():
    q, k, cos, sin = _case_tensors("bhnd", 2, 3, 1, 5, 80, "B", torch.float16)
    q, k = q.detach(), k.detach()
    qh, kh = _hf(q, k, cos, sin, "bhnd")
    qo, ko = rotary.rotary_launch(q, k, cos, sin, "bhnd", q_out=nan_like(q), k_out=nan_like(k))
    assert torch.equal(qo, qh) and torch.equal(ko, kh)
    # backward launcher alone (k only): the transpose of the rotation
    g = randn(*k.shape, dtype=torch.float16)
    kl = k.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(_hf(q, kl, cos, sin, "bhnd")[1], kl, g)
    _, got = rotary.rotary_launch(None, g, cos, sin, "bhnd", backward=True, k_out=nan_like(k))
    assert torch.equal(got, want)


def test_rotary_partial_grads():
    """Only q needs a gradient, or only q' is used: the missing gradient is skipped (None) or zero."""
    q, k, cos, sin = _case_tensors("bnhd", 1, 2, 1, 3, 32, "1", torch.float32)
    k = k.detach()
    dq = randn(*q.shape)
    with runtime.use_backend("triton"):
        qo, ko = rotary.apply_rotary(q, k, cos, sin, "bnhd")
    (g,) = torch.autograd.grad(qo, q, dq)
    (gh,) = torch.autograd.grad(_hf(q, k, cos, sin, "bnhd")[0], q, dq)
    assert torch.equal(g, gh)
    q2, k2 = q.detach().clone().requires_grad_(True), k.clone().requires_grad_(True)
    with runtime.use_backend("triton"):
        qo, _ = rotary.apply_rotary(q2, k2, cos, sin, "bnhd")
    gq, gk = torch.autograd.grad(qo, (q2, k2), dq, allow_unused=True)
    assert torch.equal(gq, gh) and (gk is None or torch.equal(gk, torch.zeros_like(gk)))


def test_rotary_cos_grad_is_unsupported_on_triton():
    q, k, cos, sin = _case_tensors("bhnd", 1, 2, 2, 3, 32, "1", torch.float32)
    cos = cos.clone().requires_grad_(True)
    with runtime.use_backend("triton"), pytest.raises(ValueError, match="cos/sin"):
        rotary.apply_rotary(q, k, cos, sin)
    with torch.no_grad(), runtime.use_backend("triton"):
        qo, _ = rotary.apply_rotary(q, k, cos, sin)
    assert torch.equal(qo, _hf(q, k, cos, sin, "bhnd")[0].detach())


def test_rotary_bad_inputs():
    q, k, cos, sin = _case_tensors("bhnd", 2, 4, 2, 5, 32, "B", torch.float32)
    q, k = q.detach(), k.detach()
    f = rotary.apply_rotary
    with pytest.raises(ValueError, match="layout"):
        f(q, k, cos, sin, layout="bshd")
    with pytest.raises(TypeError, match="q"):
        f(q.numpy(), k, cos, sin)
    with pytest.raises(ValueError, match="q"):
        f(q[0], k, cos, sin)
    with pytest.raises(TypeError, match="q"):
        f(q.to(torch.int32), k, cos, sin)
    with pytest.raises(TypeError, match="cos"):
        f(q.half(), k.half(), cos, sin.half())
    with pytest.raises(TypeError, match="sin"):
        f(q, k, cos, sin.half())
    with pytest.raises(ValueError, match="k"):
        f(q, k[:, :, :4], cos, sin)  # sequence length differs
    with pytest.raises(ValueError, match="k"):
        f(q, k[:1], cos, sin)  # batch differs
    with pytest.raises(ValueError, match="even"):
        f(q[..., :31], k[..., :31], cos[..., :31], sin[..., :31])
    with pytest.raises(ValueError, match="cos"):
        f(q, k, cos[..., :16], sin[..., :16])  # width != D
    with pytest.raises(ValueError, match="cos"):
        f(q, k, cos[:, :4], sin[:, :4])  # N differs
    with pytest.raises(ValueError, match="batch"):
        f(q, k, cos.repeat(2, 1, 1), sin.repeat(2, 1, 1))  # batch 4 for B = 2
    with pytest.raises(ValueError, match="sin"):
        f(q, k, cos, sin[:1])
    with pytest.raises(ValueError, match="cos"):
        f(q, k, cos[None], sin[None])


@pytest.mark.cuda
def test_rotary_device_mismatch():
    q, k, cos, sin = _case_tensors("bhnd", 1, 2, 2, 3, 32, "1", torch.float32)
    with pytest.raises(ValueError, match="cos"):
        rotary.apply_rotary(q, k, cos.cpu(), sin.cpu())


@pytest.mark.slow
@pytest.mark.cuda  # far too big for the interpreter
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", rotary.LAYOUTS)
def test_rotary_large(layout, dtype):
    q, k, cos, sin = _case_tensors(layout, 2, 32, 8, 2048 + 7, 128, "B", dtype)
    dq, dk = randn(*q.shape, dtype=dtype), randn(*k.shape, dtype=dtype)
    with runtime.use_backend("triton"):
        got = _run(rotary.apply_rotary, q, k, cos, sin, layout, dq, dk)
    want = _run(_hf, q, k, cos, sin, layout, dq, dk)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float32_tables_with_half_precision_q_and_k(backend):
    """Autocast gives float32 cos/sin next to fp16 q/k: the tables are cast to q's dtype."""
    q, k = randn(1, 2, 8, 16, dtype=torch.float16), randn(1, 2, 8, 16, dtype=torch.float16)
    cos, sin = randn(1, 8, 16), randn(1, 8, 16)
    with runtime.use_backend(backend):
        got = rotary.apply_rotary(q, k, cos, sin)
        want = rotary.apply_rotary(q, k, cos.half(), sin.half())
    for g, w in zip(got, want):
        assert g.dtype == torch.float16 and torch.equal(g, w)

"""Fused differential attention: kernel vs reference (forward, dq/dk/dv/dlambda) and reference vs HF's module."""

import pytest
import torch

from tests.helpers import DEVICE, FLOAT_DTYPES, assert_close, randn
from tritonformers import runtime
from tritonformers.kernels import diff_attention as da


def _padding(B, N, kind):
    if kind is None:
        return None
    m = torch.ones(B, N, dtype=torch.long)
    for b in range(B):
        if kind == "left":
            m[b, : 2 * b + 3] = 0
        else:
            m[b, N - (2 * b + 2):] = 0
    return m.to(DEVICE)


def _run(backend, q, k, v, lam, dout, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, lam)]
    with runtime.use_backend(backend):
        out = da.diff_attention(*leaves, 0.35, **kw)
    out.backward(dout)
    return out, [t.grad for t in leaves]


CASES = [
    dict(H=4, HKV=2),                                   # r = 2
    dict(H=4, HKV=4, causal=False),                     # r = 1, bidirectional
    dict(H=8, HKV=2, padding="left"),                   # r = 4, left padding (fully masked early rows)
    dict(H=4, HKV=2, N=23, NK=40, padding="right", D=64),  # prefill after a cache: Nq < Nk
    dict(H=4, HKV=2, N=1, NK=19),                       # one new token
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_kernel_matches_reference(dtype, case):
    case = dict(case)
    B, H, HKV, D = 2, case.pop("H"), case.pop("HKV"), case.pop("D", 32)
    N = case.pop("N", 37)
    NK = case.pop("NK", N)
    kpm = _padding(B, NK, case.pop("padding", None))
    q, k, v = randn(B, H, N, D, dtype=dtype), randn(B, HKV, NK, D, dtype=dtype), randn(B, HKV, NK, D, dtype=dtype)
    lam = torch.tensor(0.41, dtype=dtype, device=DEVICE)
    dout = randn(B, N, H // 2, 2 * D, dtype=dtype)
    out, grads = _run("triton", q, k, v, lam, dout, key_padding_mask=kpm, **case)
    ref, ref_grads = _run("torch", q, k, v, lam, dout, key_padding_mask=kpm, **case)
    assert out.shape == (B, N, H // 2, 2 * D)
    assert_close(out, ref, scale=4, msg="out")
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(g, rg, scale=8, msg=name)
    # dlambda sums dY * O2 over every output element: compare relative to its size
    torch.testing.assert_close(grads[3].float(), ref_grads[3].float(), atol=1e-3 if dtype == torch.float32 else 0.1,
                               rtol=1e-3 if dtype == torch.float32 else 3e-2)


def test_lambda_gradient_reaches_the_four_vectors():
    D = 32
    vecs = [randn(D, scale=0.1, requires_grad=True) for _ in range(4)]
    q, k, v = randn(1, 4, 9, D), randn(1, 2, 9, D), randn(1, 2, 9, D)
    grads = []
    for backend in ("triton", "torch"):
        with runtime.use_backend(backend):
            lam = da.diff_lambda(*vecs, da.lambda_init_for_layer(3))
            da.diff_attention(q, k, v, lam, da.lambda_init_for_layer(3)).square().sum().backward()
        grads.append([t.grad.clone() for t in vecs])
        for t in vecs:
            t.grad = None
    for g, rg in zip(*grads):
        torch.testing.assert_close(g, rg, atol=1e-4, rtol=1e-3)


def test_lambda_init_matches_the_spec():
    expected = [0.2, 0.355509, 0.470713, 0.556058, 0.619283]
    assert [round(da.lambda_init_for_layer(i), 6) for i in range(5)] == expected


@pytest.mark.parametrize("heads", [(4, 2), (8, 4), (4, 4)])
def test_reference_and_kernel_match_hf_diffllama_attention(heads):
    """Project with HF's module weights, rotate with HF's RoPE, run ours, o_proj: equals HF's module output."""
    from transformers import DiffLlamaConfig
    from transformers.models.diffllama.modeling_diffllama import (DiffLlamaAttention, DiffLlamaRotaryEmbedding,
                                                                  apply_rotary_pos_emb)

    H, HKV = heads
    cfg = DiffLlamaConfig(hidden_size=64, num_attention_heads=H, num_key_value_heads=HKV, head_dim=16,
                          attn_implementation="eager")
    cfg._attn_implementation = "eager"
    layer = 2
    module = DiffLlamaAttention(cfg, layer_idx=layer).eval()
    B, N = 2, 11
    x = randn(B, N, 64)
    pos = torch.arange(N)[None].expand(B, N)
    cos, sin = DiffLlamaRotaryEmbedding(cfg)(x, pos)
    mask2d = torch.ones(B, N, dtype=torch.long)
    mask2d[1, :3] = 0
    allowed = torch.tril(torch.ones(N, N, dtype=torch.bool)) & mask2d.bool()[:, None, None, :]
    additive = torch.zeros(B, 1, N, N).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        hf = module(x, (cos, sin), attention_mask=additive)[0]
        q = module.q_proj(x).view(B, N, H, 16).transpose(1, 2)
        k = module.k_proj(x).view(B, N, HKV, 16).transpose(1, 2)
        v = module.v_proj(x).view(B, N, HKV, 16).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        lam = da.diff_lambda(module.lambda_q1, module.lambda_k1, module.lambda_q2, module.lambda_k2, module.lambda_init)
        assert module.lambda_init == da.lambda_init_for_layer(layer)
        valid = mask2d.bool()
        for backend in ("torch", "triton"):
            with runtime.use_backend(backend):
                y = da.diff_attention(q, k, v, lam, module.lambda_init, key_padding_mask=mask2d, eps=cfg.rms_norm_eps)
            ours = module.o_proj(y.reshape(B, N, H * 16))
            torch.testing.assert_close(ours[valid], hf[valid], atol=2e-6 if backend == "torch" else 2e-5, rtol=1e-5)


def test_bad_inputs_raise():
    q, k, v = randn(1, 4, 8, 32), randn(1, 2, 8, 32), randn(1, 2, 8, 32)
    lam = torch.tensor(0.3, device=DEVICE)
    with pytest.raises(ValueError, match="even number of key/value heads"):
        da.diff_attention(q, randn(1, 1, 8, 32), randn(1, 1, 8, 32), lam, 0.2)
    with pytest.raises(ValueError, match="even number of key/value heads"):
        da.diff_attention(randn(1, 6, 8, 32), randn(1, 4, 8, 32), randn(1, 4, 8, 32), lam, 0.2)
    with pytest.raises(ValueError, match="lambda_full must hold one value"):
        da.diff_attention(q, k, v, torch.ones(2, device=DEVICE), 0.2)
    with pytest.raises(TypeError, match="lambda_init must be a Python number"):
        da.diff_attention(q, k, v, lam, torch.tensor(0.2))
    with pytest.raises(TypeError, match="v has dtype"):
        da.diff_attention(q, k, v.half(), lam, 0.2)
    with pytest.raises(ValueError, match="k and v must both have shape"):
        da.diff_attention(q, k, randn(1, 2, 7, 32), lam, 0.2)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        da.diff_attention(q, k, v, lam, 0.2, key_padding_mask=torch.ones(1, 9, dtype=torch.long, device=DEVICE))
    with runtime.use_backend("triton"):
        with pytest.raises(ValueError, match="head dim 320"):
            da.diff_attention(randn(1, 4, 2, 320), randn(1, 2, 2, 320), randn(1, 2, 2, 320), lam, 0.2)


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_large_shapes_on_cuda(dtype):
    for H, HKV, D in ((8, 8, 128), (8, 2, 64)):
        q, k, v = randn(2, H, 700, D, dtype=dtype), randn(2, HKV, 700, D, dtype=dtype), randn(2, HKV, 700, D, dtype=dtype)
        lam = torch.tensor(0.4, dtype=dtype, device=DEVICE)
        dout = randn(2, 700, H // 2, 2 * D, dtype=dtype)
        out, grads = _run("triton", q, k, v, lam, dout, key_padding_mask=_padding(2, 700, "left"))
        ref, ref_grads = _run("torch", q, k, v, lam, dout, key_padding_mask=_padding(2, 700, "left"))
        assert_close(out, ref, scale=4)
        for g, rg in zip(grads[:3], ref_grads[:3]):
            assert_close(g, rg, scale=8)


@pytest.mark.parametrize("heads,bias", [((4, 2), False), ((8, 8), True)])
def test_module_matches_hf_diffllama_attention(heads, bias):
    """nn.DifferentialAttention loaded with HF's state dict equals HF's module (eager), forward and gradients."""
    from transformers import DiffLlamaConfig
    from transformers.models.diffllama.modeling_diffllama import DiffLlamaAttention, DiffLlamaRotaryEmbedding

    from tritonformers.nn import DifferentialAttention

    H, HKV = heads
    cfg = DiffLlamaConfig(hidden_size=64, num_attention_heads=H, num_key_value_heads=HKV, head_dim=16,
                          attention_bias=bias)
    cfg._attn_implementation = "eager"
    hf = DiffLlamaAttention(cfg, layer_idx=1)
    ours = DifferentialAttention(cfg, layer_idx=1)
    ours.load_state_dict(hf.state_dict())
    B, N = 2, 10
    x = randn(B, N, 64)
    cos, sin = DiffLlamaRotaryEmbedding(cfg)(x, torch.arange(N)[None].expand(B, N))
    mask = torch.ones(B, N, dtype=torch.long)
    mask[0, :2] = 0
    allowed = torch.tril(torch.ones(N, N, dtype=torch.bool)) & mask.bool()[:, None, None, :]
    additive = torch.zeros(B, 1, N, N).masked_fill(~allowed, torch.finfo(torch.float32).min)
    dout = randn(B, N, 64)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    want = hf(xs[0], (cos, sin), attention_mask=additive)[0]
    (want * dout * mask[..., None]).sum().backward()
    with runtime.use_backend("triton"):
        got = ours(xs[1], (cos, sin), attention_mask=mask)[0]
    (got * dout * mask[..., None]).sum().backward()
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, atol=2e-5, rtol=1e-4)
    for name in ("lambda_q1", "lambda_k2", "q_proj.weight", "v_proj.weight"):
        g = dict(ours.named_parameters())[name].grad
        torch.testing.assert_close(g, dict(hf.named_parameters())[name].grad, atol=5e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------------- decode

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("H,HKV,nq,nmax,padded", [(4, 2, 1, 70, True), (8, 2, 3, 40, False), (4, 4, 16, 33, True)])
def test_decode_matches_reference_and_prefill(dtype, H, HKV, nq, nmax, padded):
    B, D = 3, 32
    lens = torch.tensor([nmax, max(nq, nmax // 2), nq], device=DEVICE)
    q = randn(B, H, nq, D, dtype=dtype)
    k_cache, v_cache = randn(B, HKV, nmax, D, dtype=dtype), randn(B, HKV, nmax, D, dtype=dtype)
    lam = torch.tensor(0.37, dtype=dtype, device=DEVICE)
    kpm = None
    if padded:  # left padding inside the valid prefix, zeros past it (a static cache's mask)
        kpm = (torch.arange(nmax, device=DEVICE)[None, :] < lens[:, None]).to(torch.int64)
        kpm[0, :5] = 0
    out = torch.full((B, nq, H // 2, 2 * D), float("nan"), dtype=dtype, device=DEVICE)
    with runtime.use_backend("triton"):
        got = da.diff_decode_attention(q, k_cache, v_cache, lens, lam, 0.3, key_padding_mask=kpm, out=out)
    assert got is out
    ref = da.diff_decode_attention_reference(q, k_cache, v_cache, lens, lam, 0.3, key_padding_mask=kpm)
    valid = torch.ones(B, nq, dtype=torch.bool)
    assert_close(got[valid], ref[valid], scale=4)
    with runtime.use_backend("triton"):  # the prefill kernel over row 0's valid prefix agrees
        prefill = da.diff_attention(q[:1], k_cache[:1, :, :nmax], v_cache[:1, :, :nmax], lam, 0.3,
                                    key_padding_mask=None if kpm is None else kpm[:1])
    assert_close(got[:1], prefill, scale=4)


def test_decode_bad_inputs():
    q, kc = randn(1, 4, 1, 32), randn(1, 2, 16, 32)
    lam = torch.tensor(0.3, device=DEVICE)
    lens = torch.tensor([4], device=DEVICE)
    with pytest.raises(ValueError, match="1 to 16 new queries"):
        da.diff_decode_attention(randn(1, 4, 17, 32), kc, kc, lens, lam, 0.2)
    with pytest.raises(TypeError, match="cache_lens must have dtype"):
        da.diff_decode_attention(q, kc, kc, lens.float(), lam, 0.2)
    with pytest.raises(ValueError, match="cache_lens must have shape"):
        da.diff_decode_attention(q, kc, kc, torch.tensor([4, 4], device=DEVICE), lam, 0.2)

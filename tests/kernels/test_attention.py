"""Flash attention (ALiBi, causal, key padding, dropout, lse): kernel vs reference, forward and gradients."""

import math

import pytest
import torch

from tests.helpers import DEVICE, FLOAT_DTYPES, assert_close, poison, randn
from tritonformers import runtime
from tritonformers.kernels import attention as attn


def _padding(B, NK, kind):
    if kind is None:
        return None
    m = torch.ones(B, NK, dtype=torch.bool)
    if kind == "left":
        for b in range(B):
            m[b, : (3 * b + 2) % NK] = False
    elif kind == "right":
        for b in range(B):
            m[b, NK - (2 * b + 3) % NK:] = False
    elif kind == "hole":
        m[:, NK // 3: NK // 2] = False
        m[-1, 1:] = False  # a row with a single real key
    return m.to(DEVICE)


def _run(fn, q, k, v, slopes, do, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    sl = slopes.detach().clone().requires_grad_(True) if slopes is not None else None
    out, lse = fn(*leaves, alibi_slopes=sl, return_lse=True, **kw)
    out.backward(do)
    grads = [t.grad for t in leaves] + ([sl.grad] if sl is not None else [])
    return out, lse, grads


def _check(dtype, B=2, H=2, NQ=37, NK=37, D=32, alibi=False, causal=False, padding=None, scale=None,
           q_stride_view=False):
    q = randn(B, H, NQ, D, dtype=dtype)
    k = randn(B, H, NK, D, dtype=dtype)
    v = randn(B, H, NK, D, dtype=dtype)
    if q_stride_view:  # q as a [B, N, H, D] buffer seen as [B, H, N, D], as a fused QKV projection gives
        q = randn(B, NQ, H, D, dtype=dtype).transpose(1, 2)
    slopes = attn.alibi_slopes(H, device=DEVICE) if alibi else None
    kpm = _padding(B, NK, padding)
    do = randn(B, H, NQ, D, dtype=dtype)
    kw = dict(causal=causal, key_padding_mask=kpm, scale=scale)
    with runtime.use_backend("triton"):
        out, lse, grads = _run(attn.attention, q, k, v, slopes, do, **kw)
    ref_out, ref_lse, ref_grads = _run(attn.attention_reference, q, k, v, slopes, do, **kw)
    assert_close(out, ref_out, scale=4, msg="out")
    both_empty = torch.isneginf(lse) & torch.isneginf(ref_lse)
    # The reference rounds scores to the model dtype (HF's arithmetic), the kernel keeps them in float32: in
    # half precision the two lse differ by up to |score| * eps(dtype) (bf16: ~3e-3 seen on CUDA), so the
    # lse is held to the dtype's tolerance there and to float32's only for float32 inputs.
    assert_close(torch.where(both_empty, 0, lse), torch.where(both_empty, 0, ref_lse),
                 torch.float32 if dtype == torch.float32 else dtype, msg="lse")
    for name, g, rg in zip(("dq", "dk", "dv", "dslopes"), grads, ref_grads):
        # dslopes sums ds * position over every score: its error grows with the count, so compare relatively.
        tol_scale = 8 if name != "dslopes" else 8 * math.sqrt(NQ * NK)
        assert_close(g, rg, dtype, scale=tol_scale, msg=name)


# Pairwise coverage of the options (not the full cross product), at fp32 and fp16.
CASES = [
    dict(),
    dict(causal=True),
    dict(alibi=True),
    dict(padding="left", alibi=True),
    dict(padding="right", causal=True),
    dict(padding="hole", causal=True, alibi=True),
    dict(NQ=5, NK=45, causal=True, alibi=True, D=80),        # prefill after a cache: bottom-right causal
    dict(NQ=45, NK=6, causal=True, D=64),                     # early rows see nothing: output 0
    dict(NQ=1, NK=33, padding="left", alibi=True, D=96),
    dict(NQ=12, NK=12, D=8, causal=True, padding="left"),     # tiny test checkpoints use small heads
    dict(NQ=19, NK=50, D=128, scale=0.3, q_stride_view=True),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_kernel_matches_reference(dtype, case):
    _check(dtype, **case)


def test_empty_rows_are_zero_with_neg_inf_lse():
    q, k, v = (randn(1, 2, 8, 32) for _ in range(3))
    kpm = torch.zeros(1, 8, dtype=torch.bool, device=DEVICE)
    with runtime.use_backend("triton"):
        out, lse = attn.attention(q, k, v, key_padding_mask=kpm, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_dropout_matches_reference_with_the_kernels_mask():
    B, H, NQ, NK, D, p = 1, 2, 33, 40, 32, 0.3
    q, k, v = randn(B, H, NQ, D), randn(B, H, NK, D), randn(B, H, NK, D)
    do = randn(B, H, NQ, D)
    slopes = attn.alibi_slopes(H, device=DEVICE)
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # what attention() draws after the same seeding
    keep = attn.dropout_keep_mask(B, H, NQ, NK, p, seed, DEVICE)
    assert 0.55 < keep.float().mean().item() < 0.85
    torch.manual_seed(123)
    with runtime.use_backend("triton"):
        out, _, grads = _run(attn.attention, q, k, v, slopes, do, causal=True, dropout_p=p)
    ref_out, _, ref_grads = _run(attn.attention_reference, q, k, v, slopes, do, causal=True, dropout_p=p,
                                 dropout_mask=keep)
    assert_close(out, ref_out, scale=4)
    for g, rg in zip(grads[:3], ref_grads[:3]):
        assert_close(g, rg, scale=8)
    torch.manual_seed(123)
    with runtime.use_backend("triton"):
        again = attn.attention(q, k, v, alibi_slopes=slopes, causal=True, dropout_p=p)
    assert torch.equal(again, out.detach()), "dropout must be reproducible from torch.manual_seed"


def test_alibi_slopes_match_hf():
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    for n in (1, 6, 12, 16, 32, 112):
        mask = torch.ones(1, 3)
        hf = build_alibi_tensor(mask, n, torch.float32)[:, 0, 1]  # position 1 -> the slope itself
        assert torch.equal(attn.alibi_slopes(n), hf), n


def test_reference_matches_hf_bloom_scores_with_left_padding():
    """The ALiBi + mask semantics equal BLOOM's eager attention (fp32, valid rows)."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    B, H, N, D = 2, 4, 9, 16
    q, k, v = randn(B, H, N, D), randn(B, H, N, D), randn(B, H, N, D)
    mask = torch.ones(B, N, dtype=torch.long, device=DEVICE)
    mask[1, :3] = 0
    alibi = build_alibi_tensor(mask, H, torch.float32).view(B, H, 1, N)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D) + alibi
    allowed = torch.tril(torch.ones(N, N, dtype=torch.bool, device=DEVICE)) & mask.bool()[:, None, None, :]
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    hf = torch.softmax(scores, -1) @ v
    slopes = attn.alibi_slopes(H, device=DEVICE)
    ours = attn.attention_reference(q, k, v, causal=True, alibi_slopes=slopes, key_padding_mask=mask)
    with runtime.use_backend("triton"):
        fused = attn.attention(q, k, v, causal=True, alibi_slopes=slopes, key_padding_mask=mask)
    valid = mask.bool()[:, None, :, None].expand_as(hf)
    torch.testing.assert_close(ours[valid], hf[valid], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused[valid], hf[valid], atol=1e-5, rtol=1e-4)


def test_bad_inputs_raise_before_launch():
    q, k, v = randn(1, 2, 8, 32), randn(1, 2, 8, 32), randn(1, 2, 8, 32)
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        attn.attention(q[0], k, v)
    with pytest.raises(TypeError, match="k has dtype"):
        attn.attention(q, k.half(), v)
    with pytest.raises(TypeError, match="q must have dtype"):
        attn.attention(q.long(), k.long(), v.long())
    with pytest.raises(ValueError, match="k must have shape"):
        attn.attention(q, randn(1, 3, 8, 32), randn(1, 3, 8, 32))
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        attn.attention(q, k, v, alibi_slopes=torch.ones(3, device=DEVICE))
    with pytest.raises(TypeError, match="alibi_slopes must have dtype"):
        attn.attention(q, k, v, alibi_slopes=torch.ones(2, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        attn.attention(q, k, v, key_padding_mask=torch.ones(1, 7, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="dropout_p"):
        attn.attention(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match="scale"):
        attn.attention(q, k, v, scale=-1.0)
    with runtime.use_backend("triton"):
        with pytest.raises(ValueError, match="head dim 320"):
            attn.attention(randn(1, 1, 4, 320), randn(1, 1, 4, 320), randn(1, 1, 4, 320))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("layout,alibi,padding,dropout", [("bnh3d", True, "left", 0.0), ("bn3hd", False, None, 0.25)])
def test_packed_attention_matches_attention_of_the_views(dtype, layout, alibi, padding, dropout):
    """packed_attention(qkv) = attention(q, k, v) of its views, forward and the one packed gradient, on the kernel
    and the reference; BLOOM's [B, N, H, 3, D] layout and a [B, N, 3, H, D] projection passed transposed."""
    B, N, H, D = 2, 21, 2, 24
    shape = (B, N, H, 3, D) if layout == "bnh3d" else (B, N, 3, H, D)
    base = randn(*shape, dtype=dtype)
    slopes = attn.alibi_slopes(H, device=DEVICE) if alibi else None
    kw = dict(causal=True, key_padding_mask=_padding(B, N, padding), dropout_p=dropout)
    do = randn(B, H, N, D, dtype=dtype)
    results = {}
    for backend in ("triton", "torch"):
        for packed in (True, False):
            qkv = base.detach().clone().requires_grad_(True)
            sl = slopes.detach().clone().requires_grad_(True) if alibi else None
            view = qkv if layout == "bnh3d" else qkv.transpose(2, 3)
            torch.manual_seed(7)  # the same dropout seed for both calls
            with runtime.use_backend(backend):
                if packed:
                    out = attn.packed_attention(view, alibi_slopes=sl, **kw)
                else:
                    out = attn.attention(*attn.split_packed_qkv(view), alibi_slopes=sl, **kw)
            out.backward(do)
            results[backend, packed] = (out, qkv.grad, sl.grad if alibi else None)
    for backend in ("triton", "torch"):
        for a, b in zip(results[backend, True], results[backend, False]):
            if a is not None:
                assert_close(a, b, dtype)
    if dropout == 0.0:  # the kernel's dropout draws differ from torch's: compared above per backend only
        kernel, ref = results["triton", True], results["torch", True]
        assert_close(kernel[0], ref[0], scale=4)
        assert_close(kernel[1], ref[1], dtype, scale=8)


def test_packed_attention_bad_inputs():
    with pytest.raises(ValueError, match="qkv must have 5 dimensions"):
        attn.packed_attention(randn(1, 8, 2, 32))
    with pytest.raises(ValueError, match=r"qkv must have shape \[B, N, n_head, 3, head_dim\]"):
        attn.packed_attention(randn(1, 8, 2, 4, 32))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        attn.packed_attention(randn(1, 8, 2, 3, 32), key_padding_mask=torch.ones(1, 7, dtype=torch.bool, device=DEVICE))


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_large_shapes_on_cuda(dtype):
    _check(dtype, B=2, H=4, NQ=1000, NK=1000, D=128, alibi=True, causal=True, padding="left")
    _check(dtype, B=1, H=4, NQ=300, NK=2100, D=64, alibi=True, causal=True)


# ---------------------------------------------------------------------------------------------- decode

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("nq,nmax,d,alibi,padded", [
    (1, 100, 32, True, True),
    (3, 70, 64, False, False),
    (16, 45, 80, True, False),
    (1, 5, 128, False, True),
])
def test_decode_matches_reference_and_full_attention(dtype, nq, nmax, d, alibi, padded):
    B, H = 3, 2
    lens = torch.tensor([nmax, max(nq, nmax // 2), nq], device=DEVICE)
    q = randn(B, H, nq, d, dtype=dtype)
    k_cache, v_cache = randn(B, H, nmax, d, dtype=dtype), randn(B, H, nmax, d, dtype=dtype)
    slopes = attn.alibi_slopes(H, device=DEVICE) if alibi else None
    kpm = None
    if padded:  # left padding inside each row's valid length, zeros past it (a static cache's mask)
        kpm = (torch.arange(nmax, device=DEVICE)[None, :] < lens[:, None]).to(torch.int64)
        kpm[0, :7 % nmax] = 0
    out = poison(torch.empty_like(q))
    with runtime.use_backend("triton"):
        got = attn.decode_attention(q, k_cache, v_cache, lens, alibi_slopes=slopes, key_padding_mask=kpm, out=out)
    assert got is out
    ref = attn.decode_attention_reference(q, k_cache, v_cache, lens, alibi_slopes=slopes, key_padding_mask=kpm)
    assert_close(got, ref, scale=4)
    for b in range(B):  # the same as prefill attention over the valid prefix
        L = int(lens[b])
        full = attn.attention_reference(q[b:b + 1], k_cache[b:b + 1, :, :L], v_cache[b:b + 1, :, :L], causal=True,
                                        alibi_slopes=slopes, key_padding_mask=None if kpm is None else kpm[b:b + 1, :L])
        assert_close(got[b:b + 1], full, scale=4)


def test_decode_bad_inputs():
    q, kc = randn(2, 2, 1, 32), randn(2, 2, 16, 32)
    lens = torch.tensor([3, 4], device=DEVICE)
    with pytest.raises(ValueError, match="1 to 16 new queries"):
        attn.decode_attention(randn(2, 2, 17, 32), kc, kc, lens)
    with pytest.raises(TypeError, match="cache_lens must have dtype"):
        attn.decode_attention(q, kc, kc, lens.float())
    with pytest.raises(ValueError, match="cache_lens must have shape"):
        attn.decode_attention(q, kc, kc, lens[:1])
    with pytest.raises(ValueError, match="k_cache and v_cache"):
        attn.decode_attention(q, kc, randn(2, 2, 15, 32), lens)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        attn.decode_attention(q, kc, kc, lens, key_padding_mask=torch.ones(2, 15, dtype=torch.long, device=DEVICE))

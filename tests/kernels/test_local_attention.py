"""Reformer local attention: kernel vs reference (HF's op order) and the module vs HF's LocalSelfAttention."""

import pytest
import torch

from tests.helpers import DEVICE, FLOAT_DTYPES, assert_close, randn
from tritonformers import runtime
from tritonformers.kernels import local_attention as la


def _padding(B, L, kind):
    if kind is None:
        return None
    m = torch.ones(B, L, dtype=torch.long)
    for b in range(B):
        if kind == "left":
            m[b, : 5 * b + 13] = 0  # batch 0: a whole chunk and more masked (HF's sum quirk)
        else:
            m[b, L - (3 * b + 4):] = 0
    return m.to(DEVICE)


def _run(fn, q, k, v, dout, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = fn(*leaves, return_lse=True, **kw)
    out.backward(dout)
    return [out, lse] + [t.grad for t in leaves]


def _compare(got, want, dtype, names=("out", "lse", "dq", "dk", "dv")):
    for name, g, w in zip(names, got, want):
        if dtype == torch.float32:
            assert_close(g, w, scale=4, msg=name)
        else:  # the reference runs HF's half-precision op order; compare relative norms
            assert torch.isfinite(g).all(), name
            err = ((g.double() - w.double()).norm() / w.double().norm()).item()
            assert err < 2e-2, f"{name}: relative error {err:.2e}"


CASES = [
    dict(chunk_length=8),
    dict(chunk_length=6, num_chunks_before=2, num_chunks_after=1, causal=True),
    dict(chunk_length=12, padding="left", causal=True),
    dict(chunk_length=12, padding="right", num_chunks_before=0),
    dict(chunk_length=16, num_chunks_before=2, num_chunks_after=2, padding="right"),  # 3 chunks < 5: repeats
    dict(chunk_length=64, causal=True, padding="left"),                                # L <= c: unchunked
    dict(chunk_length=16, scale=0.25, D=64),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_kernel_matches_reference(dtype, case):
    case = dict(case)
    B, H, L, D = 2, 2, 48, case.pop("D", 32)
    kw = dict(case, key_padding_mask=_padding(B, L, case.pop("padding", None)))
    kw.pop("padding", None)
    q, k, v, dout = (randn(B, H, L, D, dtype=dtype) for _ in range(4))
    with runtime.use_backend("triton"):
        got = _run(la.local_attention, q, k, v, dout, **kw)
    want = _run(la.local_attention_reference, q, k, v, dout, **kw)
    _compare(got, want, dtype)


def test_fully_masked_rows_sum_their_values_as_hf():
    """exp(S - lse) with lse rounded next to MASK = -1e9: a fully masked query sums its keys' values."""
    q, k, v = randn(1, 1, 16, 32), randn(1, 1, 16, 32), randn(1, 1, 16, 32)
    kpm = torch.ones(1, 16, dtype=torch.long, device=DEVICE)
    kpm[0, :8] = 0
    with runtime.use_backend("triton"):
        out = la.local_attention(q, k, v, chunk_length=8, num_chunks_before=0, key_padding_mask=kpm)
    torch.testing.assert_close(out[0, 0, :8], v[0, 0, :8].sum(0).expand(8, -1), atol=1e-5, rtol=1e-5)


def test_dropout_matches_reference_with_the_kernels_mask():
    B, H, L, D, p = 1, 2, 48, 32, 0.25
    kw = dict(chunk_length=16, num_chunks_before=1, num_chunks_after=1, causal=True, dropout_p=p)
    q, k, v, dout = (randn(B, H, L, D) for _ in range(4))
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    keep = la.local_dropout_keep_mask(B, H, L, 16, 1, 1, p, seed, DEVICE)
    assert 0.6 < keep.float().mean().item() < 0.9
    torch.manual_seed(7)
    with runtime.use_backend("triton"):
        got = _run(la.local_attention, q, k, v, dout, **kw)
    want = _run(la.local_attention_reference, q, k, v, dout, dropout_mask=keep, **kw)
    _compare(got, want, torch.float32)


@pytest.mark.parametrize("setup", [
    dict(is_decoder=False, before=1, after=0, L=24, mask=None),
    dict(is_decoder=True, before=2, after=1, L=30, mask="left"),
    dict(is_decoder=False, before=0, after=1, L=24, mask="right"),
    dict(is_decoder=True, before=1, after=0, L=5, mask="left"),     # L <= chunk: HF's unchunked path
])
def test_module_matches_hf_local_self_attention(setup):
    from transformers import ReformerConfig
    from transformers.models.reformer.modeling_reformer import LocalSelfAttention as HFLocal

    from tritonformers.nn import LocalSelfAttention

    cfg = ReformerConfig(hidden_size=32, num_attention_heads=2, attention_head_size=16, local_attn_chunk_length=6,
                         local_num_chunks_before=setup["before"], local_num_chunks_after=setup["after"],
                         is_decoder=setup["is_decoder"], local_attention_probs_dropout_prob=0.0)
    hf = HFLocal(cfg, layer_idx=0).eval()
    ours = LocalSelfAttention(cfg, layer_idx=0).eval()
    ours.load_state_dict(hf.state_dict())
    B, L = 2, setup["L"]
    x = randn(B, L, 32)
    mask = None
    if setup["mask"] is not None:
        mask = torch.ones(B, L, dtype=torch.long)
        if setup["mask"] == "left":
            mask[1, :4] = 0
        else:
            mask[0, -5:] = 0
    with torch.no_grad():
        want = hf(x, attention_mask=mask).hidden_states
    for backend in ("torch", "triton"):
        xx = x.clone().requires_grad_(True)
        with runtime.use_backend(backend):
            got = ours(xx, attention_mask=mask).hidden_states
        assert got.shape == want.shape
        torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=1e-4)
    # gradients against HF's module (through the projections)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    dout = randn(B, L, 32)
    hf(xs[0], attention_mask=mask).hidden_states.backward(dout)
    with runtime.use_backend("triton"):
        ours(xs[1], attention_mask=mask).hidden_states.backward(dout)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.key.weight.grad, hf.key.weight.grad, atol=1e-4, rtol=1e-4)


def test_bad_inputs_raise():
    q = randn(1, 2, 24, 32)
    with pytest.raises(ValueError, match="multiple of chunk_length"):
        la.local_attention(q, q, q, chunk_length=7)
    with pytest.raises(ValueError, match="chunk_length must be an integer"):
        la.local_attention(q, q, q, chunk_length=0)
    with pytest.raises(ValueError, match="num_chunks_before must be an integer"):
        la.local_attention(q, q, q, chunk_length=8, num_chunks_before=-1)
    with pytest.raises(ValueError, match="one shape"):
        la.local_attention(q, randn(1, 2, 16, 32), q, chunk_length=8)
    with pytest.raises(TypeError, match="k has dtype"):
        la.local_attention(q, q.half(), q, chunk_length=8)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        la.local_attention(q, q, q, chunk_length=8, key_padding_mask=torch.ones(1, 23, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="dropout_p"):
        la.local_attention(q, q, q, chunk_length=8, dropout_p=1.5)


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_large_shapes_on_cuda(dtype):
    B, H, L, D = 1, 4, 4096, 128
    q, k, v, dout = (randn(B, H, L, D, dtype=dtype) for _ in range(4))
    kw = dict(chunk_length=128, num_chunks_before=1, causal=True, key_padding_mask=_padding(B, L, "right"))
    with runtime.use_backend("triton"):
        got = _run(la.local_attention, q, k, v, dout, **kw)
    want = _run(la.local_attention_reference, q, k, v, dout, **kw)
    _compare(got, want, dtype)

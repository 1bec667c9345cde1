"""Reformer LSH attention: kernel vs reference (HF's op order), hashing vs HF, the module vs HF's LSHSelfAttention."""

import pytest
import torch

from tests.helpers import DEVICE, FLOAT_DTYPES, assert_close, randn
from tritonformers import runtime
from tritonformers.kernels import lsh_attention as lsh


def _padding(B, L, kind):
    if kind is None:
        return None
    m = torch.ones(B, L, dtype=torch.long)
    if kind == "left":
        m[0, :13] = 0
    else:
        m[1, L - 7:] = 0
    return m.to(DEVICE)


def _run(backend, qk, v, dout, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (qk, v)]
    with runtime.use_backend(backend):
        out, buckets = lsh.lsh_attention(*leaves, return_buckets=True, **kw)
    out.backward(dout)
    return out, buckets, [t.grad for t in leaves]


# pairwise over: chunk length, before/after in {0, 1, 2}, 1-4 hashes, int / list buckets, causal, padding
CASES = [
    dict(chunk_length=8, num_hashes=1, num_buckets=4),
    dict(chunk_length=8, num_hashes=2, num_buckets=[2, 4], num_chunks_before=0, num_chunks_after=1),
    dict(chunk_length=6, num_hashes=3, num_buckets=[2, 4], causal=True, num_chunks_before=2, num_chunks_after=1,
         L=24, H=1),
    dict(chunk_length=12, num_hashes=2, num_buckets=6, causal=True, padding="left"),
    dict(chunk_length=16, num_hashes=4, num_buckets=[4], padding="right", num_chunks_before=2, num_chunks_after=2,
         L=32, H=1),
    dict(chunk_length=64, causal=True, padding="left", num_hashes=2, num_buckets=4),  # L <= c: unchunked
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_kernel_matches_reference(dtype, case):
    case = dict(case)
    B, H, L, D = 2, case.pop("H", 2), case.pop("L", 48), 32
    case["key_padding_mask"] = _padding(B, L, case.pop("padding", None))
    qk, v, dout = (randn(B, H, L, D, dtype=dtype) for _ in range(3))
    out, buckets, grads = _run("triton", qk, v, dout, hash_seed=11, **case)
    ref, ref_buckets, ref_grads = _run("torch", qk, v, dout, hash_seed=11, **case)
    assert (buckets is None) == (ref_buckets is None) == (L <= case["chunk_length"])
    if buckets is not None:
        assert torch.equal(buckets, ref_buckets)
        assert buckets.shape == (B, H, case["num_hashes"], L)
    scale = 4 if dtype == torch.float32 else 8
    assert_close(out, ref, scale=scale, msg="out")
    assert_close(grads[0], ref_grads[0], scale=2 * scale, msg="dqk")
    assert_close(grads[1], ref_grads[1], scale=2 * scale, msg="dv")


def test_reusing_buckets_skips_the_draw():
    qk, v = randn(1, 2, 32, 16), randn(1, 2, 32, 16)
    out1, buckets = lsh.lsh_attention(qk, v, chunk_length=8, num_hashes=2, num_buckets=4, return_buckets=True)
    state = torch.random.get_rng_state()
    with runtime.use_backend("triton"):
        out2 = lsh.lsh_attention(qk, v, chunk_length=8, num_hashes=2, buckets=buckets)
    assert torch.equal(torch.random.get_rng_state(), state), "given buckets, no rotation may be drawn"
    assert_close(out2, out1)


def test_dropout_matches_reference_with_the_kernels_mask():
    B, H, L, D, p = 1, 2, 32, 16, 0.2
    qk, v, dout = (randn(B, H, L, D) for _ in range(3))
    buckets = lsh.lsh_hash(qk, 2, 4)
    kw = dict(chunk_length=8, num_hashes=2, num_chunks_before=1, num_chunks_after=0, causal=True, dropout_p=p)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    keep = lsh.lsh_dropout_keep_mask(B, H, 2 * L, 8, 1, 0, p, seed, DEVICE)
    torch.manual_seed(5)
    out, _, grads = _run("triton", qk, v, dout, buckets=buckets, **kw)
    leaves = [t.clone().requires_grad_(True) for t in (qk, v)]
    ref = lsh.lsh_attention_reference(*leaves, lsh.lsh_sort(buckets), dropout_mask=keep, **kw)
    ref.backward(dout)
    assert_close(out, ref, scale=4)
    assert_close(grads[0], leaves[0].grad, scale=8)
    assert_close(grads[1], leaves[1].grad, scale=8)


def test_auto_num_buckets_matches_the_spec():
    assert lsh.auto_num_buckets(32, 8, 32) == 8
    assert lsh.auto_num_buckets(4096, 64, 4096) == 128
    assert lsh.auto_num_buckets(524288, 64, 524288) == [128, 128]
    assert lsh.auto_num_buckets(65536, 256, 65536) == 512


def _hf_pair(**cfg_kw):
    from transformers import ReformerConfig
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention as HFLSH

    from tritonformers.nn import LSHSelfAttention

    defaults = dict(hidden_size=32, num_attention_heads=2, attention_head_size=16, lsh_attn_chunk_length=8,
                    lsh_num_chunks_before=1, lsh_num_chunks_after=0, num_hashes=2, num_buckets=4,
                    lsh_attention_probs_dropout_prob=0.0, hash_seed=None, is_decoder=False,
                    max_position_embeddings=64)
    defaults.update(cfg_kw)
    hf_cfg, our_cfg = ReformerConfig(**defaults), ReformerConfig(**defaults)
    hf = HFLSH(hf_cfg, layer_idx=0)
    ours = LSHSelfAttention(our_cfg, layer_idx=0)
    ours.load_state_dict(hf.state_dict())
    return hf, ours, our_cfg


@pytest.mark.parametrize("setup", [
    dict(cfg={}, L=32, mask=None),
    dict(cfg=dict(is_decoder=True, num_hashes=3, num_buckets=[2, 4], lsh_num_chunks_after=1), L=24, mask="left"),
    dict(cfg=dict(hash_seed=7, num_buckets=None, lsh_num_chunks_before=2), L=32, mask="right"),
    dict(cfg=dict(is_decoder=True), L=6, mask="left"),  # L <= chunk: HF's unchunked path
])
def test_module_matches_hf_lsh_self_attention(setup):
    hf, ours, our_cfg = _hf_pair(**setup["cfg"])
    B, L = 2, setup["L"]
    x = randn(B, L, 32)
    mask = None
    if setup["mask"] == "left":
        mask = torch.ones(B, L, dtype=torch.long)
        mask[1, :3] = 0
    elif setup["mask"] == "right":
        mask = torch.ones(B, L, dtype=torch.long)
        mask[0, -5:] = 0
    dout = randn(B, L, 32)
    xs = [x.clone().requires_grad_(True) for _ in range(3)]
    torch.manual_seed(1234)
    want = hf(xs[0], attention_mask=mask)
    want.hidden_states.backward(dout)
    for i, backend in ((1, "torch"), (2, "triton")):
        torch.manual_seed(1234)  # the same rotations as HF's draw
        with runtime.use_backend(backend):
            got = ours(xs[i], attention_mask=mask)
        got.hidden_states.backward(dout)
        if want.buckets is None:
            assert got.buckets is None
        else:
            assert torch.equal(got.buckets, want.buckets)
        torch.testing.assert_close(got.hidden_states, want.hidden_states, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(xs[i].grad, xs[0].grad, atol=1e-4, rtol=1e-4)
    if setup["cfg"].get("num_buckets", 4) is None:  # HF's sticky auto choice, written into the config
        assert ours.num_buckets == hf.num_buckets == our_cfg.num_buckets


def test_bad_inputs_raise():
    qk = randn(1, 2, 24, 16)
    with pytest.raises(ValueError, match="multiple of chunk_length"):
        lsh.lsh_attention(qk, qk, chunk_length=7, num_buckets=4)
    with pytest.raises(ValueError, match="num_buckets must be an even"):
        lsh.lsh_attention(qk, qk, chunk_length=8, num_buckets=3)
    with pytest.raises(ValueError, match="num_buckets must be an even"):
        lsh.lsh_attention(qk, qk, chunk_length=8, num_buckets=[2, 5])
    with pytest.raises(ValueError, match="num_buckets is required"):
        lsh.lsh_attention(qk, qk, chunk_length=8)
    with pytest.raises(ValueError, match="num_hashes must be an integer"):
        lsh.lsh_attention(qk, qk, chunk_length=8, num_buckets=4, num_hashes=0)
    with pytest.raises(ValueError, match="buckets must have shape"):
        lsh.lsh_attention(qk, qk, chunk_length=8, num_hashes=2, buckets=torch.zeros(1, 2, 1, 24, dtype=torch.long))
    with pytest.raises(TypeError, match="v has dtype"):
        lsh.lsh_attention(qk, qk.half(), chunk_length=8, num_buckets=4)
    with pytest.raises(ValueError, match="one shape"):
        lsh.lsh_attention(qk, randn(1, 2, 24, 8), chunk_length=8, num_buckets=4)


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_large_shapes_on_cuda(dtype):
    B, H, L, D = 1, 4, 4096, 64
    qk, v, dout = (randn(B, H, L, D, dtype=dtype) for _ in range(3))
    kw = dict(chunk_length=64, num_hashes=2, num_buckets=64, causal=True, hash_seed=3,
              key_padding_mask=_padding(B, L, "left"))
    out, _, grads = _run("triton", qk, v, dout, **kw)
    ref, _, ref_grads = _run("torch", qk, v, dout, **kw)
    assert_close(out, ref, scale=8)
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, scale=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_signed_argmax_equals_hfs_concatenated_argmax(dtype):
    """Hashing takes argmax(cat([r, -r])) without the copy: same index, ties included (small integers tie often)."""
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        r = torch.randn(3, 5, 7, 8, generator=g).to(dtype)
        if trial % 2:
            r = torch.randint(-3, 4, (3, 5, 7, 8), generator=g).to(dtype)
        want = torch.argmax(torch.cat([r, -r], dim=-1), dim=-1)
        assert torch.equal(lsh._argmax_signed(r), want)

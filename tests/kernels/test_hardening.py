"""Bad or degenerate inputs of the attention kernels, on both backends: cache lengths outside the cache,
empty sequences, ``out=`` buffers, non-contiguous output gradients."""

from __future__ import annotations

import pytest
import torch

import tritonformers.nn.functional as TF
from tritonformers import runtime
from tests.helpers import DEVICE, randn

BACKENDS = ["torch", "triton"]


def _decode_inputs(lens):
    B, H, NMAX, D = 2, 4, 16, 16
    q, k, v = randn(B, H, 1, D), randn(B, H, NMAX, D), randn(B, H, NMAX, D)
    return q, k, v, torch.tensor(lens, device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lens", [[17, 4], [0, 4], [5, 100]])
def test_decode_cache_lens_outside_the_cache_are_refused(backend, lens):
    q, k, v, cache_lens = _decode_inputs(lens)
    with runtime.use_backend(backend):
        with pytest.raises(ValueError, match=r"cache_lens must lie in \[1, 16\]"):
            TF.decode_attention(q, k, v, cache_lens)
        with pytest.raises(ValueError, match=r"cache_lens must lie in \[1, 16\]"):
            TF.diff_decode_attention(q, k[:, :2], v[:, :2], cache_lens, torch.tensor([0.3], device=DEVICE), 0.2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device lengths are only clamped on CUDA")
def test_decode_clamps_device_lengths_to_the_capacity():
    q, k, v, cache_lens = _decode_inputs([16, 4])
    big_k, big_v = (torch.full((2, 4, 32, 16), float("nan"), device=DEVICE) for _ in range(2))
    big_k[:, :, :16], big_v[:, :, :16] = k, v  # slots past the 16-slot view hold NaN: they must never be read
    with runtime.use_backend("triton"):
        got = TF.decode_attention(q, big_k[:, :, :16], big_v[:, :, :16], torch.tensor([40, 4], device=DEVICE))
        want = TF.decode_attention(q, k, v, cache_lens)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sequences_give_empty_results(backend):
    q = randn(1, 2, 0, 16).requires_grad_(True)
    v = randn(1, 2, 0, 16).requires_grad_(True)
    with runtime.use_backend(backend):
        out, lse = TF.local_attention(q, q, v, chunk_length=8, return_lse=True)
        lsh, buckets = TF.lsh_attention(q, v, chunk_length=8, num_hashes=2, num_buckets=4, return_buckets=True)
    assert out.shape == lsh.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0) and buckets.shape == (1, 2, 2, 0)
    (out.sum() + lsh.sum()).backward()
    assert v.grad.shape == v.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_is_validated_alike_on_both_backends(backend):
    q, k, v, cache_lens = _decode_inputs([16, 4])
    with runtime.use_backend(backend):
        with pytest.raises(ValueError, match="out must have shape"):
            TF.decode_attention(q, k, v, cache_lens, out=torch.empty(2, 4, 2, 16, device=DEVICE))
        with pytest.raises(TypeError, match="out"):
            TF.decode_attention(q, k, v, cache_lens, out=torch.empty(2, 4, 1, 16, device=DEVICE, dtype=torch.float16))
        with pytest.raises(ValueError, match="out must be contiguous"):
            TF.decode_attention(q, k, v, cache_lens, out=torch.empty(2, 4, 1, 32, device=DEVICE)[..., ::2])
        out = torch.full((2, 4, 1, 16), float("nan"), device=DEVICE)
        assert TF.decode_attention(q, k, v, cache_lens, out=out) is out and torch.isfinite(out).all()


def test_lsh_backward_takes_a_broadcast_output_gradient():
    qk, v = randn(1, 2, 32, 16).requires_grad_(True), randn(1, 2, 32, 16).requires_grad_(True)
    grads = []
    for backend in BACKENDS:
        qk.grad = v.grad = None
        with runtime.use_backend(backend):
            TF.lsh_attention(qk, v, chunk_length=8, num_hashes=2, num_buckets=4, hash_seed=1).sum().backward()
        grads.append((qk.grad.clone(), v.grad.clone()))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

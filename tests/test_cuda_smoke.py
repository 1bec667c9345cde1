"""CUDA smoke test: every kernel once in bf16 and fp16 (forward and gradients against its PyTorch reference on
the same device), the attention families once in float32 (their own tiles), the integer kernels bit-exact, and each model family once (Triton path against the reference
path). Small enough to run in well under three minutes with compilation; ``bench/gpu_check.sh quick`` runs it
before the headline benchmarks. The CPU suite covers the same ops through the interpreter in depth.
"""

from __future__ import annotations

import os

import pytest
import torch

import tritonformers.nn.functional as TF
from tritonformers import runtime

# TRITONFORMERS_SMOKE_DEVICE=cpu runs it through the interpreter (fp16 only: bf16 is wrong there), to check
# the test itself without a GPU.
DEV = os.environ.get("TRITONFORMERS_SMOKE_DEVICE", "cuda")
pytestmark = pytest.mark.cuda if DEV == "cuda" else []
if DEV == "cuda" and not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

REL_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
HALF = [torch.bfloat16, torch.float16] if DEV == "cuda" else [torch.float16]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def _run(fn, inputs, grad=True):
    """fn(*leaves) under each backend: (output, gradients) of triton and of torch."""
    results = []
    for backend in ("triton", "torch"):
        leaves = _leaves(*inputs)
        with runtime.use_backend(backend):
            out = fn(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        grads = []
        if grad:
            torch.manual_seed(1)
            out.backward(torch.randn_like(out))
            grads = [t.grad for t in leaves if t.requires_grad]
        results.append((out.detach(), grads))
    return results


def _check(fn, inputs, dtype, grad=True, scale=1.0):
    (out, grads), (ref, ref_grads) = _run(fn, inputs, grad)
    tol = REL_TOL[dtype] * scale
    assert _rel(out, ref) < tol, f"output rel {_rel(out, ref):.2e}"
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        if r is not None:
            assert _rel(g, r) < 2 * tol, f"grad {i} rel {_rel(g, r):.2e}"


def r(*shape, dtype):
    return torch.randn(*shape, device=DEV).to(dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_norms_activations_rotary(dtype):
    x, w, b = r(64, 1024, dtype=dtype), r(1024, dtype=dtype), r(1024, dtype=dtype)
    _check(lambda x, w, b: TF.layer_norm(x, w, b), (x, w, b), dtype)
    _check(lambda x, w, b, res: TF.layer_norm(x, w, b, residual=res)[0], (x, w, b, r(64, 1024, dtype=dtype)), dtype)
    _check(lambda x, w: TF.rms_norm(x, w), (x, w), dtype)
    for approximate in ("none", "tanh", "bloom"):
        _check(lambda x, b: TF.gelu(x, approximate=approximate, bias=b), (x, b), dtype)
    _check(TF.swiglu, (x, r(64, 1024, dtype=dtype)), dtype)
    cos, sin = r(1, 64, 128, dtype=dtype), r(1, 64, 128, dtype=dtype)
    _check(lambda q, k: torch.cat(TF.apply_rotary(q, k, cos, sin), 1), (r(2, 4, 64, 128, dtype=dtype),
                                                                        r(2, 2, 64, 128, dtype=dtype)), dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_fused_linear_cross_entropy(dtype):
    target = torch.randint(0, 5000, (256,), device=DEV)
    target[:7] = -100
    _check(lambda h, w: TF.fused_linear_cross_entropy(h, w, target), (r(256, 256, dtype=dtype),
                                                                       r(5000, 256, dtype=dtype) * 0.05), dtype)


def _check_fp32_oracle(fn, inputs, dtype, grad=True):
    """Triton in ``dtype`` against the reference run on float32 copies (the function the kernel computes:
    float32 scores; the reference in half precision rounds its scores, as HF does)."""
    leaves = _leaves(*inputs)
    with runtime.use_backend("triton"):
        out = fn(*leaves)
    wide = [t.detach().float().requires_grad_(t.requires_grad) for t in leaves]
    with runtime.use_backend("torch"):
        ref = fn(*wide)
    assert _rel(out, ref) < REL_TOL[dtype], f"output rel {_rel(out, ref):.2e}"
    if grad:
        dout = torch.randn_like(ref)
        out.backward(dout.to(out.dtype))
        ref.backward(dout)
        for i, (t, w) in enumerate(zip(leaves, wide)):
            assert _rel(t.grad, w.grad) < 2 * REL_TOL[dtype], f"grad {i} rel {_rel(t.grad, w.grad):.2e}"


@pytest.mark.parametrize("dtype", HALF)
def test_attention_and_decode(dtype):
    # H=4 gives power-of-two ALiBi slopes and N <= 256 integer positions: slope * pos is exact in bf16/fp16,
    # so the kernel's dtype-rounded bias equals the float32 oracle's.
    B, H, N, D = 2, 4, 250, 128
    mask = torch.ones(B, N, dtype=torch.bool, device=DEV)
    mask[0, :20] = False
    slopes = TF.alibi_slopes(H, device=DEV)
    _check_fp32_oracle(lambda q, k, v: TF.attention(q, k, v, causal=True, alibi_slopes=slopes, key_padding_mask=mask),
                       (r(B, H, N, D, dtype=dtype), r(B, H, N, D, dtype=dtype), r(B, H, N, D, dtype=dtype)), dtype)
    _check_fp32_oracle(lambda q, k, v: TF.attention(q, k, v), (r(B, H, 77, 64, dtype=dtype),
                                                               r(B, H, N, 64, dtype=dtype),
                                                               r(B, H, N, 64, dtype=dtype)), dtype)
    kc, vc = r(B, H, 256, D, dtype=dtype), r(B, H, 256, D, dtype=dtype)
    lens = torch.tensor([200, 256], device=DEV)
    _check_fp32_oracle(lambda q, k, v: TF.decode_attention(q, k, v, lens, alibi_slopes=slopes),
                       (r(B, H, 1, D, dtype=dtype), kc, vc), dtype, grad=False)


@pytest.mark.parametrize("dtype", HALF)
def test_differential_attention_and_decode(dtype):
    B, H, HKV, N, D = 2, 8, 4, 200, 64
    lam = torch.tensor([0.3], device=DEV)
    _check(lambda q, k, v: TF.diff_attention(q, k, v, lam, 0.2, causal=True),
           (r(B, H, N, D, dtype=dtype), r(B, HKV, N, D, dtype=dtype), r(B, HKV, N, D, dtype=dtype)), dtype)
    kc, vc = r(B, HKV, 256, D, dtype=dtype), r(B, HKV, 256, D, dtype=dtype)
    lens = torch.tensor([100, 256], device=DEV)
    _check(lambda q: TF.diff_decode_attention(q, kc, vc, lens, lam, 0.2), (r(B, H, 1, D, dtype=dtype),), dtype,
           grad=False)


@pytest.mark.parametrize("dtype", HALF)
def test_local_and_lsh_attention(dtype):
    B, H, N, D = 1, 2, 512, 64
    qkv = (r(B, H, N, D, dtype=dtype), r(B, H, N, D, dtype=dtype), r(B, H, N, D, dtype=dtype))
    _check(lambda q, k, v: TF.local_attention(q, k, v, chunk_length=64, causal=True, scale=D ** -0.5), qkv, dtype)
    _check(lambda qk, v: TF.lsh_attention(qk, v, chunk_length=64, num_hashes=2, num_buckets=8, hash_seed=3),
           qkv[:2], dtype)


def test_float32_attention_tiles():
    """The attention families in float32 (IEEE dots on their own, smaller tiles): forward, gradients and decode
    against the float32 reference, to the 1e-4 parity contract."""
    f32 = torch.float32
    B, H, HKV, N, D = 2, 4, 2, 200, 128
    slopes = TF.alibi_slopes(H, device=DEV)
    q, k, v = r(B, H, N, D, dtype=f32), r(B, H, N, D, dtype=f32), r(B, H, N, D, dtype=f32)
    _check(lambda q, k, v: TF.attention(q, k, v, causal=True, alibi_slopes=slopes), (q, k, v), f32)
    _check(lambda q, k, v: TF.attention(q, k, v), (q[..., :64], k[..., :64], v[..., :64]), f32)
    lens = torch.tensor([150, 200], device=DEV)
    _check(lambda q: TF.decode_attention(q, k, v, lens, alibi_slopes=slopes), (r(B, H, 1, D, dtype=f32),), f32,
           grad=False)
    lam = torch.tensor([0.3], device=DEV)
    kv = (r(B, HKV, N, D, dtype=f32), r(B, HKV, N, D, dtype=f32))
    _check(lambda q, k, v: TF.diff_attention(q, k, v, lam, 0.2, causal=True), (q, *kv), f32)
    _check(lambda q: TF.diff_decode_attention(q, *kv, lens, lam, 0.2), (r(B, H, 1, D, dtype=f32),), f32, grad=False)
    qkv = (r(1, 2, 256, 64, dtype=f32), r(1, 2, 256, 64, dtype=f32), r(1, 2, 256, 64, dtype=f32))
    _check(lambda q, k, v: TF.local_attention(q, k, v, chunk_length=64, causal=True, scale=0.125), qkv, f32)
    _check(lambda qk, v: TF.lsh_attention(qk, v, chunk_length=64, num_hashes=2, num_buckets=4, hash_seed=3),
           qkv[:2], f32)


def test_integer_kernels_are_exact(monkeypatch):
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randint(-128, 128, (300, 768), dtype=torch.int8, device=DEV, generator=g)
    w = torch.randint(-128, 128, (1024, 768), dtype=torch.int8, device=DEV, generator=g)
    bias = torch.randint(-9999, 9999, (1024,), dtype=torch.int32, device=DEV, generator=g)
    s_acc = torch.full((1024,), 2e-4, device=DEV)
    requant = TF.requant_params(s_acc, torch.tensor([0.05], device=DEV))
    gelu = TF.gelu_constants(s_acc)
    q, k, v = (torch.randint(-128, 128, (2, 4, 128, 64), dtype=torch.int8, device=DEV, generator=g) for _ in "qkv")
    consts = TF.softmax_constants(torch.tensor([1e-3], device=DEV), torch.tensor([2 ** -15], device=DEV))
    x32 = torch.randint(-30000, 30000, (64, 768), dtype=torch.int32, device=DEV, generator=g)
    bias_int, _ = TF.layer_norm_constants(torch.rand(768, device=DEV), torch.randn(768, device=DEV))
    calls = [lambda: TF.int_linear(x, w, bias), lambda: TF.int_linear(x, w, bias, gelu=gelu, requant=requant),
             lambda: TF.int_attention(q, k, v, consts), lambda: TF.int_layer_norm(x32, 2, bias_int)]
    for call in calls:
        with runtime.use_backend("triton"):
            got = call()
        with runtime.use_backend("torch"):
            want = call()
        assert got.dtype == want.dtype and torch.equal(got, want)
    if DEV == "cuda" and torch.cuda.get_device_capability()[0] >= 9:  # both GEMM kernels, whichever the timing picks
        from tritonformers.kernels import int_gemm
        for kernel in int_gemm.LINEAR_KERNELS:
            monkeypatch.setattr(int_gemm, "_force_linear_kernel", kernel)
            for call in calls[:2]:
                with runtime.use_backend("triton"):
                    got = call()
                with runtime.use_backend("torch"):
                    want = call()
                assert torch.equal(got, want), kernel


def _tiny_models():
    from tritonformers.models.bloom import BloomConfig, BloomForCausalLM
    from tritonformers.models.diffllama import DiffLlamaConfig, DiffLlamaForCausalLM
    yield BloomForCausalLM(BloomConfig(vocab_size=300, hidden_size=128, n_layer=2, n_head=4))
    yield DiffLlamaForCausalLM(DiffLlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=32))


@pytest.mark.parametrize("dtype", HALF)
def test_decoder_models_triton_path_matches_reference(dtype):
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 40), device=DEV)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    for model in _tiny_models():
        model = model.to(DEV, dtype).eval()
        with torch.no_grad():
            with runtime.use_backend("triton"):
                got = model(ids, attention_mask=mask).logits
                new = model.generate(ids, attention_mask=mask, max_new_tokens=4)
            with runtime.use_backend("torch"):
                want = model(ids, attention_mask=mask).logits
        valid = mask.bool()
        assert _rel(got[valid], want[valid]) < 4 * REL_TOL[dtype], type(model).__name__
        assert new.shape == (2, 44)



def test_greedy_stop_read_late_matches_reading_at_once(monkeypatch):
    """Greedy search on CUDA reads its stop flag STOP_CHECK_LAG steps late and rewinds what it ran past: the
    ids and the returned cache equal reading it every step (lag 0), CUDA graph on."""
    from tritonformers.models import generation
    from tritonformers.models.bloom import BloomConfig, BloomForCausalLM
    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=300, hidden_size=128, n_layer=2, n_head=4)).to(DEV).eval()
    ids = torch.randint(3, 300, (3, 12), device=DEV)
    with torch.no_grad():
        free = model.generate(ids, max_new_tokens=6, eos_token_id=None)[:, 12:]
        eos = [int(free[row, 1 + row]) for row in range(3)]  # every row stops by its third new token
        kwargs = dict(max_new_tokens=10, eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True)
        late = model.generate(ids, **kwargs)
        monkeypatch.setattr(generation, "STOP_CHECK_LAG", 0)
        at_once = model.generate(ids, **kwargs)
    assert torch.equal(late.sequences, at_once.sequences) and late.sequences.shape[1] <= 15
    assert late.cache.length == at_once.cache.length == late.sequences.shape[1] - 1
    assert all(torch.equal(a, b) for a, b in zip(late.cache[1], at_once.cache[1]))

def test_ibert_integer_inference_matches_reference():
    from tritonformers.models.ibert import IBertConfig, IBertForMaskedLM
    torch.manual_seed(0)
    model = IBertForMaskedLM(IBertConfig(vocab_size=200, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=256, max_position_embeddings=80)).to(DEV)
    ids = torch.randint(3, 200, (2, 32), device=DEV)
    with runtime.use_backend("torch"):
        model.calibrate([ids])
    with torch.no_grad():
        with runtime.use_backend("triton"):
            got = model(ids).logits
        with runtime.use_backend("torch"):
            want = model(ids).logits
    # the integer encoder is bit-exact (tests/kernels); the float LM head after it rounds in launch order
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

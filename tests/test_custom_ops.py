"""The ``torch.ops.tritonformers`` custom ops: registration (``torch.library.opcheck``: schema, fake tensors,
autograd registration, AOT dispatch), and the public functions dispatching through them with their old
results, gradients and error messages.

Kernels run through the Triton interpreter on CPU, so shapes are tiny.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import DEVICE, assert_close, randn
from tritonformers import ops, runtime
from tritonformers.kernels import activations, attention, cross_entropy, diff_attention, int_ops, lsh_attention, norms
from tritonformers.nn import functional as F

tf = torch.ops.tritonformers


@pytest.fixture(autouse=True)
def _triton_backend():
    with runtime.use_backend("triton"):
        yield


def _g(*shape, dtype=torch.float32):
    return randn(*shape, dtype=dtype, requires_grad=True)


def _int_constants():
    scale = torch.tensor([0.05])
    return (int_ops.gelu_constants(scale), int_ops.softmax_constants(torch.tensor([0.02]), torch.tensor([0.01])),
            int_ops.requant_params(torch.tensor([0.05]), torch.tensor([0.1])))


def _cases():
    """(name, op, args, kwargs) per registered op: representative inputs, tiny."""
    B, H, N, D = 1, 2, 8, 16
    q, k, v = _g(B, H, N, D), _g(B, H, N, D), _g(B, H, N, D)
    mask = torch.ones(B, N, dtype=torch.int8, device=DEVICE)
    mask[0, :2] = 0
    slopes = attention.alibi_slopes(H, DEVICE).requires_grad_(True)
    positions = attention.alibi_positions(mask, N, DEVICE)
    L = 32
    ql, kl, vl = _g(1, 2, L, D), _g(1, 2, L, D), _g(1, 2, L, D)
    buckets = torch.randint(0, 4, (1, 2, 2, L), device=DEVICE) + 4 * torch.arange(2, device=DEVICE)[:, None]
    perm = lsh_attention.lsh_sort(buckets).reshape(2, -1).to(torch.int32).contiguous()
    kc = randn(B, H, 16, D)
    lens = torch.tensor([10], device=DEVICE)
    gelu_c, soft_c, requant = _int_constants()
    xi = torch.randint(-100, 100, (3, 16), dtype=torch.int32, device=DEVICE)
    xq = torch.randint(-100, 100, (1, 2, 8, 16), dtype=torch.int8, device=DEVICE)
    w8 = torch.randint(-100, 100, (8, 16), dtype=torch.int8, device=DEVICE)
    return [
        ("rms_norm", tf.rms_norm, (_g(2, 3, 16), _g(16), 1e-6)),
        ("rms_norm_no_weight", tf.rms_norm, (_g(4, 16), None, 1e-5)),
        ("layer_norm", tf.layer_norm, (_g(2, 3, 16), _g(16), _g(16), None, 1e-5)),
        ("layer_norm_residual", tf.layer_norm, (_g(2, 3, 16), _g(16), None, _g(2, 3, 16), 1e-5)),
        ("gelu_bloom", tf.gelu, (_g(3, 16), _g(16), "bloom")),
        ("gelu_tanh_fp16", tf.gelu, (_g(3, 16, dtype=torch.float16), None, "tanh")),
        ("swiglu", tf.swiglu, (_g(3, 16), _g(3, 16))),
        ("apply_rotary", tf.apply_rotary, (_g(B, H, N, D), _g(B, 1, N, D), randn(1, N, D), randn(1, N, D), "bhnd")),
        ("flce_mean", tf.fused_linear_cross_entropy,
         (_g(6, 16), _g(40, 16), torch.randint(0, 40, (6,), device=DEVICE), _g(40), -100, "mean", None,
          [True, True, True])),
        ("flce_none", tf.fused_linear_cross_entropy,
         (_g(6, 16), _g(40, 16), torch.randint(0, 40, (6,), device=DEVICE), None, -100, "none", 4,
          [True, True, False])),
        ("attention_alibi", tf.attention, (q, k, v, slopes, positions, mask, True, 0.25, 0.0, 0)),
        ("attention_dropout", tf.attention, (q, k, v, None, None, None, False, 0.25, 0.3, 1234)),
        ("packed_attention", tf.packed_attention, (_g(B, N, H, 3, D), slopes, positions, mask, True, 0.25, 0.0, 0)),
        ("decode_attention", tf.decode_attention, (randn(B, H, 2, D), kc, kc, lens, None, None, None)),
        ("diff_attention", tf.diff_attention,
         (_g(B, 4, N, D), _g(B, 2, N, D), _g(B, 2, N, D), torch.tensor(0.3, requires_grad=True), 0.2, True, mask,
          1e-5, 0.25, [True, True, True, True])),
        ("diff_decode_attention", tf.diff_decode_attention,
         (randn(B, 4, 1, D), kc, kc, lens, torch.tensor(0.3), 0.2, None, 1e-5, None)),
        ("local_attention", tf.local_attention, (ql, kl, vl, None, 8, 1, 0, True, 1.0, 0.0, 0)),
        ("lsh_attention", tf.lsh_attention, (ql, vl, perm, None, 2, 8, 1, 0, False, 0.0, 0)),
        ("quantize", tf.quantize, (randn(3, 16), torch.tensor([0.05]), 8)),
        ("requantize", tf.requantize, (xi, *requant, 8, None, None, None)),
        ("int_gelu", tf.int_gelu, (xi, *gelu_c, *requant, 8)),
        ("int_softmax", tf.int_softmax, (xi, *ops.flat(soft_c, 5), None)),
        ("int_layer_norm", tf.int_layer_norm,
         (xi, torch.tensor([2]), torch.randint(-50, 50, (16,), device=DEVICE), None, None, 8)),
        ("int_linear", tf.int_linear,
         (xq.view(-1, 16), w8, torch.randint(-50, 50, (8,), dtype=torch.int32, device=DEVICE),
          None, None, None, None, None, None, None, None, 8, None, None, None)),
        ("int_attention", tf.int_attention, (xq, xq, xq, *ops.flat(soft_c, 5), None, None, 8, None, True)),
    ]


CASES = _cases()


def test_every_public_op_is_registered():
    for name in ops.OPS:
        assert hasattr(tf, name), name
    assert {op._qualified_op_name.split("::")[1] for _, op, _ in CASES} == set(ops.OPS)


@pytest.mark.parametrize("name,op,args", CASES, ids=[c[0] for c in CASES])
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                "test_aot_dispatch_dynamic"))


def test_meta_device_shapes():
    """Fake implementations serve the meta device: shapes, dtypes and strides without running a kernel."""
    x = torch.empty(2, 3, 16, device="meta")
    y, rstd = tf.rms_norm(x, torch.empty(16, device="meta", dtype=torch.float32), 1e-6)
    assert y.shape == x.shape and rstd.shape == (6,) and rstd.dtype == torch.float32
    q = torch.empty(1, 4, 8, 16, device="meta", dtype=torch.float16)
    out, lse = tf.attention(q, q, q, None, None, None, True, 0.25, 0.0, 0)
    assert out.shape == q.shape and out.dtype == torch.float16 and lse.shape == (1, 4, 8) and out.is_contiguous()
    kv = torch.empty(1, 2, 8, 16, device="meta", dtype=torch.float16)
    d = tf.diff_attention(q, kv, kv, torch.empty((), device="meta"), 0.2, True, None, 1e-5, 0.25, [False] * 4)[0]
    assert d.shape == (1, 8, 2, 32)


def _compare(new, old, inputs):
    """Same outputs and gradients from the functional op (custom-op path) and the kernel module's function."""
    a = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    b = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    ya, yb = new(*a), old(*b)
    ya, yb = (ya if isinstance(ya, tuple) else (ya,)), (yb if isinstance(yb, tuple) else (yb,))
    for u, w in zip(ya, yb):
        assert_close(u, w)
    for outs in (ya, yb):
        sum((u.float() * (i + 1)).sum() for i, u in enumerate(outs)).backward()
    for u, w in zip(a, b):
        if w.grad is not None:
            assert_close(u.grad, w.grad)


def test_functional_matches_kernel_functions():
    x, w, b, r = randn(2, 3, 16), randn(16), randn(16), randn(2, 3, 16)
    _compare(lambda x, w, b, r: F.layer_norm(x, w, b, residual=r), lambda x, w, b, r: norms.layer_norm(x, w, b, residual=r),
             (x, w, b, r))
    _compare(lambda x, w: F.rms_norm(x, w), lambda x, w: norms.rms_norm(x, w), (x, w))
    _compare(lambda x, b: F.gelu(x, "bloom", b), lambda x, b: activations.gelu(x, "bloom", b), (x, b))
    q, k, v = randn(1, 2, 8, 16), randn(1, 2, 8, 16), randn(1, 2, 8, 16)
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[0, :3] = 0
    _compare(lambda q, k, v, s: F.attention(q, k, v, causal=True, alibi_slopes=s, key_padding_mask=mask),
             lambda q, k, v, s: attention.attention(q, k, v, causal=True, alibi_slopes=s, key_padding_mask=mask),
             (q, k, v, attention.alibi_slopes(2)))
    h, W, t = randn(2, 5, 16), randn(40, 16), torch.randint(0, 40, (2, 5))
    t[0, 0] = -100
    for reduction in ("mean", "none"):
        _compare(lambda h, W: F.fused_linear_cross_entropy(h, W, t, reduction=reduction),
                 lambda h, W: cross_entropy.fused_linear_cross_entropy(h, W, t, reduction=reduction), (h, W))
    qd, kd = randn(1, 4, 8, 16), randn(1, 2, 8, 16)
    _compare(lambda q, k, v, lam: F.diff_attention(q, k, v, lam, 0.2),
             lambda q, k, v, lam: diff_attention.diff_attention(q, k, v, lam, 0.2), (qd, kd, kd, torch.tensor(0.3)))


BAD_INPUTS = [
    ("rms_norm", lambda m: m.rms_norm(torch.ones(2, 4, dtype=torch.int32))),
    ("layer_norm", lambda m: m.layer_norm(torch.ones(2, 4), torch.ones(5), None)),
    ("gelu", lambda m: m.gelu(torch.ones(2, 4), "fast")),
    ("attention", lambda m: m.attention(torch.ones(1, 2, 4, 8), torch.ones(1, 2, 4, 8), torch.ones(1, 2, 5, 8))),
    ("fused_linear_cross_entropy",
     lambda m: m.fused_linear_cross_entropy(torch.ones(3, 4), torch.ones(6, 4), torch.tensor([0, 9, 1]))),
    ("quantize", lambda m: m.quantize(torch.ones(2, 4), torch.ones(1), 40)),
]


@pytest.mark.parametrize("name,call", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_errors_unchanged(name, call):
    """The functional ops raise the kernel modules' errors (type and message), eagerly and under compile."""
    from tritonformers.kernels import cross_entropy as ce, int_ops as io
    kernel_fns = dict(rms_norm=norms, layer_norm=norms, gelu=activations, attention=attention,
                      fused_linear_cross_entropy=ce, quantize=io)
    with pytest.raises((TypeError, ValueError)) as want:
        call(kernel_fns[name])
    with pytest.raises(want.type, match=str(want.value)[:40].replace("[", r"\[").replace("(", r"\(")):
        call(F)
    compiled = torch.compile(lambda: call(F), backend="eager")
    with pytest.raises(want.type, match=str(want.value)[:40].replace("[", r"\[").replace("(", r"\(")):
        compiled()

"""I-BERT's drop-in quantization modules (tritonformers.nn.quantization) against transformers' quant_modules.

* State dicts load both ways (HF's names, incl. the QuantAct ranges and the stale integer buffers).
* The float (value, scale) path equals HF bit for bit: calibration (EMA ranges, the LayerNorm shift
  growth), forward in train and eval, and every QAT gradient (straight-through estimators).
* The integer path (``int_forward``, both backends) equals HF's integers where HF is integer-valued
  (embeddings, QuantAct, QuantLinear, GELU/LN after requantization) and stays within the measured +-1
  elsewhere (the softmax, the attention core, the stale-scale emulation).
* force_dequant, invalid options and bad inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.ibert import quant_modules as hq

from tests.helpers import DEVICE
from tritonformers.kernels import int_ops as io
from tritonformers.nn import quantization as q

QT = q.QuantTensor


def _same_state(ours: torch.nn.Module, hf: torch.nn.Module) -> None:
    a, b = ours.state_dict(), hf.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _pair(cls_hf, cls_ours, *args, **kwargs):
    """An HF module and ours with the same (loaded) state."""
    hf = cls_hf(*args, **kwargs).to(DEVICE)
    ours = cls_ours(*args, **kwargs).to(DEVICE)
    ours.load_state_dict(hf.state_dict())
    return hf, ours


def _exact_ints(real: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """HF's integer behind a real value (round(x / s), as HF's FixedPointMul recovers it); asserts the
    float32 rounding of ``I * s`` (up to ~0.1 for 22-bit values) leaves no doubt about the integer."""
    v = real.detach() / scale
    assert (v - v.round()).abs().max() < 0.3
    return v.round().long()


class _Layer(torch.nn.Module):
    """A miniature I-BERT block from one set of modules: embeddings -> act(16, identity) -> LN(16 in)
    -> act(8) -> linear -> act(8) -> linear + GELU -> act(8) -> linear -> act(22, residual) -> LN -> act(8),
    plus an attention core. Built with HF's classes or ours (same names, same forward signatures)."""

    def __init__(self, m, vocab=50, c=48, f=72, heads=3):
        super().__init__()
        self.heads = heads
        self.word = m.QuantEmbedding(vocab, c, padding_idx=1, quant_mode=True)
        self.pos = m.QuantEmbedding(20, c, quant_mode=True)
        self.emb_act = m.QuantAct(16, quant_mode=True)
        self.emb_ln = m.IntLayerNorm(c, eps=1e-5, quant_mode=True)
        self.emb_out = m.QuantAct(8, quant_mode=True)
        self.qkv = torch.nn.ModuleList([m.QuantLinear(c, c, per_channel=True, quant_mode=True) for _ in range(3)])
        self.qkv_act = torch.nn.ModuleList([m.QuantAct(8, quant_mode=True) for _ in range(3)])
        self.softmax = m.IntSoftmax(8, quant_mode=True)
        self.ctx_act = m.QuantAct(8, quant_mode=True)
        self.up = m.QuantLinear(c, f, per_channel=True, quant_mode=True)
        self.gelu = m.IntGELU(quant_mode=True)
        self.up_act = m.QuantAct(8, quant_mode=True)
        self.down = m.QuantLinear(f, c, per_channel=True, quant_mode=True)
        self.res_act = m.QuantAct(22, quant_mode=True)
        self.ln = m.IntLayerNorm(c, eps=1e-5, quant_mode=True)
        self.out_act = m.QuantAct(8, quant_mode=True)
        for mod in self.modules():
            if isinstance(mod, (m.QuantLinear, m.QuantEmbedding)):
                torch.nn.init.normal_(mod.weight, 0, 0.1 if isinstance(mod, m.QuantLinear) else 1.0)
            if isinstance(mod, m.QuantLinear):
                torch.nn.init.normal_(mod.bias, 0, 0.05)
            if isinstance(mod, m.IntLayerNorm):
                torch.nn.init.normal_(mod.weight, 1.0, 0.3)
                torch.nn.init.normal_(mod.bias, 0, 0.1)

    def forward(self, ids, mask_add=None):
        """HF-style float emulation: (value, scale) pairs everywhere."""
        w, sw = self.word(ids)
        p, sp = self.pos(torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids))
        e, se = self.emb_act(w, sw, identity=p, identity_scaling_factor=sp)
        e, se = self.emb_ln(e, se)
        h, sh = self.emb_out(e, se)
        qkv = []
        for lin, act in zip(self.qkv, self.qkv_act):
            t, st = act(*lin(h, sh))
            b, n, c = t.shape
            qkv.append((t.view(b, n, self.heads, -1).transpose(1, 2), st))
        (qv, sq), (kv, sk), (vv, sv) = qkv
        scale = math.sqrt(qv.shape[-1])
        scores = torch.matmul(qv, kv.transpose(-1, -2)) / scale
        if mask_add is not None:
            scores = scores + mask_add
        probs, sprob = self.softmax(scores, sq * sk / scale)
        ctx = torch.matmul(probs, vv).permute(0, 2, 1, 3).reshape(b, n, c)
        ctx, sc = self.ctx_act(ctx, sprob * sv)
        u, su = self.up(ctx, sc)
        u, su = self.gelu(u, su)
        u, su = self.up_act(u, su)
        d, sd = self.down(u, su)
        r, sr = self.res_act(d, sd, identity=h, identity_scaling_factor=sh)
        r, sr = self.ln(r, sr)
        return self.out_act(r, sr), (ctx, sc), probs

    def int_forward(self, ids, mask=None):
        """Our integer path, fused where the modules allow."""
        w, p = self.word.int_forward(ids), self.pos.int_forward(torch.arange(ids.shape[1], device=ids.device)[None]
                                                                .expand_as(ids))
        e = self.emb_act.int_forward(w, identity=p)
        h = self.emb_ln.int_forward(e, output_act=self.emb_out)
        heads = []
        for lin, act in zip(self.qkv, self.qkv_act):
            t = lin.int_forward(h, output_act=act)
            b, n, c = t.values.shape
            heads.append(QT(t.values.view(b, n, self.heads, -1).transpose(1, 2), t.scale))
        ctx, probs = q.quant_attention(*heads, self.softmax, self.ctx_act, mask=mask, output_attentions=True)
        u = self.up.int_forward(ctx, gelu=self.gelu, output_act=self.up_act)
        r = self.down.int_forward(u, output_act=self.res_act, identity=h)
        return self.ln.int_forward(r, output_act=self.out_act), ctx, probs


def _layers(calibrate_steps=2):
    torch.manual_seed(0)
    hf = _Layer(hq).to(DEVICE)
    torch.manual_seed(0)
    ours = _Layer(q).to(DEVICE)
    ids = torch.randint(0, 50, (2, 14), device=DEVICE)
    mask_add = torch.zeros(2, 1, 1, 14, device=DEVICE)
    mask_add[1, ..., 10:] = torch.finfo(torch.float32).min
    for m in (hf, ours):
        m.train()
        with torch.no_grad():
            for _ in range(calibrate_steps):
                m(ids, mask_add)
        m.eval()
    return hf, ours, ids, mask_add


# ------------------------------------------------------------------------------------------ state dicts

def test_state_dicts_load_both_ways():
    hf, ours, ids, mask_add = _layers()
    assert list(ours.state_dict()) == list(hf.state_dict())
    fresh = _Layer(q).to(DEVICE)
    fresh.load_state_dict(hf.state_dict())  # strict: every HF name, incl. x_min/x_max/act_scaling_factor
    _same_state(fresh, hf)
    back = _Layer(hq).to(DEVICE)
    back.load_state_dict(ours.state_dict())
    _same_state(ours, back)
    names = set(hf.state_dict())
    for key in ("up.fc_scaling_factor", "up.weight_integer", "up.bias_integer", "emb_act.x_min", "emb_act.x_max",
                "emb_act.act_scaling_factor", "word.weight_integer", "word.weight_scaling_factor", "ln.shift",
                "ln.activation.x_min", "softmax.act.x_max"):
        assert key in names


# ------------------------------------------------------------------------------------------ float path = HF

def test_calibration_and_float_forward_match_hf():
    """k train-mode passes (the first widens the 1e-5 init, then EMA 0.95; the LN shift grows, the
    softmax's 16-bit act calibrates on the integer exp) leave identical buffers; eval outputs are equal."""
    hf, ours, ids, mask_add = _layers(calibrate_steps=3)
    _same_state(ours, hf)
    assert hf.ln.shift.item() > 0 and hf.emb_ln.shift.item() > 0  # the overflow rule fired
    (ho, hs), (hc, hcs), hp = hf(ids, mask_add)
    (oo, os_), (oc, ocs), op = ours(ids, mask_add)
    for a, b in ((ho, oo), (hs, os_), (hc, oc), (hcs, ocs), (hp, op)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("momentum", [0.95, -1])
def test_quant_act_ranges_match_hf(momentum):
    hf, ours = _pair(hq.QuantAct, q.QuantAct, 8, act_range_momentum=momentum, quant_mode=False)
    for m in (hf, ours):
        m.train()
    for step in range(4):
        x = torch.randn(3, 5, 7, device=DEVICE) * (step + 1)
        ident = torch.randn(3, 5, 7, device=DEVICE)
        a, _ = hf(x, identity=ident)
        b, s = ours(x, identity=ident)
        assert torch.equal(a, b) and s is None
        assert torch.equal(hf.x_min, ours.x_min) and torch.equal(hf.x_max, ours.x_max)


def _hf_backward_fixed(ctx, grad_output):
    """HF's FixedPointMul.backward with its return tuple aligned to the inputs (the identity's gradient
    in the identity's slot): what ours computes."""
    identity_grad = None if ctx.identity is None else grad_output.clone() / ctx.z_scaling_factor
    return grad_output.clone() / ctx.z_scaling_factor, None, None, None, identity_grad, None


def _loss(m, ids, mask_add):
    (out, _), (ctx, _), probs = m(ids, mask_add)
    return out.square().sum() + ctx.sum() + probs.sum()


def test_qat_gradients_match_hf(monkeypatch):
    """Quantization-aware training: the same loss through the float emulation gives HF's gradients for
    every parameter (STE: round/floor pass gradients through, quantizers divide by the scale), once HF's
    misaligned FixedPointMul backward tuple is corrected; unpatched, HF drops the residual gradient."""
    hf, ours, ids, mask_add = _layers()
    x = torch.randn(2, 5, 8, device=DEVICE)
    ident = torch.randn(2, 5, 8, device=DEVICE, requires_grad=True)
    s = torch.full((1,), 0.02, device=DEVICE)
    hq.FixedPointMul.apply(x, s, 8, s, ident, s).sum().backward()
    assert ident.grad is None  # HF's bug: the identity's gradient lands on identity_scaling_factor
    q.FixedPointMul.apply(x, s, 8, s, ident, s).sum().backward()
    assert torch.equal(ident.grad, torch.ones_like(x) / s)
    monkeypatch.setattr(hq.FixedPointMul, "backward", staticmethod(_hf_backward_fixed))
    for m in (hf, ours):
        m.train()
        _loss(m, ids, mask_add).backward()
    named = dict(ours.named_parameters())
    checked = 0
    for name, p in hf.named_parameters():
        g_hf, g_ours = p.grad, named[name].grad
        assert (g_hf is None) == (g_ours is None), name
        if g_hf is not None:
            assert torch.equal(g_hf, g_ours), name
            checked += 1
    assert checked == 14  # all but the two LayerNorm biases
    assert ours.ln.bias.grad is None or ours.ln.bias.grad.abs().sum() == 0  # beta enters only via beta / gamma
    assert ours.up.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ integer path

def test_integer_path_matches_hf_layer(backend):
    """Op by op, fed with HF's own inputs, our integers equal HF's: embeddings, every requantization
    (incl. the 16-bit embedding sum and the 22-bit residual add), the fused GEMM epilogues, GELU and LN
    after requantization. Through the attention core HF's float32 softmax may move a probability by 1."""
    hf, ours, ids, mask_add = _layers()
    (ho, hs), (hc, hcs), hp = hf(ids, mask_add)
    mask = (mask_add == 0)
    out, ctx, probs = ours.int_forward(ids, mask)
    assert out.values.dtype == torch.int8 and ctx.values.dtype == torch.int8 and probs.values.dtype == torch.int16
    assert torch.equal(out.scale, hs) and torch.equal(ctx.scale, hcs)
    dp = (probs.values.long() - _exact_ints(hp, torch.tensor(1 / 256, device=DEVICE))).abs()
    assert dp.max() <= 1 and (dp != 0).float().mean() < 2e-3
    dc = (ctx.values.long() - _exact_ints(hc, hcs)).abs()
    assert dc.max() <= 1 and (dc != 0).float().mean() < 0.02
    if (dc == 0).all():  # then everything downstream is integer-exact
        assert torch.equal(out.values.long(), _exact_ints(ho, hs))


def test_integer_modules_match_hf_on_hf_inputs(backend):
    """Each module's int_forward on HF's integer inputs equals HF's output integers (teacher forcing)."""
    hf, ours, ids, mask_add = _layers()
    # embeddings + the 16-bit sum (embeddings_act with an identity)
    w, sw = hf.word(ids)
    wi = ours.word.int_forward(ids)
    assert wi.values.dtype == torch.int8 and torch.equal(wi.scale, sw)
    assert torch.equal(wi.values.long(), _exact_ints(w, sw))
    pos = torch.arange(14, device=DEVICE)[None].expand_as(ids)
    p, sp = hf.pos(pos)
    e, se = hf.emb_act(w, sw, identity=p, identity_scaling_factor=sp)
    ei = ours.emb_act.int_forward(wi, identity=ours.pos.int_forward(pos))
    assert ei.values.dtype == torch.int16 and torch.equal(ei.values.long(), _exact_ints(e, se))
    # LN (16-bit input) + act
    y, sy = hf.emb_ln(e, se)
    h, sh = hf.emb_out(y, sy)
    hi = ours.emb_ln.int_forward(ei, output_act=ours.emb_out)
    assert torch.equal(hi.values.long(), _exact_ints(h, sh))
    # QuantLinear: bare accumulator, + act
    a, sa = hf.qkv[0](h, sh)
    acc = ours.qkv[0].int_forward(hi)
    assert acc.values.dtype == torch.int32 and torch.equal(acc.scale, sa)
    assert torch.equal(acc.values.long(), _exact_ints(a, sa))
    t, st = hf.qkv_act[0](a, sa)
    assert torch.equal(ours.qkv[0].int_forward(hi, output_act=ours.qkv_act[0]).values.long(), _exact_ints(t, st))
    # linear + GELU (+ act), from the same int8 input
    u, su = hf.up(h, sh)
    g, sg = hf.gelu(u, su)
    g8, sg8 = hf.up_act(g, sg)
    gi = ours.up.int_forward(hi, gelu=ours.gelu)
    assert gi.values.dtype == torch.int64 and torch.equal(gi.scale, sg)
    assert torch.equal(ours.up.int_forward(hi, gelu=ours.gelu, output_act=ours.up_act).values.long(),
                       _exact_ints(g8, sg8))
    assert torch.equal(ours.gelu.int_forward(ours.up.int_forward(hi), output_act=ours.up_act).values.long(),
                       _exact_ints(g8, sg8))
    # down projection + 22-bit residual + LN + act
    gq = QT(_exact_ints(g8, sg8).to(torch.int8), sg8)
    d, sd = hf.down(g8, sg8)
    r, sr = hf.res_act(d, sd, identity=h, identity_scaling_factor=sh)
    ri = ours.down.int_forward(gq, output_act=ours.res_act, identity=hi)
    assert ri.values.dtype == torch.int32 and torch.equal(ri.values.long(), _exact_ints(r, sr))
    o, so = hf.out_act(*hf.ln(r, sr))
    assert torch.equal(ours.ln.int_forward(ri, output_act=ours.out_act).values.long(), _exact_ints(o, so))
    raw = ours.ln.int_forward(ri)
    ln_real, ln_scale = hf.ln(r, sr)
    assert raw.values.dtype == torch.int64 and torch.equal(raw.scale, ln_scale)
    torch.testing.assert_close(raw.values.double(), (ln_real / ln_scale).double(), rtol=1e-3, atol=2.0)


def test_stale_scale_emulation(backend):
    """HF's encoder calls every layer with the embedding scale s_E: QuantLinear then sees h * s_in / s_E
    and a bias quantized with s_w * s_E. ``assumed_scale=s_E`` reproduces it to within one unit of the
    int32 accumulator (HF: a float32 GEMM on non-integer inputs)."""
    hf, ours, ids, _ = _layers()
    h = torch.randint(-128, 128, (2, 14, 48), device=DEVICE, dtype=torch.int8)
    s_in, s_e = torch.tensor([0.0371], device=DEVICE), torch.tensor([0.0293], device=DEVICE)
    a, sa = hf.qkv[1](h.float() * s_in, s_e)
    acc = ours.qkv[1].int_forward(QT(h, s_in), assumed_scale=s_e)
    assert torch.equal(acc.scale, sa)
    assert ((acc.values.double() - (a / sa).double()).abs() <= 1.01).all()
    t, st = hf.qkv_act[1](a, sa)
    q8 = ours.qkv[1].int_forward(QT(h, s_in), assumed_scale=s_e, output_act=ours.qkv_act[1])
    d = (q8.values.long() - _exact_ints(t, st)).abs()
    assert d.max() <= 1 and (d != 0).float().mean() < 1e-2


# ------------------------------------------------------------------------------------------ dequant / options

@pytest.mark.parametrize("option", ["gelu", "softmax", "layernorm", "nonlinear"])
def test_force_dequant(option, backend):
    gelu, softmax = q.IntGELU(force_dequant=option), q.IntSoftmax(8, True, option)
    ln = q.IntLayerNorm(8, 1e-5, 8, True, option)
    hgelu, hsoftmax = hq.IntGELU(force_dequant=option), hq.IntSoftmax(8, True, option)
    hln = hq.IntLayerNorm(8, 1e-5, 8, True, option)
    for ours, theirs in ((gelu, hgelu), (softmax, hsoftmax), (ln, hln), (softmax.act, hsoftmax.act),
                         (ln.activation, hln.activation)):
        assert ours.quant_mode == theirs.quant_mode
    x = torch.randint(-2000, 2000, (2, 3, 8), dtype=torch.int32, device=DEVICE)
    s = torch.full((1,), 1e-3, device=DEVICE)
    if not gelu.quant_mode:
        out = gelu.int_forward(QT(x, s))
        assert out.scale is None and torch.equal(out.values, hgelu(x.float() * s, s)[0])
    if not ln.quant_mode:
        ln.weight.data.fill_(1.2)
        hln.load_state_dict(ln.state_dict())
        out = ln.int_forward(QT(x, s))
        assert out.scale is None
        torch.testing.assert_close(out.values, hln(x.float() * s, s)[0], rtol=1e-5, atol=1e-5)
    if not softmax.quant_mode:
        out = softmax.int_forward(QT(x, s))
        assert out.scale is None
        torch.testing.assert_close(out.values, hsoftmax(x.float() * s, s)[0], rtol=1e-6, atol=1e-7)


def test_invalid_options_and_inputs_raise():
    for cls, args in ((q.IntGELU, ()), (q.IntSoftmax, (8,)), (q.IntLayerNorm, (8, 1e-5))):
        with pytest.raises(ValueError, match="force_dequant"):
            cls(*args, force_dequant="gelu_and_softmax")  # HF silently ignores unknown strings
    with pytest.raises(NotImplementedError):
        q.QuantAct(8, per_channel=True)
    lin = q.QuantLinear(16, 8, per_channel=True, quant_mode=True)
    act = q.QuantAct(8, quant_mode=True)
    x8 = torch.randint(-128, 128, (2, 16), dtype=torch.int8)
    s = torch.full((1,), 0.02)
    with pytest.raises(TypeError, match="QuantTensor"):
        lin.int_forward(x8)
    with pytest.raises(TypeError, match="integer tensor"):
        lin.int_forward(QT(x8.float(), s))
    with pytest.raises(ValueError, match="int8, quantized per tensor"):
        lin.int_forward(QT(x8.to(torch.int16), s))
    with pytest.raises(ValueError, match="int8, quantized per tensor"):
        lin.int_forward(QT(x8, torch.full((16,), 0.02)))
    with pytest.raises(ValueError, match="pass output_act too"):
        lin.int_forward(QT(x8, s), identity=QT(x8, s))
    with pytest.raises(TypeError, match="output_act must be a QuantAct"):
        lin.int_forward(QT(x8, s), output_act=q.IntGELU())
    with pytest.raises(TypeError, match="gelu must be an IntGELU"):
        lin.int_forward(QT(x8, s), gelu=act)
    with pytest.raises(ValueError, match="prev_act_scaling_factor"):
        lin(x8.float(), torch.ones(16))
    with pytest.raises(ValueError, match="identity must be quantized"):
        act.int_forward(QT(x8, s), identity=QT(x8.float(), None))
    with pytest.raises(TypeError, match="values must be float"):
        act.int_forward(QT(x8, None))
    with pytest.raises(TypeError, match="mask must have dtype bool"):
        q.IntSoftmax(8, quant_mode=True).int_forward(QT(torch.zeros(2, 4, dtype=torch.int32), s), torch.ones(4))
    with pytest.raises(TypeError, match="input_ids"):
        q.QuantEmbedding(10, 4, quant_mode=True).int_forward(torch.zeros(3))
    with pytest.raises(ValueError, match="int8 \\[B, H, N, D\\]"):
        q.quant_attention(QT(x8, s), QT(x8, s), QT(x8, s), q.IntSoftmax(8, quant_mode=True), act)


def test_quant_act_input_quantization_and_cache():
    """Scale None = a float input: QuantAct quantizes it (clamp [-n, n-1], identity ignored as in HF);
    QuantLinear's integer weights follow parameter updates (the cache keys on the version)."""
    hf, ours = _pair(hq.QuantAct, q.QuantAct, 8, quant_mode=True)
    x = torch.randn(4, 9, device=DEVICE)
    for m in (hf, ours):
        m.train()
        m(x)
        m.eval()
    a, sa = hf(x, identity=x)
    out = ours.int_forward(QT(x, None), identity=QT(x, None))
    assert out.values.dtype == torch.int8 and torch.equal(out.scale, sa)
    assert torch.equal(out.values.long(), _exact_ints(a, sa)) and out.values.max() <= 126
    lin = q.QuantLinear(9, 5, per_channel=True, quant_mode=True).to(DEVICE)
    torch.nn.init.normal_(lin.weight)
    first = lin.quantized_weight()
    assert lin.quantized_weight() is first  # cached while the weight is unchanged
    with torch.no_grad():
        lin.weight.mul_(-1)
    w = lin.weight.detach()
    scale = io.symmetric_scale(8, w.min(1)[0], w.max(1)[0], per_channel=True)
    assert torch.equal(lin.quantized_weight().values, io.quantize_reference(w, scale, 8))

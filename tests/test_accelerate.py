"""``tritonformers.accelerate`` on transformers models with tiny random weights: same logits (valid positions),
loss and gradients on both backends, same generated ids, the same parameter tensors, idempotent, undoable,
and clear refusals."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import tritonformers
from tests.helpers import assert_close
from tritonformers import transformers_patch as acc
from tritonformers import runtime

MODELS = {
    "bloom": lambda: transformers.BloomForCausalLM(
        transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=2)),
    "diffllama": lambda: transformers.DiffLlamaForCausalLM(transformers.DiffLlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)),
    "reformer": lambda: transformers.ReformerModelWithLMHead(transformers.ReformerConfig(
        vocab_size=64, hidden_size=16, num_attention_heads=2, attention_head_size=8, attn_layers=["local", "lsh"],
        axial_pos_shape=[2, 4], axial_pos_embds_dim=[8, 8], feed_forward_size=16, is_decoder=True,
        local_attn_chunk_length=4, lsh_attn_chunk_length=4, num_buckets=4, num_hashes=1, hash_seed=0,
        max_position_embeddings=8, hidden_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0)),
    "fsmt": lambda: transformers.FSMTForConditionalGeneration(transformers.FSMTConfig(
        langs=["en", "de"], src_vocab_size=64, tgt_vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, max_position_embeddings=32, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2)),
    "ibert": lambda: transformers.IBertForMaskedLM(transformers.IBertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=40)),
}


def _batch():
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :2] = 0
    labels = ids.clone()
    labels[0, :3] = -100  # the pads, and the token a causal LM predicts from the last pad (HF: an average there)
    return dict(input_ids=ids, attention_mask=mask, labels=labels), mask.bool()


def _run(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                     if p.grad is not None}


@pytest.mark.parametrize("family", sorted(MODELS))
def test_same_results_after_accelerate(family, backend):
    model = MODELS[family]().train(family == "reformer")  # HF's reversible backward asserts training mode
    batch, valid = _batch()
    before = dict(model.state_dict())
    params = [p for p in model.parameters()]
    logits, loss, grads = _run(model, batch)
    assert tritonformers.accelerate(model) is model
    summary = acc.summary(model)
    assert summary.replaced["norms"] and summary.replaced["attention"], str(summary)
    got_logits, got_loss, got_grads = _run(model, batch)
    # a query row of pads only: HF averages, the kernels give 0 (no valid output reads it)
    assert_close(got_logits[valid], logits[valid], scale=10)
    assert_close(got_loss, loss, scale=10)
    assert got_grads.keys() == grads.keys()
    for name, g in grads.items():
        assert_close(got_grads[name], g, scale=10, msg=name)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] or after[k].data_ptr() == before[k].data_ptr() for k in before)
    assert all(a is b for a, b in zip(model.parameters(), params))


def test_summary_idempotence_and_restore():
    model = MODELS["bloom"]()
    types = {n: type(m) for n, m in model.named_modules()}
    tritonformers.accelerate(model)
    summary = acc.summary(model)
    assert len(summary.replaced["attention"]) == 2 and len(summary.replaced["norms"]) == 6
    assert len(summary.replaced["activations"]) == 2 and not summary.replaced["loss"] and "loss" not in summary.kept
    assert "bloom" in str(summary)
    tritonformers.accelerate(model)  # a second call changes nothing
    assert acc.summary(model) is summary
    assert isinstance(model.transformer.h[0].mlp.gelu_impl, tritonformers.nn.GELU)
    tritonformers.restore(model)
    assert {n: type(m) for n, m in model.named_modules()} == types and acc.summary(model) is None


@pytest.mark.parametrize("family", sorted(MODELS))
def test_every_family_restores(family):
    model = MODELS[family]()
    modules = dict(model.named_modules())
    types = {n: type(m) for n, m in modules.items()}
    tritonformers.accelerate(model, loss=True)
    summary = acc.summary(model)
    assert tritonformers.accelerate(model) is model and acc.summary(model) is summary
    attention = summary.replaced["attention"]
    assert all(type(modules[n]) is not types[n] and isinstance(modules[n], types[n]) for n in attention)  # HF's
    assert attention  # isinstance checks (Reformer's reversible layers) still hold
    tritonformers.restore(model)
    assert {n: type(m) for n, m in model.named_modules()} == types


def test_fsmt_attention_falls_back_explicitly():
    """FSMT's attention given an additive mask that is not causal runs HF's forward, with a warning."""
    model = MODELS["fsmt"]().eval()
    attn = model.model.decoder.layers[0].self_attn
    x = torch.randn(4, 2, 16)
    mask = torch.zeros(4, 4)
    mask[0, 2] = float("-inf")
    want = attn(x, x, attn_mask=mask)[0]
    tritonformers.accelerate(model)
    with pytest.warns(acc.HFFallbackWarning, match="not causal"):
        got = attn(x, x, attn_mask=mask)[0]
    assert_close(got, want)


def test_options_choose_kinds():
    model = MODELS["bloom"]()
    tritonformers.accelerate(model, attention=False, activations=False)
    summary = acc.summary(model)
    assert not summary.replaced["attention"] and not summary.replaced["activations"] and summary.replaced["norms"]


GENERATE = {  # batch, prompt length, new tokens, padded prompt positions of row 0
    "bloom": (2, 5, 4, slice(0, 2)),  # left padding: the decoders' prefill and decode steps
    "diffllama": (2, 5, 4, slice(0, 2)),
    "fsmt": (2, 5, 4, slice(3, 5)),  # the encoder's right padding, cross-attention's cached keys
    "reformer": (1, 5, 3, slice(0, 0)),  # HF's prefill pads 5 -> 8 and hashes; cached steps are HF's
}


@pytest.mark.parametrize("family", sorted(GENERATE))
def test_generate_same_ids(family):
    """HF's generate with its caches gives the same ids, every attention call that is ours on our kernels."""
    batch, length, new_tokens, pads = GENERATE[family]
    model = MODELS[family]().eval()
    ids = torch.randint(3, 64, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, pads] = 0
    want = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    tritonformers.accelerate(model)
    with runtime.use_backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("error", acc.HFFallbackWarning)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["bloom", "diffllama"])
def test_fused_loss(family, backend):
    """``loss=True``: a training step's loss and gradients are HF's, without logits (HF always returns them,
    hence off by default); without gradients the head is HF's, logits included."""
    model = MODELS[family]().train()  # the tiny configs have no dropout
    batch, _ = _batch()
    batch["labels"][1, 5] = -100
    _, loss, grads = _run(model, batch)
    with torch.no_grad():
        logits = model(**batch).logits
    tritonformers.accelerate(model, attention=False, norms=False, activations=False, loss=True)
    assert acc.summary(model).replaced["loss"] == [type(model).__name__]
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    assert out.logits is None
    out.loss.backward()
    assert_close(out.loss.detach(), loss, scale=10)
    for name, p in model.named_parameters():
        assert_close(p.grad, grads[name], scale=10, msg=name)
    summed = model(**batch, num_items_in_batch=torch.tensor(7))  # Trainer's token-count normalisation
    assert_close(summed.loss.detach(), loss * (batch["labels"][:, 1:] != -100).sum() / 7, scale=10)
    with torch.no_grad():
        evaluated = model(**batch)
    assert_close(evaluated.logits, logits)
    assert_close(evaluated.loss, loss, scale=10)


def test_padding_keep_reads_only_causal_plus_padding():
    """HF's 4D masks (bool or additive) are read as a key padding mask only when they are exactly causal
    (bottom-right aligned) + padding; the check runs once per mask tensor."""
    keep = torch.tensor([[False, True, True, True], [True, True, True, True]])
    allowed = torch.ones(3, 4, dtype=torch.bool).tril(1) & keep[:, None, :]  # 3 new queries, 1 cached key
    assert acc.padding_keep(None, 2, 3) is None
    assert torch.equal(acc.padding_keep(allowed[:, None], 2, 3), keep)
    additive = torch.zeros(2, 1, 3, 4).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    assert torch.equal(acc.padding_keep(additive, 2, 3), keep)
    packed = allowed.clone()
    packed[1, 2, :2] = False  # the last query's sequence starts at key 2: block diagonal
    with pytest.raises(acc._Unserved, match="not causal"):
        acc.padding_keep(packed[:, None], 2, 3)


def test_fused_loss_keeps_hf_paths():
    """``return_dict=False`` (HF's tuple has the logits at a fixed position) and a user's own
    ``loss_function`` keep HF's head."""
    model = tritonformers.accelerate(MODELS["bloom"]().train(), loss=True)
    batch, _ = _batch()
    loss, logits = model(**batch, return_dict=False)[:2]
    assert logits.shape == (2, 8, 64) and loss.requires_grad
    model.loss_function = lambda logits, labels, **kwargs: logits.sum()
    out = model(**batch)
    assert out.logits is not None and torch.equal(out.loss, out.logits.sum())


def test_diffllama_attention_falls_back_explicitly():
    """A mask our kernel cannot express (packed sequences' block diagonal) runs HF's forward with an
    HFFallbackWarning; the eager implementation (attention probabilities) runs HF's forward too."""
    model = MODELS["diffllama"]().eval()
    attn = model.model.layers[0].self_attn
    hidden = torch.randn(1, 6, 32)
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(6)[None])
    block = torch.zeros(6, 6, dtype=torch.bool)
    block[:3, :3] = block[3:, 3:] = True
    mask = (block & torch.ones(6, 6, dtype=torch.bool).tril())[None, None]
    want = attn(hidden, position_embeddings, mask)[0]
    tritonformers.accelerate(model)
    with pytest.warns(acc.HFFallbackWarning, match="not causal"):
        got = attn(hidden, position_embeddings, mask)[0]
    assert_close(got, want)
    model.config._attn_implementation = "eager"
    eager = model(input_ids=torch.randint(0, 64, (1, 6)), output_attentions=True)
    assert eager.attentions is not None and eager.attentions[0].shape == (1, 4, 6, 6)


def test_refusals():
    with pytest.raises(ValueError, match="unsupported model"):
        tritonformers.accelerate(torch.nn.Linear(2, 2))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match="gpt2"):
        tritonformers.accelerate(gpt2)


def test_refuses_a_changed_module(monkeypatch):
    """A transformers release whose module forward differs is refused before anything changes."""
    model = MODELS["bloom"]()
    rule = acc.FAMILIES["bloom"].rules[0]
    changed = acc.Family(acc.FAMILIES["bloom"].module,
                         (acc.Rule(rule.kind, rule.hf_class, rule.forward_params + ("new_arg",), cls=rule.cls),))
    monkeypatch.setitem(acc.FAMILIES, "bloom", changed)
    types = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(RuntimeError, match="refusing to patch"):
        tritonformers.accelerate(model)
    assert {n: type(m) for n, m in model.named_modules()} == types


# ---------------------------------------------------------------------------------------------------- I-BERT

def _ibert(quant_mode: bool):
    """A tiny IBertForMaskedLM without dropout; in quant mode calibrated by two train-mode passes (activation
    ranges, LayerNorm shifts), then in eval mode."""
    config = transformers.IBertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=40, quant_mode=quant_mode,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.IBertForMaskedLM(config)
    if quant_mode:
        model.train()
        with torch.no_grad():
            for _ in range(2):
                model(torch.randint(3, 64, (2, 8)))
    return model.eval()


def _qat_step(model, batch, state, encoder_only: bool = False):
    """From ``state``: a train-mode forward with labels (or, ``encoder_only``, a loss on the encoder's
    output) and its backward; the loss, the gradients (None where HF gives none) and the state after it
    (train mode moves the ranges and may grow the LayerNorm shifts)."""
    model.load_state_dict(state)
    model.train().zero_grad(set_to_none=True)
    if encoder_only:
        hidden = model.ibert(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        loss = (hidden * torch.linspace(-1, 1, hidden.shape[-1])).square().sum()
    else:
        loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, {k: v.clone() for k, v in model.state_dict().items()}


def test_ibert_quant_mode_keeps_hf_bits():
    """quant_mode: the quant modules' twins give HF's emulation bit for bit: a QAT step's loss on the
    encoder, every gradient (HF's: none for the residuals through a requantization, zeros upstream of them),
    the ranges and shifts it calibrates, and the encoder's eval output; each switched module is still an
    instance of HF's class. (The LM head's float LayerNorm kernel rounds apart from torch's: test above.)"""
    model = _ibert(quant_mode=True)
    batch, _ = _batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    want = _qat_step(model, batch, state, encoder_only=True)
    model.load_state_dict(state)
    with torch.no_grad():
        hidden = model.eval().ibert(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    types = {n: type(m) for n, m in model.named_modules()}
    tritonformers.accelerate(model)
    summary = acc.summary(model)
    assert len(summary.replaced["quantization"]) == 51 and len(summary.replaced["norms"]) == 6, str(summary)
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n], types[n]) for n in summary.replaced["quantization"] + summary.replaced["norms"])
    got = _qat_step(model, batch, state, encoder_only=True)
    assert torch.equal(got[0], want[0])
    for name, g in want[1].items():
        assert (g is None) == (got[1][name] is None) and (g is None or torch.equal(got[1][name], g)), name
    assert all(torch.equal(got[2][k], v) for k, v in want[2].items())
    model.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(model.eval().ibert(batch["input_ids"], attention_mask=batch["attention_mask"])
                           .last_hidden_state, hidden)


def test_ibert_integer_inference(backend, monkeypatch):
    """``integer=True``: quant_mode eval under no_grad runs the integer path (int8 GEMMs, integer softmax /
    GELU / LayerNorm), within the documented quantization noise of HF's emulation (5% here); with gradients
    on, or in train mode, the model is HF's emulation."""
    model = _ibert(quant_mode=True)
    batch, valid = _batch()
    del batch["labels"]
    with torch.no_grad():
        want = model(**batch, output_hidden_states=True)
    tritonformers.accelerate(model, integer=True)
    assert len(acc.summary(model).replaced["integer"]) == 11  # model, embeddings, encoder, 4 blocks x 2 layers
    runs = []
    run_integer = tritonformers.models.ibert.IBertModel._run_integer
    monkeypatch.setattr(tritonformers.models.ibert.IBertModel, "_run_integer",
                        lambda *a: runs.append(1) or run_integer(*a))
    with torch.no_grad():
        got = model(**batch, output_hidden_states=True, output_attentions=True)
        as_tuple = model(**batch, return_dict=False)
    assert len(runs) == 2
    for a, b in ((got.logits, want.logits), (got.hidden_states[-1], want.hidden_states[-1])):
        assert ((a - b)[valid].norm() / b[valid].norm()) < 0.05
    probs = got.attentions[0]  # p / 256 with p in [0, 256]: rows sum to ~1 over the real keys
    assert probs.shape == (2, 2, 8, 8) and torch.equal(probs * 256, (probs * 256).round())
    assert (probs[0, :, :, :2] == 0).all() and ((probs.sum(-1) - 1).abs() < 0.05).all()
    assert torch.equal(as_tuple[0], got.logits)
    assert_close(model(**batch).logits, want.logits)  # gradients on: HF's emulation (its LM head on our kernels)
    assert len(runs) == 2


@pytest.mark.parametrize("quant_mode", [False, True])
def test_ibert_fused_loss(quant_mode, backend):
    """``loss=True`` on IBertForMaskedLM: a training step's loss and gradients are HF's (float path, or the
    quant_mode emulation), without logits; under no_grad the head is HF's, logits included."""
    model = _ibert(quant_mode)
    batch, _ = _batch()
    batch["labels"][1, 5] = -100
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss, grads, _ = _qat_step(model, batch, state)
    model.load_state_dict(state)
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    tritonformers.accelerate(model, attention=False, norms=False, activations=False, quantization=False, loss=True)
    assert acc.summary(model).replaced["loss"] == ["IBertForMaskedLM"]
    model.load_state_dict(state)
    model.train().zero_grad(set_to_none=True)
    out = model(**batch)
    assert out.logits is None
    out.loss.backward()
    assert_close(out.loss.detach(), loss, scale=10)
    for name, p in model.named_parameters():
        if grads[name] is not None:
            assert_close(p.grad, grads[name], scale=10, msg=name)
    model.load_state_dict(state)
    with torch.no_grad():
        evaluated = model.eval()(**batch)
    assert_close(evaluated.logits, logits)


def test_ibert_attention_falls_back_explicitly():
    """Float I-BERT attention: ``output_attentions`` runs HF's forward (the probabilities); a mask that is not
    key padding runs it too, with an HFFallbackWarning."""
    model = _ibert(quant_mode=False)
    attn = model.ibert.encoder.layer[0].attention.self
    hidden = torch.randn(2, 6, 32)
    mask = torch.zeros(2, 1, 6, 6)
    mask[0, 0, 2, 4] = torch.finfo(torch.float32).min  # one query row only: not key padding
    want = attn(hidden, None, mask)[0][0]
    tritonformers.accelerate(model)
    with pytest.warns(acc.HFFallbackWarning, match="not key padding"):
        got = attn(hidden, None, mask)[0][0]
    assert_close(got, want)
    out = model(input_ids=torch.randint(3, 64, (1, 6)), output_attentions=True)
    assert out.attentions[0].shape == (1, 2, 6, 6)
    keep = torch.tensor([[False, True, True], [True, True, True]])
    additive = torch.zeros(2, 1, 3, 3).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    assert torch.equal(acc.padding_keep(additive, 2, 3, causal=False), keep)


def test_ibert_quant_restore_and_refusals():
    """A quant_mode model with every kind switched: the same tensors, a no-op second call, restore (HF's
    classes, no attribute left behind); a quant module whose members differ from the twin's, or integer
    without its prerequisites, is refused before anything changes."""
    model = _ibert(quant_mode=True)
    types = {n: type(m) for n, m in model.named_modules()}
    members = {n: set(vars(m)) for n, m in model.named_modules()}
    before = dict(model.state_dict())
    with pytest.raises(ValueError, match="integer=True"):
        tritonformers.accelerate(model, quantization=False, integer=True)
    with pytest.raises(ValueError, match="I-BERT only"):
        tritonformers.accelerate(MODELS["bloom"](), integer=True)
    tritonformers.accelerate(model, loss=True, integer=True)
    summary = acc.summary(model)
    assert tritonformers.accelerate(model) is model and acc.summary(model) is summary
    assert "quantization: 51 module(s)" in str(summary) and "integer: 11 module(s)" in str(summary)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(after[k].data_ptr() == before[k].data_ptr() for k in before)
    tritonformers.restore(model)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: set(vars(m)) for n, m in model.named_modules()} == members
    model.ibert.embeddings.embeddings_act1.new_range = torch.nn.Buffer(torch.zeros(1))  # a changed QuantAct
    with pytest.raises(RuntimeError, match="new_range"):
        tritonformers.accelerate(model)
    assert {n: type(m) for n, m in model.named_modules()} == types and acc.summary(model) is None


def test_ibert_float_training_calibrates_as_hf():
    """Float I-BERT in train mode: every QuantAct still sees its activation through the accelerated
    attention and norms, so the ranges a step calibrates are HF's (float rounding apart)."""
    model = _ibert(quant_mode=False)
    batch, _ = _batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    _, _, want = _qat_step(model, batch, state)
    tritonformers.accelerate(model, loss=True)
    _, _, got = _qat_step(model, batch, state)
    ranges = [k for k in want if k.endswith(("x_min", "x_max"))]
    assert len(ranges) == 2 * 32 and any(not torch.equal(want[k], state[k]) for k in ranges)
    for k in ranges:
        assert_close(got[k], want[k], scale=10, msg=k)


def test_bloom_without_cache_uses_the_packed_gradient(backend, monkeypatch):
    """use_cache=False (what gradient checkpointing sets): no cache to fill, so the accelerated BLOOM attention
    hands the fused projection to packed_attention (one packed q/k/v gradient); results as HF's."""
    model = MODELS["bloom"]()
    batch, valid = _batch()
    batch["use_cache"] = False
    logits, loss, grads = _run(model, batch)
    tritonformers.accelerate(model)
    calls = []
    packed = acc.F.packed_attention
    monkeypatch.setattr(acc.F, "packed_attention", lambda *a, **k: calls.append(1) or packed(*a, **k))
    got_logits, got_loss, got_grads = _run(model, batch)
    assert len(calls) == 2  # one per layer
    assert_close(got_logits[valid], logits[valid], scale=10)
    assert_close(got_loss, loss, scale=10)
    for name, g in grads.items():
        assert_close(got_grads[name], g, scale=10, msg=name)

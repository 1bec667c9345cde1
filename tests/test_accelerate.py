"""``tritonformers.accelerate`` on transformers models with tiny random weights: same logits (valid positions),
loss and gradients on both backends, same generated ids, the same parameter tensors, idempotent, undoable,
and clear refusals."""

from __future__ import annotations

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
    model = MODELS[family]().eval()
    batch, valid = _batch()
    before = dict(model.state_dict())
    params = [p for p in model.parameters()]
    logits, loss, grads = _run(model, batch)
    assert tritonformers.accelerate(model) is model
    summary = acc.summary(model)
    assert any(summary.replaced.values()), str(summary)
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
    assert len(summary.replaced["activations"]) == 2 and "loss" in summary.kept
    assert "bloom" in str(summary)
    tritonformers.accelerate(model)  # a second call changes nothing
    assert acc.summary(model) is summary
    assert isinstance(model.transformer.h[0].mlp.gelu_impl, tritonformers.nn.GELU)
    tritonformers.restore(model)
    assert {n: type(m) for n, m in model.named_modules()} == types and acc.summary(model) is None


def test_options_choose_kinds():
    model = MODELS["bloom"]()
    tritonformers.accelerate(model, attention=False, activations=False)
    summary = acc.summary(model)
    assert not summary.replaced["attention"] and not summary.replaced["activations"] and summary.replaced["norms"]


def test_generate_same_ids():
    model = MODELS["bloom"]().eval()
    ids = torch.randint(0, 64, (1, 5))
    want = model.generate(ids, max_new_tokens=4, do_sample=False)
    tritonformers.accelerate(model)
    with runtime.use_backend("triton"):
        got = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)


def test_refusals():
    with pytest.raises(ValueError, match="unsupported model"):
        tritonformers.accelerate(torch.nn.Linear(2, 2))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match="gpt2"):
        tritonformers.accelerate(gpt2)
    reformer = transformers.ReformerModel(transformers.ReformerConfig(
        hidden_size=16, num_attention_heads=2, attention_head_size=8, attn_layers=["local"], vocab_size=32,
        axial_pos_shape=[4, 8], axial_pos_embds_dim=[8, 8], feed_forward_size=16))
    with pytest.raises(NotImplementedError, match="Reformer family is not supported yet"):
        tritonformers.accelerate(reformer)


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

"""``torch.compile(fullgraph=True)`` over small BLOOM, DiffLlama, I-BERT (float) and Reformer-attention modules
on the Triton kernels: one graph (no break at our ops), eager outputs and gradients.

CI compiles with the ``aot_eager`` backend (Dynamo, fake tensors, AOTAutograd and our ops' registrations,
without C++ code generation, which is slow on two cores); the ``slow`` variant runs Inductor.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from tests.helpers import assert_close
from tritonformers import runtime
from tritonformers.models import bloom, diffllama, ibert


@pytest.fixture(autouse=True)
def _triton_backend():
    with runtime.use_backend("triton"):
        yield
    torch._dynamo.reset()


def _ids(vocab=64, batch=2, length=8):
    ids = torch.randint(0, vocab, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0
    return ids, mask


def _check_compiled(model, step, backend="aot_eager", scale=1.0):
    """Run ``step(model)`` (a scalar) eagerly and compiled with fullgraph: one frame, same value and gradients."""
    want = step(model)
    want.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    got = torch.compile(step, backend=counter, fullgraph=True)(model)
    got.backward()
    assert counter.frame_count == 1, f"{counter.frame_count} graphs: a graph break"
    assert_close(got, want, scale=scale)
    assert grads, "no gradient reached the parameters"
    for name, g in grads.items():
        assert_close(model.get_parameter(name).grad, g, scale=scale, msg=name)
    return counter


def _graph_ops(counter) -> set[str]:
    """The tritonformers ops in the captured graphs, by name."""
    targets = {str(n.target) for gm in counter.graphs for n in gm.graph.nodes if n.op == "call_function"}
    return {t.split(".")[1] for t in targets if t.startswith("tritonformers.")}


def test_bloom_causal_lm_compiles():
    cfg = bloom.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2)
    model = bloom.BloomForCausalLM(cfg)
    ids, mask = _ids()
    counter = _check_compiled(model, lambda m: m(input_ids=ids, attention_mask=mask, labels=ids).loss)
    names = _graph_ops(counter)
    for op in ("attention", "layer_norm", "gelu", "fused_linear_cross_entropy"):
        assert op in names, (op, sorted(names))


def test_diffllama_causal_lm_compiles():
    cfg = diffllama.DiffLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2)
    model = diffllama.DiffLlamaForCausalLM(cfg)
    ids, mask = _ids()
    counter = _check_compiled(model, lambda m: m(input_ids=ids, attention_mask=mask, labels=ids).loss)
    names = _graph_ops(counter)
    for op in ("diff_attention", "rms_norm", "swiglu", "apply_rotary", "fused_linear_cross_entropy"):
        assert op in names, (op, sorted(names))


def test_ibert_float_masked_lm_compiles():
    # eval (QuantAct's range update in training checks for NaN, data-dependent) and no padding mask (the
    # model's own test for an all-ones mask is data-dependent too): graph breaks in the model, not in our ops
    cfg = ibert.IBertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=40)
    model = ibert.IBertForMaskedLM(cfg).eval()
    ids, _ = _ids()
    counter = _check_compiled(model, lambda m: m(input_ids=ids, labels=ids).loss)
    names = _graph_ops(counter)
    for op in ("layer_norm", "gelu"):
        assert op in names, (op, sorted(names))


@pytest.mark.parametrize("kind", ["local", "lsh"])
def test_reformer_attention_compiles(kind):
    from transformers import ReformerConfig

    from tritonformers.nn import LocalSelfAttention, LSHSelfAttention

    cfg = ReformerConfig(hidden_size=32, num_attention_heads=2, attention_head_size=16, local_attn_chunk_length=8,
                         lsh_attn_chunk_length=8, num_buckets=4, num_hashes=2, is_decoder=True,
                         attention_probs_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
                         local_attention_probs_dropout_prob=0.0)
    module = (LocalSelfAttention if kind == "local" else LSHSelfAttention)(cfg)
    x = torch.randn(1, 32, 32)
    # the hashing draws random rotations: hash once eagerly, then compare eager and compiled on those buckets
    kwargs = {} if kind == "local" else dict(buckets=module(x).buckets)
    counter = _check_compiled(module, lambda m: (m(x, **kwargs)[0] * torch.linspace(-1, 1, 32)[:, None]).sum())
    assert f"{kind}_attention" in _graph_ops(counter)


@pytest.mark.slow
def test_bloom_causal_lm_inductor():
    cfg = bloom.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2)
    ids, mask = _ids()
    _check_compiled(bloom.BloomForCausalLM(cfg), lambda m: m(input_ids=ids, attention_mask=mask, labels=ids).loss,
                    backend="inductor")

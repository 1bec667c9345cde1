"""``torch.compile(fullgraph=True)`` over small BLOOM, DiffLlama, I-BERT (float) and Reformer-attention modules
on the Triton kernels (on the test device): one graph (no break at our ops), eager outputs and gradients.

CI compiles with the ``aot_eager`` backend (Dynamo, fake tensors, AOTAutograd and our ops' registrations,
without C++ code generation, which is slow on two cores); each test's ``inductor`` variant is marked slow and
runs Inductor (on the GPU check; on a CPU it needs a C++ compiler). A compiled model's ``generate`` is the
model's own (``torch.compile`` wraps the forward; decoding calls ``decode_logits``), so its CUDA-graph decode
step runs the eager kernels: the CUDA test checks that compiling leaves it working.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from tests.helpers import DEVICE, assert_close
from tritonformers import runtime
from tritonformers.models import bloom, diffllama, generation, ibert

# the Dynamo backends each model test compiles with: aot_eager in CI, Inductor on the GPU check
BACKENDS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]


@pytest.fixture(autouse=True)
def _triton_backend():
    with runtime.use_backend("triton"):
        yield
    torch._dynamo.reset()


def _ids(vocab=64, batch=2, length=8):
    ids = torch.randint(0, vocab, (batch, length), device=DEVICE)
    mask = torch.ones(batch, length, dtype=torch.long, device=DEVICE)
    mask[0, :2] = 0
    return ids, mask


def _causal_lm(family: str):
    """A one-layer BLOOM or DiffLlama causal LM with a 64-token vocabulary, on the test device."""
    if family == "bloom":
        model = bloom.BloomForCausalLM(bloom.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    else:
        model = diffllama.DiffLlamaForCausalLM(diffllama.DiffLlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2))
    return model.to(DEVICE)


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_bloom_causal_lm_compiles(backend):
    model = _causal_lm("bloom")
    ids, mask = _ids()
    counter = _check_compiled(model, lambda m: m(input_ids=ids, attention_mask=mask, labels=ids).loss, backend)
    names = _graph_ops(counter)
    for op in ("packed_attention", "layer_norm", "gelu", "fused_linear_cross_entropy"):
        assert op in names, (op, sorted(names))


@pytest.mark.parametrize("backend", BACKENDS)
def test_diffllama_causal_lm_compiles(backend):
    model = _causal_lm("diffllama")
    ids, mask = _ids()
    counter = _check_compiled(model, lambda m: m(input_ids=ids, attention_mask=mask, labels=ids).loss, backend)
    names = _graph_ops(counter)
    for op in ("diff_attention", "rms_norm", "swiglu", "apply_rotary", "fused_linear_cross_entropy"):
        assert op in names, (op, sorted(names))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ibert_float_masked_lm_compiles(backend):
    # eval (QuantAct's range update in training checks for NaN, data-dependent) and no padding mask (the
    # model's own test for an all-ones mask is data-dependent too): graph breaks in the model, not in our ops
    cfg = ibert.IBertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=40)
    model = ibert.IBertForMaskedLM(cfg).to(DEVICE).eval()
    ids, _ = _ids()
    counter = _check_compiled(model, lambda m: m(input_ids=ids, labels=ids).loss, backend)
    names = _graph_ops(counter)
    for op in ("layer_norm", "gelu"):
        assert op in names, (op, sorted(names))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["local", "lsh"])
def test_reformer_attention_compiles(kind, backend):
    from transformers import ReformerConfig

    from tritonformers.nn import LocalSelfAttention, LSHSelfAttention

    cfg = ReformerConfig(hidden_size=32, num_attention_heads=2, attention_head_size=16, local_attn_chunk_length=8,
                         lsh_attn_chunk_length=8, num_buckets=4, num_hashes=2, is_decoder=True,
                         attention_probs_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
                         local_attention_probs_dropout_prob=0.0)
    module = (LocalSelfAttention if kind == "local" else LSHSelfAttention)(cfg).to(DEVICE)
    x = torch.randn(1, 32, 32, device=DEVICE)
    # the hashing draws random rotations: hash once eagerly, then compare eager and compiled on those buckets
    kwargs = {} if kind == "local" else dict(buckets=module(x).buckets)
    weights = torch.linspace(-1, 1, 32, device=DEVICE)[:, None]  # a loss whose gradient differs per position
    counter = _check_compiled(module, lambda m: (m(x, **kwargs)[0] * weights).sum(), backend)
    assert f"{kind}_attention" in _graph_ops(counter)


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.parametrize("family", ["bloom", "diffllama"])
def test_cuda_graph_generation_of_a_compiled_model(family, monkeypatch):
    """``torch.compile(model).generate`` is the model's generate: after the compiled forward has run (Inductor),
    greedy decoding still captures its one-token step in a CUDA graph and gives the eager model's ids."""
    model = _causal_lm(family).eval()
    ids = torch.randint(3, 64, (2, 6), device="cuda")
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    want = model.generate(ids, use_cuda_graph=False, **kwargs)
    captures = []
    capture = generation.CachedDecoderSession._capture

    def counted_capture(self, tokens):
        captures.append(tuple(tokens.shape))
        return capture(self, tokens)
    monkeypatch.setattr(generation.CachedDecoderSession, "_capture", counted_capture)
    compiled = torch.compile(model, backend="inductor")
    with torch.no_grad():
        assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits)
    got = compiled.generate(ids, **kwargs)
    assert captures == [(2, 1)], "the decode step was not captured in a CUDA graph"
    assert torch.equal(got, want)

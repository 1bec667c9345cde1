"""BLOOM (tritonformers.models.bloom, tritonformers.nn.ALiBiAttention) against transformers.

Tiny random checkpoints are written by transformers itself and loaded with our ``from_pretrained``. The
reference path (torch backend) must match transformers to float32 rounding (~1e-5); the Triton path
(interpreter on CPU) to ~1e-4, on few, tiny cases since interpreter launches are the cost. Padded rows
are compared on their real positions only (HF averages garbage into fully masked query rows, the kernels
write 0 there; specs/bloom.md §12.7). Generation parity is in tests/models/test_generation.py.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BloomConfig as HFBloomConfig  # noqa: E402

from tests.helpers import transformers_version  # noqa: E402
from tests.models.common import (TOL, assert_both_cache_spellings_work, assert_forward_arguments_match_hf,  # noqa: E402
                                 assert_output_fields_match_hf, close, lm_inputs, lm_labels)
from tritonformers import runtime  # noqa: E402
from tritonformers.models import bloom as tb  # noqa: E402
from tritonformers.models.generation import KVCache  # noqa: E402
from tritonformers.nn import ALiBiAttention  # noqa: E402

transformers.logging.set_verbosity_error()
TRANSFORMERS_VERSION = transformers_version()

PAD = 3
CONFIGS = {
    # non-power-of-two head count (6 heads: the extra-slope branch), tied head
    "h6": dict(vocab_size=96, hidden_size=48, n_layer=2, n_head=6, initializer_range=0.1, pad_token_id=PAD),
    # residual from the LayerNorm output, untied LM head
    "postln": dict(vocab_size=80, hidden_size=32, n_layer=2, n_head=4, initializer_range=0.1, pad_token_id=PAD,
                   apply_residual_connection_post_layernorm=True, tie_word_embeddings=False),
    # Megatron's sliced projections that drop two biases (specs/bloom.md §5.3)
    "tp2": dict(vocab_size=64, hidden_size=32, n_layer=2, n_head=4, initializer_range=0.1, pad_token_id=PAD,
                pretraining_tp=2, slow_but_exact=True),
}
HEADS = ["BloomModel", "BloomForCausalLM", "BloomForSequenceClassification", "BloomForTokenClassification",
         "BloomForQuestionAnswering"]
TRITON_TOL = dict(atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(name, head class name, **overrides) -> (transformers model in eval mode, its checkpoint directory)."""
    made = {}

    def make(name: str, head: str = "BloomForCausalLM", **overrides):
        key = (name, head, tuple(sorted(overrides.items())))
        if key not in made:
            torch.manual_seed(len(made))
            config = HFBloomConfig(**{**CONFIGS[name], **overrides})
            model = getattr(transformers, head)(config).eval()
            path = tmp_path_factory.mktemp(f"{name}-{head}")
            model.save_pretrained(path)
            made[key] = (model, path)
        return made[key]

    return make


def inputs(vocab: int, padding: str | None, **kw):
    return lm_inputs(vocab, padding, PAD, **kw)


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------

def test_config_defaults_aliases_and_round_trip(tmp_path):
    ours, theirs = tb.BloomConfig(), HFBloomConfig()
    for key in tb.BloomConfig.defaults:
        assert getattr(ours, key) == getattr(theirs, key), key
    c = tb.BloomConfig(n_embed=96, num_hidden_layers=3, num_attention_heads=6, offset_alibi=100, seq_length=2048)
    assert (c.hidden_size, c.n_layer, c.n_head) == (96, 3, 6)
    assert (c.num_hidden_layers, c.num_attention_heads) == (3, 6)
    c.num_attention_heads = 12
    assert c.n_head == 12
    c.save_pretrained(tmp_path)
    hf = HFBloomConfig.from_pretrained(tmp_path)
    assert (hf.hidden_size, hf.n_layer, hf.n_head, hf.offset_alibi) == (96, 3, 12, 100)
    back = tb.BloomConfig.from_pretrained(tmp_path)
    assert back.seq_length == 2048 and back == c
    written = json.loads((tmp_path / "config.json").read_text())
    assert "n_embed" not in written and written["hidden_size"] == 96


def test_model_rejects_heads_not_dividing_hidden():
    with pytest.raises(ValueError, match="divisible"):
        tb.BloomModel(tb.BloomConfig(vocab_size=10, hidden_size=30, n_head=4))


# ----------------------------------------------------------------------------------------------------------
# ALiBiAttention on its own
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("be", ["torch", "triton"])
def test_alibi_attention_module_matches_hf(be):
    from transformers.models.bloom.modeling_bloom import BloomAttention, build_alibi_tensor

    torch.manual_seed(0)
    config = HFBloomConfig(hidden_size=48, n_head=6)
    hf = BloomAttention(config, layer_idx=0).eval()
    ours = ALiBiAttention(config, layer_idx=0).eval()  # a transformers config works as well as ours
    ours.load_state_dict(hf.state_dict())
    x, residual = torch.randn(2, 7, 48), torch.randn(2, 7, 48)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    alibi = build_alibi_tensor(mask, 6, torch.float32)
    allowed = torch.ones(7, 7, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
    causal = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)  # HF's eager mask
    with torch.no_grad():
        want, probs = hf(x, residual, alibi, causal)
        with runtime.use_backend(be):
            got, none = ours(x, residual, mask)
            delta, _ = ours(x, None, mask)
        got_eager, got_probs = ours(x, residual, mask, output_attentions=True)
    tol = TOL if be == "torch" else TRITON_TOL
    assert none is None
    close(got, want, mask, tol)
    close(delta + residual, want, mask, tol)
    close(got_eager, want, mask)
    torch.testing.assert_close(got_probs, probs, atol=0, rtol=0)  # HF's eager ops: bit-identical, pad rows too


def test_alibi_attention_rejects_bad_masks():
    ours = ALiBiAttention(tb.BloomConfig(hidden_size=32, n_head=4), layer_idx=0)
    x = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="2-D"):
        ours(x, None, torch.ones(2, 1, 5, 5))
    with pytest.raises(ValueError, match="shape"):
        ours(x, None, torch.ones(2, 6))


# ----------------------------------------------------------------------------------------------------------
# Reference path: every head against transformers
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["h6", "postln", "tp2"])
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_causal_lm_matches_hf(checkpoint, name, padding):
    hf, path = checkpoint(name)
    ours = tb.BloomForCausalLM.from_pretrained(path)
    ids, mask = inputs(hf.config.vocab_size, padding)
    labels = lm_labels(ids, mask)
    with torch.no_grad(), runtime.use_backend("torch"):
        want = hf(ids, attention_mask=mask, labels=labels, output_hidden_states=True, output_attentions=True)
        got = ours(ids, attention_mask=mask, labels=labels, output_hidden_states=True, output_attentions=True)
        fast = ours(ids, attention_mask=mask, output_hidden_states=True)  # the flash-attention path
    close(got.logits, want.logits, mask)
    close(got.loss, want.loss)
    assert len(got.hidden_states) == len(want.hidden_states) == hf.config.n_layer + 1
    for i, (a, b, c) in enumerate(zip(got.hidden_states, fast.hidden_states, want.hidden_states)):
        close(a, c, mask, msg=f"hidden_states[{i}]")
        close(b, c, mask, msg=f"hidden_states[{i}] (flash path)")
    close(fast.logits, want.logits, mask)
    for a, b in zip(got.attentions, want.attentions):
        close(a, b, tol=dict(atol=1e-6, rtol=1e-5))  # HF's own computation, pad rows included
    if padding is None:  # all-ones mask and no mask are the same model input
        with torch.no_grad(), runtime.use_backend("torch"):
            close(ours(ids).logits, want.logits)


def test_base_model_matches_hf_and_outputs_behave_like_hf(checkpoint):
    hf, path = checkpoint("h6", "BloomModel")
    ours = tb.BloomModel.from_pretrained(path)
    ids, mask = inputs(hf.config.vocab_size, "left")
    with torch.no_grad(), runtime.use_backend("torch"):
        want = hf(ids, attention_mask=mask)
        got = ours(ids, attention_mask=mask)
        tup = ours(ids, attention_mask=mask, return_dict=False, use_cache=False, output_hidden_states=True)
    close(got.last_hidden_state, want.last_hidden_state, mask)
    assert isinstance(got.cache, KVCache) and got.cache.get_seq_length() == ids.shape[1]
    keys, values = got.cache[0]
    assert keys.shape == values.shape == (2, 6, ids.shape[1], 8)
    assert list(got.keys()) == ["last_hidden_state", "cache"]
    assert got["last_hidden_state"] is got[0] is got.last_hidden_state
    with pytest.raises(KeyError):
        got["attentions"]
    assert len(tup) == 2 and torch.equal(tup[0], tup[1][-1])


@pytest.mark.parametrize("problem", ["single_label_classification", "regression", "multi_label_classification"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_sequence_classification_matches_hf(checkpoint, problem, padding):
    num_labels = 1 if problem == "regression" else 3
    hf, path = checkpoint("h6", "BloomForSequenceClassification", num_labels=num_labels)
    ours = tb.BloomForSequenceClassification.from_pretrained(path)
    ids, mask = inputs(hf.config.vocab_size, padding, batch=3)
    if problem == "single_label_classification":
        labels = torch.tensor([0, 2, 1])
    elif problem == "regression":
        labels = torch.randn(3)
    else:
        labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    hf.config.problem_type = None
    with torch.no_grad(), runtime.use_backend("torch"):
        want = hf(ids, attention_mask=mask, labels=labels)
        got = ours(ids, attention_mask=mask, labels=labels)
    close(got.logits, want.logits)
    close(got.loss, want.loss)
    assert ours.config.problem_type == hf.config.problem_type == problem


def test_sequence_classification_pad_rules(checkpoint):
    hf, path = checkpoint("h6", "BloomForSequenceClassification", pad_token_id=None)
    ours = tb.BloomForSequenceClassification.from_pretrained(path)
    ids, _ = inputs(hf.config.vocab_size, None, batch=2)
    with pytest.raises(ValueError, match="padding token"):
        ours(ids)
    with torch.no_grad(), runtime.use_backend("torch"):
        close(ours(ids[:1]).logits, hf(ids[:1]).logits)  # batch 1 without a pad id: the last position


def test_token_classification_and_qa_match_hf(checkpoint):
    hf_tok, path_tok = checkpoint("postln", "BloomForTokenClassification", num_labels=5)
    hf_qa, path_qa = checkpoint("postln", "BloomForQuestionAnswering")
    tok = tb.BloomForTokenClassification.from_pretrained(path_tok)
    qa = tb.BloomForQuestionAnswering.from_pretrained(path_qa)
    ids, mask = inputs(hf_tok.config.vocab_size, "left")
    labels = torch.randint(0, 5, ids.shape).masked_fill(mask == 0, -100)
    start, end = torch.tensor([2, 40]), torch.tensor([[5], [-3]])  # out of range: clamped and ignored
    with torch.no_grad(), runtime.use_backend("torch"):
        want, got = hf_tok(ids, attention_mask=mask, labels=labels), tok(ids, attention_mask=mask, labels=labels)
        close(got.logits, want.logits, mask)
        close(got.loss, want.loss)
        assert got.to_tuple()[0] is got.loss and len(got) == 2
        # QA loss sees every position's logit: compare it without padding, the logits with it
        plain, _ = inputs(hf_qa.config.vocab_size, None, seed=1)
        want_qa = hf_qa(plain, start_positions=start, end_positions=end)
        got_qa = qa(plain, start_positions=start, end_positions=end)
        close(got_qa.loss, want_qa.loss)
        want_qa, got_qa = hf_qa(ids, attention_mask=mask), qa(ids, attention_mask=mask)
        close(got_qa.start_logits, want_qa.start_logits, mask)
        close(got_qa.end_logits, want_qa.end_logits, mask)


def test_causal_lm_loss_options_match_hf(checkpoint):
    hf, path = checkpoint("h6")
    ours = tb.BloomForCausalLM.from_pretrained(path)
    ids, mask = inputs(hf.config.vocab_size, None, batch=2, length=9)
    labels = ids.clone()
    labels[0, 4] = -100
    with torch.no_grad(), runtime.use_backend("torch"):
        for kwargs in (dict(), dict(num_items_in_batch=torch.tensor(7)), dict(num_items_in_batch=5),
                       dict(shift_labels=torch.roll(labels, -1, dims=1))):
            close(ours(ids, labels=labels, **kwargs).loss, hf(ids, labels=labels, **kwargs).loss, msg=str(kwargs))
        keeps = [1, 3, torch.tensor([0, 4, 8])]
        if TRANSFORMERS_VERSION >= (5, 23):  # 5.17 indexes 2-D tensors as hidden[:, keep] (no per-row selection)
            keeps += [torch.tensor([[1, 2], [7, 3]]), torch.rand(2, 9) > 0.5]
        for keep in keeps:
            close(ours(ids, logits_to_keep=keep).logits, hf(ids, logits_to_keep=keep).logits, msg=str(keep))


@pytest.mark.parametrize("name", ["h6", "postln"])
def test_training_step_loss_and_grads_match_hf(checkpoint, name):
    """Fused linear cross-entropy (logits None) on the reference path: loss and gradients equal HF's."""
    hf, path = checkpoint(name)
    ours = tb.BloomForCausalLM.from_pretrained(path).train()
    hf = hf.train()
    ids, mask = inputs(hf.config.vocab_size, "left", length=12)
    labels = lm_labels(ids, mask)
    try:
        with runtime.use_backend("torch"):
            got = ours(ids, attention_mask=mask, labels=labels)
            got.loss.backward()
        want = hf(ids, attention_mask=mask, labels=labels)
        want.loss.backward()
    finally:
        hf.eval()
    assert got.logits is None and got.cache is None
    close(got.loss, want.loss)
    own = dict(ours.named_parameters(remove_duplicate=False))
    theirs = dict(hf.named_parameters(remove_duplicate=False))
    for key in ("transformer.word_embeddings.weight", "transformer.h.0.self_attention.query_key_value.weight",
                "transformer.h.1.mlp.dense_h_to_4h.bias", "transformer.h.0.post_attention_layernorm.weight",
                "transformer.ln_f.bias", "lm_head.weight"):
        close(own[key].grad, theirs[key].grad, tol=dict(atol=1e-5, rtol=1e-4), msg=key)
    hf.zero_grad()


def test_gradient_checkpointing_gives_the_same_grads(checkpoint):
    _, path = checkpoint("h6")
    ids, mask = inputs(96, "left", length=12)
    labels = lm_labels(ids, mask)
    grads = []
    for recompute in (False, True):
        model = tb.BloomForCausalLM.from_pretrained(path).train()
        if recompute:
            model.gradient_checkpointing_enable()
        with runtime.use_backend("torch"):
            out = model(ids, attention_mask=mask, labels=labels, use_cache=True)
            out.loss.backward()
        assert out.cache is None or not recompute
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_inputs_embeds_and_bad_inputs(checkpoint):
    hf, path = checkpoint("h6")
    ours = tb.BloomForCausalLM.from_pretrained(path)
    ids, mask = inputs(hf.config.vocab_size, "left")
    embeds = hf.transformer.word_embeddings(ids).detach()
    with torch.no_grad(), runtime.use_backend("torch"):
        close(ours(inputs_embeds=embeds, attention_mask=mask).logits,
              hf(inputs_embeds=embeds, attention_mask=mask).logits, mask)
        with pytest.raises(ValueError, match="exactly one"):
            ours(ids, inputs_embeds=embeds)
        with pytest.raises(ValueError, match="exactly one"):
            ours()
        with pytest.raises(ValueError, match="2-D"):
            ours(ids, attention_mask=mask[:, None, None, :])
        with pytest.raises(ValueError, match="shape"):
            ours(ids, attention_mask=mask[:, 1:])
        with pytest.raises(TypeError, match="KVCache"):
            ours(ids, cache=transformers.DynamicCache())


def test_tuple_outputs_match_hf_layout(checkpoint):
    hf, path = checkpoint("h6")
    ours = tb.BloomForCausalLM.from_pretrained(path)
    ids, _ = inputs(hf.config.vocab_size, None)
    with torch.no_grad(), runtime.use_backend("torch"):
        want = hf(ids, labels=ids, return_dict=False, use_cache=False, output_hidden_states=True)
        got = ours(ids, labels=ids, return_dict=False, use_cache=False, output_hidden_states=True)
    assert len(got) == len(want) == 3
    close(got[0], want[0])
    close(got[1], want[1])
    assert len(got[2]) == len(want[2])


# ----------------------------------------------------------------------------------------------------------
# Loading and saving
# ----------------------------------------------------------------------------------------------------------

def test_base_and_task_checkpoints_load_both_ways(checkpoint, tmp_path):
    hf_base, base_path = checkpoint("h6", "BloomModel")
    hf_lm, lm_path = checkpoint("h6")
    lm_from_base = tb.BloomForCausalLM.from_pretrained(base_path)  # lm_head tied to the embedding
    assert lm_from_base.lm_head.weight is lm_from_base.transformer.word_embeddings.weight
    base_from_lm = tb.BloomModel.from_pretrained(lm_path)
    torch.testing.assert_close(base_from_lm.word_embeddings.weight, hf_lm.transformer.word_embeddings.weight)
    cls_from_lm = tb.BloomForSequenceClassification.from_pretrained(lm_path, strict=False)  # score initialised
    assert torch.isfinite(cls_from_lm.score.weight).all()
    # our save loads in transformers, with its tied head and the generation config
    lm = tb.BloomForCausalLM.from_pretrained(lm_path)
    lm.save_pretrained(tmp_path)
    assert (tmp_path / "generation_config.json").is_file()
    again = transformers.BloomForCausalLM.from_pretrained(tmp_path)
    for key, value in hf_lm.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, atol=0, rtol=0, msg=key)
    assert again.generation_config.eos_token_id == 2


def test_untied_head_and_fp16(checkpoint):
    hf, path = checkpoint("postln")
    ours = tb.BloomForCausalLM.from_pretrained(path)
    assert ours.lm_head.weight is not ours.transformer.word_embeddings.weight
    torch.testing.assert_close(ours.lm_head.weight, hf.lm_head.weight, atol=0, rtol=0)
    half = tb.BloomForCausalLM.from_pretrained(path, dtype=torch.float16)
    assert half.dtype == torch.float16
    ids, mask = inputs(hf.config.vocab_size, "left")
    hf16 = transformers.BloomForCausalLM.from_pretrained(path, dtype=torch.float16).eval()
    with torch.no_grad(), runtime.use_backend("torch"):
        close(half(ids, attention_mask=mask).logits, hf16(ids, attention_mask=mask).logits, mask,
              tol=dict(atol=2e-2, rtol=2e-2))


def _flax_tree(state: dict[str, torch.Tensor], embed_keys: set[str]) -> dict:
    """A FlaxBloom parameter tree from a PyTorch state dict (kernel = weight.T, scale, embedding)."""
    tree: dict = {}
    for key, value in state.items():
        *path, leaf = key.split(".")
        module = ".".join(path)
        if leaf == "weight" and module in embed_keys:
            leaf, value = "embedding", value
        elif leaf == "weight" and value.dim() == 2:
            leaf, value = "kernel", value.t()
        elif leaf == "weight":
            leaf = "scale"
        node = tree
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = value.contiguous()
    return tree


def _write_msgpack(tree: dict, file) -> None:
    msgpack = pytest.importorskip("msgpack")

    def encode(obj):
        if isinstance(obj, torch.Tensor):
            dtype = str(obj.dtype).removeprefix("torch.")
            raw = obj.contiguous().view(torch.uint8).numpy().tobytes() if obj.numel() else b""
            return msgpack.ExtType(1, msgpack.packb((list(obj.shape), dtype, raw), use_bin_type=True))
        raise TypeError(type(obj))

    file.write_bytes(msgpack.packb(tree, default=encode, use_bin_type=True))


@pytest.mark.parametrize("head", ["BloomForCausalLM", "BloomModel"])
def test_flax_checkpoint_loads(checkpoint, tmp_path, head):
    pytest.importorskip("msgpack")
    hf, path = checkpoint("postln", head)
    state = {k: v for k, v in hf.state_dict().items()}
    tree = _flax_tree(state, {"transformer.word_embeddings", "word_embeddings"})
    if "transformer.h.0.self_attention.dense.weight" in state:  # chunked arrays, as flax writes them over 1 GiB
        node = tree["transformer"]["h"]["0"]["self_attention"]["dense"]
        flat = node["kernel"].reshape(-1)
        node["kernel"] = {"__msgpack_chunked_array__": True, "shape": {"0": 32, "1": 32},
                          "chunks": {"0": flat[:1000], "1": flat[1000:]}}
    _write_msgpack(tree, tmp_path / "flax_model.msgpack")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    ours = getattr(tb, head).from_pretrained(tmp_path)
    ids, mask = inputs(hf.config.vocab_size, "left")
    with torch.no_grad(), runtime.use_backend("torch"):
        want, got = hf(ids, attention_mask=mask), ours(ids, attention_mask=mask)
    close(got[0], want[0], mask)
    assert set(tb.load_flax_state_dict(tmp_path)) == set(state)


# ----------------------------------------------------------------------------------------------------------
# KV cache: incremental decoding equals the full forward
# ----------------------------------------------------------------------------------------------------------

def _decode_in_steps(model, ids, mask, splits):
    """Logits of each chunk fed through one growing cache, concatenated."""
    cache, out = None, []
    for lo, hi in zip(splits[:-1], splits[1:]):
        o = model(ids[:, lo:hi], attention_mask=mask[:, :hi], cache=cache, use_cache=True)
        cache = o.cache
        out.append(o.logits)
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("padding", [None, "left"])
def test_incremental_and_chunked_decoding_match_hf(checkpoint, padding):
    hf, path = checkpoint("h6")
    ours = tb.BloomForCausalLM.from_pretrained(path)
    ids, mask = inputs(hf.config.vocab_size, padding, length=24)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask).logits
        with runtime.use_backend("torch"):
            # prefill 3, 1-token steps (decode kernel), 3 tokens (multi-query decode), 17 (chunk > 16: flash)
            got, cache = _decode_in_steps(ours, ids, mask, [0, 3, 4, 5, 7, 24])
    close(got, want, mask)
    assert cache.get_seq_length() == 24 and cache.capacity >= 24


def test_cache_beam_reorder(checkpoint):
    hf, path = checkpoint("h6")
    ours = tb.BloomForCausalLM.from_pretrained(path)
    ids, mask = inputs(hf.config.vocab_size, "left", batch=3, length=8)
    order = torch.tensor([2, 0, 0])
    with torch.no_grad(), runtime.use_backend("torch"):
        o = ours(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        o.cache.reorder_cache(order)
        step = ours(ids[order, 6:], attention_mask=mask[order], cache=o.cache).logits
        want = hf(ids[order], attention_mask=mask[order]).logits[:, 6:]
    close(step, want)


def test_kv_cache_api():
    cache = KVCache(2, 3, 4, 8, 5, growable=False)
    assert (len(cache), cache.capacity, cache.batch_size, cache.get_seq_length()) == (2, 5, 3, 0)
    cache.prepare(4)
    k = torch.randn(3, 4, 4, 8)
    cache.write(0, k, -k)
    cache.write(1, k, k)
    cache.commit(4)
    keys, values = cache[0]
    assert torch.equal(keys, k) and torch.equal(values, -k) and cache.lens.tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="holds 5 positions"):
        cache.prepare(2)
    with pytest.raises(RuntimeError, match="prepare"):
        cache.write(0, k[:, :, :1], k[:, :, :1])
    cache.reorder_cache(torch.tensor([1, 1, 0]))
    assert torch.equal(cache[1][0], k[[1, 1, 0]])
    grow = KVCache(1, 1, 1, 2, 2)
    for n in (2, 1, 3):
        grow.prepare(n)
        grow.write(0, torch.ones(1, 1, n, 2), torch.ones(1, 1, n, 2))
        grow.commit(n)
    assert grow.get_seq_length() == 6 and grow.capacity >= 6 and torch.equal(grow[0][0], torch.ones(1, 1, 6, 2))
    with pytest.raises(ValueError, match="positive"):
        KVCache(0, 1, 1, 1, 1)


# ----------------------------------------------------------------------------------------------------------
# Triton path (interpreter on CPU): few, tiny cases
# ----------------------------------------------------------------------------------------------------------

def test_triton_causal_lm_forward_backward_matches_hf(checkpoint):
    hf, path = checkpoint("h6")
    ours = tb.BloomForCausalLM.from_pretrained(path).train()
    ids, mask = inputs(hf.config.vocab_size, "left", length=12)
    labels = lm_labels(ids, mask)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, output_hidden_states=True)
    with runtime.use_backend("triton"):
        with torch.no_grad():
            got = ours(ids, attention_mask=mask, output_hidden_states=True)
        loss = ours(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
    close(got.logits, want.logits, mask, TRITON_TOL)
    for a, b in zip(got.hidden_states, want.hidden_states):
        close(a, b, mask, TRITON_TOL)
    hf.train()
    try:
        want_loss = hf(ids, attention_mask=mask, labels=labels).loss
        want_loss.backward()
    finally:
        hf.eval()
    close(loss, want_loss, tol=TRITON_TOL)
    own = dict(ours.named_parameters(remove_duplicate=False))
    theirs = dict(hf.named_parameters(remove_duplicate=False))
    for key in ("transformer.word_embeddings.weight", "transformer.h.0.self_attention.query_key_value.weight",
                "transformer.h.1.mlp.dense_h_to_4h.bias"):
        close(own[key].grad, theirs[key].grad, tol=dict(atol=2e-4, rtol=1e-3), msg=key)
    hf.zero_grad()


def test_triton_heads_and_cached_decoding_match_hf(checkpoint):
    hf_cls, path_cls = checkpoint("postln", "BloomForSequenceClassification")
    hf_lm, path_lm = checkpoint("postln")
    cls = tb.BloomForSequenceClassification.from_pretrained(path_cls)
    lm = tb.BloomForCausalLM.from_pretrained(path_lm)
    ids, mask = inputs(hf_lm.config.vocab_size, "left", length=9)
    labels = torch.tensor([1, 0])
    with torch.no_grad():
        want_cls, want_lm = hf_cls(ids, attention_mask=mask, labels=labels), hf_lm(ids, attention_mask=mask)
        with runtime.use_backend("triton"):
            got_cls = cls(ids, attention_mask=mask, labels=labels)
            got_lm, _ = _decode_in_steps(lm, ids, mask, [0, 6, 7, 9])  # prefill, 1-query and 2-query decode
    close(got_cls.logits, want_cls.logits, tol=TRITON_TOL)
    close(got_cls.loss, want_cls.loss, tol=TRITON_TOL)
    close(got_lm, want_lm.logits, mask, TRITON_TOL)


def test_triton_fp16_matches_hf_fp16(checkpoint):
    _, path = checkpoint("h6")
    ours = tb.BloomForCausalLM.from_pretrained(path, dtype=torch.float16)
    theirs = transformers.BloomForCausalLM.from_pretrained(path, dtype=torch.float16).eval()
    ids, mask = inputs(96, "left")
    with torch.no_grad():
        want = theirs(ids, attention_mask=mask).logits
        with runtime.use_backend("triton"):
            got = ours(ids, attention_mask=mask).logits
    assert got.dtype == torch.float16
    close(got, want, mask, tol=dict(atol=1e-2, rtol=1e-2))


# ----------------------------------------------------------------------------------------------------------
# CUDA: bf16 against transformers in bf16
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision_matches_hf(checkpoint, dtype):
    hf, path = checkpoint("h6")
    ours = tb.BloomForCausalLM.from_pretrained(path, dtype=dtype, device="cuda")
    theirs = transformers.BloomForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()
    ids, mask = inputs(hf.config.vocab_size, "left", length=24)
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        got, want = ours(ids, attention_mask=mask).logits, theirs(ids, attention_mask=mask).logits
    close(got, want, mask, tol=dict(atol=3e-2, rtol=3e-2))


def test_output_dataclasses_have_hf_field_names():
    assert_output_fields_match_hf(tb, ("BaseModelOutputWithPastAndCrossAttentions", "CausalLMOutputWithCrossAttentions",
                                       "SequenceClassifierOutputWithPast", "TokenClassifierOutput",
                                       "QuestionAnsweringModelOutput"))


def test_forward_arguments_follow_hf():
    assert_forward_arguments_match_hf(tb, "Bloom")


def test_cache_and_its_deprecated_name(checkpoint):
    _, path = checkpoint("h6")
    ids, _ = inputs(96, None)
    with runtime.use_backend("torch"):
        assert_both_cache_spellings_work(tb.BloomForCausalLM.from_pretrained(path), ids)

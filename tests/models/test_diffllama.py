"""DiffLlama (tritonformers.models.diffllama, tritonformers.models.rope) against transformers.

Tiny random checkpoints are written by transformers itself and loaded with our ``from_pretrained``; the
references run HF's eager attention (the computation our reference path reproduces, specs/diffllama.md
§5.4). The reference path (torch backend) must match to float32 rounding (~1e-5; it is bit-exact on these
shapes); the Triton path (interpreter on CPU) to ~1e-4, on two tiny cases since interpreter launches are
the cost. Left-padded rows are compared on their real positions only (HF averages every key into fully
masked query rows, the kernel writes 0 there; specs/diffllama.md §6), and LM labels predicted from a pad
position are ignored for the same reason.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DiffLlamaConfig as HFConfig  # noqa: E402
from transformers.models.diffllama.modeling_diffllama import DiffLlamaRotaryEmbedding as HFRotary  # noqa: E402

from tests.helpers import transformers_version  # noqa: E402
from tests.models.common import (assert_both_cache_spellings_work, assert_forward_arguments_match_hf,  # noqa: E402
                                 assert_output_fields_match_hf, close, lm_inputs, lm_labels)
from tritonformers import runtime  # noqa: E402
from tritonformers.models import diffllama as td  # noqa: E402
from tritonformers.models import rope  # noqa: E402
from tritonformers.models.generation import KVCache  # noqa: E402

transformers.logging.set_verbosity_error()

PAD = 0
BASE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, head_dim=16, vocab_size=100,
            lambda_std_dev=0.5, pad_token_id=PAD, initializer_range=0.05)
CONFIGS = {
    # GQA ratio 2 (H 4, Hkv 2), untied, no bias
    "gqa2": dict(BASE, num_hidden_layers=2, num_key_value_heads=2),
    # MHA (ratio 1), 3 layers (lambda_init differs per layer), biases, tied head, H * D != E
    # H / 2 odd and GQA ratio 3 (H 6, Hkv 2)
    "h6": dict(BASE, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=8),
    "mha": dict(BASE, num_hidden_layers=3, num_key_value_heads=4, head_dim=8, attention_bias=True,
                tie_word_embeddings=True),
}
LONG_FACTORS = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]
ROPES = {
    "default": (dict(rope_type="default", rope_theta=10000.0), 32),
    "linear": (dict(rope_type="linear", factor=2.0, rope_theta=500.0), 32),
    "dynamic": (dict(rope_type="dynamic", factor=2.0, rope_theta=1000.0), 8),
    "yarn": (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8, rope_theta=1000.0), 32),
    "yarn_mscale": (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8, mscale=0.7,
                         mscale_all_dim=1.0, beta_fast=16, truncate=False), 32),
    "llama3": (dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8, rope_theta=500000.0), 64),
    "longrope": (dict(rope_type="longrope", short_factor=[1.0, 1.1, 1.2, 1.3, 1.5, 1.7, 2.0, 2.5],
                      long_factor=LONG_FACTORS, original_max_position_embeddings=8), 32),
}
TRITON_TOL = dict(atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(name, head class name, **overrides) -> (transformers model, eager attention, eval mode; its directory)."""
    made = {}

    def make(name: str, head: str = "DiffLlamaForCausalLM", **overrides):
        key = (name, head, json.dumps(overrides, sort_keys=True))
        if key not in made:
            torch.manual_seed(len(made))
            config = HFConfig(**{**CONFIGS[name], **overrides})
            model = getattr(transformers, head)(config)
            path = tmp_path_factory.mktemp(f"{name}-{head}")
            model.save_pretrained(path)
            model = getattr(transformers, head).from_pretrained(path, attn_implementation="eager").eval()
            made[key] = (model, path)
        return made[key]

    return make


def rope_overrides(kind: str) -> dict:
    params, max_positions = ROPES[kind]
    return dict(rope_parameters=dict(params), max_position_embeddings=max_positions)


def inputs(vocab: int, padding: str | None, **kw):
    return lm_inputs(vocab, padding, PAD, **kw)


# ----------------------------------------------------------------------------------------------------------
# Config and RoPE
# ----------------------------------------------------------------------------------------------------------

def test_config_defaults_and_round_trip(tmp_path):
    ours, theirs = td.DiffLlamaConfig(), HFConfig()
    for key in td.DiffLlamaConfig.defaults:
        assert getattr(ours, key) == getattr(theirs, key), key
    assert (ours.num_key_value_heads, ours.head_dim) == (32, 64)
    c = td.DiffLlamaConfig(**CONFIGS["mha"], mlp_bias=False, pretraining_tp=1)
    c.save_pretrained(tmp_path)
    hf = HFConfig.from_pretrained(tmp_path)
    assert (hf.head_dim, hf.num_key_value_heads, hf.attention_bias, hf.tie_word_embeddings) == (8, 4, True, True)
    assert hf.rope_parameters == c.rope_parameters
    back = td.DiffLlamaConfig.from_pretrained(tmp_path)
    assert back == c and back.mlp_bias is False
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_scaling" not in written and "rope_theta" not in written


@pytest.mark.parametrize("legacy", [
    {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "max_position_embeddings": 64},
    {"rope_theta": 77.0, "rope_parameters": {"rope_type": "linear", "factor": 2.0}, "rope_scaling": None},
    {"rope_theta": 77.0, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5.0}},
    {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_parameters": {"rope_type": "linear", "factor": 3.0}},
    {"rope_theta": 1234.0, "partial_rotary_factor": 1.0},
    {},
])
def test_rope_parameters_from_old_and_new_config_forms(legacy):
    ours, theirs = td.DiffLlamaConfig.from_dict(dict(legacy)), HFConfig.from_dict(dict(legacy))
    assert ours.rope_parameters == theirs.rope_parameters
    assert ours.rope_scaling == theirs.rope_scaling
    assert not hasattr(ours, "rope_theta") and not hasattr(theirs, "rope_theta")


@pytest.mark.parametrize("kind", list(ROPES))
def test_rope_frequencies_and_tables_match_hf_bitwise(kind):
    overrides = rope_overrides(kind)
    hf_cfg = HFConfig(**CONFIGS["gqa2"], **overrides)
    ours_cfg = td.DiffLlamaConfig(**CONFIGS["gqa2"], **overrides)
    ours, theirs = rope.RotaryEmbedding(ours_cfg), HFRotary(hf_cfg)
    inv_freq, scaling = rope.compute_rope_parameters(ours_cfg)
    assert torch.equal(inv_freq, theirs.inv_freq) and scaling == theirs.attention_scaling
    M = ours_cfg.max_position_embeddings
    x = torch.zeros(1, dtype=torch.float32)
    # below, beyond (dynamic regrows, longrope switches), between M and the grown length, back below
    for start, n in [(0, 5), (0, M + 5), (3, M + 1), (M + 6, 3), (0, 4), (0, 2 * M)]:
        pos = torch.arange(start, start + n)[None].expand(2, -1)
        for a, b in zip(ours(x, pos), theirs(x, pos)):
            assert torch.equal(a, b), (kind, start, n)


def test_rope_keeps_float32_frequencies_and_rejects_bad_parameters():
    cfg = td.DiffLlamaConfig(**CONFIGS["gqa2"], **rope_overrides("llama3"))
    emb = rope.RotaryEmbedding(cfg)
    want = emb.inv_freq.clone()
    emb.to(torch.float16)
    assert emb.inv_freq.dtype == torch.float32 and torch.equal(emb.inv_freq, want)
    cos, sin = emb(torch.zeros(1, dtype=torch.float16), torch.arange(4)[None])
    assert cos.dtype == sin.dtype == torch.float16 and cos.shape == (1, 4, 16)
    with pytest.raises(ValueError, match="unknown rope_type"):
        td.DiffLlamaModel(td.DiffLlamaConfig(**CONFIGS["gqa2"], rope_parameters={"rope_type": "nope"}))
    with pytest.raises(ValueError, match="factor"):
        td.DiffLlamaModel(td.DiffLlamaConfig(**CONFIGS["gqa2"], rope_parameters={"rope_type": "linear"}))
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        td.DiffLlamaModel(td.DiffLlamaConfig(**CONFIGS["gqa2"], rope_parameters={
            "rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}))
    with pytest.raises(ValueError, match="short_factor"):
        rope.RotaryEmbedding(td.DiffLlamaConfig(**CONFIGS["gqa2"], rope_parameters={
            "rope_type": "longrope", "short_factor": [1.0], "long_factor": LONG_FACTORS}))


def test_model_rejects_what_hf_rejects():
    with pytest.raises(ValueError, match="even"):
        td.DiffLlamaModel(td.DiffLlamaConfig(**{**CONFIGS["gqa2"], "num_key_value_heads": 1}))
    with pytest.raises(ValueError, match="attention_dropout"):
        td.DiffLlamaModel(td.DiffLlamaConfig(**CONFIGS["gqa2"], attention_dropout=0.1))
    with pytest.raises(ValueError, match="hidden_act"):
        td.DiffLlamaModel(td.DiffLlamaConfig(**CONFIGS["gqa2"], hidden_act="nonsense"))


# ----------------------------------------------------------------------------------------------------------
# Reference path against transformers
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gqa2", "mha", "h6"])
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_causal_lm_matches_hf(checkpoint, name, padding):
    hf, path = checkpoint(name)
    ours = td.DiffLlamaForCausalLM.from_pretrained(path)
    ids, mask = inputs(hf.config.vocab_size, padding)
    labels = lm_labels(ids, mask)
    kw = dict(attention_mask=mask, labels=labels, output_hidden_states=True, output_attentions=True)
    with torch.no_grad(), runtime.use_backend("torch"):
        want, got = hf(ids, **kw), ours(ids, **kw)
    close(got.logits, want.logits, mask)
    close(got.loss, want.loss)
    assert len(got.hidden_states) == len(want.hidden_states) == hf.config.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(got.hidden_states, want.hidden_states)):
        close(a, b, mask, msg=f"hidden_states[{i}]")
    for a, b in zip(got.attentions, want.attentions):
        close(a, b, tol=dict(atol=1e-6, rtol=1e-5))  # HF's own formula, pad rows included
    if padding is None:
        with torch.no_grad(), runtime.use_backend("torch"):
            close(ours(ids).logits, want.logits)


@pytest.mark.parametrize("kind", list(ROPES))
def test_every_rope_type_matches_hf(checkpoint, kind):
    hf, path = checkpoint("gqa2", **rope_overrides(kind))
    ours = td.DiffLlamaForCausalLM.from_pretrained(path)
    M = hf.config.max_position_embeddings
    # dynamic: beyond M (regrow), then below M (restore); longrope: past O (long factors), then short
    lengths = [12, 6] if kind in ("dynamic", "longrope") else [12]
    for n in lengths:
        ids, mask = inputs(hf.config.vocab_size, "left", length=n, seed=n)
        with torch.no_grad(), runtime.use_backend("torch"):
            close(ours(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits, mask,
                  msg=f"{kind} length {n} (M {M})")


def test_base_model_outputs_behave_like_hf(checkpoint):
    hf, path = checkpoint("gqa2", "DiffLlamaModel")
    ours = td.DiffLlamaModel.from_pretrained(path)
    ids, mask = inputs(hf.config.vocab_size, "left")
    with torch.no_grad(), runtime.use_backend("torch"):
        want = hf(ids, attention_mask=mask)
        got = ours(ids, attention_mask=mask)
        tup = ours(ids, attention_mask=mask, return_dict=False, use_cache=False, output_hidden_states=True)
        emb = ours(inputs_embeds=ours.embed_tokens(ids), attention_mask=mask).last_hidden_state
    close(got.last_hidden_state, want.last_hidden_state, mask)
    close(emb, want.last_hidden_state, mask)
    assert isinstance(got.cache, KVCache) and got.cache.get_seq_length() == ids.shape[1]
    keys, values = got.cache[0]
    assert keys.shape == values.shape == (2, 2, ids.shape[1], 16)
    assert list(got.keys()) == ["last_hidden_state", "cache"]
    assert got["last_hidden_state"] is got[0] is got.last_hidden_state
    with pytest.raises(KeyError):
        got["attentions"]
    assert len(tup) == 2 and torch.equal(tup[0], tup[1][-1])


def test_causal_lm_loss_options_and_logits_to_keep_match_hf(checkpoint):
    hf, path = checkpoint("gqa2")
    ours = td.DiffLlamaForCausalLM.from_pretrained(path)
    ids, mask = inputs(hf.config.vocab_size, None)
    labels = ids.clone()
    labels[:, :2] = -100
    keep2d = torch.tensor([[1, 4], [0, 9]])
    with torch.no_grad(), runtime.use_backend("torch"):
        keeps = [1, 3, torch.tensor([0, 5, 9])]
        if transformers_version() >= (5, 23):  # 5.17 indexes 2-D tensors as hidden[:, keep] (no per-row selection)
            keeps += [keep2d, keep2d.new_zeros(2, 10, dtype=torch.bool).index_fill(1, torch.tensor([2, 7]), True)]
        for keep in keeps:
            close(ours(ids, logits_to_keep=keep).logits, hf(ids, logits_to_keep=keep).logits, msg=str(keep))
        n = torch.tensor(7)
        close(ours(ids, labels=labels, num_items_in_batch=n).loss, hf(ids, labels=labels, num_items_in_batch=n).loss)
        tup = ours(ids, labels=labels, return_dict=False)
    assert len(tup) == 3 and tup[1].shape == (2, 10, 100) and isinstance(tup[2], KVCache)


def test_training_step_loss_and_grads_match_hf(checkpoint):
    hf, path = checkpoint("mha")
    ours = td.DiffLlamaForCausalLM.from_pretrained(path).train()
    hf.train()
    ids, mask = inputs(hf.config.vocab_size, "left")
    labels = lm_labels(ids, mask)
    with runtime.use_backend("torch"):
        got = ours(ids, attention_mask=mask, labels=labels)
    want = hf(ids, attention_mask=mask, labels=labels)
    hf.eval()
    assert got.logits is None and got.cache is None  # fused loss; no cache in training mode
    close(got.loss, want.loss)
    got.loss.backward()
    want.loss.backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        close(p.grad, theirs[name].grad, tol=dict(atol=1e-5, rtol=1e-4), msg=name)
    hf.zero_grad()


@pytest.mark.parametrize("problem", ["single_label_classification", "regression"])
def test_sequence_classification_matches_hf(checkpoint, problem):
    num_labels = 1 if problem == "regression" else 3
    hf, path = checkpoint("gqa2", "DiffLlamaForSequenceClassification", num_labels=num_labels)
    ours = td.DiffLlamaForSequenceClassification.from_pretrained(path)
    for padding in ("left", "right"):
        ids, mask = inputs(hf.config.vocab_size, padding)
        labels = torch.tensor([2, 0]) if num_labels > 1 else torch.tensor([0.5, -1.0])
        with torch.no_grad(), runtime.use_backend("torch"):
            want = hf(ids, attention_mask=mask, labels=labels)
            got = ours(ids, attention_mask=mask, labels=labels)
        close(got.logits, want.logits)
        close(got.loss, want.loss)
    assert ours.config.problem_type == hf.config.problem_type == problem


def test_token_classification_and_qa_match_hf(checkpoint):
    hf, path = checkpoint("mha", "DiffLlamaForTokenClassification", num_labels=5)
    ours = td.DiffLlamaForTokenClassification.from_pretrained(path)
    ids, mask = inputs(hf.config.vocab_size, "left")
    labels = torch.randint(0, 5, ids.shape).masked_fill(mask == 0, -100)
    with torch.no_grad(), runtime.use_backend("torch"):
        want, got = hf(ids, attention_mask=mask, labels=labels), ours(ids, attention_mask=mask, labels=labels)
    close(got.logits, want.logits, mask)
    close(got.loss, want.loss)
    assert ours.score.bias is not None and ours.dropout.p == 0.1

    hf, path = checkpoint("gqa2", "DiffLlamaForQuestionAnswering")
    ours = td.DiffLlamaForQuestionAnswering.from_pretrained(path)
    assert any(k.startswith("transformer.") for k in ours.state_dict())
    ids, mask = inputs(hf.config.vocab_size, "right")
    start, end = torch.tensor([1, 42]), torch.tensor([[4], [-3]])  # out of range: clamped and ignored
    with torch.no_grad(), runtime.use_backend("torch"):
        want = hf(ids, attention_mask=mask, start_positions=start, end_positions=end)
        got = ours(ids, attention_mask=mask, start_positions=start, end_positions=end)
    close(got.start_logits, want.start_logits, mask)
    close(got.end_logits, want.end_logits, mask)
    close(got.loss, want.loss)


def test_packed_sequences_match_hf(checkpoint):
    hf, path = checkpoint("gqa2")
    ours = td.DiffLlamaForCausalLM.from_pretrained(path)
    ids, _ = inputs(hf.config.vocab_size, None, length=9)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad(), runtime.use_backend("torch"):
        for use_cache in (False, None):  # HF detects packing only without a cache
            kw = dict(position_ids=pos, use_cache=use_cache, output_attentions=True)
            want, got = hf(ids, **kw), ours(ids, **kw)
            close(got.logits, want.logits, msg=f"use_cache={use_cache}")
            close(got.attentions[0], want.attentions[0], tol=dict(atol=1e-6, rtol=1e-5))


def test_fp16_reference_path_matches_hf_fp16(checkpoint):
    hf32, path = checkpoint("gqa2")
    hf = transformers.DiffLlamaForCausalLM.from_pretrained(path, dtype=torch.float16, attn_implementation="eager")
    ours = td.DiffLlamaForCausalLM.from_pretrained(path, dtype=torch.float16)
    assert ours.dtype == torch.float16 and ours.model.rotary_emb.inv_freq.dtype == torch.float32
    ids, mask = inputs(hf.config.vocab_size, "left")
    with torch.no_grad(), runtime.use_backend("torch"):
        close(ours(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits, mask,
              tol=dict(atol=2e-3, rtol=2e-3))


def test_inputs_are_checked(checkpoint):
    hf, path = checkpoint("gqa2")
    ours = td.DiffLlamaForCausalLM.from_pretrained(path)
    ids, mask = inputs(hf.config.vocab_size, None)
    with pytest.raises(ValueError, match="exactly one"):
        ours(ids, inputs_embeds=ours.model.embed_tokens(ids))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        ours(ids, attention_mask=mask[:, :4])
    with pytest.raises(ValueError, match="2-D"):
        ours(ids, attention_mask=mask[:, None, None, :])
    with pytest.raises(TypeError, match="KVCache"):
        ours(ids, cache=((None, None),))


# ----------------------------------------------------------------------------------------------------------
# Caches and generation (reference path)
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding", [None, "left"])
def test_incremental_and_chunked_decoding_match_full_forward(checkpoint, padding):
    hf, path = checkpoint("gqa2")
    ours = td.DiffLlamaForCausalLM.from_pretrained(path)
    ids, mask = inputs(hf.config.vocab_size, padding, length=12)
    with torch.no_grad(), runtime.use_backend("torch"):
        want = hf(ids, attention_mask=mask).logits
        full = ours(ids, attention_mask=mask).logits
        cache, out = None, []
        for lo, hi in zip([0, 4, 5, 6, 9], [4, 5, 6, 9, 12]):  # prefill, two single tokens, chunks
            o = ours(ids[:, lo:hi], attention_mask=mask[:, :hi], cache=cache, use_cache=True)
            cache = o.cache
            out.append(o.logits)
    close(full, want, mask)
    close(torch.cat(out, dim=1), full, mask)
    assert cache.get_seq_length() == 12


@pytest.mark.parametrize("kind", ["default", "dynamic", "longrope"])
def test_greedy_and_beam_generate_match_hf(checkpoint, kind):
    hf, path = checkpoint("gqa2", **rope_overrides(kind))
    ids, mask = inputs(hf.config.vocab_size, "left", batch=3, length=6, seed=3)
    for num_beams in (1, 3):
        # a fresh model for each call: dynamic RoPE keeps state across forwards, in HF as here
        ours = td.DiffLlamaForCausalLM.from_pretrained(path)
        theirs = transformers.DiffLlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
        kw = dict(attention_mask=mask, max_new_tokens=8, num_beams=num_beams, do_sample=False)
        with runtime.use_backend("torch"):
            got = ours.generate(ids, **kw)
        want = theirs.generate(ids, **kw)
        assert torch.equal(got, want), (kind, num_beams, got, want)


def test_state_dict_round_trip_and_tied_head(checkpoint, tmp_path):
    hf, path = checkpoint("mha")
    ours = td.DiffLlamaForCausalLM.from_pretrained(path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert list(ours.state_dict()) == list(hf.state_dict())
    ours.save_pretrained(tmp_path)
    back = transformers.DiffLlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    for name, t in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    ids, mask = inputs(hf.config.vocab_size, "left")
    again = td.DiffLlamaForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad(), runtime.use_backend("torch"):
        close(again(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits, mask)
    base = td.DiffLlamaModel.from_pretrained(tmp_path)  # a task checkpoint into the base model
    assert torch.equal(base.norm.weight, ours.model.norm.weight)


# ----------------------------------------------------------------------------------------------------------
# Triton path (interpreter on CPU): two tiny cases
# ----------------------------------------------------------------------------------------------------------

def test_triton_causal_lm_forward_backward_matches_hf(checkpoint):
    hf, path = checkpoint("gqa2")
    ours = td.DiffLlamaForCausalLM.from_pretrained(path)
    ids, mask = inputs(hf.config.vocab_size, "left", length=8)
    labels = lm_labels(ids, mask)
    with runtime.use_backend("triton"):
        got = ours(ids, attention_mask=mask, labels=labels)
        got.loss.backward()
    want = hf(ids, attention_mask=mask, labels=labels)
    want.loss.backward()
    close(got.loss, want.loss, tol=TRITON_TOL)
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        close(p.grad, theirs[name].grad, tol=dict(atol=2e-4, rtol=1e-3), msg=name)
    hf.zero_grad()


def test_triton_cached_decoding_matches_hf(checkpoint):
    hf, path = checkpoint("gqa2")
    ours = td.DiffLlamaForCausalLM.from_pretrained(path)
    ids, mask = inputs(hf.config.vocab_size, "left", length=5, seed=1)
    with torch.no_grad(), runtime.use_backend("triton"):
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=3)  # prefill, then full-capacity steps
        first = ours(ids[:, :3], attention_mask=mask[:, :3], use_cache=True)
        second = ours(ids[:, 3:], attention_mask=mask, cache=first.cache)  # 2 queries, 5 keys
    assert torch.equal(got, hf.generate(ids, attention_mask=mask, max_new_tokens=3))
    with torch.no_grad():
        want = hf(ids, attention_mask=mask).logits
    close(torch.cat([first.logits, second.logits], dim=1), want, mask, tol=TRITON_TOL)


def test_triton_fp16_forward_matches_hf_fp16(checkpoint):
    _, path = checkpoint("gqa2")
    ours = td.DiffLlamaForCausalLM.from_pretrained(path, dtype=torch.float16)
    theirs = transformers.DiffLlamaForCausalLM.from_pretrained(path, dtype=torch.float16,
                                                               attn_implementation="eager").eval()
    ids, mask = inputs(100, "left", length=6, seed=2)
    with torch.no_grad():
        want = theirs(ids, attention_mask=mask).logits
        with runtime.use_backend("triton"):
            got = ours(ids, attention_mask=mask).logits
    assert got.dtype == torch.float16
    close(got, want, mask, tol=dict(atol=1e-2, rtol=1e-2))


# ----------------------------------------------------------------------------------------------------------
# Odds and ends
# ----------------------------------------------------------------------------------------------------------

def test_gradient_checkpointing_gives_the_same_grads(checkpoint):
    _, path = checkpoint("gqa2")
    plain, ckpt = (td.DiffLlamaForCausalLM.from_pretrained(path).train() for _ in range(2))
    ckpt.gradient_checkpointing_enable()
    ids, mask = inputs(100, "left")
    labels = lm_labels(ids, mask)
    with runtime.use_backend("torch"):
        for model in (plain, ckpt):
            model(ids, attention_mask=mask, labels=labels).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        close(b.grad, a.grad, tol=dict(atol=1e-6, rtol=1e-5), msg=name)


def test_output_dataclasses_have_hf_field_names():
    assert_output_fields_match_hf(td, ("BaseModelOutputWithPast", "CausalLMOutputWithPast"))


def test_forward_arguments_follow_hf():
    assert_forward_arguments_match_hf(td, "DiffLlama")


def test_cache_and_its_deprecated_name(checkpoint):
    _, path = checkpoint("gqa2")
    ids, _ = inputs(BASE["vocab_size"], None, length=7)
    with runtime.use_backend("torch"):
        assert_both_cache_spellings_work(td.DiffLlamaForCausalLM.from_pretrained(path), ids)


def test_dynamic_rope_refuses_cuda_graph_generation(checkpoint):
    _, path = checkpoint("gqa2", **rope_overrides("dynamic"))
    ours = td.DiffLlamaForCausalLM.from_pretrained(path)
    assert not ours.supports_cuda_graph
    with pytest.raises(ValueError, match="CUDA graph"):
        ours.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=2, use_cuda_graph=True)


# ----------------------------------------------------------------------------------------------------------
# CUDA: half precision and CUDA-graph decoding
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision_matches_hf(checkpoint, dtype):
    hf, path = checkpoint("mha")
    ours = td.DiffLlamaForCausalLM.from_pretrained(path, dtype=dtype, device="cuda")
    theirs = transformers.DiffLlamaForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()  # sdpa
    ids, mask = inputs(hf.config.vocab_size, "left", length=48)
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        got, want = ours(ids, attention_mask=mask).logits, theirs(ids, attention_mask=mask).logits
    close(got, want, mask, tol=dict(atol=3e-2, rtol=3e-2))


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["default", "longrope"])
@pytest.mark.parametrize("params", [dict(), dict(num_beams=3, num_return_sequences=2)])
def test_cuda_graph_decoding_matches_eager_and_hf(checkpoint, kind, params):
    hf, path = checkpoint("gqa2", **rope_overrides(kind))
    ours = td.DiffLlamaForCausalLM.from_pretrained(path, device="cuda")
    assert ours.supports_cuda_graph
    ids, mask = inputs(hf.config.vocab_size, "left", batch=3, length=6, seed=4)
    kwargs = dict(attention_mask=mask.cuda(), max_new_tokens=10, **params)
    graphed = ours.generate(ids.cuda(), use_cuda_graph=True, **kwargs)
    eager = ours.generate(ids.cuda(), use_cuda_graph=False, **kwargs)
    theirs = transformers.DiffLlamaForCausalLM.from_pretrained(path, attn_implementation="eager").cuda().eval()
    want = theirs.generate(ids.cuda(), do_sample=False, **kwargs)
    assert torch.equal(graphed, eager)
    assert torch.equal(graphed, want)


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_larger_model_forward_backward_matches_hf(tmp_path):
    torch.manual_seed(0)
    config = HFConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=64, vocab_size=512, lambda_std_dev=0.5, pad_token_id=PAD)
    transformers.DiffLlamaForCausalLM(config).save_pretrained(tmp_path)
    theirs = transformers.DiffLlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").cuda()
    ours = td.DiffLlamaForCausalLM.from_pretrained(tmp_path, device="cuda")
    ids, mask = inputs(512, "left", batch=2, length=300)
    ids, mask = ids.cuda(), mask.cuda()
    labels = lm_labels(ids, mask)
    got, want = ours(ids, attention_mask=mask, labels=labels), theirs(ids, attention_mask=mask, labels=labels)
    close(got.loss, want.loss, tol=TRITON_TOL)
    got.loss.backward()
    want.loss.backward()
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        close(p.grad, theirs_params[name].grad, tol=dict(atol=5e-4, rtol=5e-3), msg=name)


def test_cli_generate_matches_hf(tmp_path, capsys):
    """`tritonformers generate` on a local DiffLlama checkpoint with a sentencepiece tokenizer equals HF's ids."""
    pytest.importorskip("google.protobuf", reason="transformers reads tokenizer.model through protobuf")
    from tests.tokenizers.test_llama_tokenizer import train_sentencepiece, write_checkpoint
    from tritonformers.cli import main

    model_path = train_sentencepiece(tmp_path / "spm")
    write_checkpoint(tmp_path / "ckpt", model_path, pad_token="<unk>", padding_side="left")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    torch.manual_seed(0)
    config = transformers.DiffLlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=8, pad_token_id=0, initializer_range=0.2)
    hf = transformers.DiffLlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "ckpt")
    prompts = ["Hello world", "The quick brown fox jumps"]
    enc = tok(prompts, padding=True, padding_side="left", return_tensors="pt")
    argv = ["generate", "--model", str(tmp_path / "ckpt"), "--max-new-tokens", "5", "--device", "cpu"]
    argv += [a for p in prompts for a in ("--prompt", p)]
    capsys.readouterr()
    with runtime.use_backend("torch"):
        assert main(argv) == 0
    want = tok.batch_decode(hf.generate(**enc, max_new_tokens=5, do_sample=False), skip_special_tokens=True)
    assert capsys.readouterr().out == "".join(text + "\n" for text in want)

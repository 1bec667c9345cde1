"""Reformer models (tritonformers.models.reformer) against transformers' Reformer.

Tiny random checkpoints are written by transformers and loaded with our ``from_pretrained``. Parameters are
redrawn (LayerNorms near 1/0, the rest N(0, 0.5)) so that no layer is close to the identity and greedy ids
vary. Chunk lengths 4 (local) and 6 (LSH) make lcm 12 differ from both. On the reference path float32
outputs equal HF's to rounding (most cases are bit-identical): every head, padded batches (HF's auto-padding
and pad bucket), mixed / all-local / all-LSH layers, int / list / automatic ``num_buckets``, 1-3 hashes,
encoder (wrap-around, chunks after) and decoder. LSH rotations are drawn from torch's generator in HF's order,
so ``hash_seed`` (or the same manual seed before both models) gives the same buckets.

Training: the reversible backward (recomputing each layer from its outputs) gives HF's gradients; with
dropout it equals plain autograd through the same seeded forward; the tensors a training step saves do not
grow from 2 to 8 layers. Cached generation gives HF's ids and step logits (HF's batched LSH cache reads row 0
for every row, so rows are compared one at a time). The Triton path runs one tiny model in the interpreter.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers.models.reformer import modeling_reformer as hfm  # noqa: E402

from tests.models.common import TOL, assert_forward_arguments_match_hf, close  # noqa: E402
from tritonformers import runtime  # noqa: E402
from tritonformers.models import reformer as tr  # noqa: E402

transformers.logging.set_verbosity_error()

VOCAB = 40
NO_DROPOUT = dict(hidden_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
                  lsh_attention_probs_dropout_prob=0.0)
BASE = dict(vocab_size=VOCAB, hidden_size=16, num_attention_heads=2, attention_head_size=8, feed_forward_size=24,
            axial_pos_shape=(4, 6), axial_pos_embds_dim=(6, 10), max_position_embeddings=24,
            local_attn_chunk_length=4, lsh_attn_chunk_length=6, hash_seed=7, eos_token_id=None, **NO_DROPOUT)
CASES = {
    # name: (config overrides, length, padding rows)
    "decoder_mixed": (dict(is_decoder=True, attn_layers=["local", "lsh", "local"], num_buckets=4, num_hashes=2,
                           chunk_size_feed_forward=3), 24, None),
    "encoder_mixed_padded": (dict(attn_layers=["lsh", "local", "lsh"], num_buckets=[2, 4], num_hashes=3,
                                  local_num_chunks_after=1, hidden_act="gelu"), 17, "both"),
    "encoder_lsh_wrap": (dict(attn_layers=["lsh", "lsh"], num_buckets=2, lsh_num_chunks_before=2,
                              lsh_num_chunks_after=1), 18, "one"),
    "decoder_local_autopad": (dict(is_decoder=True, attn_layers=["local", "local"], local_num_chunks_before=2), 10,
                              None),
    "short_unchunked": (dict(is_decoder=True, attn_layers=["local", "lsh"], num_buckets=4), 3, None),
    "auto_buckets_plain_positions": (dict(attn_layers=["lsh", "local"], num_buckets=None, axial_pos_embds=False,
                                          hash_seed=None), 24, "one"),
}


def randomize(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = "layer_norm" in name
            p.normal_(1.0 if name.endswith("layer_norm.weight") else 0.0, 0.1 if norm else 0.5)


def make_checkpoint(directory, overrides, head="ReformerModel", seed=0):
    """A random HF model of ``head`` saved in ``directory``; returns (HF model in eval mode, directory)."""
    torch.manual_seed(seed)
    hf = getattr(transformers, head)(transformers.ReformerConfig(**{**BASE, **overrides}))
    randomize(hf)
    hf.save_pretrained(directory)
    return hf.eval(), directory


def inputs(length, padding=None, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = None
    if padding:
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0
        if padding == "both":
            mask[1, :2] = 0
    return ids, mask


def run_both(hf, ours, seed=3, **kwargs):
    """The same call on both models from the same RNG state (LSH rotations are drawn in HF's order)."""
    torch.manual_seed(seed)
    a = hf(**kwargs)
    torch.manual_seed(seed)
    with runtime.use_backend("torch"):
        b = ours(**kwargs)
    return a, b


# ---------------------------------------------------------------------------------------------- interface

def test_forward_arguments_and_output_fields_match_hf():
    assert_forward_arguments_match_hf(tr, "Reformer")
    import dataclasses

    for name in ("ReformerModelOutput", "ReformerModelWithLMHeadOutput"):
        assert [f.name for f in dataclasses.fields(getattr(tr, name))] == \
            [f.name for f in dataclasses.fields(getattr(hfm, name))], name


def test_activations_equal_transformers_bitwise():
    from transformers.activations import ACT2FN

    x = torch.randn(1000) * 3
    for name, fn in tr._ACTIVATIONS.items():
        assert torch.equal(fn(x), ACT2FN[name](x)), name


# ---------------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("case", sorted(CASES))
def test_base_model_matches_hf(tmp_path, case):
    overrides, length, padding = CASES[case]
    hf, path = make_checkpoint(tmp_path, overrides)
    ours = tr.ReformerModel.from_pretrained(path)
    ids, mask = inputs(length, padding)
    kwargs = dict(attention_mask=mask, output_hidden_states=True, use_cache=False)
    if case == "auto_buckets_plain_positions":  # inputs_embeds, num_buckets chosen on the fly (and written back)
        kwargs["inputs_embeds"] = hf.get_input_embeddings()(ids).detach()
    else:
        kwargs["input_ids"] = ids
    with torch.no_grad():
        a, b = run_both(hf, ours, **kwargs)
    close(b.last_hidden_state, a.last_hidden_state, msg="last_hidden_state")
    assert len(b.hidden_states) == len(a.hidden_states) == len(overrides["attn_layers"]) + 1
    for i, (x, y) in enumerate(zip(b.hidden_states, a.hidden_states)):
        close(x, y, msg=f"hidden_states[{i}]")
    assert ours.config.num_buckets == hf.config.num_buckets


@pytest.mark.parametrize("case", ["decoder_mixed", "encoder_mixed_padded", "short_unchunked"])
def test_output_attentions_match_hf(tmp_path, case):
    """Attention probabilities (the reference path) in HF's per-layer layouts: local [B, H, L/c, c, window],
    LSH sorted [B, H, hashes * L/c, c, window], unchunked [B, H, L, L]."""
    overrides, length, padding = CASES[case]
    hf, path = make_checkpoint(tmp_path, overrides)
    ours = tr.ReformerModel.from_pretrained(path)
    ids, mask = inputs(length, padding)
    with torch.no_grad():
        a, b = run_both(hf, ours, input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False)
    assert len(b.attentions) == len(a.attentions) == len(overrides["attn_layers"])
    for i, (x, y) in enumerate(zip(b.attentions, a.attentions)):
        close(x, y, msg=f"attentions[{i}]")


def test_num_hashes_override_and_position_ids_match_hf(tmp_path):
    hf, path = make_checkpoint(tmp_path, CASES["decoder_mixed"][0])
    ours = tr.ReformerModel.from_pretrained(path)
    ids, _ = inputs(12)
    positions = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], list(range(10, 22))])
    for nh in (1, 3):
        with torch.no_grad():
            a, b = run_both(hf, ours, input_ids=ids, num_hashes=nh, position_ids=positions, use_cache=False)
        close(b.last_hidden_state, a.last_hidden_state, msg=f"num_hashes={nh}")
    with torch.no_grad(), runtime.use_backend("torch"):  # auto-padding with position_ids (HF crashes): continued
        given = ours(ids[:, :10], position_ids=torch.arange(10).expand(2, 10), use_cache=False).last_hidden_state
        default = ours(ids[:, :10], use_cache=False).last_hidden_state
    close(given, default, msg="position_ids with auto-padding")


@pytest.fixture(scope="module")
def encoder_heads(tmp_path_factory):
    """One encoder checkpoint per head (same body weights), HF model and ours."""
    pairs = {}
    for head in ("ReformerForMaskedLM", "ReformerForSequenceClassification", "ReformerForQuestionAnswering"):
        overrides = dict(CASES["encoder_mixed_padded"][0], num_labels=2 if "Question" in head else 3)
        hf, path = make_checkpoint(tmp_path_factory.mktemp(head), overrides, head)
        pairs[head] = (hf, getattr(tr, head).from_pretrained(path))
    return pairs


def test_masked_lm_matches_hf(encoder_heads):
    hf, ours = encoder_heads["ReformerForMaskedLM"]
    ids, mask = inputs(17, "both")
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.5, -100)
    with torch.no_grad():
        a, b = run_both(hf, ours, input_ids=ids, attention_mask=mask, labels=labels)
    close(b.logits, a.logits, msg="logits")
    torch.testing.assert_close(b.loss, a.loss, **TOL)
    with torch.no_grad(), runtime.use_backend("torch"):
        as_tuple = ours(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert len(as_tuple) == 2 and torch.equal(as_tuple[1], b.logits)
    with runtime.use_backend("torch"):  # with gradients: the fused loss, no logits
        fused = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, a.loss, **TOL)


@pytest.mark.parametrize("problem", ["single_label_classification", "regression", "multi_label_classification"])
def test_sequence_classification_matches_hf(encoder_heads, problem):
    hf, ours = encoder_heads["ReformerForSequenceClassification"]
    ids, mask = inputs(12, "one")
    labels = {"single_label_classification": torch.tensor([2, 0]), "regression": torch.randn(2, 3),
              "multi_label_classification": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])}[problem]
    hf.config.problem_type = ours.config.problem_type = problem
    with torch.no_grad():
        a, b = run_both(hf, ours, input_ids=ids, attention_mask=mask, labels=labels)
    close(b.logits, a.logits, msg="logits")
    torch.testing.assert_close(b.loss, a.loss, **TOL)


def test_question_answering_matches_hf(encoder_heads):
    hf, ours = encoder_heads["ReformerForQuestionAnswering"]
    ids, mask = inputs(17, "both")
    kwargs = dict(input_ids=ids, attention_mask=mask, start_positions=torch.tensor([1, 40]),
                  end_positions=torch.tensor([[30], [3]]), output_hidden_states=True)
    with torch.no_grad():
        a, b = run_both(hf, ours, **kwargs)
    for field in ("start_logits", "end_logits", "loss"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), **TOL)
    assert len(b.hidden_states) == 4


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    overrides = dict(CASES["decoder_mixed"][0], attn_layers=["local", "lsh", "local", "lsh"], num_buckets=[2, 4],
                     axial_pos_shape=(4, 8), max_position_embeddings=32, chunk_size_lm_head=1,
                     chunk_size_feed_forward=0)
    hf, path = make_checkpoint(tmp_path_factory.mktemp("lm"), overrides, "ReformerModelWithLMHead")
    if getattr(hf.lm_head.decoder, "bias", None) is not None:  # transformers >= 5.25 adds the decoder bias
        with torch.no_grad():
            hf.lm_head.decoder.bias.zero_()  # a bias that dominates would make every greedy id the same
        hf.save_pretrained(path)
    return hf, tr.ReformerModelWithLMHead.from_pretrained(path), path


def test_lm_head_logits_loss_and_logits_to_keep_match_hf(lm):
    hf, ours, _ = lm
    ids, mask = inputs(21, "one")
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        a, b = run_both(hf, ours, input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        close(b.logits, a.logits, msg="logits")
        torch.testing.assert_close(b.loss, a.loss, **TOL)
        a, b = run_both(hf, ours, input_ids=ids, logits_to_keep=2, use_cache=False, return_dict=False)
    assert len(b) == len(a) == 1 and b[0].shape == (2, 2, VOCAB)
    close(b[0], a[0], msg="logits_to_keep")


def test_lm_bias_of_newer_checkpoints_is_used(lm, tmp_path):
    """transformers 5.25's LM decoder has a bias (5.17's has none and drops it on load; a 5.17 checkpoint then
    loads with a zero bias here, as in 5.25)."""
    hf, ours, path = lm
    state = load_file(f"{path}/model.safetensors")
    state["lm_head.decoder.bias"] = torch.linspace(-1, 1, VOCAB)
    (tmp_path / "new").mkdir()
    save_file(state, tmp_path / "new" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "new" / "config.json").write_text(open(f"{path}/config.json").read())
    biased = tr.ReformerModelWithLMHead.from_pretrained(tmp_path / "new")
    del state["lm_head.decoder.bias"]
    (tmp_path / "old").mkdir()
    save_file(state, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "old" / "config.json").write_text(open(f"{path}/config.json").read())
    plain = tr.ReformerModelWithLMHead.from_pretrained(tmp_path / "old")
    ids, _ = inputs(12)
    with torch.no_grad(), runtime.use_backend("torch"):
        diff = biased(ids, use_cache=False).logits - plain(ids, use_cache=False).logits
    torch.testing.assert_close(diff, torch.linspace(-1, 1, VOCAB).expand_as(diff), **TOL)


def test_save_pretrained_round_trips_through_transformers(lm, tmp_path):
    hf, ours, _ = lm
    ours.save_pretrained(tmp_path)
    back = transformers.ReformerModelWithLMHead.from_pretrained(tmp_path).eval()
    ids, _ = inputs(12)
    with torch.no_grad():
        a, b = run_both(back, ours, input_ids=ids, use_cache=False)
    close(b.logits, a.logits, msg="reloaded")


# ---------------------------------------------------------------------------------------------- training

def train_pair(tmp_path, overrides, head):
    hf, path = make_checkpoint(tmp_path, overrides, head)
    return hf.train(), getattr(tr, head).from_pretrained(path).train()


def grads_of(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("head", ["ReformerModelWithLMHead", "ReformerForMaskedLM"])
def test_training_step_gradients_match_hf(tmp_path, head):
    """Train mode, dropouts 0: loss and every parameter gradient through the reversible backward equal HF's."""
    overrides = dict(CASES["decoder_mixed"][0]) if head == "ReformerModelWithLMHead" else \
        dict(CASES["encoder_mixed_padded"][0])
    hf, ours = train_pair(tmp_path, overrides, head)
    ids, mask = inputs(24, None if head == "ReformerModelWithLMHead" else "both")
    a, b = run_both(hf, ours, input_ids=ids, attention_mask=mask, labels=ids)
    a.loss.backward()
    with runtime.use_backend("torch"):
        b.loss.backward()
    torch.testing.assert_close(b.loss, a.loss, **TOL)
    theirs, mine = grads_of(hf), grads_of(ours)
    assert set(theirs) <= set(mine) and set(mine) - set(theirs) <= {"lm_head.decoder.bias"}  # (5.17 has none)
    for name, g in theirs.items():
        torch.testing.assert_close(mine[name], g, atol=1e-5, rtol=1e-4, msg=name)


def _plain_autograd(run, x1, x2, all_hidden, *params):
    """The layers under ordinary autograd (every activation saved): the oracle for the reversible backward."""
    return torch.cat(run.forward(x1, x2, all_hidden), dim=-1)


def test_reversible_backward_replays_dropout_exactly(tmp_path, monkeypatch):
    """With every dropout on (attention probabilities in both kernels, hidden, feed-forward, embeddings), the
    recomputing backward equals plain autograd through the same seeded forward."""
    dropouts = dict(hidden_dropout_prob=0.2, local_attention_probs_dropout_prob=0.3,
                    lsh_attention_probs_dropout_prob=0.3)
    _, ours = train_pair(tmp_path, dict(CASES["decoder_mixed"][0], **dropouts), "ReformerModelWithLMHead")
    ids, _ = inputs(24)
    results = []
    for patch in (False, True):
        if patch:
            monkeypatch.setattr(tr.ReversibleLayersFunction, "apply", _plain_autograd)
        ours.zero_grad()
        torch.manual_seed(5)
        with runtime.use_backend("torch"):
            loss = ours(ids, labels=ids).loss
            loss.backward()
        results.append((loss.detach(), grads_of(ours)))
    (loss_rev, rev), (loss_plain, plain) = results
    torch.testing.assert_close(loss_rev, loss_plain, rtol=0, atol=0)
    assert set(rev) == set(plain)
    for name in plain:  # X2 = Y2 - g(Y1) reconstructs the inputs to rounding (~1e-4 here): a replay error is O(1)
        torch.testing.assert_close(rev[name], plain[name], atol=3e-4, rtol=1e-3, msg=name)


def _saved_bytes(model, ids) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with runtime.use_backend("torch"):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # what the forward keeps for backward
            loss = model(ids, labels=ids).loss
        loss.backward()  # (recomputes one layer at a time)
    return total


def test_training_memory_is_flat_in_depth(monkeypatch):
    """Bytes autograd saves in a training step: equal for 2 and 8 layers (only the last layer's streams and
    the head are kept), while plain autograd through the same layers grows with depth."""
    def model(layers):
        torch.manual_seed(0)
        config = tr.ReformerConfig(**{**BASE, "is_decoder": True, "attn_layers": ["local", "lsh"] * (layers // 2),
                                      "num_buckets": 4})
        return tr.ReformerModelWithLMHead(config).train()

    ids, _ = inputs(24)
    reversible = [_saved_bytes(model(n), ids) for n in (2, 8)]
    assert reversible[0] == reversible[1]
    monkeypatch.setattr(tr.ReversibleLayersFunction, "apply", _plain_autograd)
    plain = [_saved_bytes(model(n), ids) for n in (2, 8)]
    assert plain[1] > plain[0] > reversible[0]


# ---------------------------------------------------------------------------------------------- generation

def _hf_greedy(hf, ids, steps, num_hashes=None):
    """HF's manual cached loop (what its generate does): ids and the logits of every step."""
    out, logits, cache, cur = ids, [], None, ids
    with torch.no_grad():
        for _ in range(steps):
            res = hf(cur, past_buckets_states=cache, use_cache=True, num_hashes=num_hashes)
            cache, step = res.past_buckets_states, res.logits[:, -1]
            logits.append(step)
            cur = step.argmax(-1, keepdim=True)
            out = torch.cat([out, cur], dim=-1)
    return out, logits


@pytest.mark.parametrize("prompt, num_hashes", [(3, None), (13, None), (12, 1), (7, 3)])
def test_cached_greedy_generation_matches_hf(lm, prompt, num_hashes):
    """Prompt 3: unchunked prefill, the LSH cache starts hashing once it reaches the chunk; 13: auto-padded
    prefill (pad bucket in the cached buckets); 12: chunked, exact; 7 with 3 hashes (generate's override)."""
    hf, ours, _ = lm
    ids, _ = inputs(prompt, batch=1, seed=prompt)
    torch.manual_seed(0)
    expected, hf_logits = _hf_greedy(hf, ids, 10, num_hashes)
    torch.manual_seed(0)
    with runtime.use_backend("torch"):
        got = ours.generate(ids, max_new_tokens=10, num_hashes=num_hashes, return_dict_in_generate=True,
                            output_scores=True)
    assert got.sequences.tolist() == expected.tolist()
    for i, (x, y) in enumerate(zip(got.scores, hf_logits)):
        torch.testing.assert_close(x, y, **TOL, msg=f"step {i}")
    torch.manual_seed(0)
    assert hf.generate(ids, max_new_tokens=10, do_sample=False, num_hashes=num_hashes).tolist() == expected.tolist()


def test_batched_generation_equals_one_row_at_a_time(lm):
    """Each row reads its own cached states (HF's batched LSH step reads row 0's)."""
    _, ours, _ = lm
    ids, _ = inputs(13, batch=2, seed=4)
    with runtime.use_backend("torch"):
        both = ours.generate(ids, max_new_tokens=8)
        rows = [ours.generate(ids[i:i + 1], max_new_tokens=8) for i in range(2)]
    assert both.tolist() == torch.cat(rows).tolist()
    with pytest.raises(ValueError, match="padding mask"):
        ours.generate(ids, attention_mask=torch.tensor([[0] + [1] * 12, [1] * 13]), max_new_tokens=2)


def test_sampling_matches_hf_draw_for_draw(tmp_path):
    """Without hash_seed every LSH call draws fresh rotations from torch's generator, interleaved with the
    sampling draws: the same seed gives HF's samples only if every draw comes in HF's order and shape."""
    overrides = dict(CASES["decoder_mixed"][0], axial_pos_shape=(4, 8), max_position_embeddings=32,
                     chunk_size_feed_forward=0, hash_seed=None)
    hf, path = make_checkpoint(tmp_path, overrides, "ReformerModelWithLMHead")
    ours = tr.ReformerModelWithLMHead.from_pretrained(path)
    ids, _ = inputs(13, batch=1, seed=3)
    options = dict(max_new_tokens=8, do_sample=True, top_k=10, temperature=0.8)
    torch.manual_seed(0)
    expected = hf.generate(ids, **options)
    torch.manual_seed(0)
    with runtime.use_backend("torch"):
        assert ours.generate(ids, **options).tolist() == expected.tolist()


def test_beam_search_and_fp16_match_hf(tmp_path):
    """Beam search (the cache reordered between steps) gives HF's ids on a local-attention decoder (HF's batched
    LSH cache step reads row 0, so beams over LSH layers are compared one row at a time above); in float16
    (HF's fp16 mask constants) logits equal HF's."""
    overrides = dict(CASES["decoder_mixed"][0], attn_layers=["local", "local"], axial_pos_shape=(4, 8),
                     chunk_size_feed_forward=0, max_position_embeddings=32)  # (HF cannot chunk 1-token steps)
    hf, path = make_checkpoint(tmp_path, overrides, "ReformerModelWithLMHead")
    ours = tr.ReformerModelWithLMHead.from_pretrained(path)
    ids, _ = inputs(5, batch=1, seed=3)
    options = dict(max_new_tokens=8, num_beams=2, num_return_sequences=2, length_penalty=0.5)
    with runtime.use_backend("torch"):
        assert ours.generate(ids, **options).tolist() == hf.generate(ids, do_sample=False, **options).tolist()
    half = tr.ReformerModelWithLMHead.from_pretrained(path, dtype=torch.float16)
    ids, mask = inputs(24, "both")
    with torch.no_grad():
        a, b = run_both(hf.half(), half, input_ids=ids, attention_mask=mask, use_cache=False)
    assert b.logits.dtype == torch.float16
    close(b.logits, a.logits, tol=dict(atol=1e-2, rtol=1e-2), msg="fp16 logits")


# ---------------------------------------------------------------------------------------------- errors

def test_bad_input_raises_clear_errors(tmp_path, lm):
    _, ours, path = lm
    ids, _ = inputs(24)
    with pytest.raises(ValueError, match="num_hashes"):
        ours(ids, num_hashes=0)
    with pytest.raises(ValueError, match="output_attentions"), runtime.use_backend("triton"):
        ours(ids, output_attentions=True)  # the kernels never form the probabilities: no silent fallback
    ours.train()
    try:
        with pytest.raises(ValueError, match="multiply to sequence length"):  # HF's axial training error
            ours(ids[:, :12])
        with pytest.raises(ValueError, match="multiple of least common multiple chunk_length 12"):
            ours(ids[:, :17])
    finally:
        ours.eval()
    with torch.no_grad(), runtime.use_backend("torch"):
        cache = ours(ids[:, :5], use_cache=True).past_buckets_states
        with pytest.raises(ValueError, match="one token"):
            ours(ids[:, :2], past_buckets_states=cache)
    with pytest.raises(ValueError, match="attn_layers"):
        tr.ReformerModel(tr.ReformerConfig(**{**BASE, "attn_layers": ["local", "global"]}))
    with pytest.raises(ValueError, match="is_decoder"):
        tr.ReformerModelWithLMHead(tr.ReformerConfig(**{**BASE, "attn_layers": ["local"]}))
    with pytest.raises(ValueError, match="is_decoder"):
        tr.ReformerForMaskedLM(tr.ReformerConfig(**{**BASE, "attn_layers": ["local"], "is_decoder": True}))
    with pytest.raises(ValueError, match="sum to"):
        tr.ReformerModel(tr.ReformerConfig(**{**BASE, "attn_layers": ["local"], "axial_pos_embds_dim": (6, 6)}))
    with pytest.raises(ValueError, match="num_buckets"):
        tr.ReformerModel(tr.ReformerConfig(**{**BASE, "attn_layers": ["lsh"], "num_buckets": 3}))
    other = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=8, vocab_size=10)).save_pretrained(other)
    with pytest.raises(ValueError, match="model_type 'bert'"):
        tr.ReformerModel.from_pretrained(other)


# ---------------------------------------------------------------------------------------------- Triton path

def test_triton_path_forward_and_training_step_match_reference(tmp_path, device):
    """The kernels (the interpreter on CPU) inside the model: the loss and gradients of a training step equal
    the reference path (which equals HF above), and so do the ids of cached generation."""
    overrides = dict(CASES["decoder_mixed"][0], num_hashes=1)
    _, ours = train_pair(tmp_path, overrides, "ReformerModelWithLMHead")
    ours.to(device)
    ids = inputs(24, batch=1)[0].to(device)
    results = []
    for backend in ("torch", "triton"):
        ours.zero_grad()
        torch.manual_seed(2)
        with runtime.use_backend(backend):
            loss = ours(ids, labels=ids).loss
            loss.backward()
        results.append((loss.detach(), grads_of(ours)))
    (loss_ref, ref), (loss_tri, tri) = results
    torch.testing.assert_close(loss_tri, loss_ref, atol=1e-4, rtol=1e-4)
    for name in ref:
        torch.testing.assert_close(tri[name], ref[name], atol=2e-4, rtol=1e-3, msg=name)
    ours.eval()  # cached greedy generation with a chunked, auto-padded prefill on the kernels
    with runtime.use_backend("triton"):
        got = ours.generate(ids[:, :13], max_new_tokens=4)
    with runtime.use_backend("torch"):
        assert got.tolist() == ours.generate(ids[:, :13], max_new_tokens=4).tolist()


def test_cli_generate_matches_hf(tmp_path, capsys):
    """`tritonformers generate` on a local Reformer checkpoint with its spiece.model equals HF's ids."""
    pytest.importorskip("google.protobuf", reason="transformers reads spiece.model through protobuf")
    from tests.tokenizers.test_reformer_tokenizer import checkpoint, train
    from tritonformers.cli import main

    source = checkpoint(tmp_path / "ckpt", train(tmp_path / "spm"))
    tok = transformers.AutoTokenizer.from_pretrained(source)
    overrides = dict(CASES["decoder_mixed"][0], vocab_size=len(tok), axial_pos_shape=(4, 8),
                     chunk_size_feed_forward=0, max_position_embeddings=32)
    hf, _ = make_checkpoint(source, overrides, "ReformerModelWithLMHead")
    prompt = "The quick brown fox"
    argv = ["generate", "--model", source, "--max-new-tokens", "5", "--device", "cpu", "--prompt", prompt]
    capsys.readouterr()
    with runtime.use_backend("torch"):
        assert main(argv) == 0
    printed = capsys.readouterr().out
    ids = hf.generate(tok(prompt, return_tensors="pt").input_ids, max_new_tokens=5, do_sample=False)
    assert printed == tok.decode(ids[0], skip_special_tokens=True) + "\n"

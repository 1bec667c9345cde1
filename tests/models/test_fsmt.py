"""FSMT (tritonformers.models.fsmt) against transformers' FSMT on tiny random checkpoints.

The reference path (torch backend) matches transformers to float32 rounding: logits, encoder output, hidden
states, the loss and the gradients of every parameter; the Triton path (interpreter) is smoke-tested on the
same model. HF's decoder is causal only with ``use_cache=False`` (its default call is not: specs/fsmt.md §7),
so every comparison uses that call; padded rows are compared on their real positions (HF averages fully
masked query rows, the kernels write 0 there). Generation parity is in test_fsmt_generation.py.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.models.common import (TOL, assert_forward_arguments_match_hf, assert_output_fields_match_hf,  # noqa: E402
                                 close)
from tests.helpers import DEVICE  # noqa: E402
from tests.models.fsmt_common import CONFIGS, EOS, PAD, make_checkpoint, source_batch  # noqa: E402
from tritonformers import runtime  # noqa: E402
from tritonformers.models import fsmt as tf  # noqa: E402

transformers.logging.set_verbosity_error()
TRITON_TOL = dict(atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    made = {}

    def make(name: str = "base", **overrides):
        key = (name, tuple(sorted(overrides.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(f"fsmt-{name}")
            made[key] = (make_checkpoint(path, name, **overrides), path)
        return made[key]

    return make


def target_batch(vocab: int, rows: int = 3, length: int = 5, seed: int = 1, pad_row: bool = True):
    """Decoder ids starting with </s>; row 1 ends with two pads (the decoder key-padding path)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (rows, length), generator=g)
    ids[:, 0] = EOS
    if pad_row:
        ids[1, -2:] = PAD
    return ids


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------

def test_config_defaults_aliases_and_round_trip(tmp_path):
    ours, theirs = tf.FSMTConfig(), transformers.FSMTConfig()
    for key in tf.FSMTConfig.defaults:
        assert getattr(ours, key) == (list(getattr(theirs, key)) if key == "langs" else getattr(theirs, key)), key
    c = tf.FSMTConfig(hidden_size=64, num_attention_heads=4, vocab_size=99, num_hidden_layers=3, decoder={"x": 1})
    assert (c.d_model, c.encoder_attention_heads, c.tgt_vocab_size, c.encoder_layers) == (64, 4, 99, 3)
    assert not hasattr(c, "decoder")
    c.save_pretrained(tmp_path)
    hf = transformers.FSMTConfig.from_pretrained(tmp_path)
    assert (hf.d_model, hf.tgt_vocab_size, hf.encoder_layers, hf.num_beams) == (64, 99, 3, 5)
    assert tf.FSMTConfig.from_pretrained(tmp_path) == c


def test_checkpoint_of_another_model_type_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bart", "d_model": 16}))
    with pytest.raises(ValueError, match="model_type 'bart'.*FSMTForConditionalGeneration loads model_type 'fsmt'"):
        tf.FSMTForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'bart' checkpoint, not an FSMT"):
        tf.FSMTConfig.from_pretrained(tmp_path)


def test_sinusoids_match_hf():
    from transformers.models.fsmt.modeling_fsmt import SinusoidalPositionalEmbedding

    for dim in (15, 16):
        want = SinusoidalPositionalEmbedding.get_embedding(40, dim, PAD)
        assert torch.equal(tf.sinusoidal_positions(40, dim, PAD), want)


# ----------------------------------------------------------------------------------------------------------
# Forward, loss, gradients
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,padding,with_mask", [("base", "right", True), ("base", "left", True),
                                                     ("base", "right", False), ("odd", "left", True)])
def test_forward_matches_hf(checkpoint, name, padding, with_mask):
    hf, path = checkpoint(name)
    cfg = CONFIGS[name]
    ids, mask = source_batch(cfg["src_vocab_size"], length=9 if name == "odd" else 7, padding=padding)
    dec = target_batch(cfg["tgt_vocab_size"], length=8 if name == "odd" else 5)  # "odd": beyond the table
    enc_mask = mask if with_mask else None
    with torch.no_grad():
        want = hf(ids, attention_mask=enc_mask, decoder_input_ids=dec, use_cache=False, output_hidden_states=True)
        with runtime.use_backend("torch"):
            model = tf.FSMTForConditionalGeneration.from_pretrained(path)
            got = model(ids, attention_mask=enc_mask, decoder_input_ids=dec, output_hidden_states=True)
    real = dec != PAD
    close(got.logits, want.logits, real, msg="logits")
    close(got.encoder_last_hidden_state, want.encoder_last_hidden_state, mask if with_mask else None, msg="encoder")
    assert len(got.decoder_hidden_states) == len(want.decoder_hidden_states)
    for a, b in zip(got.decoder_hidden_states, want.decoder_hidden_states):
        close(a, b, real, msg="decoder hidden")
    for a, b in zip(got.encoder_hidden_states, want.encoder_hidden_states):
        close(a, b, mask if with_mask else None, msg="encoder hidden")


def test_fsmt_model_returns_logits_and_the_default_call_is_causal(checkpoint):
    hf, path = checkpoint()
    ids, mask = source_batch()
    dec = target_batch(36, pad_row=False)
    with torch.no_grad():
        want = hf.model(ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False)
        with runtime.use_backend("torch"):
            base = tf.FSMTModel.from_pretrained(path)  # a task checkpoint into the base model
            got = base(ids, attention_mask=mask, decoder_input_ids=dec)  # HF's default here is not causal
            as_tuple = base(ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False, return_dict=False)
    close(got.last_hidden_state, want.last_hidden_state, msg="logits")
    assert isinstance(got.cache, tf.EncoderDecoderCache) and got.cache.get_seq_length() == dec.shape[1]
    assert len(as_tuple) == 2 and torch.equal(as_tuple[0], got.last_hidden_state)


def test_incremental_decoding_with_the_cache_equals_the_full_pass(checkpoint):
    _, path = checkpoint()
    ids, mask = source_batch()
    dec = target_batch(36, length=6, pad_row=False)
    with torch.no_grad(), runtime.use_backend("torch"):
        model = tf.FSMTForConditionalGeneration.from_pretrained(path)
        full = model(ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits
        out = model(ids, attention_mask=mask, decoder_input_ids=dec[:, :3], use_cache=True)
        steps = [out.logits]
        for t in range(3, 6):
            with pytest.warns(FutureWarning, match="past_key_values"):  # the deprecated name still works
                out = model(encoder_outputs=(out.encoder_last_hidden_state,), attention_mask=mask,
                            decoder_input_ids=dec[:, t:t + 1], past_key_values=out.cache)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)


def test_greedy_generate_equals_stepwise_argmax_of_hf_forward(checkpoint):
    """Generation against HF's full causal forward (an oracle that holds with every transformers release,
    whose cached generate is wrong in 5.17: test_fsmt_generation.py)."""
    hf, path = checkpoint()
    ids, mask = source_batch(rows=2)
    with runtime.use_backend("torch"):
        got = tf.FSMTForConditionalGeneration.from_pretrained(path).generate(ids, attention_mask=mask, num_beams=1,
                                                                           max_new_tokens=6)
    for row in range(ids.shape[0]):
        seq = torch.tensor([[EOS]])
        with torch.no_grad():
            while seq.shape[1] < 7 and (seq.shape[1] == 1 or seq[0, -1] != EOS):
                logits = hf(ids[row:row + 1], attention_mask=mask[row:row + 1], decoder_input_ids=seq,
                            use_cache=False).logits[0, -1]
                nxt = EOS if seq.shape[1] == 6 else int(logits.argmax())  # the forced EOS at max_length - 1
                seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
        n = seq.shape[1]
        assert torch.equal(got[row, :n], seq[0]) and got[row, n:].eq(PAD).all(), (got[row], seq)


def test_loss_and_gradients_match_hf(checkpoint):
    hf, path = checkpoint()
    ids, mask = source_batch()
    labels = target_batch(36, seed=3)[:, 1:].contiguous()
    labels[0, -1] = -100
    dec = tf.shift_tokens_right(labels, PAD)
    assert labels[0, -1] == -100  # not modified in place, unlike HF's shift
    hf.zero_grad()
    want = hf(ids, attention_mask=mask, decoder_input_ids=dec, labels=labels)
    want.loss.backward()
    with runtime.use_backend("torch"):
        model = tf.FSMTForConditionalGeneration.from_pretrained(path)
        got = model(ids, attention_mask=mask, labels=labels)  # decoder inputs = labels shifted right
        got.loss.backward()
        with torch.no_grad():
            again = model(ids, attention_mask=mask, decoder_input_ids=dec, labels=labels)
    assert got.logits is None  # the fused loss never forms the logits
    torch.testing.assert_close(got.loss, want.loss, **TOL)
    torch.testing.assert_close(again.loss, want.loss, **TOL)
    ours = dict(model.named_parameters())
    for name, p in hf.named_parameters():
        if "embed_positions" in name:
            continue
        torch.testing.assert_close(ours[name].grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_triton_path_float16_matches_float32(checkpoint):
    _, path = checkpoint()
    ids, mask = (t.to(DEVICE) for t in source_batch(rows=2))
    dec = target_batch(36, rows=2).to(DEVICE)
    with torch.no_grad():
        with runtime.use_backend("torch"):
            want = tf.FSMTForConditionalGeneration.from_pretrained(path, device=DEVICE)(
                ids, attention_mask=mask, decoder_input_ids=dec).logits
        with runtime.use_backend("triton"):
            half = tf.FSMTForConditionalGeneration.from_pretrained(path, dtype=torch.float16, device=DEVICE)
            got = half(ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert got.dtype == torch.float16
    scale = want.abs().max()
    close(got / scale, want / scale, dec != PAD, tol=dict(atol=2e-2, rtol=2e-2), msg="fp16 logits")


def test_triton_path_matches_the_reference(checkpoint):
    _, path = checkpoint()
    ids, mask = (t.to(DEVICE) for t in source_batch(rows=2))
    dec = target_batch(36, rows=2).to(DEVICE)
    labels = dec.roll(-1, dims=1)
    results = {}
    for be in ("torch", "triton"):
        with runtime.use_backend(be):
            model = tf.FSMTForConditionalGeneration.from_pretrained(path, device=DEVICE)
            with torch.no_grad():
                logits = model(ids, attention_mask=mask, decoder_input_ids=dec).logits
            loss = model(ids, attention_mask=mask, decoder_input_ids=dec, labels=labels).loss
            loss.backward()
            grad = model.model.encoder.layers[0].self_attn.q_proj.weight.grad
            results[be] = (logits, loss, grad)
    real = dec != PAD
    close(results["triton"][0], results["torch"][0], real, tol=TRITON_TOL, msg="logits")
    torch.testing.assert_close(results["triton"][1], results["torch"][1], **TRITON_TOL)
    torch.testing.assert_close(results["triton"][2], results["torch"][2], atol=1e-3, rtol=1e-3)


def test_triton_generate_matches_the_reference_path(checkpoint):
    """Greedy and beam search through the kernels (decode attention over the static caches; the CUDA-graph
    step on CUDA) give the reference path's ids and scores."""
    _, path = checkpoint("base", eos_bias=3.0)
    ids, mask = (t.to(DEVICE) for t in source_batch(rows=2, seed=3))
    runs = {}
    for be in ("torch", "triton"):
        with runtime.use_backend(be):
            model = tf.FSMTForConditionalGeneration.from_pretrained(path, device=DEVICE)
            greedy = model.generate(ids, attention_mask=mask, num_beams=1, max_new_tokens=4)
            beam = model.generate(ids, attention_mask=mask, num_beams=2, num_return_sequences=2, max_new_tokens=3,
                                  return_dict_in_generate=True)
            runs[be] = (greedy, beam.sequences, beam.sequences_scores)
    assert torch.equal(runs["triton"][0], runs["torch"][0])
    assert torch.equal(runs["triton"][1], runs["torch"][1])
    torch.testing.assert_close(runs["triton"][2], runs["torch"][2], **TRITON_TOL)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision_matches_hf(checkpoint, dtype):
    """Kernels in bf16/fp16 against transformers in the same dtype (its softmax runs in that dtype too)."""
    hf, path = checkpoint()
    theirs = transformers.FSMTForConditionalGeneration.from_pretrained(path, dtype=dtype).cuda().eval()
    ours = tf.FSMTForConditionalGeneration.from_pretrained(path, dtype=dtype, device="cuda")
    ids, mask = (t.cuda() for t in source_batch(rows=3, length=24))
    dec = target_batch(36, length=16).cuda()
    with torch.no_grad():
        want = theirs(ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits
        got = ours(ids, attention_mask=mask, decoder_input_ids=dec).logits
    scale = want.abs().max()
    close(got / scale, want / scale, dec != PAD, tol=dict(atol=3e-2, rtol=3e-2), msg="logits")


# ----------------------------------------------------------------------------------------------------------
# Saving, loading, errors
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["base", "odd"])
def test_save_pretrained_round_trips_through_hf(checkpoint, tmp_path, name):
    hf, path = checkpoint(name)
    model = tf.FSMTForConditionalGeneration.from_pretrained(path)
    tied = model.model.decoder.embed_tokens.weight is model.model.decoder.output_projection.weight
    assert tied == CONFIGS[name].get("tie_word_embeddings", False)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["num_beams"] == 5
    back = transformers.FSMTForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, mask = source_batch(CONFIGS[name]["src_vocab_size"])
    dec = target_batch(CONFIGS[name]["tgt_vocab_size"], pad_row=False)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits
        got = back(ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_output_fields_and_forward_arguments_follow_hf():
    assert_output_fields_match_hf(tf, ["BaseModelOutput", "Seq2SeqModelOutput", "Seq2SeqLMOutput"])
    assert_forward_arguments_match_hf(tf, "FSMT")


def test_inputs_embeds_match_hf_and_ids(checkpoint):
    """The encoder from embeddings against HF's encoder (HF's model never builds the causal mask without
    input_ids, so the full model is compared with our own call by ids)."""
    hf, path = checkpoint()
    ids, mask = source_batch(padding="left")
    dec = target_batch(36, pad_row=False)
    model = tf.FSMTForConditionalGeneration.from_pretrained(path)
    src_embeds = model.model.encoder.embed_tokens(ids).detach()  # pad rows are zero vectors: positions agree
    dec_embeds = model.model.decoder.embed_tokens(dec).detach()
    with torch.no_grad():
        want = hf.model.encoder(None, attention_mask=mask, inputs_embeds=src_embeds).last_hidden_state
        with runtime.use_backend("torch"):
            got = model.model.encode(inputs_embeds=src_embeds, attention_mask=mask).last_hidden_state
            out = model(inputs_embeds=src_embeds, attention_mask=mask, decoder_inputs_embeds=dec_embeds)
            by_ids = model(ids, attention_mask=mask, decoder_input_ids=dec)
    close(got, want, mask, msg="encoder from embeddings")
    close(out.logits, by_ids.logits, msg="embeddings vs ids")
    with pytest.warns(FutureWarning, match="past_key_values"):
        assert out.past_key_values is out.cache


def test_bad_inputs_are_clear_errors(checkpoint):
    _, path = checkpoint()
    model = tf.FSMTForConditionalGeneration.from_pretrained(path)
    ids, mask = source_batch()
    with pytest.raises(ValueError, match=r"input_ids holds ids outside \[0, 40\)"):
        model(ids.masked_fill(ids == EOS, 40), attention_mask=mask, decoder_input_ids=ids[:, :2])
    with pytest.raises(ValueError, match="decoder_input_ids holds ids outside"):
        model(ids, attention_mask=mask, decoder_input_ids=torch.full((3, 2), 36))
    with pytest.raises(ValueError, match="num_beams must be a positive int"):
        model.generate(ids, attention_mask=mask, num_beams=0)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(ids, attention_mask=mask[:, :3], decoder_input_ids=ids[:, :2])
    with pytest.raises(ValueError, match="output_attentions is not supported"):
        model(ids, decoder_input_ids=ids[:, :2], output_attentions=True)

"""FSMT generate (the shared tritonformers.models.generation over FSMT's encoder-decoder session) against
transformers' generate: identical ids (shape included) and sequence scores to ~1e-5 in float32 on the
reference path, for greedy and beam search (2-5 beams, length penalties, early_stopping True / False /
"never", num_return_sequences, no_repeat_ngram_size, min_length, the forced-EOS path) on a padded batch whose
sentences finish at different steps. transformers builds no encoder mask from pads in generate, so the mask
is always passed here; ours infers it (checked against an explicit one). One greedy and one beam run go
through the Triton kernels (interpreter).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.models.fsmt_common import EOS, make_checkpoint, source_batch  # noqa: E402
from tritonformers import runtime  # noqa: E402
from tritonformers.models import fsmt as tf  # noqa: E402
from tritonformers.models.generation import GenerateOutput  # noqa: E402

transformers.logging.set_verbosity_error()


def _hf_positions_follow_the_cache() -> bool:
    """transformers 5.17's FSMT embeds each cached decoding step at position 2 (it computes positions from the
    one new token, ignoring the cache), so its generate is no oracle there; later releases pass the cache
    length (``SinusoidalPositionalEmbedding.forward(..., cache_length=)``)."""
    import inspect

    from transformers.models.fsmt.modeling_fsmt import SinusoidalPositionalEmbedding

    return "cache_length" in inspect.signature(SinusoidalPositionalEmbedding.forward).parameters


pytestmark = pytest.mark.skipif(not _hf_positions_follow_the_cache(),
                                reason="this transformers' FSMT generate puts every cached step at position 2 "
                                       "(fixed in later releases): not an oracle")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers model, ours): the EOS logit biased so that sentences end at varied steps."""
    path = tmp_path_factory.mktemp("fsmt-gen")
    hf = make_checkpoint(path, eos_bias=3.0)
    return hf, tf.FSMTForConditionalGeneration.from_pretrained(path)


def both(hf, ours, ids, mask, **kwargs):
    want = hf.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **kwargs)
    with runtime.use_backend("torch"):
        got = ours.generate(ids, attention_mask=mask, return_dict_in_generate=True, **kwargs)
    assert isinstance(got, GenerateOutput)
    assert torch.equal(got.sequences, want.sequences), f"\n{got.sequences}\n{want.sequences}"
    return got, want


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=9), dict(max_length=5), dict(max_new_tokens=9, min_length=6),
                                    dict(max_new_tokens=9, no_repeat_ngram_size=2),
                                    dict(max_new_tokens=9, bad_words_ids=[[22], [5, 5], [31, 19, 15]])],
                         ids=["natural-eos", "forced-eos", "min-length", "no-repeat", "bad-words"])
def test_greedy_matches_hf(models, kwargs):
    hf, ours = models
    ids, mask = source_batch(rows=4)
    got, _ = both(hf, ours, ids, mask, num_beams=1, **kwargs)
    assert got.sequences[:, 0].eq(EOS).all()  # every row starts with the decoder start token


BEAMS = [
    dict(num_beams=2),
    dict(num_beams=3, num_return_sequences=3, length_penalty=0.6, early_stopping=True),
    dict(num_beams=4, num_return_sequences=2, length_penalty=2.0, early_stopping="never"),
    dict(num_beams=5, num_return_sequences=5, length_penalty=-0.5),
    dict(num_beams=3, length_penalty=0.0, early_stopping="never", no_repeat_ngram_size=2),
    dict(num_beams=4, num_return_sequences=4, length_penalty=1.3, min_length=5),
    dict(num_beams=3, num_return_sequences=2, max_length=5),  # the forced-EOS path ends every beam
    dict(num_beams=2, bad_words_ids=[[19], [5, 5], [31, 19, 15], [2]]),
]


@pytest.mark.parametrize("case", range(len(BEAMS)), ids=lambda i: "-".join(f"{k}={v}" for k, v in BEAMS[i].items()))
def test_beam_search_matches_hf(models, case):
    hf, ours = models
    params = BEAMS[case]
    ids, mask = source_batch(rows=4, padding=("right", "left")[case % 2], seed=1)
    kwargs = dict(params) if "max_length" in params else dict(params, max_new_tokens=9)
    got, want = both(hf, ours, ids, mask, **kwargs)
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, atol=1e-5, rtol=1e-5)


def test_defaults_come_from_the_config_and_the_mask_is_inferred(models):
    hf, ours = models
    ids, mask = source_batch(rows=3, seed=2)
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=6)  # num_beams 5 from the config
    with runtime.use_backend("torch"):
        got = ours.generate(ids, max_new_tokens=6)  # the mask from the pads (transformers attends to them)
    assert torch.equal(got, want)


def test_sampling_matches_hf_with_the_same_seed(models):
    hf, ours = models
    ids, mask = source_batch(rows=3, seed=4)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=8, top_p=0.9, temperature=0.8,
                  num_beams=1, num_return_sequences=2)
    torch.manual_seed(7)
    want = hf.generate(ids, **kwargs)
    torch.manual_seed(7)
    with runtime.use_backend("torch"):
        got = ours.generate(ids, **kwargs)
    assert torch.equal(got, want), f"\n{got}\n{want}"

"""generate (tritonformers.models.generation) against transformers' generate on a tiny random BLOOM.

Ids must be identical in float32 on the reference path: greedy, beam search (beams, length penalties,
early stopping modes, returned sequences, scores), sampling with the same seed, the logits processors,
defaults from generation_config.json, mask inference. One greedy run goes through the Triton kernels
(interpreter); the CUDA-graph decode step is checked on CUDA. The session interface other families
plug into is exercised with a toy model.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tritonformers import runtime  # noqa: E402
from tritonformers.models import bloom as tb  # noqa: E402
from tritonformers.models.generation import (  # noqa: E402
    DecodeSession, GenerateOutput, GenerationConfig, GenerationMixin, KVCache, generate,
)

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

PAD = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers model, our model, path): 6 heads, an initialisation wide enough for clear argmaxes."""
    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=64, hidden_size=48, n_layer=2, n_head=6, initializer_range=0.15,
                                      pad_token_id=PAD)
    hf = transformers.BloomForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("bloom-gen")
    hf.save_pretrained(path)
    return hf, tb.BloomForCausalLM.from_pretrained(path), path


def batch(seed: int = 0, rows: int = 3, length: int = 7):
    """A left-padded batch: row 0 padded by 2, row 2 by 4 (pads hold PAD)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(PAD + 1, 64, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    if rows > 2:
        mask[2, :4] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def reachable_eos(hf, ids, mask) -> int:
    """A token greedy search emits mid-way in row 1, so that eos stops some rows early."""
    return int(hf.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)[1, ids.shape[1] + 2])


def ours_generate(model, ids, **kwargs):
    with runtime.use_backend("torch"):
        return model.generate(ids, **kwargs)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("variant", ["max_new_tokens", "max_length", "eos", "eos_list", "pad_is_eos"])
def test_greedy_matches_hf(models, seed, variant):
    hf, ours, _ = models
    ids, mask = batch(seed)
    kwargs = dict(attention_mask=mask, max_new_tokens=8)
    if variant == "max_length":
        kwargs = dict(attention_mask=mask, max_length=12)
    elif variant == "eos":
        kwargs["eos_token_id"] = reachable_eos(hf, ids, mask)
    elif variant == "eos_list":
        kwargs["eos_token_id"] = [60, reachable_eos(hf, ids, mask)]
    elif variant == "pad_is_eos":
        kwargs.update(eos_token_id=reachable_eos(hf, ids, mask), pad_token_id=None)
    want = hf.generate(ids, do_sample=False, **kwargs)
    got = ours_generate(ours, ids, **kwargs)
    assert torch.equal(got, want), f"\n{got}\n{want}"


@pytest.mark.parametrize("lag", [1, 3, 50])
@pytest.mark.parametrize("variant", ["one_row", "eos_list", "pad_is_eos"])
def test_greedy_reading_its_stop_late_gives_the_same_output_and_cache(models, monkeypatch, lag, variant):
    """On CUDA greedy search reads its "any row unfinished" flag a few steps late (no sync per step) and rewinds
    the steps it ran past the stop: forced here on the CPU, sequences, scores and the returned cache are those
    of reading it at once (and transformers' sequences); lag 50 outlives the loop (read at max_length)."""
    from tritonformers.models import generation
    hf, ours, _ = models
    ids, mask = batch(2, rows=1 if variant == "one_row" else 3)
    free = hf.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)[:, ids.shape[1]:]
    eos = [int(free[row, 1 + row % 3]) for row in range(ids.shape[0])]  # every row stops by its step 3
    kwargs = dict(attention_mask=mask, max_new_tokens=9, return_dict_in_generate=True, output_scores=True,
                  eos_token_id=eos, pad_token_id=None if variant == "pad_is_eos" else PAD)
    at_once = ours_generate(ours, ids, **kwargs)
    monkeypatch.setattr(generation, "_stop_check_lag", lambda session, cfg: lag)
    rewound = []
    rewind = generation.CachedDecoderSession.rewind
    monkeypatch.setattr(generation.CachedDecoderSession, "rewind", lambda self, n: (rewound.append(n), rewind(self, n)))
    late = ours_generate(ours, ids, **kwargs)
    assert rewound and rewound[0] == min(lag, 9 - (late.sequences.shape[1] - ids.shape[1])), rewound
    want = hf.generate(ids, do_sample=False, **{k: v for k, v in kwargs.items() if k != "return_dict_in_generate"
                                                and k != "output_scores"})
    assert torch.equal(late.sequences, want) and torch.equal(at_once.sequences, want)
    assert want.shape[1] < ids.shape[1] + 9, "eos must stop every row before max_new_tokens"
    assert len(late.scores) == len(at_once.scores) and all(torch.equal(a, b) for a, b in zip(late.scores, at_once.scores))
    assert late.cache.length == at_once.cache.length == want.shape[1] - 1
    assert torch.equal(late.cache.lens, at_once.cache.lens)
    for layer in range(len(late.cache)):
        assert all(torch.equal(a, b) for a, b in zip(late.cache[layer], at_once.cache[layer]))


def test_kv_cache_rewind():
    cache = KVCache(1, 2, 1, 4, 8)
    cache.prepare(5)
    cache.commit(5)
    cache.rewind(2)
    assert cache.length == 3 and cache.lens.tolist() == [3, 3] and cache[0][0].shape[2] == 3
    with pytest.raises(ValueError, match="cannot rewind 4"):
        cache.rewind(4)


BEAMS = [
    dict(num_beams=2),
    dict(num_beams=3, num_return_sequences=2, early_stopping=True, length_penalty=0.5),
    dict(num_beams=4, num_return_sequences=4, early_stopping="never", length_penalty=2.0),
    dict(num_beams=3, num_return_sequences=3, length_penalty=-0.5),
    dict(num_beams=2, early_stopping="never", length_penalty=0.0, max_length=13),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("params", BEAMS, ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()))
def test_beam_search_matches_hf(models, seed, params):
    hf, ours, _ = models
    ids, mask = batch(seed)
    kwargs = dict(attention_mask=mask, eos_token_id=reachable_eos(hf, ids, mask), **params)
    if "max_length" not in kwargs:
        kwargs["max_new_tokens"] = 8
    want = hf.generate(ids, do_sample=False, return_dict_in_generate=True, output_scores=True, **kwargs)
    got = ours_generate(ours, ids, return_dict_in_generate=True, **kwargs)
    assert isinstance(got, GenerateOutput) and isinstance(got.cache, KVCache)
    assert torch.equal(got.sequences, want.sequences), f"\n{got.sequences}\n{want.sequences}"
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, atol=1e-5, rtol=1e-5)


def test_sampling_matches_hf_with_the_same_seed_and_is_reproducible(models):
    hf, ours, _ = models
    ids, mask = batch(2)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=10, top_p=0.9, temperature=0.7,
                  num_return_sequences=2)
    torch.manual_seed(123)
    want = hf.generate(ids, **kwargs)
    torch.manual_seed(123)
    got = ours_generate(ours, ids, **kwargs)
    assert torch.equal(got, want)
    torch.manual_seed(123)  # beam sampling draws the same way
    beam_want = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, num_beams=2)
    torch.manual_seed(123)
    beam_got = ours_generate(ours, ids, attention_mask=mask, max_new_tokens=6, do_sample=True, num_beams=2)
    assert torch.equal(beam_got, beam_want)
    runs = [ours_generate(ours, ids, generator=torch.Generator().manual_seed(7), **kwargs) for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (6, 15)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_logits_processors_match_hf(models, num_beams):
    hf, ours, _ = models
    ids, mask = batch(3)
    eos = reachable_eos(hf, ids, mask)
    for kwargs in (dict(repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=3),
                   dict(min_length=11, forced_eos_token_id=eos, max_length=14),
                   dict(no_repeat_ngram_size=1, forced_bos_token_id=5)):
        kwargs = dict(attention_mask=mask, eos_token_id=eos, num_beams=num_beams, **kwargs)
        kwargs.setdefault("max_new_tokens", 8)
        want = hf.generate(ids, do_sample=False, **kwargs)
        got = ours_generate(ours, ids, **kwargs)
        assert torch.equal(got, want), f"{kwargs}\n{got}\n{want}"


def test_defaults_from_generation_config_json_and_mask_inference(models, tmp_path):
    hf, _, path = models
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    ids, mask = batch(4)
    eos = reachable_eos(hf, ids, mask)
    settings = {"bos_token_id": 1, "eos_token_id": eos, "pad_token_id": PAD, "num_beams": 2, "max_new_tokens": 6,
                "length_penalty": 0.7}
    (tmp_path / "generation_config.json").write_text(json.dumps(settings))
    theirs = transformers.BloomForCausalLM.from_pretrained(tmp_path).eval()
    ours = tb.BloomForCausalLM.from_pretrained(tmp_path)
    assert ours.generation_config.num_beams == 2
    # no attention_mask: inferred from the pad id, as transformers does
    want = theirs.generate(ids)
    got = ours_generate(ours, ids)
    assert torch.equal(got, want)
    assert torch.equal(ours_generate(ours, ids, attention_mask=mask), got)
    # without max_length anywhere: 20 new tokens (transformers 5 adds the prompt length)
    _, plain, _ = models
    with pytest.warns(UserWarning, match="20 new tokens"):
        out = ours_generate(plain, ids[1:2], eos_token_id=None)
    assert out.shape == (1, ids.shape[1] + 20)
    assert torch.equal(out, hf.generate(ids[1:2], eos_token_id=None))


def test_generate_rejects_bad_settings(models):
    _, ours, _ = models
    ids, mask = batch(0)
    bad = [
        (dict(num_return_sequences=2), "greedy"),
        (dict(num_beams=2, num_return_sequences=3), "at most num_beams"),
        (dict(max_length=5), "max_length"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(num_beams=0), "num_beams"),
        (dict(early_stopping="sometimes"), "early_stopping"),
        (dict(max_new_tokens=4, attention_mask=mask[:, 1:]), "attention_mask"),
        (dict(max_new_tokens=4, foo=1), "unexpected"),
    ]
    for kwargs, match in bad:
        kwargs.setdefault("attention_mask", mask)
        with pytest.raises((ValueError, TypeError), match=match):
            ours.generate(ids, **kwargs)
    with pytest.raises(TypeError, match="input_ids"):
        ours.generate(ids.float(), max_new_tokens=2)


def test_generate_names_bad_prompts(models):
    """An empty prompt names input_ids; an id outside the vocabulary is named with the vocabulary size."""
    _, ours, _ = models
    ids, mask = batch(0)
    with pytest.raises(ValueError, match=r"input_ids is empty \(shape \[3, 0\]\)"):
        ours.generate(ids[:, :0], attention_mask=mask[:, :0], max_new_tokens=2)
    for bad in (64, 1000, -1):
        wrong = ids.clone()
        wrong[1, 3] = bad
        with pytest.raises(ValueError, match=rf"input_ids holds token id {bad} \(row 1\).*\[0, 63\].*size 64"):
            ours.generate(wrong, attention_mask=mask, max_new_tokens=2)


def test_right_padded_prompts_warn(models):
    """transformers' warning for right padding into a decoder-only model (the mask says which side)."""
    _, ours, _ = models
    ids, mask = batch(0)
    right = torch.stack([torch.cat([r[m == 1], r[m == 0]]) for r, m in zip(ids, mask)])
    right_mask = torch.stack([torch.cat([m[m == 1], m[m == 0]]) for m in mask])
    with pytest.warns(UserWarning, match="right-padded.*padding_side='left'"):
        ours_generate(ours, right, attention_mask=right_mask, max_new_tokens=2)
    with pytest.warns(UserWarning, match="right-padded"):  # the mask inferred from the pads
        ours_generate(ours, right, max_new_tokens=2, pad_token_id=PAD)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours_generate(ours, ids, attention_mask=mask, max_new_tokens=2)
    assert not [w for w in caught if "right-padded" in str(w.message)]


def test_triton_greedy_matches_hf(models):
    hf, ours, _ = models
    ids, mask = batch(0, rows=2, length=6)
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    with runtime.use_backend("triton"):
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=3)
    assert torch.equal(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("params", [dict(), dict(num_beams=3, num_return_sequences=2)])
def test_cuda_graph_decoding_matches_eager_and_hf(models, params):
    hf, _, path = models
    ours = tb.BloomForCausalLM.from_pretrained(path, device="cuda")
    ids, mask = batch(5)
    kwargs = dict(attention_mask=mask.cuda(), max_new_tokens=10, eos_token_id=reachable_eos(hf, ids, mask), **params)
    graphed = ours.generate(ids.cuda(), use_cuda_graph=True, **kwargs)
    eager = ours.generate(ids.cuda(), use_cuda_graph=False, **kwargs)
    want = hf.cuda().generate(ids.cuda(), do_sample=False, **kwargs)
    hf.cpu()
    assert torch.equal(graphed, eager)
    assert torch.equal(graphed, want)


# ----------------------------------------------------------------------------------------------------------
# The session interface, with a toy model (what FSMT/Reformer-style families implement)
# ----------------------------------------------------------------------------------------------------------

class _BigramSession(DecodeSession):
    """Logits depend on the last token only; the output starts from a decoder start token (length 1)."""

    def __init__(self, table, rows, start):
        self.table = table
        self.prompt = torch.full((rows, 1), start, dtype=torch.long)
        self.prompt_mask = None
        self.last = self.prompt[:, 0]
        self.reorders = 0

    def prefill(self, max_length):
        return self.table[self.last]

    def step(self, tokens):
        self.last = tokens
        return self.table[tokens]

    def reorder(self, index):
        self.last = self.last[index]
        self.reorders += 1


class _Bigram(GenerationMixin):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(12, 12, generator=g) * 3
        self.generation_config = GenerationConfig(eos_token_id=2, pad_token_id=0, decoder_start_token_id=2)
        self.device = torch.device("cpu")
        self.sessions = []

    def generation_session(self, input_ids, attention_mask, num_copies=1, use_cuda_graph=None, **kwargs):
        session = _BigramSession(self.table, input_ids.shape[0] * num_copies, start=2)
        self.sessions.append(session)
        return session


def test_custom_session_plugs_into_generate():
    model = _Bigram()
    src = torch.ones(2, 5, dtype=torch.long)
    out = generate(model, src, max_new_tokens=5)
    row = [2]
    for _ in range(5):
        row.append(int(model.table[row[-1]].argmax()))
        if row[-1] == 2:
            break
    assert out.shape[1] == len(row) and out[0].tolist() == row and out[1].tolist() == row
    beams = model.generate(src, max_new_tokens=4, num_beams=3, num_return_sequences=2, return_dict_in_generate=True)
    assert beams.sequences.shape[0] == 4 and beams.sequences[:, 0].eq(2).all()
    assert model.sessions[-1].reorders >= 1 and beams.sequences_scores.shape == (4,)


# ----------------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------------

def test_cli_generate_matches_hf(tmp_path, capsys):
    from tests.tokenizers.test_bloom_tokenizer import write_bloom_tokenizer
    from tritonformers.cli import main

    write_bloom_tokenizer(tmp_path, padding_side="left")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=2, n_head=4,
                                      initializer_range=0.15, pad_token_id=3)
    hf = transformers.BloomForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    prompts = ["Hello world", "The quick brown fox"]
    enc = tok(prompts, padding=True, return_tensors="pt")
    for extra, hf_kwargs in (([], {}), (["--num-beams", "2"], dict(num_beams=2))):
        capsys.readouterr()
        argv = ["generate", "--model", str(tmp_path), "--max-new-tokens", "5", "--device", "cpu"]
        argv += [a for p in prompts for a in ("--prompt", p)] + extra
        with runtime.use_backend("torch"):
            assert main(argv) == 0
        out = hf.generate(**enc, max_new_tokens=5, do_sample=False, **hf_kwargs)
        want = tok.batch_decode(out, skip_special_tokens=True)
        assert capsys.readouterr().out == "".join(text + "\n" for text in want)
    with pytest.raises(SystemExit) as exc:  # argparse rejects the directory before anything loads
        main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"])
    assert exc.value.code == 2 and "argument --model: no such directory" in capsys.readouterr().err

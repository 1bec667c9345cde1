"""tritonformers train on Reformer (long-context causal LM, raw bytes or its tokenizer) and FSMT (translation pairs).

Same conventions as tests/test_training.py: tiny random checkpoints written by transformers, generated data (the
sentence grammar of that module as UTF-8 bytes for Reformer; an English -> "German" word-by-word translation with
verb-final order for FSMT, over a BPE learned here), the PyTorch reference path for the long runs.
"""

from __future__ import annotations

import json
import math
import os
import random
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from tritonformers import runtime
from tritonformers.training import FAMILIES, train
from tritonformers.training.data import PairCorpus, Seq2SeqTask, pair_stream, tokenizer_fingerprint, train_batch

from .test_training import (_config_file, _curve, _one_thread, _records, check_distributed,  # noqa: F401 (fixtures)
                            corpus, work, write_corpus)

pytest.importorskip("sacremoses")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def check_resume(options: dict, at: int, work, name: str) -> None:
    """A run resumed from its step-``at`` checkpoint gives the uninterrupted run's records and final weights."""
    full, resumed = str(work / f"{name}-full"), str(work / f"{name}-resumed")
    with runtime.use_backend("torch"):
        train(**options, out=full)
        train(**options, out=resumed, resume=os.path.join(full, f"checkpoint-{at}"))
    expected = [r for r in _curve(full) if r["step"] > at]
    assert _curve(resumed) == expected and [r["step"] for r in expected if "loss" in r] == \
        list(range(at + 1, options["max_steps"] + 1))
    from safetensors.torch import load_file
    a, b = (load_file(os.path.join(d, "model.safetensors")) for d in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _hf_checkpoint(directory, config, model_cls):
    torch.manual_seed(0)
    model_cls(config).save_pretrained(directory)
    return str(directory)


# ----------------------------------------------------------------------------------------------------------
# Reformer
# ----------------------------------------------------------------------------------------------------------

# 2 layers (local, LSH), chunks of 8, axial positions 4 x 8 = 32: trains on 32-token sequences; 258 ids = bytes + 2.
# axial_norm_std 0.02 (HF's default 1.0 makes the positions ~50x the token embeddings at this size: HF's model and
# ours alike then stay at the byte unigram loss, ~2.9, for hundreds of steps).
REFORMER = dict(axial_norm_std=0.02, vocab_size=258, hidden_size=32, num_attention_heads=2, attention_head_size=16,
                attn_layers=["local", "lsh"], axial_pos_shape=[4, 8], axial_pos_embds_dim=[16, 16],
                local_attn_chunk_length=8, lsh_attn_chunk_length=8, num_buckets=4, num_hashes=1, feed_forward_size=64,
                local_num_chunks_before=1, local_num_chunks_after=0, lsh_num_chunks_after=0,
                max_position_embeddings=32, is_decoder=True, pad_token_id=0, eos_token_id=2)


@pytest.fixture(scope="module")
def reformer_dir(work):
    """An enwik8-style byte-level checkpoint: config and weights, no tokenizer files."""
    return _hf_checkpoint(work / "reformer", transformers.ReformerConfig(**REFORMER),
                          transformers.ReformerModelWithLMHead)


def test_reformer_trains_on_bytes_and_writes_an_hf_checkpoint(reformer_dir, corpus, work):
    out = str(work / "reformer-converge")
    with runtime.use_backend("torch"):
        result = train(model=reformer_dir, data=corpus, out=out, max_steps=120, batch_size=8, lr=3e-3,
                       warmup_steps=10, eval_every=60, progress=False, seed=1)  # seq_len: the axial length, 32
    losses, evals = _records(out), _records(out, "eval_loss")
    assert [r["step"] for r in losses] == list(range(1, 121)) and [r["step"] for r in evals] == [60, 120]
    assert losses[0]["tokens_per_s"] > 0
    start = losses[0]["loss"]
    assert start > 0.8 * math.log(258)
    # bytes of a small grammar: ~5.5 nats -> ~1.3 in 120 steps
    assert result.eval_loss == evals[-1]["eval_loss"] < 0.4 * start, (start, evals)
    assert not any(name.startswith(("spiece", "tokenizer")) for name in os.listdir(out))  # bytes: no tokenizer
    ours = FAMILIES["reformer"].model_cls().from_pretrained(out).eval()
    theirs = transformers.ReformerModelWithLMHead.from_pretrained(out).eval()
    from .models.test_reformer import run_both  # the same RNG state for both: LSH draws its rotations
    ids = torch.tensor([[b + 2 for b in b"the cat sees the red ball. a dog"]])
    with torch.no_grad():
        hf, mine = run_both(theirs, ours, input_ids=ids)
    expected = hf.logits
    if getattr(theirs.lm_head.decoder, "bias", None) is None:
        # transformers < 5.25 has no LM decoder bias and drops the trained one on load (tests/models/test_reformer)
        expected = expected + ours.lm_head.decoder.bias.detach()
    torch.testing.assert_close(mine.logits, expected, atol=1e-4, rtol=1e-4)


def test_reformer_resume_gives_the_uninterrupted_curve(reformer_dir, corpus, work):
    """Dropout (hidden 0.05, local attention 0.05), LSH hashing and gradient accumulation: the run resumed from
    its step-3 checkpoint continues bit for bit."""
    options = dict(model=reformer_dir, data=corpus, batch_size=2, grad_accum=2, max_steps=6, lr=1e-3,
                   warmup_steps=2, eval_every=3, save_every=3, progress=False, seed=4, eval_sequences=4)
    check_resume(options, 3, work, "reformer")


def test_reformer_with_its_tokenizer(corpus, work):
    """A checkpoint with spiece.model trains on its tokens, and the output directory carries the tokenizer."""
    from .tokenizers.test_reformer_tokenizer import checkpoint, train as train_spm
    d = checkpoint(work / "reformer-spm", train_spm(work / "spm-reformer"))
    _hf_checkpoint(d, transformers.ReformerConfig(**{**REFORMER, "vocab_size": 320}),
                   transformers.ReformerModelWithLMHead)
    out = str(work / "reformer-spm-out")
    with runtime.use_backend("torch"):
        result = train(model=d, data=corpus, out=out, max_steps=3, batch_size=2, progress=False, eval_sequences=2)
    assert math.isfinite(result.eval_loss)
    text = "the old fox follows a blue cup."
    assert transformers.AutoTokenizer.from_pretrained(out).encode(text) == \
        transformers.AutoTokenizer.from_pretrained(d).encode(text)


def test_reformer_bad_input_is_refused(reformer_dir, corpus, work):
    base = dict(model=reformer_dir, data=corpus, out=str(work / "reformer-refused"), progress=False)
    plain = _config_file(work / "reformer-plain", model_type="reformer",
                         **{**REFORMER, "axial_pos_embds": False, "max_position_embeddings": 64})
    cases = [
        (dict(seq_len=16), "axial positions \\(4, 8\\).*exactly 32 tokens"),
        (dict(model=plain, seq_len=20), "multiples of its attention chunk lengths' least common multiple \\(8\\)"),
        (dict(model=plain, seq_len=128), "beyond what this reformer model serves \\(64"),
        (dict(fsdp=True), "fsdp: the reformer family cannot be sharded"),
        (dict(gradient_checkpointing=True), "gradient_checkpointing: the reformer family"),
        (dict(target_data=corpus), "target_data is for translation"),
        (dict(model=_config_file(work / "reformer-small-vocab", model_type="reformer",
                                 **{**REFORMER, "vocab_size": 200})), "raw UTF-8 bytes.*vocab_size >= 258"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            train(**{**base, **change})
    assert not os.path.exists(base["out"])


@pytest.mark.parametrize("family", ["reformer", "fsmt"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_dtypes_train(family, dtype, request, corpus, work):
    """Three steps under autocast (float16 with the grad scaler): finite losses, float32 weights written."""
    if family == "reformer":
        options = dict(model=request.getfixturevalue("reformer_dir"), data=corpus)
    else:
        options = dict(model=request.getfixturevalue("fsmt_dir"), data=request.getfixturevalue("tsv"), seq_len=24)
    out = str(work / f"autocast-{family}-{dtype}")
    with runtime.use_backend("torch"):
        result = train(**options, out=out, batch_size=2, max_steps=3, dtype=dtype, progress=False, eval_sequences=2)
    assert math.isfinite(result.loss) and math.isfinite(result.eval_loss)
    from safetensors.torch import load_file
    assert all(t.dtype == torch.float32 for t in load_file(os.path.join(out, "model.safetensors")).values())


# ----------------------------------------------------------------------------------------------------------
# FSMT: translation pairs
# ----------------------------------------------------------------------------------------------------------

EN_DE = {"the": "die", "a": "eine", "my": "meine", "our": "unsere", "cat": "Katze", "dog": "Hund", "bird": "Vogel",
         "old": "alte", "fox": "Fuchs", "small": "kleine", "fish": "Fisch", "teacher": "Lehrerin", "baker": "Bäckerin",
         "sees": "sieht", "chases": "jagt", "likes": "mag", "finds": "findet", "paints": "malt", "follows": "folgt",
         "red": "rote", "ball": "Kugel", "green": "grüne", "box": "Kiste", "tall": "hohe", "tree": "Tanne",
         "blue": "blaue", "cup": "Tasse", "river": "Elbe", "an": "eine", "apple": "Birne"}


def translate(sentence: str) -> str:
    """Word by word, the verb moved to the end: "the cat sees a dog." -> "die Katze eine Hund sieht."."""
    words = sentence.rstrip(".").split()
    verb = next(i for i, w in enumerate(words) if w in ("sees", "chases", "likes", "finds", "paints", "follows"))
    german = [EN_DE[w] for w in words[:verb] + words[verb + 1:] + [words[verb]]]
    return " ".join(german) + "."


def write_pairs(path, lines: int = 400, seed: int = 0, fmt: str = "tsv") -> str:
    """The corpus' sentences and their translations, as TSV, JSON-lines, or two parallel files (path.en/.de)."""
    rng = random.Random(seed)
    sources = [l.strip() for l in open(write_corpus(str(path) + ".tmp", lines, seed), encoding="utf-8")]
    os.remove(str(path) + ".tmp")
    rng.shuffle(sources)
    pairs = [(s, translate(s)) for s in sources]
    if fmt == "parallel":
        for i, lang in enumerate(("en", "de")):
            with open(f"{path}.{lang}", "w", encoding="utf-8") as f:
                f.writelines(p[i] + "\n" for p in pairs)
        return f"{path}.en"
    with open(path, "w", encoding="utf-8") as f:
        for s, t in pairs:
            f.write(f"{s}\t{t}\n" if fmt == "tsv" else json.dumps({"source": s, "target": t}) + "\n")
    return str(path)


def _write_fsmt_tokenizer(directory) -> tuple[int, int]:
    """vocab-src.json, vocab-tgt.json (each side's pieces and merge results), a shared merges.txt learned from
    both sides' Moses words, tokenizer_config.json (en -> de)."""
    import sacremoses

    from .tokenizers.test_fsmt_tokenizer import learn_bpe
    sides = {}
    for lang, words in (("en", list(EN_DE) + ["."]), ("de", list(EN_DE.values()) + ["."])):
        moses = sacremoses.MosesTokenizer(lang=lang)
        sides[lang] = [t for w in words for t in moses.tokenize(w, escape=True)] * 3
    merges = learn_bpe(sides["en"] + sides["de"], 120)
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    os.makedirs(directory, exist_ok=True)
    sizes = []
    for lang, name in (("en", "vocab-src.json"), ("de", "vocab-tgt.json")):
        chars = sorted({c for w in sides[lang] for c in w[:-1]} | {w[-1] + "</w>" for w in sides[lang]}
                       | {c + "</w>" for w in sides[lang] for c in w})
        vocab = {t: i for i, t in enumerate(dict.fromkeys(specials + chars + [a + b for a, b in merges]))}
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        sizes.append(len(vocab))
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.writelines(f"{a} {b}\n" for a, b in merges)
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"langs": ["en", "de"], "tokenizer_class": "FSMTTokenizer", "model_max_length": 64}, f)
    return sizes[0], sizes[1]


FSMT = dict(langs=["en", "de"], d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=40,
            dropout=0.1, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, eos_token_id=2,
            bos_token_id=0, decoder_start_token_id=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def fsmt_dir(work):
    d = work / "fsmt"
    src, tgt = _write_fsmt_tokenizer(d)
    return _hf_checkpoint(d, transformers.FSMTConfig(**FSMT, src_vocab_size=src, tgt_vocab_size=tgt),
                          transformers.FSMTForConditionalGeneration)


@pytest.fixture(scope="module")
def tsv(work):
    return write_pairs(work / "pairs.tsv")


def test_fsmt_trains_on_pairs_and_writes_an_hf_checkpoint(fsmt_dir, tsv, work):
    out = str(work / "fsmt-converge")
    with runtime.use_backend("torch"):
        result = train(model=fsmt_dir, data=tsv, out=out, max_steps=240, batch_size=8, seq_len=24, lr=1e-2,
                       warmup_steps=10, eval_every=80, progress=False, seed=1)
    losses, evals = _records(out), _records(out, "eval_loss")
    assert [r["step"] for r in losses] == list(range(1, 241)) and [r["step"] for r in evals] == [80, 160, 240]
    start = losses[0]["loss"]
    assert start > 0.7 * math.log(json.load(open(os.path.join(fsmt_dir, "config.json")))["tgt_vocab_size"])
    # a deterministic word-by-word translation: ~5.2 nats -> ~0.05 in 240 steps
    assert result.eval_loss == evals[-1]["eval_loss"] < 0.05 * start, (start, evals)
    ours = FAMILIES["fsmt"].model_cls().from_pretrained(out).eval()
    theirs = transformers.FSMTForConditionalGeneration.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    sentences = ["the cat sees a blue cup.", "our baker paints the river."]
    batch = tok(sentences, return_tensors="pt", padding=True)
    decoder = torch.tensor([[2, 5, 6, 7, 8], [2, 9, 10, 11, 1]])
    with torch.no_grad(), runtime.use_backend("torch"):
        a = ours(**batch, decoder_input_ids=decoder).logits
        b = theirs(**batch, decoder_input_ids=decoder, use_cache=False).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # it translates (greedy, our generate on the output directory)
    with torch.no_grad(), runtime.use_backend("torch"):
        generated = ours.generate(**batch, num_beams=1, max_length=16)
    assert tok.batch_decode(generated, skip_special_tokens=True) == [translate(s) for s in sentences]


def test_fsmt_resume_gives_the_uninterrupted_curve(fsmt_dir, work):
    """Dropout 0.1, JSON-lines pairs, length-grouped batches over two epochs: the run resumed from step 4
    continues bit for bit."""
    data = write_pairs(work / "resume-pairs.jsonl", lines=60, seed=3, fmt="jsonl")
    options = dict(model=fsmt_dir, data=data, batch_size=4, grad_accum=2, seq_len=24, max_steps=10, lr=1e-3,
                   warmup_steps=2, eval_every=4, save_every=4, progress=False, seed=6)
    check_resume(options, 4, work, "fsmt")


def test_cli_trains_on_parallel_files(fsmt_dir, work, capsys, monkeypatch):
    """`tritonformers train --data x.en --target-data x.de`; resuming with another batch x processes warns that
    the length-grouped pair order changes."""
    from tritonformers.cli import main
    monkeypatch.setenv("TRITONFORMERS_BACKEND", "torch")
    source = write_pairs(work / "cli-pairs", lines=40, fmt="parallel")
    out = str(work / "fsmt-cli")
    flags = ["train", "--model", fsmt_dir, "--data", source, "--target-data", source[:-3] + ".de", "--out", out,
             "--seq-len", "24", "--batch-size", "2", "--save-every", "2", "--no-progress"]
    assert main([*flags, "--max-steps", "2"]) == 0
    assert "eval loss" in capsys.readouterr().err
    assert {"vocab-src.json", "vocab-tgt.json", "merges.txt", "checkpoint-2"} <= set(os.listdir(out))
    with pytest.warns(UserWarning, match="blocks of 2 .* blocks of 4"):
        assert main([*flags[:-5], "--batch-size", "4", "--max-steps", "3", "--no-progress",
                     "--resume", os.path.join(out, "checkpoint-2")]) == 0
    assert [r["step"] for r in _records(out)] == [1, 2, 3]


def test_pair_formats_targets_and_length_batches(fsmt_dir, tsv, work):
    """TSV, JSON-lines and parallel files give the same ids; sources end in </s> (source vocabulary), targets
    decode back to the German text (target vocabulary); micro-batches group similar lengths, and a batch padded
    to its longest pair gives each pair the loss it has alone (what makes a 2-process run equal one process)."""
    from tritonformers.tokenizers.fsmt import FSMTTokenizer
    tok = FSMTTokenizer.from_pretrained(fsmt_dir)
    key = tokenizer_fingerprint(tok, fsmt_dir)
    streams = [pair_stream(write_pairs(work / f"fmt.{fmt}", lines=50, fmt=fmt), None if fmt != "parallel" else
                           str(work / "fmt.parallel.de"), tok, key) for fmt in ("tsv", "jsonl", "parallel")]
    for ids, offsets in streams[1:]:
        assert np.array_equal(ids, streams[0][0]) and np.array_equal(offsets, streams[0][1])
    ids, offsets = streams[0]
    first = [l.rstrip("\n").split("\t") for l in open(work / "fmt.tsv", encoding="utf-8")][0]
    source, target = ids[offsets[0]:offsets[1]].tolist(), ids[offsets[1]:offsets[2]].tolist()
    assert source == tok(first[0])["input_ids"] and source[-1] == target[-1] == 2
    assert tok.decode(target, skip_special_tokens=True) == first[1] and 3 not in target  # no <unk>
    # length-grouped order: the pairs of one micro-step (block = batch x processes) have close lengths
    big_ids, big_offsets = pair_stream(tsv, None, tok, key)
    corpus = PairCorpus(big_ids, big_offsets, seq_len=24, eval_sequences=8, seed=0, block=4)
    spreads = [np.ptp([len(corpus.train_window(p)[1]) for p in range(s, s + 4)]) for s in range(0, 200, 4)]
    assert np.mean(spreads) <= 1.0 and sorted(corpus._epoch_order(0)) == list(range(corpus.n_train))
    task = Seq2SeqTask(tokenizer=tok)
    batch = train_batch(corpus, task, range(0, 8), seed=0)
    assert batch["input_ids"].shape[0] == 8 and (batch["labels"] == -100).any()
    model = FAMILIES["fsmt"].model_cls().from_pretrained(fsmt_dir).eval()
    with torch.no_grad(), runtime.use_backend("torch"):
        whole = model(**batch).loss * task.targets(batch["labels"])
        alone = sum(model(**b).loss * task.targets(b["labels"])
                    for b in (train_batch(corpus, task, range(p, p + 1), seed=0) for p in range(8)))
    torch.testing.assert_close(whole, alone, rtol=1e-5, atol=1e-5)


def test_fsmt_bad_input_is_refused(fsmt_dir, tsv, corpus, work):
    base = dict(model=fsmt_dir, data=tsv, out=str(work / "fsmt-refused"), seq_len=24, progress=False)
    (work / "no-target.tsv").write_text("the cat sees a dog.\tdie Katze eine Hund sieht.\nmy bird likes a cup.\n",
                                        encoding="utf-8")
    (work / "no-target.jsonl").write_text(json.dumps({"source": "a dog", "tgt": "eine Hund"}) + "\n", encoding="utf-8")
    (work / "empty-target.jsonl").write_text(json.dumps({"source": "a dog", "target": " "}) + "\n", encoding="utf-8")
    (work / "short.de").write_text("die Katze.\n", encoding="utf-8")
    cases = [
        (dict(data=str(work / "no-target.tsv")), ValueError, r"no-target.tsv:2 has 1 tab-separated column.*target"),
        (dict(data=str(work / "no-target.jsonl")), ValueError, r"no-target.jsonl:1 has no string field 'target'"),
        (dict(data=str(work / "empty-target.jsonl")), ValueError, r"empty-target.jsonl:1 has an empty target side"),
        (dict(data=corpus), ValueError, "translation needs a source and a target side"),
        (dict(data=corpus, target_data=str(work / "short.de")), ValueError, "are not parallel"),
        (dict(target_data=str(work / "missing.de")), FileNotFoundError, "target_data .* does not exist"),
        (dict(seq_len=64), ValueError, r"beyond what this fsmt model serves \(40"),
        (dict(seq_len=4), ValueError, "0 pair\\(s\\) fit seq_len=4"),
        (dict(fsdp=False, gradient_checkpointing=True), ValueError, "gradient_checkpointing: the fsmt family"),
    ]
    for change, error, message in cases:
        skipped = pytest.warns(UserWarning, match="skipped") if change.get("seq_len") == 4 else nullcontext()
        with pytest.raises(error, match=message), skipped:
            train(**{**base, **change})
    assert not os.path.exists(base["out"])


# ----------------------------------------------------------------------------------------------------------
# DDP / FSDP2: torchrun with 2 processes against one process (tests/test_training.py's check), no dropout
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,mode", [("reformer", "ddp"), ("fsmt", "ddp"), ("fsmt", "fsdp")])
def test_distributed_matches_one_process(family, mode, request, corpus, work):
    """Reformer: the reversible layers' recomputed backward under DDP's gradient hooks, LSH rotations drawn alike
    on every rank (FSDP2 is refused: its sharded parameters reach the reversible function ungathered). FSMT: each
    rank pads its own micro-batch, which changes no pair's loss; under FSDP2 the decoder layers are gathered
    around ``cross_keys_values`` too (projected before the layers run)."""
    if family == "reformer":
        config = {**REFORMER, "hidden_dropout_prob": 0.0, "local_attention_probs_dropout_prob": 0.0,
                  "lsh_attention_probs_dropout_prob": 0.0}
        options = dict(model=_config_file(work / "reformer-ddp-config", model_type="reformer", **config), data=corpus)
    else:
        tokenizer = request.getfixturevalue("fsmt_dir")
        with open(os.path.join(tokenizer, "config.json"), encoding="utf-8") as f:
            saved = json.load(f)
        sizes = {k: saved[k] for k in ("src_vocab_size", "tgt_vocab_size")}
        config = {**FSMT, **sizes, "dropout": 0.0}
        options = dict(model=_config_file(work / "fsmt-ddp-config", model_type="fsmt", **config),
                       tokenizer=tokenizer, data=request.getfixturevalue("tsv"), seq_len=24)
    check_distributed(family, mode, work, **options)

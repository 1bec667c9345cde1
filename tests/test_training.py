"""tritonformers train / tritonformers.training on tiny models of every trainable family (CPU).

Checkpoints are tiny random models written by transformers (1-2 layers, hidden 32), tokenizers are trained on
the fly (tests/tokenizers), and the corpus is generated: sentences from a small grammar, so a model can learn
it. Long runs use the PyTorch reference path; one short run goes through our Triton kernels (the interpreter
on CPU). The distributed tests launch ``torchrun --nproc_per_node 2`` (gloo) against one process.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from tritonformers import runtime
from tritonformers.cli import main
from tritonformers.training import FAMILIES, PENDING, Family, register_family, train
from tritonformers.training.data import MaskedLMTask, token_stream, tokenizer_fingerprint
from tritonformers.training.loop import lr_factor

from .tokenizers.test_bloom_tokenizer import write_bloom_tokenizer
from .tokenizers.test_llama_tokenizer import train_sentencepiece, write_checkpoint as write_llama_tokenizer

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBJECTS = "the cat|a dog|my bird|the old fox|a small fish|the teacher|our baker".split("|")
VERBS = "sees|chases|likes|finds|paints|follows".split("|")
OBJECTS = "the red ball|a green box|the tall tree|a blue cup|the river|an apple".split("|")


def write_corpus(path, lines: int = 600, seed: int = 0) -> str:
    """Sentences "subject verb object." from a tiny grammar: learnable structure, varied enough to evaluate."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(lines):
            f.write(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}.\n")
    return str(path)


def _roberta_tokenizer(directory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from .tokenizers.corpus import training_text
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(training_text() + SUBJECTS + VERBS + OBJECTS, trainer=trainer)
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "RobertaTokenizer"}, f)
    return tokenizer.get_vocab_size()


def _hf_checkpoint(directory, config_cls, model_cls, **fields):
    torch.manual_seed(0)
    model_cls(config_cls(**fields)).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is faster than two fighting other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def corpus(work):
    return write_corpus(work / "corpus.txt")


@pytest.fixture(scope="module")
def bloom_dir(work):
    d = write_bloom_tokenizer(work / "bloom")
    return _hf_checkpoint(d, transformers.BloomConfig, transformers.BloomForCausalLM, vocab_size=400, hidden_size=32,
                          n_layer=1, n_head=2)  # no dropout: the distributed runs compare losses


@pytest.fixture(scope="module")
def diffllama_dir(work):
    d = write_llama_tokenizer(work / "diffllama", train_sentencepiece(work / "spm"), pad_token="<unk>")
    return _hf_checkpoint(d, transformers.DiffLlamaConfig, transformers.DiffLlamaForCausalLM, vocab_size=500,
                          hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def ibert_dir(work):
    d = str(work / "ibert")
    vocab = _roberta_tokenizer(d)
    return _hf_checkpoint(d, transformers.IBertConfig, transformers.IBertForMaskedLM, vocab_size=vocab, hidden_size=32,
                          num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          max_position_embeddings=40, pad_token_id=1)


def _records(out, kind="loss"):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if kind in r]


def _curve(out):
    """The metrics of a run without the timings (which differ from run to run)."""
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in f]


# ----------------------------------------------------------------------------------------------------------
# Convergence, and the final directory as an HF checkpoint
# ----------------------------------------------------------------------------------------------------------

# family: (checkpoint fixture, extra options, HF class of the output, bound on final eval loss / first loss).
# From ~ln(vocab) = 6.0 nats, the causal LMs reach ~1.6-2.1 in 150 steps; a masked LM learns from the 15% of
# tokens it masks only, and reaches ~3.8 (perplexity 400 -> 45) in 150 steps, ~3.85 in 60 QAT steps.
CONVERGENCE = {
    "bloom": ("bloom_dir", {}, "BloomForCausalLM", 0.5),
    "diffllama": ("diffllama_dir", {}, "DiffLlamaForCausalLM", 0.5),
    "ibert": ("ibert_dir", {"quant_mode": False}, "IBertForMaskedLM", 0.7),
    "ibert_qat": ("ibert_dir", {"quant_mode": True, "max_steps": 60, "eval_every": 30}, "IBertForMaskedLM", 0.7),
}


@pytest.mark.parametrize("name", sorted(CONVERGENCE))
def test_training_converges_and_writes_an_hf_checkpoint(name, request, corpus, work):
    fixture, extra, hf_class, bound = CONVERGENCE[name]
    model_dir = request.getfixturevalue(fixture)
    out = str(work / f"converge-{name}")
    options = dict(model=model_dir, data=corpus, out=out, max_steps=150, batch_size=8, seq_len=32, lr=3e-3,
                   warmup_steps=10, eval_every=50, progress=False, seed=1)
    options.update(extra)
    with runtime.use_backend("torch"):
        result = train(**options)
    losses, evals = _records(out), _records(out, "eval_loss")
    assert [r["step"] for r in losses] == list(range(1, options["max_steps"] + 1))
    assert all(set(r) >= {"step", "loss", "lr", "tokens_per_s"} and r["tokens_per_s"] > 0 for r in losses)
    assert [r["step"] for r in evals] == list(range(options["eval_every"], options["max_steps"] + 1, options["eval_every"]))
    assert all(math.isclose(r["eval_ppl"], math.exp(r["eval_loss"])) for r in evals)
    start = losses[0]["loss"]
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        vocab = json.load(f)["vocab_size"]
    assert start > 0.8 * math.log(vocab)  # near ln(vocab): an untrained model
    assert result.eval_loss == evals[-1]["eval_loss"] < bound * start, (start, evals)
    # the output is a plain HF directory: ours and transformers' classes load it and agree
    ours_cls = FAMILIES[name.removesuffix("_qat")].model_cls()
    ours = ours_cls.from_pretrained(out)
    theirs = getattr(transformers, hf_class).from_pretrained(out).eval()
    assert transformers.AutoTokenizer.from_pretrained(out) is not None
    if name == "ibert_qat":
        assert ours.config.quant_mode and ours.is_calibrated()  # the QAT ranges were saved
        return
    ids = torch.randint(5, 300, (2, 16))
    with torch.no_grad(), runtime.use_backend("torch"):
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_triton_kernels_smoke(bloom_dir, corpus, work):
    """Two steps through our Triton kernels (the interpreter on CPU) give the reference path's losses."""
    options = dict(model=bloom_dir, data=corpus, batch_size=1, seq_len=16, max_steps=2, progress=False, seed=3,
                   eval_sequences=1)
    losses = {}
    for backend in ("torch", "triton"):
        with runtime.use_backend(backend):
            train(**options, out=str(work / f"smoke-{backend}"))
        losses[backend] = [r["loss"] for r in _records(str(work / f"smoke-{backend}"))]
    assert all(math.isfinite(x) for x in losses["triton"])
    np.testing.assert_allclose(losses["triton"], losses["torch"], rtol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_dtypes_train(dtype, bloom_dir, corpus, work):
    out = str(work / f"autocast-{dtype}")
    with runtime.use_backend("torch"):
        result = train(model=bloom_dir, data=corpus, out=out, batch_size=2, seq_len=16, max_steps=3, dtype=dtype,
                       progress=False, eval_sequences=2)
    assert math.isfinite(result.loss) and math.isfinite(result.eval_loss)
    from safetensors.torch import load_file
    assert all(t.dtype == torch.float32 for t in load_file(os.path.join(out, "model.safetensors")).values())


# ----------------------------------------------------------------------------------------------------------
# Exact resume
# ----------------------------------------------------------------------------------------------------------

def test_resume_gives_the_uninterrupted_curve(ibert_dir, corpus, work):
    """Masked LM with dropout and gradient accumulation: a run resumed from its step-4 checkpoint continues
    bit for bit as the uninterrupted run (data order, masks, dropout RNG, optimizer, LR schedule)."""
    full, resumed = str(work / "resume-full"), str(work / "resume-from-4")
    options = dict(model=ibert_dir, data=corpus, batch_size=2, grad_accum=2, seq_len=24, max_steps=8, lr=1e-3,
                   warmup_steps=2, eval_every=4, save_every=4, progress=False, seed=5)
    with runtime.use_backend("torch"):
        train(**options, out=full)
        checkpoint = os.path.join(full, "checkpoint-4")
        assert {"config.json", "model.safetensors", "tokenizer.json", "training_state.pt"} <= set(os.listdir(checkpoint))
        train(**options, out=resumed, resume=checkpoint)
    expected = [r for r in _curve(full) if r["step"] > 4]
    assert _curve(resumed) == expected and len(expected) == 5
    from safetensors.torch import load_file
    a, b = (load_file(os.path.join(d, "model.safetensors")) for d in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # resuming into the same directory keeps the records up to the checkpoint, then continues
    with runtime.use_backend("torch"):
        train(**options, out=full, resume=checkpoint)
    assert _curve(full) == [r for r in _curve(full) if r["step"] <= 4] + expected


# ----------------------------------------------------------------------------------------------------------
# DDP and FSDP2: torchrun with 2 processes (gloo) against one process on the same global batch
# ----------------------------------------------------------------------------------------------------------

def _ibert_config(directory, vocab):
    """A dropout-free I-BERT config (random weights): runs of different layouts then compute the same thing."""
    return _config_file(directory, model_type="ibert", vocab_size=vocab, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=40, pad_token_id=1,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.mark.parametrize("family,mode", [("bloom", "ddp"), ("bloom", "fsdp"), ("ibert", "fsdp")])
def test_distributed_matches_one_process(family, mode, request, corpus, work):
    """torchrun, 2 processes x batch 2 against one process x batch 4 (same global batch, grad accumulation 2):
    same losses, evaluation and final weights; the checkpoint written by the two processes then resumes in one
    process and continues the one-process curve (the optimizer state is saved unsharded, keyed by name)."""
    if family == "bloom":
        model = {"model": request.getfixturevalue("bloom_dir")}
    else:  # I-BERT through float_forward: FSDP2 must gather the layers' parameters around that method too
        tokenizer = request.getfixturevalue("ibert_dir")
        with open(os.path.join(tokenizer, "config.json"), encoding="utf-8") as f:
            model = {"model": _ibert_config(work / "ibert-config", json.load(f)["vocab_size"]), "tokenizer": tokenizer}
    check_distributed(family, mode, work, **model, data=corpus, seq_len=16)


def check_distributed(family, mode, work, **options):
    """torchrun with 2 processes x batch 2 against one process x batch 4 (the test above); ``options`` name the
    model and data."""
    common = dict(**options, max_steps=4, grad_accum=2, lr=3e-3, eval_sequences=3, save_every=2, progress=False,
                  seed=2)
    single = str(work / f"{family}-{mode}-single")
    with runtime.use_backend("torch"):
        train(**common, batch_size=4, out=single)
    out = str(work / f"{family}-{mode}")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in common.items() if k != "progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "tritonformers", "train", *flags, "--batch-size=2", f"--out={out}", "--no-progress"]
    if mode == "fsdp":
        cmd.append("--fsdp")
    env = {**os.environ, "TRITONFORMERS_BACKEND": "torch", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _assert_same_curve(_curve(out), _curve(single))
    # the final model (gathered from the shards under FSDP) loads as an HF directory with the same weights
    cls = FAMILIES[family].model_cls()
    final, reference = cls.from_pretrained(out), cls.from_pretrained(single)
    for (name, p), q in zip(final.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)
    resumed = str(work / f"{family}-{mode}-resumed")
    with runtime.use_backend("torch"), pytest.warns(UserWarning, match="written by 2 process"):
        train(**common, batch_size=4, out=resumed, resume=os.path.join(out, "checkpoint-2"))
    _assert_same_curve(_curve(resumed), [r for r in _curve(single) if r["step"] > 2])


def _assert_same_curve(ours, ref):
    assert [r["step"] for r in ours] == [r["step"] for r in ref] and ours
    for a, b in zip(ours, ref):
        assert a.keys() == b.keys()
        for key in ("loss", "eval_loss", "lr"):
            if key in b:
                assert math.isclose(a[key], b[key], rel_tol=1e-5), (key, a, b)


# ----------------------------------------------------------------------------------------------------------
# Data: formats, the token cache, masking
# ----------------------------------------------------------------------------------------------------------

def test_token_cache_is_keyed_by_tokenizer(bloom_dir, ibert_dir, work, monkeypatch):
    from tritonformers.tokenizers.bloom import BloomTokenizer
    from tritonformers.tokenizers.roberta import RobertaTokenizer
    (work / "cache").mkdir()
    data = write_corpus(work / "cache" / "corpus.txt", lines=20)
    bloom = BloomTokenizer.from_pretrained(bloom_dir)
    first = np.asarray(token_stream(data, bloom, tokenizer_fingerprint(bloom, bloom_dir)))
    expected = [i for line in open(data, encoding="utf-8") for i in bloom.encode(line, add_special_tokens=False)]
    assert first.tolist() == expected + [bloom.eos_token_id]
    # a second read comes from the cache: the tokenizer is not called
    monkeypatch.setattr(BloomTokenizer, "__call__", lambda *a, **k: pytest.fail("re-tokenised"))
    again = token_stream(data, bloom, tokenizer_fingerprint(bloom, bloom_dir))
    assert isinstance(again, np.memmap) and np.array_equal(again, first)
    roberta = RobertaTokenizer.from_pretrained(ibert_dir)
    other = token_stream(data, roberta, tokenizer_fingerprint(roberta, ibert_dir))
    assert other.tolist() != first.tolist()
    assert len(os.listdir(work / "cache" / ".tritonformers-cache")) == 2


def test_data_formats(bloom_dir, work):
    from tritonformers.tokenizers.bloom import BloomTokenizer
    tok = BloomTokenizer.from_pretrained(bloom_dir)
    key = tokenizer_fingerprint(tok, bloom_dir)
    folder = work / "folder"
    folder.mkdir()
    (folder / "b.txt").write_text("the cat sees a dog.\n", encoding="utf-8")
    (folder / "a.jsonl").write_text(json.dumps({"text": "my bird"}) + "\n" + json.dumps({"text": "a fox"}) + "\n",
                                    encoding="utf-8")
    (folder / "notes.csv").write_text("ignored", encoding="utf-8")
    eos = tok.eos_token_id
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    want = enc("my bird") + [eos] + enc("a fox") + [eos] + enc("the cat sees a dog.\n") + [eos]
    assert np.asarray(token_stream(str(folder), tok, key)).tolist() == want
    ids = np.arange(50, dtype=np.int32)
    np.save(work / "ids.npy", ids)
    assert np.asarray(token_stream(str(work / "ids.npy"), tok, key)).tolist() == ids.tolist()
    assert token_stream(torch.arange(7), tok, key).tolist() == list(range(7))
    bad = work / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="text_field"):
        token_stream(str(bad), tok, key)


def test_masking_follows_roberta(ibert_dir):
    from tritonformers.tokenizers.roberta import RobertaTokenizer
    tok = RobertaTokenizer.from_pretrained(ibert_dir)
    task = MaskedLMTask(seq_len=4002, tokenizer=tok, vocab_size=len(tok))
    window = torch.randint(5, len(tok), (4000,))
    window[::50] = tok.eos_token_id  # document separators are never chosen
    ids, labels = task.example(window, sample_seed=11)
    again, labels_again = task.example(window, sample_seed=11)
    assert torch.equal(ids, again) and torch.equal(labels, labels_again)
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    chosen = labels != -100
    assert not chosen[1:-1][window == tok.eos_token_id].any() and not chosen[[0, -1]].any()
    assert torch.equal(labels[chosen], torch.cat([torch.tensor([0]), window, torch.tensor([0])])[chosen])
    assert 0.13 < chosen.float().mean() < 0.17
    masked = (ids == tok.mask_token_id) & chosen
    kept = (ids == labels) & chosen
    assert 0.75 < masked.sum() / chosen.sum() < 0.85 and 0.06 < kept.sum() / chosen.sum() < 0.14
    assert not (ids == tok.mask_token_id)[~chosen].any()
    short = MaskedLMTask(seq_len=4, tokenizer=tok, vocab_size=len(tok), probability=0.01)
    for seed in range(20):  # mostly nothing drawn at 1%: one token is chosen anyway
        assert (short.example(window[:2], sample_seed=seed)[1] != -100).sum() >= 1


def test_lr_schedule():
    assert [lr_factor(i, 4, 20, 0.1) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 20, 0.1) == 1.0
    assert math.isclose(lr_factor(19, 4, 20, 0.1), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert math.isclose(lr_factor(100, 4, 20, 0.1), 0.1)


# ----------------------------------------------------------------------------------------------------------
# Bad input: a clear error before training
# ----------------------------------------------------------------------------------------------------------

def _config_file(directory, **config):
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "config.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    return path


def test_bad_input_is_refused_before_training(bloom_dir, diffllama_dir, corpus, work):
    out = str(work / "refused")
    base = dict(model=bloom_dir, data=corpus, out=out, seq_len=16, progress=False)
    empty = work / "empty.txt"
    empty.write_text("", encoding="utf-8")
    cases = [
        (dict(data=str(work / "missing.txt")), FileNotFoundError, "does not exist"),
        (dict(data=str(empty)), ValueError, "is empty"),
        (dict(model=diffllama_dir, seq_len=128), ValueError, r"beyond what this diffllama model serves \(64"),
        (dict(model=_config_file(work / "gpt2", model_type="gpt2")), ValueError, "model_type 'gpt2'"),
        (dict(resume=bloom_dir), ValueError, "holds no training state"),
        (dict(model=str(work / "gpt2")), FileNotFoundError, "no weights"),
        (dict(model=_config_file(work / "bare", model_type="bloom", vocab_size=400)), ValueError, "needs a tokenizer"),
        (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
        (dict(dtype="float64"), ValueError, "dtype must be one of"),
    ]
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            train(**{**base, **change})
    assert not os.path.exists(out)  # nothing was trained or written


def test_cli_refuses_with_a_message(corpus, work, capsys):
    rc = main(["train", "--model", _config_file(work / "cli-t5", model_type="t5"), "--data", corpus,
               "--out", str(work / "cli-out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'t5'" in err and "bloom, diffllama, fsmt, ibert, reformer" in err


def test_cli_trains_from_a_config(bloom_dir, corpus, work, capsys, monkeypatch):
    """`tritonformers train` with a bare config.json (random weights) and --tokenizer; every flag of the issue."""
    monkeypatch.setenv("TRITONFORMERS_BACKEND", "torch")
    config = _config_file(work / "cli-config", model_type="bloom", vocab_size=400, hidden_size=32, n_layer=1,
                          n_head=2)
    out = str(work / "cli-train")
    rc = main(["train", "--model", config, "--tokenizer", bloom_dir, "--data", corpus, "--out", out,
               "--max-steps", "4", "--batch-size", "2", "--seq-len", "16", "--grad-accum", "1", "--lr", "1e-3",
               "--warmup-steps", "1", "--eval-every", "2", "--save-every", "2", "--seed", "0", "--dtype", "float32",
               "--gradient-checkpointing"])
    assert rc == 0
    assert "eval loss" in capsys.readouterr().err
    assert [r["step"] for r in _records(out, "eval_loss")] == [2, 4]
    assert {"checkpoint-2", "checkpoint-4", "config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    rc = main(["train", "--model", config, "--tokenizer", bloom_dir, "--data", corpus, "--out", out,
               "--max-steps", "6", "--batch-size", "2", "--seq-len", "16", "--resume", os.path.join(out, "checkpoint-4"),
               "--no-progress"])
    assert rc == 0 and [r["step"] for r in _records(out)] == list(range(1, 7))


def test_registry_joins_and_refuses(monkeypatch):
    monkeypatch.setattr("tritonformers.training.families.FAMILIES", dict(FAMILIES))
    monkeypatch.setattr("tritonformers.training.families.PENDING", dict(PENDING))
    from tritonformers.training import families
    with pytest.raises(ValueError, match="task must be one of"):
        Family("x", task="regression", model_class="x:Y", tokenizer_class=None)
    families.PENDING["mamba"] = ("causal_lm", "its model classes are not in tritonformers.models yet")
    with pytest.raises(ValueError, match="mamba model \\(causal_lm\\).*cannot train yet: its model classes"):
        families.family_for("mamba")
    family = register_family(Family("mamba", task="causal_lm", model_class="tritonformers.models.bloom:BloomForCausalLM",
                                    tokenizer_class=None, byte_offset=2))
    assert families.family_for("mamba") is family and "mamba" not in families.PENDING

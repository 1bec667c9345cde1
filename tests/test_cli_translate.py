"""`tritonformers translate` end to end on a tiny random FSMT checkpoint with its tokenizer files: one output
line per input line, in input order (batches are sorted by length), blank lines kept, the same translations
as generating sentence by sentence, progress and the rate report on stderr only; clear errors."""

from __future__ import annotations

import io
import json
import string

import pytest
import torch

pytest.importorskip("sacremoses")
pytest.importorskip("transformers")

from tests.models.fsmt_common import make_checkpoint  # noqa: E402
from tritonformers import runtime  # noqa: E402
from tritonformers.cli import main  # noqa: E402
from tritonformers.models.fsmt import FSMTForConditionalGeneration  # noqa: E402
from tritonformers.tokenizers.fsmt import FSMTTokenizer  # noqa: E402

LINES = ["the cat sat on the mat .", "", "a dog", "hello world , how are you today ?", "   ", "x", "zebra quiz"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A checkpoint whose vocabularies are the tokenizer's: specials, letters, letters + </w>, punctuation."""
    d = tmp_path_factory.mktemp("fsmt-translate")
    chars = list(string.ascii_lowercase) + list(".,?")
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + chars + [c + "</w>" for c in chars])}
    make_checkpoint(d, src_vocab_size=len(vocab), tgt_vocab_size=len(vocab), eos_bias=3.0)
    for name in ("vocab-src.json", "vocab-tgt.json"):
        (d / name).write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("t h\nth e</w>\n")
    (d / "tokenizer_config.json").write_text(json.dumps({"langs": ["en", "de"], "model_max_length": 1024}))
    return d


def expected(model_dir, lines, **kwargs):
    model = FSMTForConditionalGeneration.from_pretrained(model_dir)
    tok = FSMTTokenizer.from_pretrained(model_dir)
    out = []
    for line in lines:
        if not line.strip():
            out.append("")
            continue
        enc = tok(line, return_tensors="pt")
        ids = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kwargs)
        out.append(tok.decode(ids[0], skip_special_tokens=True))
    return out


def test_translate_keeps_order_and_blank_lines(model_dir, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(LINES) + "\n")
    with runtime.use_backend("torch"):
        rc = main(["translate", "--model", str(model_dir), "--input", str(src), "--batch-size", "2",
                   "--num-beams", "2", "--max-new-tokens", "6", "--progress", "--device", "cpu"])
        want = expected(model_dir, LINES, num_beams=2, max_new_tokens=6)
    captured = capsys.readouterr()
    assert rc == 0
    assert captured.out.split("\n")[:-1] == want  # translations only, one per input line, in order
    assert any(want) and want[1] == want[4] == ""
    assert "5/5 sentences" in captured.err and "sentences/s" in captured.err and "tokens/s" in captured.err


def test_translate_reads_stdin_and_writes_a_file(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("a dog\n\nzebra quiz\n"))
    out = tmp_path / "out.txt"
    with runtime.use_backend("torch"):
        rc = main(["translate", "--model", str(model_dir), "--output", str(out), "--num-beams", "1",
                   "--max-new-tokens", "4", "--quiet", "--device", "cpu"])
        want = expected(model_dir, ["a dog", "", "zebra quiz"], num_beams=1, max_new_tokens=4)
    captured = capsys.readouterr()
    assert rc == 0 and captured.out == "" and captured.err == ""
    assert out.read_text().split("\n")[:-1] == want


def test_translate_errors(model_dir, tmp_path, capsys):
    other = tmp_path / "bloom"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bloom"}))
    assert main(["translate", "--model", str(other)]) == 2
    assert "needs an FSMT checkpoint" in capsys.readouterr().err
    assert main(["translate", "--model", str(model_dir), "--num-beams", "0"]) == 2
    assert "--num-beams must be at least 1" in capsys.readouterr().err
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in model_dir.iterdir():
        if f.name != "merges.txt":
            (partial / f.name).write_bytes(f.read_bytes())
    assert main(["translate", "--model", str(partial), "--input", str(model_dir / "vocab-src.json")]) == 2
    assert "merges.txt" in capsys.readouterr().err
    assert torch.tensor(0).item() == 0  # torch stays importable after the CLI's lazy imports

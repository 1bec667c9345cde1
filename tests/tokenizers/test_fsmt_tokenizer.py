"""FSMTTokenizer (tritonformers.tokenizers.fsmt) against transformers' FSMTTokenizer (AutoTokenizer) on small
vocabulary and merges files written here: a tiny BPE learned from the corpus below (merges in learning
order, as fastBPE writes them), a source vocabulary that lacks some merge results (the unknown-piece path)
and a target vocabulary with other ids. Ids, token strings, padded/truncated batches, pairs and decoded text
must be identical, for English, German and Russian, cased and lower-cased.
"""

from __future__ import annotations

import collections
import json

import pytest

pytest.importorskip("sacremoses")
transformers = pytest.importorskip("transformers")

from tests.tokenizers.corpus import assert_same_call  # noqa: E402
from tritonformers.tokenizers.fsmt import FSMTTokenizer  # noqa: E402

transformers.logging.set_verbosity_error()

CORPUS = [
    "Here's a little song I wrote. Don't worry, be happy.",
    "It's a well-known fact: 3-4 people paid $1,234.56 (or 10 000,5 €) for it!",
    "\"Straight\" quotes, “curly” quotes, «guillemets» and ‘single’ ones.",
    "Das ist ein Haus, nicht wahr? Wir haben's gesehen — am 3. Oktober.",
    "Ich wünsche Ihnen einen schönen Tag in Zürich und Köln.",
    "Машинное обучение - это здорово, не так ли?",
    "Это не так; мы видели «дом» в 2019 году.",
    "Full-width：１２３，ＡＢＣ！（test）【x】％…",
    "tabs\tand\nnewlines glue, zero\u200bwidth, soft\u00adhyphen, bell\u0007 and \ufeffBOM",
    "Markup & co: <b>bold</b> | pipes | [brackets] {braces}",
    "Literal specials<s>inside</s>text <pad> and <unk>.",
    "USA is United States of America",
    "",
    "a",
    "Ю",
]
PAIRS = [(CORPUS[0], CORPUS[3]), (CORPUS[5], CORPUS[11]), ("", "Only the second.")]


def learn_bpe(words: list[str], merges: int) -> list[tuple[str, str]]:
    """A plain BPE learner: the most frequent adjacent pair (ties: the first seen), merged everywhere."""
    vocab = collections.Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in words if w)
    learned = []
    for _ in range(merges):
        pairs = collections.Counter()
        for word, n in vocab.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], -list(pairs).index(p)))
        learned.append(best)
        merged = collections.Counter()
        for word, n in vocab.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        vocab = merged
    return learned


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(directory factory by (src, tgt, lower)): vocab-src.json, vocab-tgt.json, merges.txt, tokenizer_config."""
    import sacremoses

    words = []
    for lang in ("en", "de", "ru"):
        moses = sacremoses.MosesTokenizer(lang=lang)
        for line in CORPUS:
            words += moses.tokenize(line, aggressive_dash_splits=True, escape=True) * 2
    merges = learn_bpe(words, 150)
    pieces = sorted({ch for w in words for ch in w} | {ch + "</w>" for w in words for ch in w})
    results = [a + b for a, b in merges]
    src_tokens = pieces + [r for i, r in enumerate(results) if i % 5 != 3]  # some merge results unknown
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    src = {t: i for i, t in enumerate(specials + list(dict.fromkeys(src_tokens)))}
    tgt_tokens = list(dict.fromkeys(reversed(pieces + results)))[:-7]  # other ids, a few missing
    tgt = {t: i for i, t in enumerate(specials + tgt_tokens)}
    made = {}

    def make(langs=("en", "de"), lower=False):
        key = (tuple(langs), lower)
        if key not in made:
            d = tmp_path_factory.mktemp(f"fsmt-tok-{'-'.join(langs)}")
            (d / "vocab-src.json").write_text(json.dumps(src, ensure_ascii=False))
            (d / "vocab-tgt.json").write_text(json.dumps(tgt, ensure_ascii=False))
            (d / "merges.txt").write_text("".join(f"{a} {b} 7\n" for a, b in merges))  # counts are ignored
            config = {"langs": list(langs), "model_max_length": 1024, "tokenizer_class": "FSMTTokenizer"}
            if lower:
                config["do_lower_case"] = True
            (d / "tokenizer_config.json").write_text(json.dumps(config))
            made[key] = d
        return made[key]

    return make


def load_both(path):
    return FSMTTokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("langs,lower", [(("en", "de"), False), (("de", "en"), False), (("ru", "en"), True),
                                         (("en", "ru"), False)])
def test_encoding_matches_transformers(files, langs, lower):
    ours, ref = load_both(files(langs, lower))
    assert type(ref).__name__ == "FSMTTokenizer"
    for text in CORPUS:
        for add_special_tokens in (True, False):
            assert_same_call(ours, ref, text, add_special_tokens=add_special_tokens)
        assert ours.tokenize(text) == ref.tokenize(text), text
    first, second = (list(side) for side in zip(*PAIRS))
    assert_same_call(ours, ref, first, second)
    for side in ("left", "right"):
        assert_same_call(ours, ref, CORPUS, padding=True, padding_side=side, return_tensors="pt")
    assert_same_call(ours, ref, CORPUS, padding="max_length", max_length=40, truncation=True)
    for truncation, (a, b) in ((True, PAIRS[0]), ("only_first", PAIRS[1]), ("only_second", PAIRS[0])):
        assert_same_call(ours, ref, a, b, truncation=truncation, max_length=40)
    assert_same_call(ours, ref, CORPUS, truncation=True, max_length=6, padding=True)
    assert_same_call(ours, ref, CORPUS[:4], text_target=CORPUS[4:8], padding=True, return_tensors="pt")
    assert_same_call(ours, ref, text_target=CORPUS[5])


@pytest.mark.parametrize("langs", [("en", "de"), ("de", "ru"), ("ru", "en")])
def test_decoding_matches_transformers(files, langs):
    ours, ref = load_both(files(langs))
    batch = ref(CORPUS + [b for _, b in PAIRS], padding=True)["input_ids"]
    for skip in (False, True):
        assert ours.batch_decode(batch, skip_special_tokens=skip) == ref.batch_decode(batch, skip_special_tokens=skip)
    assert ours.decode(list(range(len(ref.decoder) + 3))) == ref.decode(list(range(len(ref.decoder) + 3)))


def test_special_tokens_vocab_and_save_round_trip(files, tmp_path):
    ours, ref = load_both(files())
    assert sorted(ours.all_special_ids) == sorted(ref.all_special_ids) == [0, 1, 2, 3]
    assert (ours.pad_token_id, ours.sep_token_id, ours.unk_token_id, ours.bos_token_id) == (1, 2, 3, 0)
    assert ours.eos_token is None and ours.vocab_size == ref.vocab_size and ours.get_vocab() == ref.get_vocab()
    ours.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in CORPUS[:6]:
        assert again(text)["input_ids"] == ref(text)["input_ids"]
    assert FSMTTokenizer.from_pretrained(tmp_path)(CORPUS[:3])["input_ids"] == ref(CORPUS[:3])["input_ids"]


def test_missing_files_and_langs_are_named(files, tmp_path):
    src = files()
    for name in ("vocab-src.json", "vocab-tgt.json", "merges.txt"):
        d = tmp_path / name.replace(".", "_")
        d.mkdir()
        for other in ("vocab-src.json", "vocab-tgt.json", "merges.txt", "tokenizer_config.json"):
            if other != name:
                (d / other).write_bytes((src / other).read_bytes())
        with pytest.raises(FileNotFoundError, match=name):
            FSMTTokenizer.from_pretrained(d)
    (tmp_path / "nolangs").mkdir()
    for other in ("vocab-src.json", "vocab-tgt.json", "merges.txt"):
        (tmp_path / "nolangs" / other).write_bytes((src / other).read_bytes())
    with pytest.raises(ValueError, match="langs"):
        FSMTTokenizer.from_pretrained(tmp_path / "nolangs")

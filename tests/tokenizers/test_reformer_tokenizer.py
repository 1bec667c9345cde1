"""ReformerTokenizer against transformers' ReformerTokenizer, loaded through AutoTokenizer.

Tiny sentencepiece models are trained on the fly on the multilingual corpus (spiece.model, as
google/reformer-crime-and-punishment ships): BPE with sentencepiece's default nmt_nfkc normalisation (a
precompiled charsmap), BPE with the identity rule (no charsmap, no normalizer), a Unigram model (which
transformers, and we, run as BPE with merges recovered from the pieces), a configured pad token, and the
tokenizer.json transformers saves. Loading spiece.model in transformers needs the `protobuf` package.
"""

import json
import os
import shutil

import pytest
import sentencepiece as spm

from tritonformers.tokenizers.reformer import ReformerTokenizer, read_precompiled_charsmap

from .corpus import CORPUS, assert_same_behaviour, assert_same_call, training_text

transformers = pytest.importorskip("transformers")
AutoTokenizer = transformers.AutoTokenizer
pytest.importorskip("google.protobuf", reason="transformers converts spiece.model through protobuf")


def train(directory, model_type="bpe", **options):
    os.makedirs(directory, exist_ok=True)
    corpus = os.path.join(directory, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as handle:
        handle.write("\n".join(training_text(5)))
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=os.path.join(directory, "spiece"), vocab_size=320,
                                   model_type=model_type, character_coverage=0.98, hard_vocab_limit=False,
                                   minloglevel=2, **options)
    return os.path.join(directory, "spiece.model")


VARIANTS = {
    "bpe_nfkc": (dict(), {}),
    "bpe_identity": (dict(normalization_rule_name="identity", remove_extra_whitespaces=False), {}),
    "unigram": (dict(model_type="unigram"), {}),
    "pad_token": (dict(), {"pad_token": "<pad>"}),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The trained spiece.model of each variant (variants with the same training options share one)."""
    by_options, paths = {}, {}
    for name, (options, _) in VARIANTS.items():
        key = json.dumps(options, sort_keys=True)
        if key not in by_options:
            by_options[key] = train(tmp_path_factory.mktemp("spm"), **options)
        paths[name] = by_options[key]
    return paths


def checkpoint(directory, model_path, **config):
    os.makedirs(directory, exist_ok=True)
    shutil.copy(model_path, os.path.join(directory, "spiece.model"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
        json.dump({"tokenizer_class": "ReformerTokenizer", **config}, handle)
    return str(directory)


@pytest.fixture(scope="module", params=[*VARIANTS, "json"])
def pair(request, models, tmp_path_factory):
    """(ours, transformers') for a spiece.model checkpoint, or for the tokenizer.json transformers saves."""
    name = request.param
    directory = tmp_path_factory.mktemp(name)
    variant = "bpe_nfkc" if name == "json" else name
    source = checkpoint(directory / "spm", models[variant], **VARIANTS[variant][1])
    if name == "json":
        AutoTokenizer.from_pretrained(source).save_pretrained(directory / "json")
        source = str(directory / "json")
    try:
        ref = AutoTokenizer.from_pretrained(source)
    except Exception as error:  # noqa: BLE001 - older transformers (5.17) fail on an empty charsmap themselves
        if name == "bpe_identity" and "precompiled_charsmap" in str(error):
            pytest.skip(f"this transformers cannot load a model without a charsmap: {error}")
        raise
    return ReformerTokenizer.from_pretrained(source), ref


def test_loads_as_transformers_does(pair):
    ours, ref = pair
    assert type(ref).__name__ == "ReformerTokenizer"
    assert ours.special_tokens_map == ref.special_tokens_map
    assert ours.all_special_tokens == ref.all_special_tokens and ours.all_special_ids == ref.all_special_ids
    assert len(ours) == len(ref) and ours.get_vocab() == ref.get_vocab()
    assert ours.num_special_tokens_to_add() == ref.num_special_tokens_to_add() == 0  # no EOS, no BOS


def test_same_ids_padding_and_decoding(pair):
    ours, ref = pair
    if ref.pad_token is None:  # no pad token: padding is an error in both
        with pytest.raises(ValueError):
            ours(["a", "bb"], padding=True)
        for text in CORPUS:
            assert_same_call(ours, ref, text)
            ids = ref.encode(text)
            assert ours.decode(ids) == ref.decode(ids)
            assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    else:
        assert_same_behaviour(ours, ref)
    for text in ("Hello  world ", " a\tb\n", "</s> x <s>", "<unk>?", "~[]"):
        assert_same_call(ours, ref, text)


def test_bpe_model_matches_sentencepiece_but_for_trailing_spaces(models, tmp_path):
    ours = ReformerTokenizer.from_pretrained(checkpoint(tmp_path, models["bpe_nfkc"]))
    processor = spm.SentencePieceProcessor(model_file=models["bpe_nfkc"])
    ordinary = [t for t in CORPUS if t and t == t.rstrip() and "<" not in t]
    assert len(ordinary) > 20
    for text in ordinary:
        assert ours.encode(text) == processor.encode(text), text
    assert ours.encode("Hello ")[-1] == ours.convert_tokens_to_ids("▁")  # the trailing-space quirk
    assert read_precompiled_charsmap(models["bpe_nfkc"]) and not read_precompiled_charsmap(models["bpe_identity"])


def test_save_pretrained_round_trip(pair, tmp_path):
    ours, _ = pair
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "ReformerTokenizer"
    for other in (AutoTokenizer.from_pretrained(tmp_path), ReformerTokenizer.from_pretrained(tmp_path)):
        for text in CORPUS:
            assert_same_call(ours, other, text)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        ReformerTokenizer.from_pretrained(tmp_path)

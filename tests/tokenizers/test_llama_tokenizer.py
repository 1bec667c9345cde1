"""LlamaTokenizer (DiffLlama's) against transformers' LlamaTokenizer, loaded through AutoTokenizer.

A tiny sentencepiece BPE model with byte fallback is trained on the fly (tokenizer.model), written with
the tokenizer_config.json settings real Llama checkpoints use (BOS/EOS flags, legacy, add_prefix_space,
pad token, padding side), and also in the tokenizer.json form that transformers itself saves.
Loading tokenizer.model in transformers needs the `protobuf` package (our loader does not).
"""

import json
import os
import shutil

import pytest
import sentencepiece as spm

from tritonformers.tokenizers.llama import LlamaTokenizer, merges_from_vocab, read_sentencepiece_pieces

from .corpus import CORPUS, PAIRS, assert_same_behaviour, assert_same_call, training_text

transformers = pytest.importorskip("transformers")
AutoTokenizer = transformers.AutoTokenizer
try:  # transformers needs protobuf to read tokenizer.model; our loader does not
    import google.protobuf  # noqa: F401

    HAS_PROTOBUF = True
except ImportError:
    HAS_PROTOBUF = False
NO_PROTOBUF = "transformers converts tokenizer.model through protobuf, which is not installed"
needs_protobuf = pytest.mark.skipif(not HAS_PROTOBUF, reason=NO_PROTOBUF)


def train_sentencepiece(directory, **options):
    """Train a ~500-piece sentencepiece BPE (byte fallback) on the corpus; returns tokenizer.model's path."""
    os.makedirs(directory, exist_ok=True)
    corpus = os.path.join(directory, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as handle:
        handle.write("\n".join(training_text(5)))
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(directory, "tokenizer"), model_type="bpe", vocab_size=500,
        byte_fallback=True, character_coverage=0.98, hard_vocab_limit=False, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2, **options,
    )
    return os.path.join(directory, "tokenizer.model")


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("spm"))


def write_checkpoint(directory, model_path, **config):
    os.makedirs(directory, exist_ok=True)
    shutil.copy(model_path, os.path.join(directory, "tokenizer.model"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
        json.dump({"tokenizer_class": "LlamaTokenizer", **config}, handle)
    return str(directory)


VARIANTS = {
    "default": {"pad_token": "<unk>"},
    "bos": {"add_bos_token": True, "pad_token": "</s>"},
    "bos_eos_new_pad": {"add_bos_token": True, "add_eos_token": True, "pad_token": "<pad>"},
    "legacy": {"legacy": True, "add_bos_token": True, "pad_token": "<unk>"},
    "no_prefix_space": {"add_prefix_space": False, "legacy": False, "pad_token": "<unk>", "padding_side": "right"},
}


@pytest.fixture(scope="module", params=[*sorted(VARIANTS), "json_bos", "json_legacy"])
def pair(request, spm_model, tmp_path_factory):
    """(ours, transformers') for a tokenizer.model checkpoint, or the tokenizer.json transformers saves from one."""
    if not HAS_PROTOBUF:
        pytest.skip(NO_PROTOBUF)
    name = request.param
    directory = tmp_path_factory.mktemp(name)
    source = write_checkpoint(directory / "spm", spm_model, **VARIANTS[name.removeprefix("json_")])
    if name.startswith("json_"):
        AutoTokenizer.from_pretrained(source).save_pretrained(directory / "json")
        source = str(directory / "json")
        assert not os.path.exists(os.path.join(source, "tokenizer.model"))
    return LlamaTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(source)


def test_loads_as_transformers_does(pair):
    ours, ref = pair
    assert type(ref).__name__ == "LlamaTokenizer"
    assert ours.special_tokens_map == ref.special_tokens_map
    assert ours.all_special_tokens == ref.all_special_tokens and ours.all_special_ids == ref.all_special_ids
    assert ours.padding_side == ref.padding_side and ours.add_bos_token == ref.add_bos_token
    assert len(ours) == len(ref) and ours.get_vocab() == ref.get_vocab()
    assert ours.num_special_tokens_to_add() == ref.num_special_tokens_to_add()
    assert ours.num_special_tokens_to_add(pair=True) == ref.num_special_tokens_to_add(pair=True)


def test_same_behaviour(pair):
    assert_same_behaviour(*pair)


def test_special_strings_and_leading_spaces(pair):
    ours, ref = pair
    for text in ("the fox<s>jumps", "Hey </s> you", " Hello", " ", "  ", "\n", "<s><s>", "a <unk> b", "▁x"):
        assert_same_call(ours, ref, text)
        assert_same_call(ours, ref, text, text)
        ids = ref.encode(text)
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    lone = ref.convert_tokens_to_ids("▁world")
    assert ours.decode([lone]) == ref.decode([lone])


def test_save_pretrained_round_trip(pair, tmp_path):
    ours, _ = pair
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and "add_bos_token" not in config  # tokenizer.json decides
    for other in (AutoTokenizer.from_pretrained(tmp_path), LlamaTokenizer.from_pretrained(tmp_path)):
        assert other.padding_side == ours.padding_side
        assert_same_call(ours, other, CORPUS, padding=True, return_tensors="pt")
        assert_same_call(ours, other, [a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True)
        assert other.batch_decode(ours(CORPUS)["input_ids"]) == ours.batch_decode(ours(CORPUS)["input_ids"])


def test_bos_and_decode_rules(spm_model, tmp_path):
    ours = LlamaTokenizer.from_pretrained(write_checkpoint(tmp_path / "l", spm_model, add_bos_token=True))
    ids = ours.encode("Hello world")
    assert ids[0] == ours.bos_token_id == 1 and ours.eos_token_id not in ids
    assert ours.decode(ids, skip_special_tokens=True) == "Hello world"
    assert ours.decode(ids) == "<s> Hello world"
    assert ours.padding_side == "left"


def test_sentencepiece_agrees_on_ordinary_text(spm_model, tmp_path):
    """Same ids as the sentencepiece runtime, except for leading spaces and written special tokens."""
    ours = LlamaTokenizer.from_pretrained(write_checkpoint(tmp_path / "l", spm_model))
    processor = spm.SentencePieceProcessor(model_file=spm_model)
    ordinary = [t for t in CORPUS if t and not t[0].isspace() and "<" not in t]
    assert len(ordinary) > 20
    for text in ordinary:
        assert ours.encode(text) == processor.encode(text), text
    assert ours.encode(" Hello") != processor.encode(" Hello")  # Metaspace adds no second "▁"
    emoji = next(t for t in CORPUS if "😀" in t)
    assert any(token.startswith("<0x") for token in ours.tokenize(emoji))  # byte fallback is exercised
    assert ours.decode(ours.encode(emoji)) == emoji


@needs_protobuf
@pytest.mark.parametrize("overrides", [{"add_eos_token": True}, {"add_bos_token": False}, {"add_bos_token": True},
                                       {"add_prefix_space": False}, {"legacy": True}, {"padding_side": "right"}])
def test_from_pretrained_overrides(spm_model, tmp_path, overrides):
    source = write_checkpoint(tmp_path / "spm", spm_model, add_bos_token=True, pad_token="<unk>")
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path / "json")
    for directory in (source, tmp_path / "json"):  # with tokenizer.json, an unpassed flag counts as False
        ours = LlamaTokenizer.from_pretrained(directory, **overrides)
        ref = AutoTokenizer.from_pretrained(directory, **overrides)
        assert_same_call(ours, ref, CORPUS, padding=True)
        assert_same_call(ours, ref, PAIRS[0][0], PAIRS[0][1])


def test_setting_flags_rebuilds_the_template(pair):
    ours, ref = pair
    bos, eos = ours.add_bos_token, ours.add_eos_token
    try:
        for add_bos, add_eos in ((True, True), (False, True), (False, False)):
            ours.add_bos_token, ref.add_bos_token = add_bos, add_bos
            ours.add_eos_token, ref.add_eos_token = add_eos, add_eos
            assert_same_call(ours, ref, "Hello world", "second")
    finally:
        ours.add_bos_token, ours.add_eos_token = bos, eos
        ref.add_bos_token, ref.add_eos_token = bos, eos


@needs_protobuf
def test_transformers4_style_config(spm_model, tmp_path):
    """tokenizer.json + a tokenizer_config.json as transformers 4 wrote them for Llama-2."""
    AutoTokenizer.from_pretrained(write_checkpoint(tmp_path / "spm", spm_model, add_bos_token=True)).save_pretrained(
        tmp_path / "v4")
    token = {"__type": "AddedToken", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    config = {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "bos_token": {**token, "content": "<s>"}, "eos_token": {**token, "content": "</s>"},
        "unk_token": {**token, "content": "<unk>"}, "pad_token": None, "padding_side": "right",
        "clean_up_tokenization_spaces": False, "sp_model_kwargs": {}, "model_max_length": int(1e30),
        "added_tokens_decoder": {str(i): {**token, "content": t, "special": True}
                                 for i, t in enumerate(["<unk>", "<s>", "</s>"])},
    }
    (tmp_path / "v4" / "tokenizer_config.json").write_text(json.dumps(config))
    ours = LlamaTokenizer.from_pretrained(tmp_path / "v4", pad_token="<unk>")
    ref = AutoTokenizer.from_pretrained(tmp_path / "v4", pad_token="<unk>")
    assert ours.padding_side == ref.padding_side == "right" and ours.encode("a")[0] == 1
    assert_same_behaviour(ours, ref)


@needs_protobuf
def test_user_defined_and_control_pieces(tmp_path):
    model = train_sentencepiece(tmp_path / "spm", user_defined_symbols=["<sep>", "[MASK]"], control_symbols=["<ctl>"])
    directory = write_checkpoint(tmp_path / "l", model, add_bos_token=True, pad_token="<unk>")
    ours, ref = LlamaTokenizer.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    assert ours.extra_special_tokens == ref.extra_special_tokens
    for text in ("a<sep>b [MASK] c<ctl>d", "<ctl>", *CORPUS[:6]):
        assert_same_call(ours, ref, text)
        ids = ref.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    ours.save_pretrained(tmp_path / "saved")
    assert_same_call(ours, AutoTokenizer.from_pretrained(tmp_path / "saved"), "a<sep>b [MASK] c<ctl>d", padding=True)


@needs_protobuf
def test_sentencepiece_reader_and_merges(spm_model):
    from google.protobuf import __version__  # noqa: F401  (the oracle below parses with protobuf)
    from sentencepiece import sentencepiece_model_pb2
    from transformers.tokenization_utils_base import generate_merges

    proto = sentencepiece_model_pb2.ModelProto()
    with open(spm_model, "rb") as handle:
        proto.ParseFromString(handle.read())
    pieces = read_sentencepiece_pieces(spm_model)
    assert pieces == [(p.piece, p.type) for p in proto.pieces]
    vocab = {piece: index for index, (piece, _) in enumerate(pieces)}
    assert merges_from_vocab(vocab) == generate_merges(vocab)


def test_errors(spm_model, tmp_path):
    ours = LlamaTokenizer.from_pretrained(write_checkpoint(tmp_path / "l", spm_model))
    assert ours.pad_token is None
    with pytest.raises(ValueError, match="pad_token"):
        ours(CORPUS, padding=True)
    ours.pad_token = ours.eos_token
    assert ours(["a", "Hello world"], padding=True)["input_ids"][0][0] == ours.eos_token_id  # left padding
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        LlamaTokenizer.from_pretrained(tmp_path)  # holds no tokenizer file
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "tokenizer.model").write_bytes(b"\xff\xff\xff\xff not a model")
    with pytest.raises(ValueError, match="sentencepiece"):
        LlamaTokenizer.from_pretrained(bogus)
    byte_level = tmp_path / "byte_level"  # a Llama-3 style tokenizer.json is not a LlamaTokenizer's
    byte_level.mkdir()
    (byte_level / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []},
                                                          "pre_tokenizer": {"type": "ByteLevel"}}))
    with pytest.raises(ValueError, match="BaseTokenizer"):
        LlamaTokenizer.from_pretrained(byte_level)

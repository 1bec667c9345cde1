"""BloomTokenizer against transformers' AutoTokenizer (TokenizersBackend in transformers 5).

A tiny byte-level BPE is trained on the fly with the pipeline of bigscience/bloom's tokenizer.json (regex
Split + ByteLevel without regex, ByteLevel post-processor and decoder, `<unk> <s> </s> <pad>` first) and saved
as tokenizer.json + tokenizer_config.json naming `BloomTokenizerFast`, as the bigscience repositories do.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tritonformers.tokenizers.bloom import BloomTokenizer

from .corpus import CORPUS, PAIRS, assert_same_call, assert_same_encoding, training_text

transformers = pytest.importorskip("transformers")
AutoTokenizer = transformers.AutoTokenizer

BLOOM_SPLIT = r" ?[^(\s|[.,!?…。，、।۔،])]+"
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def write_bloom_tokenizer(directory, **config):
    """Train a tiny BLOOM-style tokenizer and save it as a BLOOM checkpoint does."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(BLOOM_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(training_text(), trainer=trainer)
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    config = {"tokenizer_class": "BloomTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
              "eos_token": "</s>", "pad_token": "<pad>", "add_prefix_space": False, **config}
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    return str(directory)


@pytest.fixture(scope="module")
def bloom_dir(tmp_path_factory):
    return write_bloom_tokenizer(tmp_path_factory.mktemp("bloom"), padding_side="left")


@pytest.fixture(scope="module")
def pair(bloom_dir):
    """(ours, transformers') for the left-padding checkpoint."""
    return BloomTokenizer.from_pretrained(bloom_dir), AutoTokenizer.from_pretrained(bloom_dir)


def test_loads_as_transformers_does(pair):
    ours, ref = pair
    assert type(ref).__name__ == "TokenizersBackend"
    assert ours.padding_side == ref.padding_side == "left"
    assert (ours.unk_token_id, ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (0, 1, 2, 3)
    assert ours.pad_token_id == ref.pad_token_id and ours.bos_token_id == ref.bos_token_id
    assert len(ours) == len(ref) and ours.vocab_size == ref.vocab_size
    assert ours.get_vocab() == ref.get_vocab()
    assert ours.all_special_tokens == ref.all_special_tokens
    assert ours.all_special_ids == ref.all_special_ids
    assert ours.model_max_length == ref.model_max_length == int(1e30)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_every_text_matches(pair, add_special_tokens):
    ours, ref = pair
    for text in CORPUS:
        assert_same_call(ours, ref, text, add_special_tokens=add_special_tokens)
        expected = ref.encode(text, add_special_tokens=add_special_tokens)
        assert ours.encode(text, add_special_tokens=add_special_tokens) == expected
        assert ours.tokenize(text) == ref.tokenize(text)


def test_no_bos_or_eos_is_added(pair):
    ours, _ = pair
    for text in CORPUS:
        ids = ours.encode(text)
        assert ids == ours.encode(text, add_special_tokens=False)
    # written special tokens are matched as single ids
    assert ours.encode("the fox<s>jumps").count(1) == 1


@pytest.mark.parametrize("padding", [True, "longest", "max_length", False, "do_not_pad"])
@pytest.mark.parametrize("padding_side", [None, "left", "right"])
def test_padded_batches(pair, padding, padding_side):
    ours, ref = pair
    kwargs = {"padding": padding, "padding_side": padding_side}
    if padding == "max_length":
        kwargs["max_length"] = 64
    assert_same_call(ours, ref, CORPUS, **kwargs)
    if padding not in (False, "do_not_pad"):
        assert_same_call(ours, ref, CORPUS, return_tensors="pt", **kwargs)


def test_padded_tensors_layout(pair):
    ours, _ = pair
    batch = ours(["Hello world", "a"], padding=True, return_tensors="pt")
    assert batch["input_ids"].dtype == torch.int64 and batch.attention_mask.dtype == torch.int64
    # left padding with pad id 3 and a 0 in the mask
    assert batch["input_ids"][1, 0].item() == 3 and batch["attention_mask"][1, 0].item() == 0
    right = ours(["Hello world", "a"], padding=True, padding_side="right", return_tensors="pt")
    assert right["input_ids"][1, -1].item() == 3 and right["attention_mask"][1, -1].item() == 0
    single = ours("Hello world", return_tensors="pt")
    assert single["input_ids"].shape[0] == 1


@pytest.mark.parametrize("options", [
    {"return_attention_mask": False}, {"return_token_type_ids": True}, {"return_special_tokens_mask": True},
    {"return_offsets_mapping": True}, {"return_length": True}, {"pad_to_multiple_of": 8, "padding": True},
    {"split_special_tokens": True},
])
def test_return_options(pair, options):
    ours, ref = pair
    assert_same_call(ours, ref, CORPUS, **options)
    assert_same_call(ours, ref, "Hello <s> world", **options)


@pytest.mark.parametrize("truncation", [True, "longest_first", "only_first", "only_second", None])
@pytest.mark.parametrize("max_length", [1, 4, 9])
def test_truncation_single_and_pairs(pair, truncation, max_length):
    ours, ref = pair
    assert_same_call(ours, ref, CORPUS, truncation=truncation, max_length=max_length)
    first, second = zip(*PAIRS)
    assert_same_call(ours, ref, list(first), list(second), truncation=truncation, max_length=max_length)
    assert_same_call(ours, ref, list(first), list(second), truncation=truncation, max_length=max_length,
                     padding="max_length", return_tensors="pt")
    for a, b in PAIRS:
        assert_same_call(ours, ref, a, b, truncation=truncation, max_length=max_length)


def test_truncation_side_stride_and_overflow(bloom_dir):
    ours, ref = BloomTokenizer.from_pretrained(bloom_dir), AutoTokenizer.from_pretrained(bloom_dir)
    for side in ("right", "left"):
        ours.truncation_side = ref.truncation_side = side
        assert_same_call(ours, ref, CORPUS, truncation=True, max_length=5, padding=True)
        assert_same_call(ours, ref, CORPUS[:6], truncation=True, max_length=6, stride=2,
                         return_overflowing_tokens=True)


def test_unbounded_model_max_length(pair):
    ours, ref = pair
    # With no model limit, truncation=True and padding="max_length" without max_length do nothing.
    assert_same_call(ours, ref, CORPUS, truncation=True)
    assert_same_call(ours, ref, CORPUS, padding="max_length")


def test_model_max_length_from_config(tmp_path):
    directory = write_bloom_tokenizer(tmp_path / "b", model_max_length=7)
    ours, ref = BloomTokenizer.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    assert ours.model_max_length == ref.model_max_length == 7
    assert ours.padding_side == ref.padding_side == "right"  # no padding_side in the config: right
    assert_same_call(ours, ref, CORPUS, truncation=True)
    assert_same_call(ours, ref, CORPUS, padding="max_length", truncation=True, return_tensors="pt")
    assert_same_call(ours, ref, PAIRS[0][0], PAIRS[0][1], truncation="only_second")


def test_pairs(pair):
    ours, ref = pair
    first, second = zip(*PAIRS)
    assert_same_call(ours, ref, list(first), list(second), padding=True, return_token_type_ids=True)
    for a, b in PAIRS:
        assert_same_call(ours, ref, a, b, return_token_type_ids=True)


def test_pretokenized_input(pair):
    ours, ref = pair
    words = [text.split() or [""] for text in CORPUS if text.strip()]
    assert_same_call(ours, ref, words, is_split_into_words=True, padding=True)
    assert_same_call(ours, ref, words[0], is_split_into_words=True)


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_decode_and_batch_decode(pair, skip_special_tokens):
    ours, ref = pair
    for text in CORPUS:
        ids = ref.encode(text)
        expected = ref.decode(ids, skip_special_tokens=skip_special_tokens)
        assert ours.decode(ids, skip_special_tokens=skip_special_tokens) == expected
    batch = ref(CORPUS, padding=True, return_tensors="pt")["input_ids"]
    expected = ref.batch_decode(batch, skip_special_tokens=skip_special_tokens)
    assert ours.batch_decode(batch, skip_special_tokens=skip_special_tokens) == expected
    assert ours.decode(batch, skip_special_tokens=skip_special_tokens) == expected
    assert ours.batch_decode(batch.tolist(), skip_special_tokens=skip_special_tokens) == expected
    if skip_special_tokens:  # byte-level BPE round-trips every text without special-token strings
        assert all(out == text for out, text in zip(expected, CORPUS) if not any(t in text for t in SPECIALS))


def test_decode_scalars_and_cleanup(pair):
    ours, ref = pair
    assert ours.decode(5) == ref.decode(5)
    assert ours.decode(torch.tensor(5)) == ref.decode(torch.tensor(5))
    assert ours.decode([]) == ref.decode([]) == ""
    ids = ref.encode("Hello , world . It 's fine !")
    with pytest.warns(UserWarning):  # ignored for BPE, as transformers 5 ignores it
        expected = ref.decode(ids, clean_up_tokenization_spaces=True)
        assert ours.decode(ids, clean_up_tokenization_spaces=True) == expected == ours.decode(ids)


def test_save_pretrained_round_trip(pair, tmp_path):
    ours, _ = pair
    ours(CORPUS, padding=True, truncation=True, max_length=4)  # leaves state on the backend
    ours.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.json", "tokenizer_config.json"]
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    assert saved["padding"] is None and saved["truncation"] is None
    ref, again = AutoTokenizer.from_pretrained(tmp_path), BloomTokenizer.from_pretrained(tmp_path)
    assert ref.padding_side == again.padding_side == "left"
    for other in (ref, again):
        assert_same_call(ours, other, CORPUS, padding=True)
        assert_same_call(ours, other, [a for a, _ in PAIRS], [b for _, b in PAIRS], truncation=True, max_length=8)
        assert other.decode(ours.encode(CORPUS[6])) == CORPUS[6]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "BloomTokenizerFast" and config["add_prefix_space"] is False


def test_from_pretrained_overrides(bloom_dir):
    ours = BloomTokenizer.from_pretrained(bloom_dir, padding_side="right", add_bos_token=True, add_eos_token=True)
    ref = AutoTokenizer.from_pretrained(bloom_dir, padding_side="right", add_bos_token=True, add_eos_token=True)
    assert_same_call(ours, ref, CORPUS, padding=True)
    assert_same_call(ours, ref, PAIRS[0][0], PAIRS[0][1])
    assert ours.encode("a")[0] == 1 and ours.encode("a")[-1] == 2


def test_legacy_special_tokens_map(tmp_path):
    directory = write_bloom_tokenizer(tmp_path / "b")
    config_path = os.path.join(directory, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    special = {k: config.pop(k) for k in ("unk_token", "bos_token", "eos_token", "pad_token")}
    special["pad_token"] = {"content": "<pad>", "lstrip": False, "rstrip": False, "normalized": False,
                            "single_word": False}
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    with open(os.path.join(directory, "special_tokens_map.json"), "w", encoding="utf-8") as handle:
        json.dump(special, handle)
    ours, ref = BloomTokenizer.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    assert ours.pad_token == ref.pad_token == "<pad>" and ours.pad_token_id == 3
    assert_same_call(ours, ref, CORPUS, padding=True)


def test_bad_arguments(pair, tmp_path):
    ours, _ = pair
    with pytest.raises(ValueError, match="padding"):
        ours(CORPUS, padding="middle")
    with pytest.raises(ValueError, match="padding_side"):
        ours(CORPUS, padding=True, padding_side="middle")
    with pytest.raises(ValueError, match="truncation"):
        ours(CORPUS, truncation="sometimes", max_length=3)
    with pytest.raises(TypeError, match="text"):
        ours(3)
    with pytest.raises(TypeError, match="text"):
        ours(["a", 3])
    with pytest.raises(ValueError, match="text_pair"):
        ours(["a", "b"], ["c"])
    with pytest.raises(TypeError, match="text_pair"):
        ours(["a", "b"], "c")
    with pytest.raises(ValueError, match="padding=True"):
        ours(["a", "Hello world"], return_tensors="pt")
    with pytest.raises(ValueError, match="return_tensors"):
        ours("a", return_tensors="tf")
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        ours(CORPUS, padding=True, truncation=True, max_length=5, pad_to_multiple_of=4)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        BloomTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        BloomTokenizer.from_pretrained(tmp_path / "missing")
    unpadded = BloomTokenizer.from_pretrained(ours.name_or_path, pad_token=None)
    with pytest.raises(ValueError, match="pad_token"):
        unpadded(CORPUS, padding=True)


def test_unreadable_files_are_named(bloom_dir, tmp_path):
    """A file given as the directory, a tokenizer.json or tokenizer_config.json that does not parse: the error
    names the path (the tokenizers library's own error names none)."""
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(NotADirectoryError, match="file.txt.*tokenizer directory"):
        BloomTokenizer.from_pretrained(file)
    for name, content in (("tokenizer.json", "{not json"), ("tokenizer.json", '{"version": "1.0"}'),
                          ("tokenizer_config.json", "{not json")):
        broken = shutil.copytree(bloom_dir, tmp_path / f"broken-{name}-{len(content)}")
        (broken / name).write_text(content)
        with pytest.raises(ValueError, match=str(broken / name)):
            BloomTokenizer.from_pretrained(broken)


def test_package_does_not_import_transformers():
    code = ("import sys; import tritonformers.tokenizers.bloom, tritonformers.tokenizers.roberta, "
            "tritonformers.tokenizers.llama; assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_batch_encoding_helpers(pair):
    ours, _ = pair
    batch = ours(["Hello world"], return_tensors="pt")
    assert batch.tokens(0) == ours.tokenize("Hello world")
    assert batch.to("cpu") is batch and batch.input_ids.device.type == "cpu"
    assert set(batch) == {"input_ids", "attention_mask"}
    ids = ours.encode("Hello")
    assert_same_encoding(ours("Hello"), {"input_ids": ids, "attention_mask": [1] * len(ids)})


def test_model_specific_and_extra_special_tokens(tmp_path):
    directory = write_bloom_tokenizer(tmp_path / "b", image_token="<image>", extra_special_tokens=["<x1>", "<x2>"])
    ours, ref = BloomTokenizer.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    assert ours.image_token == ref.image_token == "<image>" and ours.image_token_id == ref.image_token_id == 400
    assert ours.extra_special_tokens == ref.extra_special_tokens == ["<x1>", "<x2>"]
    assert ours.all_special_ids == ref.all_special_ids
    text = "look <image> at <x1>this<x2>"
    assert_same_call(ours, ref, text)
    ids = ref.encode(text)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    ours.pad_token_id = 2
    assert ours.pad_token == "</s>"
    assert ours(["Hello world", "a"], padding=True)["input_ids"][1][-1] == 2
    with pytest.raises(AttributeError):
        ours.no_such_token

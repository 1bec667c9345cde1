"""RobertaTokenizer (I-BERT's) against transformers' RobertaTokenizer, loaded through AutoTokenizer.

A tiny byte-level BPE (GPT-2 regex, special tokens `<s> <pad> </s> <unk> <mask>` = 0..4 as in RoBERTa) is
trained on the fly and written in the layouts real checkpoints use: vocab.json + merges.txt, tokenizer.json,
and roberta-base's hub layout (config.json + tokenizer.json whose `<mask>` strips the space on its left).
"""

import json
import os

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tritonformers.tokenizers.roberta import RobertaTokenizer

from .corpus import CORPUS, PAIRS, assert_same_behaviour, assert_same_call, training_text

transformers = pytest.importorskip("transformers")
AutoTokenizer = transformers.AutoTokenizer

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


@pytest.fixture(scope="module")
def trained():
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=450, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(training_text(), trainer=trainer)
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return tokenizer


def write_checkpoint(directory, tokenizer, layout, **config):
    """Save `tokenizer` in one of the layouts: "files", "json" or "hub"."""
    os.makedirs(directory, exist_ok=True)
    if layout == "files":
        tokenizer.model.save(str(directory))
    else:
        data = json.loads(tokenizer.to_str())
        if layout == "hub":  # roberta-base's tokenizer.json: <mask> eats the space before it
            for token in data["added_tokens"]:
                token["lstrip"] = token["content"] == "<mask>"
        with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as handle:
            json.dump(data, handle, ensure_ascii=False)
    if layout == "hub":
        with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as handle:
            json.dump({"model_type": "roberta", **config}, handle)
    else:
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as handle:
            json.dump({"tokenizer_class": "RobertaTokenizer", **config}, handle)
    return str(directory)


def _token(content, **flags):
    """A special token as transformers 4 serialised it in tokenizer_config.json."""
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, **flags}


# roberta-base's tokenizer_config.json as transformers 4 wrote it: AddedToken dicts, <mask> with lstrip.
TRANSFORMERS4_CONFIG = {
    "add_prefix_space": False, "errors": "replace", "model_max_length": 512, "trim_offsets": True,
    "bos_token": _token("<s>"), "cls_token": _token("<s>"), "eos_token": _token("</s>"), "sep_token": _token("</s>"),
    "pad_token": _token("<pad>"), "unk_token": _token("<unk>"), "mask_token": _token("<mask>", lstrip=True),
    "added_tokens_decoder": {
        str(i): {**_token(t, lstrip=t == "<mask>"), "special": True} for i, t in enumerate(SPECIALS)
    },
}

VARIANTS = {
    "transformers4_config": ("files", TRANSFORMERS4_CONFIG),
    "files": ("files", {"model_max_length": 32}),
    "json": ("json", {"model_max_length": 32}),
    "hub": ("hub", {}),
    "prefix_space": ("files", {"add_prefix_space": True, "trim_offsets": False}),
    "left_padding": ("json", {"padding_side": "left", "model_max_length": 20}),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, trained, tmp_path_factory):
    layout, config = VARIANTS[request.param]
    directory = write_checkpoint(tmp_path_factory.mktemp(request.param), trained, layout, **config)
    return RobertaTokenizer.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)


def test_loads_as_transformers_does(pair):
    ours, ref = pair
    assert type(ref).__name__ == "RobertaTokenizer"
    assert ours.special_tokens_map == ref.special_tokens_map
    ids = (ours.bos_token_id, ours.pad_token_id, ours.eos_token_id, ours.unk_token_id, ours.mask_token_id)
    assert ids == (0, 1, 2, 3, 4)
    assert ours.cls_token_id == ref.cls_token_id and ours.sep_token_id == ref.sep_token_id
    assert ours.padding_side == ref.padding_side and ours.model_max_length == ref.model_max_length
    assert len(ours) == len(ref) and ours.get_vocab() == ref.get_vocab()
    assert ours.all_special_ids == ref.all_special_ids
    assert ours.num_special_tokens_to_add() == 2 and ours.num_special_tokens_to_add(pair=True) == 4


def test_same_behaviour(pair):
    assert_same_behaviour(*pair)


def test_templates(pair):
    ours, _ = pair
    a, b = ours.encode("Hello world", add_special_tokens=False), ours.encode("How are you?", add_special_tokens=False)
    assert ours.encode("Hello world") == [0, *a, 2]
    assert ours.encode("Hello world", "How are you?") == [0, *a, 2, 2, *b, 2]
    batch = ours(["Hello world", "a"], padding=True)
    assert batch["input_ids"][1].count(1) == len(batch["input_ids"][0]) - 3  # pad id 1
    text = " Hello world" if ours.init_kwargs.get("add_prefix_space") else "Hello world"  # the prefix space stays
    assert ours.decode(ours.encode("Hello world")) == f"<s>{text}</s>"
    assert ours.decode(ours.encode("Hello world"), skip_special_tokens=True) == text


def test_mask_token_in_text(pair):
    ours, ref = pair
    for text in ("Paris is the <mask> of France.", "a<mask>b", "<mask> <mask>", " <mask>"):
        assert_same_call(ours, ref, text, return_offsets_mapping=True)


def test_model_max_length_truncation(pair):
    ours, ref = pair
    assert_same_call(ours, ref, CORPUS, truncation=True, padding="max_length")
    assert_same_call(ours, ref, [a for a, _ in PAIRS], [b for _, b in PAIRS], truncation="longest_first",
                     padding="max_length", return_tensors="pt")


def test_save_pretrained_round_trip(pair, tmp_path):
    ours, _ = pair
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "RobertaTokenizer"
    for other in (AutoTokenizer.from_pretrained(tmp_path), RobertaTokenizer.from_pretrained(tmp_path)):
        assert other.padding_side == ours.padding_side
        assert_same_call(ours, other, CORPUS, padding=True, return_tensors="pt")
        assert_same_call(ours, other, [a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True)
        assert_same_call(ours, other, "Paris is the <mask> of France.")


def test_from_pretrained_overrides(trained, tmp_path):
    directory = write_checkpoint(tmp_path / "r", trained, "files")
    for overrides in ({"add_prefix_space": True}, {"padding_side": "left", "model_max_length": 6},
                      {"mask_token": "<unk>"}):
        ours = RobertaTokenizer.from_pretrained(directory, **overrides)
        ref = AutoTokenizer.from_pretrained(directory, **overrides)
        assert_same_call(ours, ref, CORPUS, padding=True, truncation=True)
        assert_same_call(ours, ref, "Paris is the <mask> of France.", "<unk> again")


def test_new_special_token_gets_next_id(trained, tmp_path):
    directory = write_checkpoint(tmp_path / "r", trained, "json", cls_token="<cls>", sep_token="<sep>")
    ours, ref = RobertaTokenizer.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    # new tokens take ids in transformers' order of names: sep before cls
    assert (ours.cls_token_id, ours.sep_token_id) == (ref.cls_token_id, ref.sep_token_id) == (451, 450)
    assert_same_call(ours, ref, PAIRS[0][0], PAIRS[0][1])
    assert_same_call(ours, ref, "text with <cls> and <sep>")


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        RobertaTokenizer.from_pretrained(tmp_path)

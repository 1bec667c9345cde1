"""Reformer's tokenizer (google/reformer-crime-and-punishment's ``spiece.model``), as transformers 5 builds it.

transformers 5's ``ReformerTokenizer`` (``models/reformer/tokenization_reformer.py``) is a `tokenizers`
pipeline, not the sentencepiece runtime:

* model: BPE (``fuse_unk``, no byte fallback). From ``spiece.model`` the vocabulary is the pieces in id order
  and the merges are every split of a piece into two pieces of the vocabulary, ordered by the piece's id,
  then by the left part's length (so a sentencepiece BPE model encodes as sentencepiece does, but for a
  trailing space, which becomes a "▁" token). From ``tokenizer.json`` a BPE model gives its vocabulary and
  merges; a Unigram one becomes BPE over its pieces with no merges (character by character), as
  transformers does when the class is ReformerTokenizer;
* normalizer: the model's precompiled sentencepiece charsmap, then runs of spaces collapsed to one; none
  when the model has no charsmap (sentencepiece's "identity" rule);
* pre-tokenizer and decoder: Metaspace ("▁", prepend always, split on spaces);
* no BOS/EOS added (template ``$A`` / ``$A $B``); ``eos_token`` "</s>", ``unk_token`` "<unk>", no pad token
  (padding raises until one is set); the model's control pieces (``<s>``, ``</s>``) and user-defined pieces
  are extra special tokens.

enwik8's checkpoint has no tokenizer: it reads UTF-8 bytes shifted by 2 (``ids = list(text.encode()) + 2``
as a tensor; 0 is padding), and decodes ``bytes(id - 2 for id in ids if id > 1)``.
"""

from __future__ import annotations

import base64
import json

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .base import TOKENIZER_FILE, BaseTokenizer, existing_file, read_json, restore_padding_truncation
from .llama import _protobuf_fields, merges_from_vocab, read_sentencepiece_pieces

SENTENCEPIECE_FILE = "spiece.model"
_CONTROL, _USER_DEFINED = 3, 4  # sentencepiece's SentencePiece.Type values


class ReformerTokenizer(BaseTokenizer):
    """Reformer's tokenizer from ``spiece.model`` or ``tokenizer.json`` (+ tokenizer_config.json)."""

    tokenizer_class = "ReformerTokenizer"
    default_special_tokens = {"eos_token": "</s>", "unk_token": "<unk>"}

    @classmethod
    def _build_backend(cls, directory: str, config: dict) -> Tokenizer:
        json_path = existing_file(directory, TOKENIZER_FILE)
        saved = charsmap = None
        if json_path is not None:
            vocab, merges, saved, charsmap = _read_tokenizer_json(json_path)
        else:
            model_path = existing_file(directory, SENTENCEPIECE_FILE)
            if model_path is None:
                raise FileNotFoundError(f"ReformerTokenizer needs {TOKENIZER_FILE} or {SENTENCEPIECE_FILE} in "
                                        f"{directory}")
            pieces = read_sentencepiece_pieces(model_path)
            vocab = {piece: index for index, (piece, _) in enumerate(pieces)}
            merges = merges_from_vocab(vocab)
            charsmap = read_precompiled_charsmap(model_path)
            if "extra_special_tokens" not in config and "additional_special_tokens" not in config:
                config["extra_special_tokens"] = [
                    AddedToken(piece, normalized=False, special=kind == _CONTROL)
                    for piece, kind in pieces if kind in (_CONTROL, _USER_DEFINED)
                ]
        unk = str(config.get("unk_token", cls.default_special_tokens["unk_token"]))
        backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=False,
                                dropout=None))
        if charsmap:
            backend.normalizer = normalizers.Sequence([normalizers.Precompiled(charsmap),
                                                       normalizers.Replace(Regex(" {2,}"), " ")])
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        if saved is not None:
            if saved.post_processor is not None:
                backend.post_processor = saved.post_processor
            restore_padding_truncation(backend, saved.padding, saved.truncation)
        return backend


def _read_tokenizer_json(path: str):
    """(vocab, merges, the file's pipeline over an empty model, precompiled charsmap or None)."""
    data = read_json(path)
    model = data["model"]
    kind = model.get("type", "BPE")
    if kind == "BPE":
        vocab = model["vocab"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    elif kind == "Unigram":  # transformers' ReformerTokenizer keeps the pieces and finds no merges
        vocab = {piece: index for index, (piece, _) in enumerate(model["vocab"])}
        merges = []
    else:
        raise ValueError(f"{path}: ReformerTokenizer reads a BPE or Unigram tokenizer.json, found {kind}")
    normalizer = data.get("normalizer") or {}
    steps = normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    charsmap = next((base64.b64decode(s["precompiled_charsmap"]) for s in steps
                     if s and s.get("type") == "Precompiled" and s.get("precompiled_charsmap")), None)
    empty = {**data, "model": {"type": "BPE", "vocab": {}, "merges": []}, "added_tokens": [], "normalizer": None}
    return vocab, merges, Tokenizer.from_str(json.dumps(empty)), charsmap


def read_precompiled_charsmap(path: str) -> bytes | None:
    """The precompiled normalisation charsmap of a sentencepiece model (ModelProto field 3, NormalizerSpec,
    its field 2), or None when it is empty (the "identity" rule)."""
    with open(path, "rb") as handle:
        data = handle.read()
    for number, wire, value in _protobuf_fields(data):
        if number == 3 and wire == 2:
            for inner, inner_wire, inner_value in _protobuf_fields(value):
                if inner == 2 and inner_wire == 2:
                    return bytes(inner_value) or None
    return None


__all__ = ["ReformerTokenizer", "read_precompiled_charsmap"]

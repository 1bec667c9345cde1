"""The Llama tokenizer (DiffLlama's): sentencepiece-style BPE with byte fallback, run by `tokenizers`.

transformers 5's `LlamaTokenizer` (transformers/models/llama/tokenization_llama.py) is a `tokenizers` (Rust)
pipeline, not the sentencepiece runtime, and it differs from sentencepiece on leading spaces: Metaspace adds
no "▁" to a text that already starts with a space (`" Hello"` gives `▁Hello`, sentencepiece `▁ ▁Hello`).
This module builds the same pipeline:

* vocabulary and merges: from tokenizer.json, or converted from a sentencepiece `tokenizer.model` (the
  pieces in id order; the merges are every split of a piece into two pieces of the vocabulary, ordered by
  the piece's id, then by the length of the left part); control and user-defined pieces become added
  tokens (control ones special);
* BPE with `byte_fallback` (`<0xNN>` pieces) and fused unknowns, no normalizer;
* Metaspace pre-tokenizer ("▁", no split) whose prepend scheme is "first" (`add_prefix_space`, default
  True, and `legacy=False`, the default), "always" (`legacy=True`) or "never" (`add_prefix_space=False`);
* decoder: "▁" -> " ", bytes of `<0xNN>` pieces, fuse, then strip one leading space if add_prefix_space;
* BOS/EOS: tokenizer.json's post-processor decides; without tokenizer.json, `add_bos_token` /
  `add_eos_token` from tokenizer_config.json, each False when absent (transformers 5's behaviour, even
  though its docstring says add_bos_token defaults to True); a flag passed to `from_pretrained` rebuilds
  the template from the flags (an unpassed one counting as False);
* padding on the left unless tokenizer_config.json says otherwise; no pad token unless configured.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from .base import TOKENIZER_FILE, BaseTokenizer, existing_file, read_bpe_file, restore_padding_truncation

SENTENCEPIECE_FILE = "tokenizer.model"
_CONTROL, _USER_DEFINED = 3, 4  # sentencepiece's SentencePiece.Type values


class LlamaTokenizer(BaseTokenizer):
    """Llama's tokenizer from tokenizer.json or a sentencepiece tokenizer.model (+ tokenizer_config.json)."""

    tokenizer_class = "LlamaTokenizer"
    padding_side = "left"
    default_special_tokens = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}

    @classmethod
    def _build_backend(cls, directory: str, config: dict) -> Tokenizer:
        json_path = existing_file(directory, TOKENIZER_FILE)
        saved = None
        if json_path is not None:  # only its post-processor, padding and truncation are kept
            with open(json_path, encoding="utf-8") as handle:
                if '"ByteLevel"' in handle.read():  # the test AutoTokenizer uses to pick TokenizersBackend
                    raise ValueError(f"{json_path} is a byte-level (Llama-3 style) tokenizer, which AutoTokenizer "
                                     "loads verbatim: use tritonformers.tokenizers.base.BaseTokenizer")
            vocab, merges, saved = read_bpe_file(json_path)
        else:
            model_path = existing_file(directory, SENTENCEPIECE_FILE)
            if model_path is None:
                raise FileNotFoundError(
                    f"LlamaTokenizer needs {TOKENIZER_FILE} or {SENTENCEPIECE_FILE} in {directory}"
                )
            pieces = read_sentencepiece_pieces(model_path)
            vocab = {piece: index for index, (piece, _) in enumerate(pieces)}
            merges = merges_from_vocab(vocab)
            if "extra_special_tokens" not in config and "additional_special_tokens" not in config:
                config["extra_special_tokens"] = [
                    AddedToken(piece, normalized=False, special=kind == _CONTROL)
                    for piece, kind in pieces if kind in (_CONTROL, _USER_DEFINED)
                ]
        backend = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
        add_prefix_space = config.get("add_prefix_space")
        add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
        scheme = ("always" if config.get("legacy", False) else "first") if add_prefix_space else "never"
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix_space:  # the space Metaspace put in front of the text
            steps.append(decoders.Strip(content=" ", left=1))
        backend.decoder = decoders.Sequence(steps)
        if saved is not None:
            if saved.post_processor is not None:
                backend.post_processor = saved.post_processor
            restore_padding_truncation(backend, saved.padding, saved.truncation)
        return backend


def merges_from_vocab(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges recovered from a sentencepiece vocabulary, as transformers 5 recovers them.

    Every split of a piece into a left and a right piece that are both in the vocabulary is a merge; merges
    are ranked by the id of the merged piece (sentencepiece orders BPE pieces by score), then by the
    length of the left part.
    """
    merges = []
    for piece, _ in sorted(vocab.items(), key=lambda item: item[1]):
        splits = ((piece[:cut], piece[cut:]) for cut in range(1, len(piece)))
        merges += [(left, right) for left, right in splits if left in vocab and right in vocab]
    return merges


def read_sentencepiece_pieces(path: str) -> list[tuple[str, int]]:
    """The (piece, type) list of a sentencepiece model file, in id order.

    Reads the protobuf wire format directly (ModelProto field 1 = repeated SentencePiece {1: piece,
    3: type}), so loading needs neither the protobuf package nor sentencepiece. Types: 1 normal,
    2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    """
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        pieces = []
        for number, wire, value in _protobuf_fields(data):
            if number == 1 and wire == 2:
                fields = {n: v for n, _, v in _protobuf_fields(value)}
                pieces.append((bytes(fields.get(1, b"")).decode("utf-8"), int(fields.get(3, 1))))
    except (IndexError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path} is not a sentencepiece model: {error}") from error
    if not pieces:
        raise ValueError(f"{path} is not a sentencepiece model: it holds no pieces")
    return pieces


def _protobuf_fields(data: bytes):
    """Yield (field number, wire type, value) of one protobuf message; value is an int or the raw bytes."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(data, position)
        elif wire in (1, 5):  # fixed64 / fixed32 (scores): not needed, kept raw
            size = 8 if wire == 1 else 4
            value, position = data[position:position + size], position + size
        elif wire == 2:
            size, position = _varint(data, position)
            value, position = data[position:position + size], position + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if position > len(data):
            raise ValueError("truncated protobuf message")
        yield number, wire, value


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7


__all__ = ["LlamaTokenizer", "merges_from_vocab", "read_sentencepiece_pieces"]

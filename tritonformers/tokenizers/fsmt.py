"""FSMT's tokenizer (fairseq WMT19): Moses preprocessing + BPE with the ``</w>`` end-of-word marker, separate
source and target vocabularies (transformers.models.fsmt.tokenization_fsmt). The oracle is transformers' ``FSMTTokenizer`` (what
``AutoTokenizer`` gives for these files; there is no fast one).

Encoding ``tok(text)`` (always in the source language, with ``vocab-src.json``, also for targets):

1. split the text on the literal special tokens ``<s> <pad> </s> <unk>`` (unless ``split_special_tokens``);
2. each other piece: lower-cased when ``do_lower_case``, FSMT's Unicode punctuation table,
   ``sacremoses.MosesPunctNormalizer(src_lang)``, every character of Unicode category C deleted (tabs and
   newlines too: words are glued), ``sacremoses.MosesTokenizer(src_lang)`` with ``aggressive_dash_splits``
   and XML escaping;
3. BPE of each Moses token, ids from ``vocab-src.json`` (unknown pieces -> ``<unk>``), ``</s>`` appended
   (pairs ``A </s> B </s>``); padding on the right with ``<pad>``, truncation, tensors: all by the
   ``tokenizers`` backend (:class:`BaseTokenizer`).

The BPE runs on ``tokenizers.models.BPE`` (``end_of_word_suffix="</w>"``) over the pre-split Moses tokens. Two
gaps between that model and FSMT's files are bridged here: (a) one ``merges.txt`` serves both languages, so
some merge results are missing from ``vocab-src.json``, which the Rust model refuses; the backend therefore
gets an internal vocabulary = vocab-src plus every merge part and result at ids above vocab-src's, and those
extra ids become ``<unk>`` after encoding (exactly what FSMT's lookup of an unknown piece gives); (b) the
Rust model applies merges one occurrence at a time by rank, FSMT's Python loop merges every occurrence of the
best pair at once. They agree whenever a merge's parts come from earlier merges (how BPE training writes
the file, fastBPE's codes included); a hand-made merges file that lists a merge before the merges making
its parts could tokenise differently.

Decoding maps ids through ``vocab-tgt.json`` (0-3 to the special strings, dropped with
``skip_special_tokens``), undoes BPE (``</w>`` -> a space) and runs ``sacremoses.MosesDetokenizer(tgt_lang)``.
sacremoses is imported on first use, with an error naming it when missing.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from typing import Any

from tokenizers import Tokenizer, processors
from tokenizers.models import BPE

from .base import TOKENIZER_CONFIG_FILE, BaseTokenizer

VOCAB_FILES = {"src_vocab_file": "vocab-src.json", "tgt_vocab_file": "vocab-tgt.json", "merges_file": "merges.txt"}
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")

# FSMT's own Unicode punctuation table (transformers' replace_unicode_punct), applied in this order.
_PUNCT = [
    ("，", ","), (re.compile(r"。\s*"), ". "), ("、", ","), ("”", '"'), ("“", '"'), ("∶", ":"), ("：", ":"),
    ("？", "?"), ("《", '"'), ("》", '"'), ("）", ")"), ("！", "!"), ("（", "("), ("；", ";"), ("１", "1"),
    ("」", '"'), ("「", '"'), ("０", "0"), ("３", "3"), ("２", "2"), ("５", "5"), ("６", "6"), ("９", "9"),
    ("７", "7"), ("８", "8"), ("４", "4"), (re.compile(r"．\s*"), ". "), ("～", "~"), ("’", "'"), ("…", "..."),
    ("━", "-"), ("〈", "<"), ("〉", ">"), ("【", "["), ("】", "]"), ("％", "%"),
]


def replace_unicode_punct(text: str) -> str:
    for old, new in _PUNCT:
        text = old.sub(new, text) if isinstance(old, re.Pattern) else text.replace(old, new)
    return text


def remove_non_printing_char(text: str) -> str:
    """Delete every character of Unicode category C* (control, format, private use, surrogate, unassigned)."""
    return "".join(ch for ch in text if not unicodedata.category(ch).startswith("C"))


def _sacremoses():
    try:
        import sacremoses
    except ImportError as e:  # optional: absent on some machines
        raise ImportError("FSMTTokenizer needs the 'sacremoses' package (pip install sacremoses)") from e
    return sacremoses


def read_merges(path: str) -> list[tuple[str, str]]:
    """FSMT's merges: lines split on "\\n" with the LAST element dropped (a file without a final newline
    loses its last merge, as in transformers), the first two fields of each line."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")[:-1]
    return [tuple(line.split()[:2]) for line in lines]


class FSMTTokenizer(BaseTokenizer):
    """FSMT's Moses + BPE tokenizer over ``vocab-src.json``, ``vocab-tgt.json``, ``merges.txt`` and
    ``tokenizer_config.json`` (``langs`` = [src, tgt], ``do_lower_case``); see the module docstring."""

    tokenizer_class = "FSMTTokenizer"
    default_special_tokens = {"unk_token": "<unk>", "bos_token": "<s>", "sep_token": "</s>", "pad_token": "<pad>"}

    @classmethod
    def _build_backend(cls, directory: str, config: dict) -> Tokenizer:
        paths = {key: os.path.join(directory, name) for key, name in VOCAB_FILES.items()}
        for key, path in paths.items():
            if not os.path.isfile(path):
                raise FileNotFoundError(f"FSMTTokenizer needs {VOCAB_FILES[key]} in {directory} (missing {path})")
        langs = config.get("langs")
        if not (isinstance(langs, (list, tuple)) and len(langs) == 2):
            raise ValueError(f"tokenizer_config.json in {directory} must give langs = [src_lang, tgt_lang], "
                             f"got {langs!r}")
        with open(paths["src_vocab_file"], encoding="utf-8") as f:
            src = json.load(f)
        with open(paths["tgt_vocab_file"], encoding="utf-8") as f:
            tgt = json.load(f)
        merges = read_merges(paths["merges_file"])
        internal = dict(src)
        next_id = max(src.values(), default=-1) + 1
        config["_src_size"] = next_id  # ids at or above are internal: they decode to <unk>
        for a, b in merges:
            for piece in (a, b, a + b):
                if piece not in internal:
                    internal[piece] = next_id
                    next_id += 1
        config["_tgt_vocab"] = {int(i): t for t, i in tgt.items()}
        config["_src_vocab"] = src
        config["_merges"] = merges
        unk = str(config.get("unk_token", "<unk>"))
        return Tokenizer(BPE(vocab=internal, merges=merges, unk_token=unk if unk in internal else None,
                             end_of_word_suffix="</w>", fuse_unk=False))

    def __init__(self, backend: Tokenizer, /, **config: Any):
        self._src_size = config.pop("_src_size", None)
        self._tgt_vocab = config.pop("_tgt_vocab", {})
        self._tgt_ids = {t: i for i, t in self._tgt_vocab.items()}
        self._src_vocab = config.pop("_src_vocab", {})
        self._merges = config.pop("_merges", [])
        super().__init__(backend, **config)
        self.src_lang, self.tgt_lang = self.init_kwargs["langs"]
        self.do_lower_case = bool(self.init_kwargs.get("do_lower_case", False))
        self._moses: dict[str, Any] = {}

    def _post_init(self) -> None:
        sep = (self.sep_token, self.sep_token_id)
        self._backend.post_processor = processors.TemplateProcessing(
            single="$A:0 </s>:0", pair="$A:0 </s>:0 $B:1 </s>:1", special_tokens=[sep])

    # ------------------------------------------------------------------ vocabularies
    @property
    def vocab_size(self) -> int:
        return len(self._src_vocab)

    def __len__(self) -> int:
        return len(self._src_vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._src_vocab)

    @property
    def src_vocab_size(self) -> int:
        return len(self._src_vocab)

    @property
    def tgt_vocab_size(self) -> int:
        return len(self._tgt_vocab)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._src_vocab.get(tokens, self._src_vocab.get(self.unk_token))
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        """Target-vocabulary tokens (the special ids give their strings), as transformers' FSMT does."""
        if isinstance(ids, int):
            return self._id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._id_to_token(int(i)) for i in ids if int(i) not in skip]

    def _id_to_token(self, index: int) -> str:
        specials = {self.convert_tokens_to_ids(t): t for t in self.all_special_tokens}
        return specials.get(index, self._tgt_vocab.get(index, self.unk_token))

    # ------------------------------------------------------------------ Moses
    def _moses_tool(self, kind: str, lang: str):
        key = (kind, lang)
        if key not in self._moses:
            self._moses[key] = getattr(_sacremoses(), kind)(lang=lang)
        return self._moses[key]

    def moses_words(self, text: str, split_special_tokens: bool = False, lang: str | None = None) -> list[str]:
        """Steps 1-2 of the module docstring: the pre-BPE words of ``text`` (special tokens kept whole unless
        ``split_special_tokens``), with Moses in ``lang`` (default: the source language)."""
        pieces = [text] if split_special_tokens else re.split(f"({'|'.join(map(re.escape, SPECIALS))})", text)
        words: list[str] = []
        for piece in pieces:
            if piece in SPECIALS and not split_special_tokens:
                words.append(piece)
            elif piece:
                words += self._moses_piece(piece, lang or self.src_lang)
        return words

    def _moses_piece(self, text: str, lang: str) -> list[str]:
        if self.do_lower_case:
            text = text.lower()
        text = replace_unicode_punct(text)
        text = self._moses_tool("MosesPunctNormalizer", lang).normalize(text)
        text = remove_non_printing_char(text)
        tokens = self._moses_tool("MosesTokenizer", lang).tokenize(
            text, aggressive_dash_splits=True, return_str=False, escape=True)
        return [t for t in tokens if t]

    # ------------------------------------------------------------------ encoding
    def __call__(self, text=None, text_pair=None, *, text_target=None, is_split_into_words: bool = False,
                 return_tensors=None, **kwargs) -> Any:
        """transformers' call (see :meth:`BaseTokenizer.__call__`); texts go through Moses first (a
        pre-split input, ``is_split_into_words=True``, skips Moses and is BPE-encoded word by word).
        ``text_target`` is encoded the same way (source language, vocab-src: FSMT's rule) into ``labels``, or
        is the whole result when ``text`` is None."""
        if text_target is not None:
            target = self(text_target, is_split_into_words=is_split_into_words, return_tensors=return_tensors,
                          **kwargs)
            if text is None:
                return target
            out = self(text, text_pair, is_split_into_words=is_split_into_words, return_tensors=return_tensors,
                       **kwargs)
            out["labels"] = target["input_ids"]
            return out
        if text is None:
            raise ValueError("pass text or text_target")
        split = kwargs.get("split_special_tokens")
        split = self.split_special_tokens if split is None else bool(split)
        words = text if is_split_into_words else self._words(text, split)
        pair = text_pair if (is_split_into_words or text_pair is None) else self._words(text_pair, split)
        out = super().__call__(words, pair, is_split_into_words=True, return_tensors=return_tensors, **kwargs)
        out["input_ids"] = self._unknown_to_unk(out["input_ids"])
        return out

    def _unknown_to_unk(self, ids):
        """Internal ids (merge pieces missing from vocab-src) -> the unk id, in lists, tensors or arrays."""
        limit, unk = self._src_size, self.unk_token_id
        if limit is None:
            return ids
        if hasattr(ids, "masked_fill"):
            return ids.masked_fill(ids >= limit, unk)
        if hasattr(ids, "dtype"):  # a numpy array (return_tensors="np")
            ids = ids.copy()
            ids[ids >= limit] = unk
            return ids
        if ids and isinstance(ids[0], list):
            return [[unk if i >= limit else i for i in row] for row in ids]
        return [unk if i >= limit else i for i in ids]

    def _words(self, text, split_special_tokens: bool):
        if isinstance(text, str):
            return self.moses_words(text, split_special_tokens)
        if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            return [self.moses_words(t, split_special_tokens) for t in text]
        raise TypeError("text must be a str or a list of str")

    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False) -> list[str]:
        """The BPE pieces of ``text`` as FSMT's BPE writes them (a character outside the merges and the
        vocabulary is its own piece, which the Rust model reports as ``<unk>``: recovered from the offsets)."""
        words = self._words(text, self.split_special_tokens)
        pair_words = None if pair is None else self._words(pair, self.split_special_tokens)
        return self._pieces(words, pair_words, add_special_tokens)

    def target_ids(self, text: str) -> list[int]:
        """``text`` in the target language as decoder labels: Moses in ``tgt_lang``, BPE, ids from
        ``vocab-tgt.json`` (unknown pieces -> ``<unk>``), then ``</s>``, as fairseq binarises the target side
        (``tok(text_target=...)`` keeps transformers' rule: source language and vocabulary)."""
        pieces = self._pieces(self.moses_words(text, self.split_special_tokens, self.tgt_lang), None, False)
        vocab = self._tgt_ids
        unk = vocab.get(self.unk_token, self.unk_token_id)
        return [vocab.get(p, unk) for p in pieces] + [vocab.get(self.sep_token, self.sep_token_id)]

    def _pieces(self, words, pair_words, add_special_tokens: bool) -> list[str]:
        encoding = self(words, pair_words, is_split_into_words=True, add_special_tokens=add_special_tokens).encodings[0]
        tokens = list(encoding.tokens)
        for i, (token, word, seq) in enumerate(zip(tokens, encoding.word_ids, encoding.sequence_ids)):
            source = words if seq == 0 else pair_words
            if token == self.unk_token and word is not None and source[word] not in SPECIALS:
                start, end = encoding.offsets[i]
                tokens[i] = source[word][start:end] + ("</w>" if end == len(source[word]) else "")
        return tokens

    # ------------------------------------------------------------------ decoding
    def _decode(self, ids, skip_special_tokens, clean_up_tokenization_spaces) -> str:
        tokens = self.convert_ids_to_tokens([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        words = "".join(t.replace(" ", "").replace("</w>", " ") for t in tokens).split()
        return self._moses_tool("MosesDetokenizer", self.tgt_lang).detokenize(words)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, directory: str | os.PathLike) -> tuple[str, ...]:
        """Write vocab-src.json, vocab-tgt.json, merges.txt and tokenizer_config.json (what transformers'
        FSMTTokenizer reads)."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        paths = [os.path.join(directory, name) for name in (*VOCAB_FILES.values(), TOKENIZER_CONFIG_FILE)]
        tgt = {t: i for i, t in sorted(self._tgt_vocab.items())}
        for path, vocab in zip(paths[:2], (self._src_vocab, tgt)):
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps(vocab, ensure_ascii=False, indent=2) + "\n")
        with open(paths[2], "w", encoding="utf-8") as f:
            f.write("".join(f"{a} {b}\n" for a, b in self._merges))
        config = self._config_to_save()
        with open(paths[3], "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        return tuple(paths)


__all__ = ["FSMTTokenizer", "replace_unicode_punct", "remove_non_printing_char", "read_merges"]

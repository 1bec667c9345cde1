"""What every tokenizer shares: a `tokenizers.Tokenizer` (Rust) backend plus transformers' calling conventions.

The oracle is `transformers.AutoTokenizer.from_pretrained(dir)` in transformers 5, whose tokenizers are all
`TokenizersBackend` (Rust) classes. This module reproduces the parts of that behaviour that decide ids:

* loading: `tokenizer_config.json` (special tokens, padding/truncation side, `model_max_length`, ...), the
  legacy `special_tokens_map.json` / `added_tokens.json`, and the added tokens (those of
  `tokenizer_config.json`'s `added_tokens_decoder`, else those of `tokenizer.json`), re-registered on the
  backend in id order, then every named special token that the backend does not know yet;
* `add_bos_token` / `add_eos_token`: a `tokenizer.json` post-processor decides, unless the caller passes
  either flag to `from_pretrained` (or the backend has none); then a template is built from the flags;
* `__call__`: transformers' resolution of `padding` / `truncation` / `max_length` (including the
  `model_max_length` fallbacks), then the Rust backend pads, truncates, builds pairs and attention masks;
* `decode`: the backend's decoder; `clean_up_tokenization_spaces` is ignored for BPE models, as in
  transformers 5 (it would delete real spaces before punctuation);
* `save_pretrained`: `tokenizer.json` + `tokenizer_config.json` that `AutoTokenizer` reloads to the same ids.

A family module (`bloom`, `roberta`, `llama`) only says how to build its backend from the files in a
directory (`_build_backend`), its defaults, and any final touch (`_post_init`).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from typing import Any

from tokenizers import AddedToken, Encoding, Tokenizer, processors

VERY_LARGE_INTEGER = int(1e30)  # transformers' "no limit" model_max_length
LARGE_INTEGER = int(1e20)  # above this, model_max_length counts as unbounded

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
PADDING_STRATEGIES = ("longest", "max_length", "do_not_pad")
TRUNCATION_STRATEGIES = ("longest_first", "only_first", "only_second", "do_not_truncate")
SIDES = ("left", "right")
_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")

# Config keys that name files or loading state: never kept, never written back.
_DROPPED_CONFIG_KEYS = (
    "tokenizer_class", "auto_map", "init_inputs", "name_or_path", "vocab_file", "merges_file", "tokenizer_file",
    "special_tokens_map_file", "added_tokens_decoder", "files_loaded", "device_map", "slow_tokenizer_class",
    "backend", "is_local", "local_files_only",
)


def as_added_token(value: Any, name: str = "token") -> str | AddedToken:
    """A special-token value from a config: a string, an `AddedToken`, or its serialised dict form."""
    if isinstance(value, (str, AddedToken)):
        return value
    if isinstance(value, dict) and "content" in value:
        return AddedToken(**{k: v for k, v in value.items() if k in _ADDED_TOKEN_FIELDS})
    raise TypeError(f"{name} must be a str, a tokenizers.AddedToken or its dict form, got {type(value).__name__}")


def read_json(path: str) -> Any:
    """The JSON value in `path`; a file that does not parse is a ValueError naming it."""
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error


def existing_file(directory: str, name: str) -> str | None:
    path = os.path.join(directory, name)
    return path if os.path.isfile(path) else None


class BatchEncoding(dict):
    """The output of a tokenizer call: a dict (`input_ids`, `attention_mask`, ...) with attribute access.

    Values are lists of ints (one list per sequence, or a flat list for a single unbatched text), or
    int64 tensors [batch, length] with `return_tensors="pt"`. `encodings` holds the backend's
    `tokenizers.Encoding` objects (tokens, offsets, word ids).
    """

    def __init__(self, data: dict, encodings: list[Encoding] | None = None):
        super().__init__(data)
        self.encodings = encodings

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def tokens(self, index: int = 0) -> list[str]:
        """The token strings of sequence `index`."""
        return self.encodings[index].tokens

    def to(self, device) -> "BatchEncoding":
        """Move every tensor to `device` (in place; returns self)."""
        for key, value in self.items():
            if hasattr(value, "to"):
                self[key] = value.to(device)
        return self


def _special_token_property(name: str) -> property:
    def getter(self):
        value = self._special_tokens.get(name)
        return None if value is None else str(value)

    def setter(self, value):
        if value is not None:
            value = as_added_token(value, name)
        self._special_tokens[name] = value

    return property(getter, setter, doc=f"The {name.replace('_', ' ')} string, or None when unset.")


def _special_token_id_property(name: str) -> property:
    def getter(self):
        token = getattr(self, name)
        return None if token is None else self.convert_tokens_to_ids(token)

    def setter(self, value):
        setattr(self, name, None if value is None else self._backend.id_to_token(int(value)))

    return property(getter, setter, doc=f"The id of the {name.replace('_', ' ')}, or None when unset.")


class BaseTokenizer:
    """A tokenizer over a `tokenizers.Tokenizer` backend, called the way transformers' tokenizers are.

    Build one with `from_pretrained(directory)`; a subclass supplies `_build_backend`. The base class
    itself loads `tokenizer.json` verbatim, which is what transformers' generic `TokenizersBackend` does.
    """

    tokenizer_class = "TokenizersBackend"  # the class name written to tokenizer_config.json
    padding_side = "right"
    truncation_side = "right"
    model_input_names = ("input_ids", "attention_mask")
    default_special_tokens: dict[str, str] = {}

    # ------------------------------------------------------------------ construction
    def __init__(self, backend: Tokenizer, /, **config: Any):
        """Wrap `backend` (a built `tokenizers.Tokenizer`) with the settings of a tokenizer_config.json.

        `config` takes tokenizer_config.json's keys: the special tokens (`bos_token`, ..., `pad_token`,
        `extra_special_tokens` or `additional_special_tokens`, any other `*_token`), `padding_side`,
        `truncation_side`, `model_max_length`, `model_input_names`, `clean_up_tokenization_spaces`,
        `split_special_tokens`, `add_bos_token` / `add_eos_token`, and `added_tokens_decoder`
        ({id: AddedToken or its dict}). Other keys are kept and written back by `save_pretrained`.
        """
        if not isinstance(backend, Tokenizer):
            raise TypeError(f"backend must be a tokenizers.Tokenizer, got {type(backend).__name__}")
        self._backend = backend
        config = dict(config)
        self.name_or_path = config.pop("name_or_path", "")
        added_tokens = config.pop("added_tokens_decoder", None) or {}
        added_tokens = {int(i): as_added_token(t, "added_tokens_decoder") for i, t in added_tokens.items()}
        for key in _DROPPED_CONFIG_KEYS:
            config.pop(key, None)

        # Padding / truncation stored in tokenizer.json only give defaults: every call sets its own.
        self._file_padding, self._file_truncation = backend.padding, backend.truncation
        if self._file_truncation is not None:
            config.setdefault("truncation_side", self._file_truncation["direction"])
        if self._file_padding is not None:
            if "pad_token" not in self.default_special_tokens:  # a family default wins, as in transformers
                config.setdefault("pad_token", self._file_padding["pad_token"])
            config.setdefault("padding_side", self._file_padding["direction"])

        explicit_bos_eos = "add_bos_token" in config or "add_eos_token" in config
        self._add_bos_token = bool(config.pop("add_bos_token", False))
        self._add_eos_token = bool(config.pop("add_eos_token", False))
        self._read_special_tokens(config)
        self._read_settings(config)
        self.init_kwargs = config  # what is left: family options (add_prefix_space, legacy, ...) and unknown keys

        self._register_added_tokens(added_tokens)
        backend.encode_special_tokens = self.split_special_tokens
        if explicit_bos_eos or backend.post_processor is None:
            self.update_post_processor()
        self._post_init()

    def _read_special_tokens(self, config: dict) -> None:
        self._special_tokens: dict[str, str | AddedToken | None] = {}
        for name in SPECIAL_TOKEN_NAMES:
            value = config.pop(name, self.default_special_tokens.get(name))
            self._special_tokens[name] = None if value is None else as_added_token(value, name)
        extra = config.pop("extra_special_tokens", None)
        legacy_extra = config.pop("additional_special_tokens", None)
        extra = legacy_extra if extra is None else extra
        if isinstance(extra, dict):  # named model-specific tokens, e.g. {"image_token": "<image>"}
            config.update(extra)
            extra = None
        # Any other `<name>_token` string is a named model-specific special token, as in transformers.
        named = [k for k, v in config.items() if k.endswith("_token") and isinstance(v, (str, AddedToken, dict))]
        for key in named:
            self._special_tokens[key] = as_added_token(config.pop(key), key)
        self._extra_special_tokens = [as_added_token(t, "extra_special_tokens") for t in (extra or [])]

    def _read_settings(self, config: dict) -> None:
        max_length = config.pop("model_max_length", config.pop("max_len", None))
        self.model_max_length = VERY_LARGE_INTEGER if max_length is None else int(max_length)
        cls = type(self)
        self.padding_side = _check_side(config.pop("padding_side", cls.padding_side), "padding_side")
        self.truncation_side = _check_side(config.pop("truncation_side", cls.truncation_side), "truncation_side")
        self.model_input_names = list(config.pop("model_input_names", cls.model_input_names))
        self.clean_up_tokenization_spaces = bool(config.pop("clean_up_tokenization_spaces", False))
        force = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"
        self._force_bpe_cleanup = bool(config.pop(force, False))
        self.split_special_tokens = bool(config.pop("split_special_tokens", False))

    def _register_added_tokens(self, added_tokens: dict[int, str | AddedToken]) -> None:
        """Register the configured added tokens (in id order), then the special tokens the backend lacks.

        A token already on the backend with identical flags is skipped; one with other flags is re-added,
        which updates its flags (lstrip, rstrip, ...) in place. A special token absent from the vocabulary
        gets the next free id, so the order (named tokens in SPECIAL_TOKEN_NAMES order, then the extra
        ones) decides ids, as it does in transformers.
        """
        present = {t.content: t.__getstate__() for t in self._backend.get_added_tokens_decoder().values()}
        to_add = [_fresh_token(t) for _, t in sorted(added_tokens.items())]
        to_add = [t for t in to_add if t.__getstate__() != present.get(t.content)]
        known = set(present) | {t.content for t in to_add}
        for value in [*self._special_tokens.values(), *self._extra_special_tokens]:
            if value is not None and str(value) not in known:
                to_add.append(_fresh_token(value))
                known.add(str(value))
        named = {str(v) for v in self._special_tokens.values() if v is not None}
        for token in to_add:
            if not token.special and token.content in named:
                token.special = True
        if to_add:
            self._backend.add_tokens(to_add)

    def _post_init(self) -> None:
        """Family hook, run last in __init__ (RoBERTa installs its post-processor here)."""

    @classmethod
    def _build_backend(cls, directory: str, config: dict) -> Tokenizer:
        """The backend built from the files in `directory` (may adjust `config`). Here: tokenizer.json as is."""
        path = existing_file(directory, TOKENIZER_FILE)
        if path is None:
            raise FileNotFoundError(f"{cls.__name__} needs {TOKENIZER_FILE} in {directory}")
        try:
            return Tokenizer.from_file(path)
        except Exception as error:  # the Rust side raises a bare Exception that names no file
            raise ValueError(f"{path} is not a tokenizer.json the tokenizers library can read: {error}") from error

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs: Any) -> "BaseTokenizer":
        """Load the tokenizer saved in a local `directory`, as `AutoTokenizer.from_pretrained` would.

        Keyword arguments override tokenizer_config.json (e.g. `padding_side="left"`, `add_bos_token=True`).
        Never touches the network.
        """
        directory = os.fspath(directory)
        if os.path.isfile(directory):
            raise NotADirectoryError(f"{directory} is a file; expected a tokenizer directory (holding "
                                     f"{TOKENIZER_FILE} or the family's vocabulary files)")
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"tokenizer directory not found: {directory}")
        config_path = existing_file(directory, TOKENIZER_CONFIG_FILE)
        config = read_json(config_path) if config_path else {}
        json_path = existing_file(directory, TOKENIZER_FILE)
        if json_path is not None:  # its post-processor decides BOS/EOS, unless the caller passes a flag
            config.pop("add_bos_token", None)
            config.pop("add_eos_token", None)
        if "added_tokens_decoder" not in config:
            config["added_tokens_decoder"] = _legacy_added_tokens(directory, config, kwargs, json_path)
        config.update(kwargs)
        config["name_or_path"] = directory
        backend = cls._build_backend(directory, config)
        return cls(backend, **config)

    # ------------------------------------------------------------------ special tokens and vocabulary
    def __getattr__(self, name: str):
        """Model-specific named special tokens (`image_token`, `image_token_id`, ...) from the config."""
        special = self.__dict__.get("_special_tokens", {})
        token_name = name.removesuffix("_id")
        if token_name not in special:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        value = special[token_name]
        if value is None or name == token_name:
            return None if value is None else str(value)
        return self.convert_tokens_to_ids(str(value))

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The `tokenizers.Tokenizer` doing the work."""
        return self._backend

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos_token

    @add_bos_token.setter
    def add_bos_token(self, value: bool) -> None:
        self._add_bos_token = bool(value)
        self.update_post_processor()

    @property
    def add_eos_token(self) -> bool:
        return self._add_eos_token

    @add_eos_token.setter
    def add_eos_token(self, value: bool) -> None:
        self._add_eos_token = bool(value)
        self.update_post_processor()

    def update_post_processor(self) -> None:
        """Install the template `[bos] $A [eos]` (pair: `[bos] $A [eos] [bos] $B [eos]`) from the flags."""
        bos, eos = self.bos_token, self.eos_token
        add_bos = self._add_bos_token = self._add_bos_token and bos is not None
        add_eos = self._add_eos_token = self._add_eos_token and eos is not None
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        specials = [(bos, self.bos_token_id)] if add_bos else []
        specials += [(eos, self.eos_token_id)] if add_eos else []
        self._backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=specials
        )

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set, as strings."""
        return {k: str(v) for k, v in self._special_tokens.items() if v is not None}

    @property
    def extra_special_tokens(self) -> list[str]:
        return [str(t) for t in self._extra_special_tokens]

    @property
    def all_special_tokens(self) -> list[str]:
        """Named then extra special tokens, without duplicates."""
        return list(dict.fromkeys([*self.special_tokens_map.values(), *self.extra_special_tokens]))

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens."""
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """Size of the full vocabulary, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int] | None:
        """Token string(s) to id(s); unknown strings give the unk id (None when there is no unk token)."""
        if isinstance(tokens, str):
            index = self._backend.token_to_id(tokens)
            if index is None and self.unk_token is not None:
                index = self._backend.token_to_id(self.unk_token)
            return index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False) -> str | list[str]:
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._backend.id_to_token(int(i)) for i in ids if int(i) not in skip]

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return self._backend.num_special_tokens_to_add(pair)

    # ------------------------------------------------------------------ encoding
    def __call__(
        self,
        text: str | list[str] | list[list[str]],
        text_pair: str | list[str] | list[list[str]] | None = None,
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
        split_special_tokens: bool | None = None,
    ) -> BatchEncoding:
        """Tokenize a text, a batch of texts, or (batches of) pairs `(text, text_pair)`.

        padding: False/"do_not_pad", True/"longest" (to the longest in the batch), "max_length" (to
        `max_length`, else `model_max_length`); `padding_side` overrides the tokenizer's for this call.
        truncation: False/"do_not_truncate", True/"longest_first", "only_first", "only_second", to
        `max_length` (else `model_max_length`); `max_length` alone (padding False, truncation None)
        means "longest_first", as in transformers. Returns lists of ints, one list per sequence (a flat
        list for a single text), or int64 tensors [batch, length] with `return_tensors="pt"` ("np" for
        numpy); `attention_mask` is 1 on real tokens and 0 on padding.
        """
        batched = _check_text_input(text, "text", is_split_into_words)
        if text_pair is not None:
            if _check_text_input(text_pair, "text_pair", is_split_into_words) != batched:
                raise TypeError("text_pair must be a batch (list) exactly when text is one")
            if batched and len(text) != len(text_pair):
                raise ValueError(f"batch length of text ({len(text)}) does not match text_pair ({len(text_pair)})")
        padding, truncation, max_length = self._resolve_strategies(
            padding, truncation, max_length, pad_to_multiple_of
        )
        self._configure_backend(
            padding, truncation, max_length, stride, pad_to_multiple_of, padding_side, split_special_tokens
        )
        if batched:
            inputs = list(zip(text, text_pair)) if text_pair is not None else list(text)
        else:  # transformers treats an empty text_pair as no pair
            inputs = [(text, text_pair)] if text_pair else [text]
        encodings = self._backend.encode_batch(
            inputs, add_special_tokens=add_special_tokens, is_pretokenized=is_split_into_words
        )
        data = self._collect(
            encodings, return_token_type_ids, return_attention_mask, return_overflowing_tokens,
            return_special_tokens_mask, return_offsets_mapping, return_length,
        )
        if not batched and return_tensors is None and not return_overflowing_tokens:
            data = {k: v[0] if v and isinstance(v[0], list) else v for k, v in data.items()}
        return BatchEncoding(_to_tensors(data, return_tensors), encodings)

    def encode(
        self,
        text: str | list[str],
        text_pair: str | list[str] | None = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        stride: int = 0,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        **kwargs: Any,
    ):
        """The `input_ids` of `__call__` with the same arguments."""
        return self(
            text, text_pair, add_special_tokens=add_special_tokens, padding=padding, truncation=truncation,
            max_length=max_length, stride=stride, padding_side=padding_side, return_tensors=return_tensors,
            **kwargs,
        )["input_ids"]

    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False) -> list[str]:
        """The token strings of `text` (and `pair`), without special tokens unless asked."""
        self._configure_backend("do_not_pad", "do_not_truncate", None, 0, None, None, None)
        return self._backend.encode(text, pair, add_special_tokens=add_special_tokens).tokens

    def _resolve_strategies(self, padding, truncation, max_length, pad_to_multiple_of) -> tuple[str, str, int]:
        """transformers' `_get_padding_truncation_strategies`: strategy names and the effective max_length.

        Without `max_length`, "max_length" padding and any truncation use `model_max_length`, or are
        dropped when the model has no limit (model_max_length above 1e20).
        """
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"
        padding = _strategy(padding, "padding", "longest", "do_not_pad", PADDING_STRATEGIES)
        truncation = _strategy(truncation, "truncation", "longest_first", "do_not_truncate", TRUNCATION_STRATEGIES)
        if max_length is None:
            limit = None if self.model_max_length > LARGE_INTEGER else self.model_max_length
            if padding == "max_length":
                padding, max_length = ("do_not_pad", None) if limit is None else (padding, limit)
            if truncation != "do_not_truncate":
                truncation, max_length = ("do_not_truncate", max_length) if limit is None else (truncation, limit)
        pad_id = self.pad_token_id
        if padding != "do_not_pad" and (pad_id is None or pad_id < 0):
            raise ValueError("padding was requested but the tokenizer has no pad_token (set tokenizer.pad_token)")
        if (truncation != "do_not_truncate" and padding != "do_not_pad" and pad_to_multiple_of is not None
                and max_length is not None and max_length % pad_to_multiple_of != 0):
            raise ValueError(f"truncation length ({max_length}) is not a multiple of "
                             f"pad_to_multiple_of ({pad_to_multiple_of})")
        return padding, truncation, max_length

    def _configure_backend(self, padding, truncation, max_length, stride, pad_to_multiple_of, padding_side,
                           split_special_tokens) -> None:
        """Set the backend's truncation, padding and special-token splitting for the next encode."""
        if truncation == "do_not_truncate":
            self._backend.no_truncation()
        else:
            self._backend.enable_truncation(
                max_length, stride=stride, strategy=truncation, direction=self.truncation_side
            )
        if padding == "do_not_pad":
            self._backend.no_padding()
        else:
            side = _check_side(self.padding_side if padding_side is None else padding_side, "padding_side")
            self._backend.enable_padding(
                direction=side, pad_id=self.pad_token_id, pad_type_id=0, pad_token=self.pad_token,
                length=max_length if padding == "max_length" else None, pad_to_multiple_of=pad_to_multiple_of,
            )
        if split_special_tokens is None:
            split_special_tokens = self.split_special_tokens
        self._backend.encode_special_tokens = bool(split_special_tokens)

    def _collect(self, encodings, token_type_ids, attention_mask, overflowing, special_tokens_mask, offsets,
                 length) -> dict:
        """Lists per sequence from the backend's encodings (overflowing windows become extra rows)."""
        if token_type_ids is None:
            token_type_ids = "token_type_ids" in self.model_input_names
        if attention_mask is None:
            attention_mask = "attention_mask" in self.model_input_names
        fields = [
            ("input_ids", True, lambda e: e.ids),
            ("token_type_ids", token_type_ids, lambda e: e.type_ids),
            ("attention_mask", attention_mask, lambda e: e.attention_mask),
            ("special_tokens_mask", special_tokens_mask, lambda e: e.special_tokens_mask),
            ("offset_mapping", offsets, lambda e: e.offsets),
            ("length", length, lambda e: len(e.ids)),
        ]
        data = {name: [] for name, wanted, _ in fields if wanted}
        sample_of_row = []
        for sample, encoding in enumerate(encodings):
            rows = [encoding, *encoding.overflowing] if overflowing else [encoding]
            for row in rows:
                for name, wanted, get in fields:
                    if wanted:
                        data[name].append(get(row))
            sample_of_row += [sample] * len(rows)
        if overflowing:
            data["overflow_to_sample_mapping"] = sample_of_row
        return data

    # ------------------------------------------------------------------ decoding
    def decode(self, token_ids, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str | list[str]:
        """Ids (an int, a list, a tensor) to text; a batch (list of lists, 2-D tensor) gives a list of texts."""
        token_ids = _to_python(token_ids)
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if token_ids and isinstance(token_ids[0], (list, tuple)):
            return [self._decode(ids, skip_special_tokens, clean_up_tokenization_spaces) for ids in token_ids]
        return self._decode(token_ids, skip_special_tokens, clean_up_tokenization_spaces)

    def batch_decode(self, sequences, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        """A list of texts, one per sequence of ids."""
        result = self.decode(sequences, skip_special_tokens, clean_up_tokenization_spaces)
        return [result] if isinstance(result, str) else result

    def _decode(self, ids, skip_special_tokens, clean_up_tokenization_spaces) -> str:
        text = self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if not clean_up_tokenization_spaces:
            return text
        if type(self._backend.model).__name__ == "BPE" and not self._force_bpe_cleanup:
            # transformers 5 ignores the clean-up for BPE: it deletes real spaces before punctuation.
            warnings.warn(f"{type(self).__name__}: clean_up_tokenization_spaces is ignored for BPE tokenizers",
                          stacklevel=3)
            return text
        return clean_up_tokenization(text)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, directory: str | os.PathLike) -> tuple[str, str]:
        """Write tokenizer.json and tokenizer_config.json; `AutoTokenizer` and `from_pretrained` reload them."""
        directory = os.fspath(directory)
        if os.path.isfile(directory):
            raise ValueError(f"directory must be a directory, not a file: {directory}")
        os.makedirs(directory, exist_ok=True)
        config_path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
        with open(config_path, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(self._config_to_save(), indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        backend = Tokenizer.from_str(self._backend.to_str())
        restore_padding_truncation(backend, self._file_padding, self._file_truncation)
        json_path = os.path.join(directory, TOKENIZER_FILE)
        backend.save(json_path)
        return config_path, json_path

    def _config_to_save(self) -> dict:
        config = copy.deepcopy(self.init_kwargs)
        config.update(self.special_tokens_map)
        if self._extra_special_tokens:
            config["extra_special_tokens"] = self.extra_special_tokens
        config.update(
            model_max_length=self.model_max_length, padding_side=self.padding_side,
            truncation_side=self.truncation_side, clean_up_tokenization_spaces=self.clean_up_tokenization_spaces,
            tokenizer_class=self.tokenizer_class,
        )
        if list(self.model_input_names) != list(type(self).model_input_names):
            config["model_input_names"] = list(self.model_input_names)
        if self.split_special_tokens:
            config["split_special_tokens"] = True
        return config

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"len={len(self)}, padding_side={self.padding_side!r}, special_tokens={self.special_tokens_map})")


for _name in SPECIAL_TOKEN_NAMES:  # bos_token, bos_token_id, ..., mask_token, mask_token_id
    setattr(BaseTokenizer, _name, _special_token_property(_name))
    setattr(BaseTokenizer, _name + "_id", _special_token_id_property(_name))
del _name


def clean_up_tokenization(text: str) -> str:
    """transformers' clean-up of spaces before punctuation and English contractions (WordPiece-era)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _legacy_added_tokens(directory: str, config: dict, overrides: dict,
                         json_path: str | None) -> dict[int, AddedToken]:
    """Added tokens of a config without `added_tokens_decoder` (older checkpoints), as transformers finds them.

    special_tokens_map.json fills `config` (the caller's overrides win), added_tokens.json and the
    `added_tokens` of tokenizer.json give the tokens with their flags.
    """
    map_path = existing_file(directory, SPECIAL_TOKENS_MAP_FILE)
    for key, value in (read_json(map_path) if map_path else {}).items():
        if overrides.get(key):
            continue
        if key in ("additional_special_tokens", "extra_special_tokens") and isinstance(value, list):
            existing = list(config.get("extra_special_tokens") or config.get("additional_special_tokens") or [])
            for token in value:
                token = AddedToken(**{**token, "special": True}) if isinstance(token, dict) else token
                if token not in existing:
                    existing.append(token)
            config.pop("additional_special_tokens", None)
            config["extra_special_tokens"] = existing
        elif isinstance(value, dict) and "content" in value:
            config[key] = as_added_token({**value, "special": True}, key)
        else:
            config[key] = value
    added: dict[int, AddedToken] = {}
    added_path = existing_file(directory, ADDED_TOKENS_FILE)
    if added_path:
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        specials = {str(config[k]) for k in SPECIAL_TOKEN_NAMES if config.get(k)} | {str(t) for t in extra}
        for content, index in read_json(added_path).items():
            is_special = content in specials
            added[int(index)] = AddedToken(content, normalized=not is_special, special=is_special)
    if json_path:
        for entry in read_json(json_path).get("added_tokens", []):
            entry = dict(entry)
            added[int(entry.pop("id"))] = as_added_token(entry)
    return added


def read_bpe_file(path: str) -> tuple[dict[str, int], list[tuple[str, str]], Tokenizer]:
    """The vocabulary, the merges and the rest of the pipeline of a BPE tokenizer.json.

    For families that rebuild their model from a file's vocabulary (as transformers' RoBERTa and Llama
    classes do) but keep some of its settings (post-processor, padding, truncation): the returned
    `Tokenizer` is the file over an empty vocabulary, which avoids building the full model twice.
    """
    tokenizer_json = read_json(path)
    model = tokenizer_json["model"]
    if model.get("type", "BPE") != "BPE":
        raise ValueError(f"{path}: expected a BPE model, found {model.get('type')}")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    empty = {**tokenizer_json, "model": {**model, "vocab": {}, "merges": []}, "added_tokens": []}
    return model["vocab"], merges, Tokenizer.from_str(json.dumps(empty))


def restore_padding_truncation(backend: Tokenizer, padding: dict | None, truncation: dict | None) -> None:
    """Set a backend's padding / truncation to saved values (`Tokenizer.padding` / `.truncation` dicts)."""
    if truncation is None:
        backend.no_truncation()
    else:
        backend.enable_truncation(**{k: truncation[k] for k in ("max_length", "stride", "strategy", "direction")})
    if padding is None:
        backend.no_padding()
    else:
        keys = ("direction", "pad_id", "pad_type_id", "pad_token", "length", "pad_to_multiple_of")
        backend.enable_padding(**{k: padding[k] for k in keys})


def _fresh_token(value: str | AddedToken) -> AddedToken:
    """An AddedToken to register (a copy: registering may flip its `special` flag); strings are special."""
    return copy.deepcopy(value) if isinstance(value, AddedToken) else AddedToken(value, special=True)


def _check_side(value: Any, name: str) -> str:
    if value not in SIDES:
        raise ValueError(f"{name} must be 'left' or 'right', got {value!r}")
    return value


def _strategy(value: Any, name: str, if_true: str, if_false: str, allowed: tuple[str, ...]) -> str:
    if value is None or isinstance(value, bool):
        return if_true if value else if_false
    value = getattr(value, "value", value)  # transformers' PaddingStrategy / TruncationStrategy enums
    if value not in allowed:
        raise ValueError(f"{name} must be a bool or one of {allowed}, got {value!r}")
    return value


def _check_text_input(text: Any, name: str, is_split_into_words: bool) -> bool:
    """Validate `text` and tell whether it is a batch."""
    if isinstance(text, str):
        if is_split_into_words:
            raise TypeError(f"{name} must be a list of words when is_split_into_words=True")
        return False
    if not isinstance(text, (list, tuple)):
        raise TypeError(f"{name} must be a str or a list of str, got {type(text).__name__}")
    if is_split_into_words:
        batched = len(text) > 0 and isinstance(text[0], (list, tuple))
        words = [w for seq in text for w in seq] if batched else list(text)
    else:
        batched, words = True, list(text)
    if not all(isinstance(w, str) for w in words):
        raise TypeError(f"{name} must contain only str")
    return batched


def _to_python(value: Any) -> Any:
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    return value


def _to_tensors(data: dict, return_tensors: str | None) -> dict:
    if return_tensors is None:
        return data
    kind = getattr(return_tensors, "value", return_tensors)
    if kind == "pt":
        import torch

        convert = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    elif kind == "np":
        import numpy as np

        convert = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    else:
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
    try:
        return {key: convert(value) for key, value in data.items()}
    except ValueError as error:
        raise ValueError("cannot make a tensor of sequences of different lengths: pass padding=True "
                         "(and/or truncation=True) to get equal lengths") from error

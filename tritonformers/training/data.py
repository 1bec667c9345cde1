"""Training data: text -> one token stream (tokenised once, cached) -> fixed-length windows -> batches.

* Input (:func:`data_files`): a text file, a folder of text files (``*.txt``, ``*.jsonl``, sorted by name), a
  JSON-lines file whose records hold a text field, or token ids already made (a 1-D integer ``.npy`` file,
  or, from Python, a list / array / tensor of ids).
* Tokenisation (:func:`token_stream`): every document (a text file, or one JSON-lines record) is encoded
  without special tokens and followed by the tokenizer's end-of-sequence token, and the documents are
  concatenated. The stream is cached next to the data, ``<folder>/.tritonformers-cache/<name>.<key>.npy``,
  where the key hashes the tokenizer files, the data files (names, sizes, modification times) and the
  format; a restart memory-maps it instead of re-tokenising, and another tokenizer never reads it.
* Windows (:class:`Corpus`): the stream is cut into non-overlapping windows; the last ``n_eval`` windows are
  the held-out split, the others are visited in a random order drawn afresh every epoch from the seed.
* Positions: training sample ``p`` (counted over the whole run, all ranks) is window
  ``permutation(epoch = p // n_train)[p % n_train]``; a micro-batch of rank ``r`` takes samples
  ``position + r * batch .. + batch``. The data position of a checkpoint is one integer, and a process count
  that divides the global batch the same way reads the very same samples (what makes DDP equal one process).
* Tasks (:func:`make_task`): ``causal_lm`` / ``reversible_lm`` use the window as ``input_ids`` and ``labels``
  (the models shift); ``masked_lm`` wraps ``seq_len - 2`` tokens in ``<s> ... </s>`` and masks as RoBERTa
  (HF's ``DataCollatorForLanguageModeling``), with a generator seeded by the sample's position, so the mask
  of a sample never depends on the process layout or on a restart.
* Pairs (``seq2seq``, :class:`PairCorpus`): a TSV file (``source<TAB>target`` a line), JSON-lines records with
  source and target fields, a folder of those, or a source text file with a parallel ``target_data`` file
  (line i of one translates line i of the other). The source side is tokenised as the tokenizer encodes a
  text (``</s>`` appended), the target side with its ``target_ids`` (FSMT: target language and vocabulary);
  the pairs are cached as one id array plus offsets. Pairs with a side longer than ``seq_len`` tokens are
  skipped (with a warning, as fairseq's ``--skip-invalid-size-inputs-valid-test``); the last ``n_eval`` are
  held out. Each epoch's order is a permutation of the pairs, sorted by length within pools of 32 blocks of
  ``block`` pairs (``block`` = batch size x processes: one micro-step of all ranks), the blocks of a pool then
  shuffled: a micro-batch holds pairs of similar length (little padding), the order is a function of
  (seed, epoch, block) only, and sample positions work as for windows (same resume and DDP rules). Batches
  pad the sources with ``<pad>`` (attention mask 0) and the labels with -100; the model shifts the labels
  right into its decoder input, whose positions count real tokens only, so padding changes no sample.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
IDS_SUFFIX = ".npy"
CACHE_DIR = ".tritonformers-cache"
_FORMAT = "tritonformers-token-stream-v1"
_LINES_PER_CALL = 1024  # lines encoded per tokenizer call: bounded memory for big files
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "spiece.model", "vocab-src.json",
                    "vocab-tgt.json")
PAIR_SUFFIXES = (".tsv",) + JSONL_SUFFIXES
_PAIR_FORMAT = "tritonformers-pairs-v1"
_POOL_BLOCKS = 32  # blocks per length-sorting pool: longer pools pad less but shuffle less


class ByteTokenizer:
    """Raw bytes as token ids (``id = byte + offset``), for byte-level models such as enwik8's Reformer."""

    def __init__(self, offset: int = 0):
        self.offset = int(offset)
        self.eos_token_id = None
        self.all_special_ids = list(range(self.offset))

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        return {"input_ids": [[b + self.offset for b in t.encode("utf-8")] for t in texts]}

    def __len__(self) -> int:
        return 256 + self.offset

    def save_pretrained(self, directory) -> tuple:
        return ()


def has_tokenizer_files(directory: str | None) -> bool:
    return directory is not None and any(os.path.isfile(os.path.join(directory, n)) for n in _TOKENIZER_FILES)


def load_tokenizer(family, directory: str | None, vocab_size: int | None = None):
    """The family's tokenizer from ``directory``: a ByteTokenizer for byte-level families, and for families
    with ``byte_fallback`` when ``directory`` holds no tokenizer files (then ``vocab_size`` must cover the
    bytes: 256 + the family's ``byte_offset``)."""
    cls = family.tokenizer_cls()
    if family.byte_fallback and not has_tokenizer_files(directory):
        if directory is not None and not os.path.isdir(directory):
            raise FileNotFoundError(f"tokenizer directory {directory!r} does not exist")
        needed = 256 + family.byte_offset
        if vocab_size is not None and vocab_size < needed:
            raise ValueError(f"no tokenizer files given, so this {family.model_type} run would read raw UTF-8 bytes "
                             f"(ids byte + {family.byte_offset}), which needs vocab_size >= {needed}; the model has "
                             f"{vocab_size}: pass tokenizer=DIR (--tokenizer DIR) with its tokenizer files")
        return ByteTokenizer(family.byte_offset)
    if cls is None:
        return ByteTokenizer(family.byte_offset)
    if directory is None:
        raise ValueError(f"a {family.model_type} run needs a tokenizer: pass tokenizer=DIR (--tokenizer DIR), or a "
                         "model directory that holds the tokenizer files")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenizer directory {directory!r} does not exist")
    return cls.from_pretrained(directory)


def tokenizer_fingerprint(tokenizer, directory: str | None) -> str:
    """A hash of what decides the ids: the tokenizer class and the contents of its files."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(str(getattr(tokenizer, "offset", "")).encode())
    for name in _TOKENIZER_FILES:
        path = None if directory is None else os.path.join(directory, name)
        if path is not None and os.path.isfile(path):
            h.update(name.encode())
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Files and documents
# ----------------------------------------------------------------------------------------------------------

def data_files(path: str | os.PathLike) -> list[Path]:
    """The data files of ``path`` (a file, or a folder's text / JSON-lines files sorted by name)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data path {str(p)!r} does not exist")
    if p.is_file():
        return [p]
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                   and f.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES)
    if not files:
        raise ValueError(f"data folder {str(p)!r} holds no text files ({', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)})")
    return files


def _documents(file: Path, text_field: str) -> Iterator[Iterator[list[str]]]:
    """Each document of ``file`` as an iterator over groups of lines (newlines kept, so nothing is lost)."""
    if file.suffix.lower() in JSONL_SUFFIXES:
        with open(file, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{file}:{number} is not a JSON object: {e}") from e
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ValueError(f"{file}:{number} has no string field {text_field!r} (text_field option)")
                yield iter([[record[text_field]]])
        return

    def groups():
        with open(file, encoding="utf-8") as f:
            lines = []
            for line in f:
                lines.append(line)
                if len(lines) == _LINES_PER_CALL:
                    yield lines
                    lines = []
            if lines:
                yield lines
    yield groups()


def _encode_files(files: list[Path], tokenizer, text_field: str) -> np.ndarray:
    eos = getattr(tokenizer, "eos_token_id", None)
    pieces: list[np.ndarray] = []
    for file in files:
        for document in _documents(file, text_field):
            n_before = len(pieces)
            for lines in document:
                ids = tokenizer(lines, add_special_tokens=False)["input_ids"]
                pieces.extend(np.asarray(x, dtype=np.int64) for x in ids if len(x))
            if eos is not None and len(pieces) > n_before:
                pieces.append(np.asarray([eos], dtype=np.int64))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return stream.astype(np.uint16 if stream.size == 0 or stream.max() < 2**16 else np.int32)


def _cache_file(path: Path, files: list[Path], fingerprint: str, text_field: str) -> Path:
    h = hashlib.sha256(f"{_FORMAT}|{fingerprint}|{text_field}".encode())
    for f in files:
        stat = f.stat()
        h.update(f"|{f.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    folder = path.parent if path.is_file() else path
    return folder / CACHE_DIR / f"{path.name}.{h.hexdigest()[:20]}.npy"


def token_stream(data: Any, tokenizer, fingerprint: str, text_field: str = "text",
                 is_writer: bool = True, barrier: Callable[[], None] = lambda: None) -> np.ndarray:
    """The token ids of ``data`` as one 1-D integer array (memory-mapped from the cache when it is a file).

    Under ``torch.distributed`` only the writer (rank 0) tokenises; the others wait at ``barrier`` and then
    read its cache. A folder that cannot be written keeps the stream in memory (with a warning).
    """
    if isinstance(data, (torch.Tensor, np.ndarray, list, tuple)):
        return _check_ids(np.asarray(data.cpu() if isinstance(data, torch.Tensor) else data), "data")
    if not isinstance(data, (str, os.PathLike)):
        raise TypeError(f"data must be a path or a sequence of token ids, got {type(data).__name__}")
    path = Path(data)
    files = data_files(path)
    if path.is_file() and path.suffix.lower() == IDS_SUFFIX:
        return _check_ids(np.load(path, mmap_mode="r"), str(path))
    cache = _cache_file(path, files, fingerprint, text_field)
    return _cached([cache], lambda: [_encode_files(files, tokenizer, text_field)], is_writer, barrier)[0]


def _cached(caches: list[Path], build: Callable[[], list[np.ndarray]], is_writer: bool,
            barrier: Callable[[], None]) -> list[np.ndarray]:
    """The arrays cached in ``caches`` (memory-mapped), built and written by the writer when missing. The first
    file marks a complete cache: it is written last, each file through a temporary name."""
    if is_writer and not caches[0].is_file():
        arrays = build()
        try:
            caches[0].parent.mkdir(exist_ok=True)
            for cache, array in reversed(list(zip(caches, arrays))):
                tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    np.save(f, array)
                os.replace(tmp, cache)
        except OSError as e:
            warnings.warn(f"could not write the token cache {caches[0]} ({e}); the ids stay in memory", stacklevel=3)
            barrier()
            return arrays
    barrier()
    if not caches[0].is_file():  # a reader whose writer could not cache: tokenise here too
        return build()
    return [np.load(cache, mmap_mode="r") for cache in caches]


# ----------------------------------------------------------------------------------------------------------
# Source/target pairs (seq2seq)
# ----------------------------------------------------------------------------------------------------------

def pair_files(data: str | os.PathLike, target_data: str | os.PathLike | None) -> list[Path]:
    """The files of a pair corpus: ``[source, target]`` (parallel files), or the TSV / JSON-lines files of
    ``data`` (a file, or a folder's sorted by name)."""
    if target_data is not None:
        files = [Path(data), Path(target_data)]
        for name, f in zip(("data", "target_data"), files):
            if not f.is_file():
                raise FileNotFoundError(f"{name} {str(f)!r} does not exist (parallel files: source and target text, "
                                        "one sentence a line)")
        return files
    p = Path(data)
    if not p.exists():
        raise FileNotFoundError(f"data path {str(p)!r} does not exist")
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                                           and f.suffix.lower() in PAIR_SUFFIXES)
    if not files:
        raise ValueError(f"data folder {str(p)!r} holds no translation files ({', '.join(PAIR_SUFFIXES)})")
    for f in files:
        if f.suffix.lower() not in PAIR_SUFFIXES:
            raise ValueError(f"data {str(f)!r}: translation needs a source and a target side: a .tsv file "
                             "(source<TAB>target), JSON-lines records with source and target fields, or this file "
                             "as the source with target_data=PARALLEL_FILE (--target-data)")
    return files


def _side(text, where: str, side: str, field: str | None = None) -> str:
    """One side of a pair, stripped; a ValueError naming ``where`` when it is missing (no such JSON field) or
    empty."""
    if not isinstance(text, str):
        raise ValueError(f"{where} has no string field {field!r} ({side}_field option)")
    if not text.strip():
        raise ValueError(f"{where} has an empty {side} side")
    return text.strip()


def _read_pairs(files: list[Path], parallel: bool, source_field: str, target_field: str) -> Iterator[tuple[str, str]]:
    """Every (source, target) text of the corpus, in order; a missing or empty side is a ValueError naming the
    file and line."""
    if parallel:
        with open(files[0], encoding="utf-8") as src, open(files[1], encoding="utf-8") as tgt:
            number = 0
            for number, (a, b) in enumerate(zip(src, tgt), 1):
                yield _side(a, f"{files[0]}:{number}", "source"), _side(b, f"{files[1]}:{number}", "target")
            if next(src, None) is not None or next(tgt, None) is not None:
                raise ValueError(f"data {str(files[0])!r} and target_data {str(files[1])!r} are not parallel: they "
                                 f"differ in length after line {number}")
        return
    for file in files:
        with open(file, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                where = f"{file}:{number}"
                if not line.strip():
                    continue
                if file.suffix.lower() == ".tsv":
                    columns = line.rstrip("\r\n").split("\t")
                    if len(columns) != 2:
                        raise ValueError(f"{where} has {len(columns)} tab-separated column(s); a pair is "
                                         "source<TAB>target (a missing target side?)")
                    yield _side(columns[0], where, "source"), _side(columns[1], where, "target")
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where} is not a JSON object: {e}") from e
                if not isinstance(record, dict):
                    raise ValueError(f"{where} is not a JSON object")
                yield (_side(record.get(source_field), where, "source", source_field),
                       _side(record.get(target_field), where, "target", target_field))


def _encode_pairs(files, parallel, tokenizer, source_field, target_field) -> list[np.ndarray]:
    """[ids, offsets]: pair i's source is ids[offsets[2i]:offsets[2i+1]], its target up to offsets[2i+2]."""
    target_ids = getattr(tokenizer, "target_ids", None) or (lambda t: tokenizer(text_target=t)["input_ids"])
    pieces, lengths = [], []
    pairs = _read_pairs(files, parallel, source_field, target_field)
    while group := [pair for _, pair in zip(range(_LINES_PER_CALL), pairs)]:
        sources = tokenizer([a for a, _ in group])["input_ids"]
        for src, (_, b) in zip(sources, group):
            tgt = target_ids(b)
            pieces += [np.asarray(src, dtype=np.int64), np.asarray(tgt, dtype=np.int64)]
            lengths += [len(src), len(tgt)]
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    ids = ids.astype(np.uint16 if ids.size == 0 or ids.max() < 2**16 else np.int32)
    return [ids, np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])]


def pair_stream(data, target_data, tokenizer, fingerprint: str, source_field: str = "source",
                target_field: str = "target", is_writer: bool = True,
                barrier: Callable[[], None] = lambda: None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, offsets) of the tokenised pairs of ``data`` (see the module docstring), cached next to the data
    and keyed by the tokenizer, the files and the fields; under torch.distributed rank 0 tokenises."""
    if not isinstance(data, (str, os.PathLike)) or not isinstance(target_data, (str, os.PathLike, type(None))):
        raise TypeError("translation data must be a path (and target_data a path or None)")
    files = pair_files(data, target_data)
    key = f"{fingerprint}|{source_field}|{target_field}|{_PAIR_FORMAT}|{target_data is not None}"
    cache = _cache_file(Path(data), files, key, "")
    caches = [cache, cache.with_name(cache.name.removesuffix(".npy") + ".offsets.npy")]
    ids, offsets = _cached(caches, lambda: _encode_pairs(files, target_data is not None, tokenizer, source_field,
                                                         target_field), is_writer, barrier)
    return ids, offsets


class PairCorpus:
    """Tokenised pairs (:func:`pair_stream`): those with a side over ``seq_len`` skipped, the last ``n_eval``
    held out, the rest visited per epoch in a length-grouped random order (see the module docstring)."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, seq_len: int, eval_sequences: int, seed: int,
                 block: int, source: str = "the corpus"):
        self.ids, self.offsets, self.seed, self.block = ids, np.asarray(offsets), seed, block
        n = (len(self.offsets) - 1) // 2
        if n == 0:
            raise ValueError(f"{source} is empty: it holds no source/target pairs")
        lengths = np.diff(self.offsets).reshape(n, 2)
        self.index = np.flatnonzero(lengths.max(axis=1) <= seq_len)
        if len(self.index) < n:
            warnings.warn(f"{source}: {n - len(self.index)} of {n} pairs have a side longer than seq_len={seq_len} "
                          "tokens and are skipped", stacklevel=3)
        if len(self.index) < 2:
            raise ValueError(f"{source} is too small: {len(self.index)} pair(s) fit seq_len={seq_len} (longest side "
                             f"{int(lengths.max())} tokens), and a run needs at least two (one held out); add pairs "
                             "or raise seq_len")
        self.lengths = lengths[self.index].max(axis=1)
        self.n_eval = min(eval_sequences, max(1, len(self.index) // 10))
        self.n_train = len(self.index) - self.n_eval
        self._epoch, self._order = -1, None

    def _pair(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b, c = self.offsets[2 * self.index[k]:2 * self.index[k] + 3]
        as_tensor = lambda x: torch.from_numpy(np.asarray(x, dtype=np.int64))  # noqa: E731
        return as_tensor(self.ids[a:b]), as_tensor(self.ids[b:c])

    def _epoch_order(self, epoch: int) -> np.ndarray:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n_train, generator=g).numpy()
        pool = self.block * _POOL_BLOCKS
        out = []
        for start in range(0, self.n_train, pool):
            chunk = order[start:start + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            blocks = [chunk[i:i + self.block] for i in range(0, len(chunk), self.block)]
            out += [blocks[i] for i in torch.randperm(len(blocks), generator=g).tolist()]
        return np.concatenate(out)

    def train_window(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (source, target) ids of training sample ``position`` (counted over the run)."""
        epoch, offset = divmod(position, self.n_train)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self._epoch_order(epoch)
        return self._pair(int(self._order[offset]))

    def eval_window(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._pair(self.n_train + k)


def _check_ids(ids: np.ndarray, name: str) -> np.ndarray:
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name}: token ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    if ids.size and ids.min() < 0:
        raise ValueError(f"{name}: token ids must be >= 0")
    return ids


# ----------------------------------------------------------------------------------------------------------
# Windows, order, batches
# ----------------------------------------------------------------------------------------------------------

class Corpus:
    """A token stream cut into windows of ``window`` tokens: the last ``n_eval`` held out, the rest shuffled
    per epoch (see the module docstring)."""

    def __init__(self, stream: np.ndarray, window: int, eval_sequences: int, seed: int, source: str = "the corpus"):
        self.stream, self.window, self.seed = stream, window, seed
        n = len(stream) // window
        if len(stream) == 0:
            raise ValueError(f"{source} is empty: tokenising it gave no tokens")
        if n < 2:
            raise ValueError(f"{source} is too small: {len(stream)} tokens give {n} window(s) of {window}, and a run "
                             "needs at least two (one held out for evaluation); add text or lower seq_len")
        self.n_eval = min(eval_sequences, max(1, n // 10))
        self.n_train = n - self.n_eval
        self._epoch, self._order = -1, None

    def _window(self, index: int) -> torch.Tensor:
        start = index * self.window
        return torch.from_numpy(np.asarray(self.stream[start:start + self.window], dtype=np.int64))

    def train_window(self, position: int) -> torch.Tensor:
        """The window of training sample ``position`` (counted over the run)."""
        epoch, offset = divmod(position, self.n_train)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.n_train, generator=g)
        return self._window(int(self._order[offset]))

    def eval_window(self, k: int) -> torch.Tensor:
        return self._window(self.n_train + k)


class _FixedLengthTask:
    """Tasks whose examples all have one length: a batch is the stacked examples."""

    @staticmethod
    def collate(examples) -> dict[str, torch.Tensor]:
        return collate(examples)

    @staticmethod
    def tokens(batch: dict[str, torch.Tensor]) -> int:
        """Tokens the model reads in ``batch`` (for tokens/s)."""
        return batch["input_ids"].numel()


class CausalLMTask(_FixedLengthTask):
    """``causal_lm`` / ``reversible_lm``: the window is the input and the label (the model shifts)."""

    def __init__(self, seq_len: int, **_):
        self.window = seq_len

    def example(self, window: torch.Tensor, sample_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return window, window

    @staticmethod
    def targets(labels: torch.Tensor) -> int:
        """Loss terms in a batch: HF's causal loss predicts positions 1.. of each row."""
        return int((labels[:, 1:] != -100).sum())



class MaskedLMTask(_FixedLengthTask):
    """``masked_lm``: ``<s> window </s>``, RoBERTa masking (``probability`` of the ordinary tokens: 80% become
    ``<mask>``, 10% a random id, 10% stay), labels -100 where nothing was chosen. Unlike HF's collator, at least
    one token of every sequence is chosen, so no micro-batch has a NaN (0/0) mean loss to back-propagate."""

    def __init__(self, seq_len: int, tokenizer, vocab_size: int, probability: float = 0.15, **_):
        if seq_len < 3:
            raise ValueError(f"seq_len must be >= 3 for a masked LM (<s> ... </s>), got {seq_len}")
        self.window = seq_len - 2
        self.probability, self.vocab_size = probability, vocab_size
        self.cls, self.sep, self.mask = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id
        if None in (self.cls, self.sep, self.mask):
            raise ValueError("a masked-LM tokenizer needs cls, sep and mask tokens")
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)

    def example(self, window: torch.Tensor, sample_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.cat([torch.tensor([self.cls]), window, torch.tensor([self.sep])])
        g = torch.Generator().manual_seed(sample_seed)
        chance = torch.full(ids.shape, self.probability).masked_fill(torch.isin(ids, self.special), 0.0)
        chosen = torch.bernoulli(chance, generator=g).bool()
        if not chosen.any():  # HF's collator may choose none; a sequence without loss terms has a 0/0 mean loss
            candidates = chance.nonzero().flatten()
            if len(candidates):
                chosen[candidates[torch.randint(len(candidates), (1,), generator=g)]] = True
        labels = ids.masked_fill(~chosen, -100)
        replaced = torch.bernoulli(torch.full(ids.shape, 0.8), generator=g).bool() & chosen
        randomised = torch.bernoulli(torch.full(ids.shape, 0.5), generator=g).bool() & chosen & ~replaced
        random_ids = torch.randint(self.vocab_size, ids.shape, generator=g)
        ids = ids.masked_fill(replaced, self.mask).where(~randomised, random_ids)
        return ids, labels

    @staticmethod
    def targets(labels: torch.Tensor) -> int:
        return int((labels != -100).sum())


class Seq2SeqTask:
    """``seq2seq``: a (source, target) pair of ids is the example; a batch pads the sources with ``<pad>`` and an
    attention mask, the labels (the target ids, ``</s>`` last) with -100 (the model shifts them right into its
    decoder input and masks the decoder's pads)."""

    def __init__(self, tokenizer, **_):
        self.pad = tokenizer.pad_token_id
        if self.pad is None:
            raise ValueError("a translation tokenizer needs a pad token")

    @staticmethod
    def example(pair, sample_seed: int):
        return pair

    def collate(self, examples) -> dict[str, torch.Tensor]:
        sources, targets = zip(*examples)
        pad = torch.nn.utils.rnn.pad_sequence
        input_ids = pad(list(sources), batch_first=True, padding_value=self.pad)
        mask = pad([torch.ones_like(s) for s in sources], batch_first=True, padding_value=0)
        return {"input_ids": input_ids, "attention_mask": mask,
                "labels": pad(list(targets), batch_first=True, padding_value=-100)}

    @staticmethod
    def targets(labels: torch.Tensor) -> int:
        return int((labels != -100).sum())

    @staticmethod
    def tokens(batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())


def make_task(kind: str, **kwargs):
    """The data task of a family's task kind (see tritonformers.training.families)."""
    if kind in ("causal_lm", "reversible_lm"):
        return CausalLMTask(**kwargs)
    if kind == "masked_lm":
        return MaskedLMTask(**kwargs)
    if kind == "seq2seq":
        return Seq2SeqTask(**kwargs)
    raise ValueError(f"task {kind!r} has no data pipeline yet")


def sample_seed(seed: int, position: int, held_out: bool = False) -> int:
    """The seed of one sample's random choices (masking): a function of the run seed and the position only."""
    return (seed * 0x9E3779B97F4A7C15 + 2 * position + int(held_out)) % (2**63 - 1)


def collate(examples: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    ids, labels = zip(*examples)
    return {"input_ids": torch.stack(ids), "labels": torch.stack(labels)}


def train_batch(corpus: Corpus, task, positions: range, seed: int) -> dict[str, torch.Tensor]:
    """The micro-batch of training samples at ``positions``."""
    return task.collate([task.example(corpus.train_window(p), sample_seed(seed, p)) for p in positions])


def eval_batches(corpus: Corpus, task, rank: int, world: int, batch_size: int, seed: int):
    """This rank's share of the held-out windows (``k = rank, rank + world, ...``), in batches."""
    mine = list(range(rank, corpus.n_eval, world))
    for i in range(0, len(mine), batch_size):
        ks = mine[i:i + batch_size]
        yield task.collate([task.example(corpus.eval_window(k), sample_seed(seed, k, held_out=True)) for k in ks])


__all__ = ["ByteTokenizer", "load_tokenizer", "has_tokenizer_files", "tokenizer_fingerprint", "data_files",
           "token_stream", "Corpus", "pair_files", "pair_stream", "PairCorpus", "CausalLMTask", "MaskedLMTask",
           "Seq2SeqTask", "make_task", "sample_seed", "train_batch", "eval_batches"]

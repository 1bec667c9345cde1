"""Text generation shared by the model families: a static KV cache, decoding sessions, and greedy search,
sampling and beam search with the semantics of transformers 5's ``generate`` (``GenerationMixin.generate``,
``_sample`` and ``_beam_search`` in ``transformers/generation/utils.py``; the logits processors of
``transformers/generation/logits_process.py``).

How a family plugs in
---------------------
A generative head mixes in :class:`GenerationMixin` (before its ``PreTrainedMixin`` base) and provides a
:class:`DecodeSession` through ``generation_session(input_ids, attention_mask, num_copies, use_cuda_graph,
**model_kwargs)``. A session owns the model state of one ``generate`` call and has three operations:

* ``prefill(max_length)`` -> logits [N, V] of the token after the prompt (N = batch x copies);
* ``step(tokens [N])`` -> logits [N, V] after appending one token to every row;
* ``reorder(index [N])`` -> row i continues old row ``index[i]`` (beam search).

``session.prompt`` [N, P] holds the ids the output rows start with (the prompt for decoders, the decoder
start token for encoder-decoders) and ``session.prompt_mask`` its padding mask (or None).

Decoder-only models with a key/value cache need not write a session: the default one,
:class:`CachedDecoderSession`, needs two methods of the model:

* ``new_cache(batch_size, capacity) -> KVCache`` (:class:`KVCache`, preallocated);
* ``decode_logits(input_ids [N, T], attention_mask [N, T or capacity], cache) -> logits [N, V]`` of the
  last position: runs the layers after the session called ``cache.prepare(T)`` (it must not call
  ``prepare``/``commit`` itself), without host synchronisation, so that on CUDA the one-token step can be
  captured in a CUDA graph (the mask is then the full-capacity buffer, 1 = a real token, 0 beyond).

Encoder-decoders (FSMT) and models with their own state (Reformer's bucket cache) implement a
:class:`DecodeSession` subclass. Everything else (defaults from the config and ``generation_config.json``,
padding and mask inference, expansion for beams, logits processors, the search loops, finalisation and
padding of beam outputs) is shared here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import runtime
from .outputs import ModelOutput

__all__ = [
    "ModelOutput", "GenerateOutput", "KVCache", "GenerationConfig", "DecodeSession", "CachedDecoderSession",
    "GenerationMixin", "generate", "process_scores", "GENERATION_DEFAULTS",
]

GENERATION_CONFIG_NAME = "generation_config.json"


# ----------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class GenerateOutput(ModelOutput):
    """What ``generate(..., return_dict_in_generate=True)`` returns.

    ``sequences`` [N, L] int64 as the plain return; ``sequences_scores`` [N] float32 the length-normalised
    beam scores (beam search only; transformers fills it only with ``output_scores=True``, here it is always
    given); ``scores`` the processed float32 scores [N, V] of each step when ``output_scores``;
    ``cache`` the session's cache (``past_key_values``, its pre-5.25 name, also reads it).
    """

    sequences: torch.Tensor = None
    sequences_scores: torch.Tensor | None = None
    scores: tuple | None = None
    cache: Any = None


# ----------------------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------------------

_INDEX_SLOTS = 16  # new tokens per step whose write positions live in a persistent buffer (graph replay)


class KVCache:
    """A static key/value cache: per layer ``key_cache[i]`` / ``value_cache[i]`` [B, H, capacity, D],
    zero-filled, of which the first ``length`` positions are valid (the same for every row: padding is
    carried by the attention mask, as in transformers).

    One forward step of T new tokens is ``prepare(T)`` (reserve room, set the device-side write positions
    and ``lens`` = length + T), then each layer's ``write(layer_idx, k, v)``, then ``commit(T)``. The
    device tensors ``lens`` [B] int32 and the write positions are updated in place, so a step captured in a
    CUDA graph replays correctly after ``prepare``. ``reorder_cache(index)`` (beam search) permutes the rows
    in place. A ``growable`` cache (the default for HF-style ``use_cache=True`` calls) reallocates to twice
    its size when full; one made for ``generate`` is sized once and never moves.

    HF-like accessors: ``get_seq_length()``, ``get_max_length()``, ``len(cache)`` (layers), ``cache[i]``
    = (keys, values) [B, H, length, D] views.
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, head_dim: int, capacity: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 growable: bool = True):
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("num_heads", num_heads),
                            ("head_dim", head_dim), ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        device = torch.device("cpu" if device is None else device)
        shape = (batch_size, num_heads, capacity, head_dim)
        self.key_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.value_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.growable = growable
        self.length = 0
        self.lens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self._arange = torch.arange(_INDEX_SLOTS, dtype=torch.long, device=device)
        self._index_buf = torch.zeros(_INDEX_SLOTS, dtype=torch.long, device=device)
        self._index: torch.Tensor | None = None
        self._pending = 0

    @property
    def capacity(self) -> int:
        return self.key_cache[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.key_cache[0].shape[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def __len__(self) -> int:
        return len(self.key_cache)

    def __getitem__(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.length
        return self.key_cache[layer_idx][:, :, :n], self.value_cache[layer_idx][:, :, :n]

    def prepare(self, n: int) -> None:
        """Open a step of ``n`` new tokens: grow if needed, set the write positions and ``lens``."""
        if n <= 0:
            raise ValueError(f"a cache step needs at least one new token, got {n}")
        if self.length + n > self.capacity:
            if not self.growable:
                raise ValueError(f"the cache holds {self.capacity} positions; {self.length} are used and "
                                 f"{n} more were asked for")
            self._grow(max(self.length + n, 2 * self.capacity))
        if n <= _INDEX_SLOTS:
            self._index = self._index_buf[:n]
            torch.add(self._arange[:n], self.length, out=self._index)
        else:
            self._index = torch.arange(self.length, self.length + n, device=self.lens.device)
        self.lens.fill_(self.length + n)
        self._pending = n

    def write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one layer's new keys/values [B, H, n, D] at the positions ``prepare(n)`` opened."""
        if self._index is None or k.shape[2] != self._pending:
            raise RuntimeError(f"KVCache.write of {k.shape[2]} tokens without a matching prepare() "
                               f"(prepared {self._pending})")
        with torch.no_grad():
            self.key_cache[layer_idx].index_copy_(2, self._index, k.to(self.key_cache[layer_idx].dtype))
            self.value_cache[layer_idx].index_copy_(2, self._index, v.to(self.value_cache[layer_idx].dtype))

    def commit(self, n: int) -> None:
        """Close the step: the ``n`` new positions become part of the past."""
        self.length += n
        self._pending = 0

    def rewind(self, n: int) -> None:
        """Forget the last ``n`` committed positions (their slots are rewritten by later steps)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot rewind {n} of the cache's {self.length} positions")
        self.length -= n
        self.lens.fill_(self.length)

    def reorder_cache(self, index: torch.Tensor) -> None:
        """Row i takes old row ``index[i]``, in place (the buffers keep their addresses)."""
        index = index.to(self.lens.device)
        with torch.no_grad():
            for t in (*self.key_cache, *self.value_cache):
                t.copy_(t.index_select(0, index))

    def _grow(self, capacity: int) -> None:
        n = self.length
        for caches in (self.key_cache, self.value_cache):
            for i, old in enumerate(caches):
                new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
                new[:, :, :n] = old[:, :, :n]
                caches[i] = new

    def __repr__(self) -> str:
        k = self.key_cache[0]
        return (f"KVCache(layers={len(self)}, batch={k.shape[0]}, heads={k.shape[1]}, head_dim={k.shape[3]}, "
                f"length={self.length}, capacity={self.capacity}, dtype={k.dtype})")


# ----------------------------------------------------------------------------------------------------------
# Generation config
# ----------------------------------------------------------------------------------------------------------

# transformers' global defaults (GenerationConfig._get_default_generation_params), for fields not set by the
# user, the passed generation config or the model's one. max_length 20 counts new tokens when it is only
# this default (transformers 5 adds the prompt length then).
GENERATION_DEFAULTS: dict[str, Any] = {
    "max_length": 20, "max_new_tokens": None, "min_length": 0, "min_new_tokens": None,
    "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "temperature": 1.0, "top_k": 50,
    "top_p": 1.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "length_penalty": 1.0,
    "early_stopping": False, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    "decoder_start_token_id": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "use_cache": True, "return_dict_in_generate": False, "output_scores": False, "bad_words_ids": None,
}


class GenerationConfig:
    """Generation parameters by transformers' names (:data:`GENERATION_DEFAULTS`); None = not set.

    ``GenerationConfig(**fields)``, :meth:`from_pretrained` (a directory's ``generation_config.json``),
    :meth:`from_model_config` (the generation fields a model config carries: special tokens, and for FSMT
    ``num_beams``, ``max_length``, ...), :meth:`save_pretrained`, :meth:`to_dict`. Unknown keys of a file
    are kept and written back.
    """

    def __init__(self, **kwargs: Any):
        self._fields: dict[str, Any] = {}
        for key, value in kwargs.items():
            self._fields[key] = value

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        if key in self._fields:
            return self._fields[key]
        if key in GENERATION_DEFAULTS:
            return None
        raise AttributeError(f"GenerationConfig has no field {key!r}")

    def __setattr__(self, key: str, value: Any) -> None:
        if key.startswith("_"):
            super().__setattr__(key, value)
        else:
            self._fields[key] = value

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._fields)

    def is_set(self, key: str) -> bool:
        return self._fields.get(key) is not None

    @classmethod
    def from_model_config(cls, config: Any) -> "GenerationConfig":
        """The generation fields of a model config that are set (not None)."""
        d = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
        return cls(**{k: v for k, v in d.items() if k in GENERATION_DEFAULTS and v is not None
                      and k not in ("use_cache", "return_dict_in_generate", "output_scores")},
                   _from_model_config=True)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "GenerationConfig":
        file = Path(path) / GENERATION_CONFIG_NAME
        if not file.is_file():
            raise FileNotFoundError(f"no {GENERATION_CONFIG_NAME} in {str(path)!r}")
        with open(file, encoding="utf-8") as f:
            d = json.load(f)
        if not isinstance(d, dict):
            raise ValueError(f"{str(file)!r} does not hold a JSON object")
        d.pop("transformers_version", None)
        return cls(**d)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        file = d / GENERATION_CONFIG_NAME
        with open(file, "w", encoding="utf-8") as f:
            f.write(json.dumps({k: v for k, v in self._fields.items() if v is not None}, indent=2,
                               sort_keys=True) + "\n")
        return file

    def __repr__(self) -> str:
        return f"GenerationConfig {json.dumps(self._fields, sort_keys=True, default=str)}"


def load_generation_config(path: str | os.PathLike, model_config: Any) -> GenerationConfig:
    """transformers' rule: ``generation_config.json`` when the directory has one, else the model config's."""
    if (Path(path) / GENERATION_CONFIG_NAME).is_file():
        return GenerationConfig.from_pretrained(path)
    return GenerationConfig.from_model_config(model_config)


# ----------------------------------------------------------------------------------------------------------
# Sessions
# ----------------------------------------------------------------------------------------------------------

class DecodeSession:
    """The model side of one ``generate`` call (see the module docstring). Subclasses set ``prompt``
    [N, P] int64 and ``prompt_mask`` ([N, P] or None) and implement the three operations."""

    prompt: torch.Tensor
    prompt_mask: torch.Tensor | None = None
    cache: Any = None

    def prefill(self, max_length: int) -> torch.Tensor:
        raise NotImplementedError

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reorder(self, index: torch.Tensor) -> None:
        raise NotImplementedError

    #: whether :meth:`rewind` can undo steps (lets greedy search read its stop flag a few steps late)
    can_rewind = False

    def rewind(self, n: int) -> None:
        """Undo the last ``n`` ``step`` calls (greedy search ran them past the stop it had not read yet)."""
        raise NotImplementedError


class CachedDecoderSession(DecodeSession):
    """The session of a decoder-only model with a :class:`KVCache` (protocol in the module docstring).

    The 2-D attention mask lives in a [N, capacity] buffer that gains a 1 per step (finished rows too, as
    transformers' running mask). On CUDA (``use_cuda_graph`` None = when the model says
    ``supports_cuda_graph`` and runs compiled kernels) the first decode step runs eagerly as the warm-up, the
    second captures the one-token forward into a CUDA graph, and every later step only refreshes the token
    and mask buffers and the cache's write positions, then replays it.
    """

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 use_cuda_graph: bool | None = None):
        self.model = model
        self.prompt = input_ids
        self.prompt_mask = attention_mask
        if use_cuda_graph is None:
            use_cuda_graph = bool(getattr(model, "supports_cuda_graph", False)) and runtime.on_gpu(input_ids)
        if use_cuda_graph and not input_ids.is_cuda:
            raise ValueError("use_cuda_graph=True needs the model and inputs on a CUDA device")
        self.use_cuda_graph = use_cuda_graph
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None
        self._graph = None
        self._eager_steps = 0

    def prefill(self, max_length: int) -> torch.Tensor:
        N, P = self.prompt.shape
        capacity = max(max_length - 1, P)  # the last generated token is never fed back
        self.cache = self.model.new_cache(N, capacity)
        self.mask = torch.zeros(N, capacity, dtype=torch.long, device=self.prompt.device)
        self.mask[:, :P] = self.prompt_mask
        self.cache.prepare(P)
        logits = self.model.decode_logits(self.prompt, self.mask[:, :P], self.cache)
        self.cache.commit(P)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask[:, self.cache.length] = 1
        tokens = tokens.view(-1, 1)
        if self._graph is not None:
            return self._replay(tokens)
        if self.use_cuda_graph and self._eager_steps >= 1:
            self._capture(tokens)
            return self._replay(tokens)
        self._eager_steps += 1
        self.cache.prepare(1)
        if self.use_cuda_graph:  # the warm-up step runs on a side stream, as torch.cuda.graphs wants
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self.model.decode_logits(tokens, self.mask, self.cache)
            torch.cuda.current_stream().wait_stream(side)
        else:
            logits = self.model.decode_logits(tokens, self.mask, self.cache)
        self.cache.commit(1)
        return logits

    def _capture(self, tokens: torch.Tensor) -> None:
        self._tokens = tokens.clone()
        self.cache.prepare(1)  # the positions buffer the graph reads; refreshed in place before each replay
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = self.model.decode_logits(self._tokens, self.mask, self.cache)
        self._graph = graph

    def _replay(self, tokens: torch.Tensor) -> torch.Tensor:
        self._tokens.copy_(tokens)
        self.cache.prepare(1)
        self._graph.replay()
        self.cache.commit(1)
        return self._logits.clone()

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder_cache(index)
        self.mask.copy_(self.mask.index_select(0, index.to(self.mask.device)))

    can_rewind = True

    def rewind(self, n: int) -> None:
        if n:
            self.cache.rewind(n)
            self.mask[:, self.cache.length:self.cache.length + n] = 0


# ----------------------------------------------------------------------------------------------------------
# Logits processors (transformers' order and formulas)
# ----------------------------------------------------------------------------------------------------------

def process_scores(cfg: dict, input_ids: torch.Tensor, scores: torch.Tensor, *, prompt_len: int,
                   eos: torch.Tensor | None, prompt_pads: torch.Tensor | None, warp: bool,
                   min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Apply transformers' logits processors to float32 ``scores`` [N, V] given the sequences so far
    ``input_ids`` [N, L]: repetition penalty (prompt pads ignored), no-repeat n-grams, bad words, min length, min new
    tokens, forced BOS at length 1, forced EOS at ``max_length - 1``; then, when ``warp`` (sampling),
    temperature, top-k and top-p."""
    L = input_ids.shape[1]
    if cfg["repetition_penalty"] != 1.0:
        scores = _repetition_penalty(input_ids, scores, cfg["repetition_penalty"], prompt_pads)
    if cfg["no_repeat_ngram_size"] and cfg["no_repeat_ngram_size"] > 0:
        scores = _no_repeat_ngram(input_ids, scores, cfg["no_repeat_ngram_size"])
    if cfg["bad_words_ids"]:
        scores = _bad_words(input_ids, scores, cfg["bad_words_ids"], eos)
    if eos is not None and cfg["min_length"] and cfg["min_length"] > 0 and L < cfg["min_length"]:
        scores = scores.index_fill(1, eos, -math.inf)
    if eos is not None and cfg["min_new_tokens"] and L - prompt_len < cfg["min_new_tokens"]:
        scores = scores.index_fill(1, eos, -math.inf)
    if cfg["forced_bos_token_id"] is not None and L == 1:
        scores = torch.full_like(scores, -math.inf)
        scores[:, cfg["forced_bos_token_id"]] = 0
    if cfg["forced_eos_token_id"] is not None and L == cfg["max_length"] - 1:
        scores = torch.full_like(scores, -math.inf)
        scores[:, cfg["forced_eos_token_id"]] = 0
    if warp:
        scores = _warp(cfg, scores, min_tokens_to_keep)
    return scores


def _repetition_penalty(input_ids, scores, penalty: float, prompt_pads):
    V = scores.shape[-1]
    if prompt_pads is not None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        input_ids = input_ids.masked_fill(positions[None, :] < prompt_pads[:, None], V)
    input_ids = input_ids.clamp(max=V)
    padded = F.pad(scores, (0, 1))
    score = torch.gather(padded, 1, input_ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return padded.scatter(1, input_ids, score)[..., :V]


def _no_repeat_ngram(input_ids, scores, n: int):
    L = input_ids.shape[1]
    if L < n:
        return scores
    prefix = input_ids[:, L + 1 - n:]
    windows = input_ids.unfold(dimension=1, size=n, step=1)
    matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)
    V = scores.shape[-1]
    banned = scores.new_zeros((scores.shape[0], V + 1), dtype=torch.bool)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=V), V), True)
    return scores.masked_fill(banned[:, :V], -math.inf)


def _bad_words(input_ids, scores, bad_words: list, eos):
    """transformers' NoBadWordsLogitsProcessor: a one-token entry is banned always (an entry that is just an
    eos id is dropped); a longer one bans its last token where the sequence ends with the rest."""
    eos_ids = set() if eos is None else set(eos.tolist())
    if any(t >= scores.shape[-1] for seq in bad_words for t in seq):
        raise ValueError(f"bad_words_ids holds ids beyond the vocabulary ({scores.shape[-1]} tokens)")
    banned = torch.zeros_like(scores, dtype=torch.bool)
    L = input_ids.shape[1]
    for seq in bad_words:
        if len(seq) == 1 and seq[0] not in eos_ids:
            banned[:, seq[0]] = True
        elif 1 < len(seq) <= L + 1:
            prefix = torch.tensor(seq[:-1], dtype=input_ids.dtype, device=input_ids.device)
            banned[:, seq[-1]] |= (input_ids[:, L + 1 - len(seq):] == prefix).all(dim=1)
    return scores.masked_fill(banned, -math.inf)


def _warp(cfg: dict, scores: torch.Tensor, keep: int) -> torch.Tensor:
    if cfg["temperature"] is not None and cfg["temperature"] != 1.0:
        scores = scores / cfg["temperature"]
    top_k = cfg["top_k"]
    if top_k is not None and top_k != 0:
        k = min(max(top_k, keep), scores.shape[-1])
        scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], -math.inf)
    top_p = cfg["top_p"]
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -keep:] = 0
        scores = scores.masked_fill(remove.scatter(1, sorted_indices, remove), -math.inf)
    return scores


# ----------------------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------------------

def _resolve(model, generation_config: GenerationConfig | None, kwargs: dict) -> tuple[dict, dict, bool]:
    """(settings, model kwargs, whether max_length is only the global default)."""
    model_gc = getattr(model, "generation_config", None) or GenerationConfig()
    given = generation_config.to_dict() if generation_config is not None else {}
    user = {k: v for k, v in kwargs.items() if k in GENERATION_DEFAULTS}
    model_kwargs = {k: v for k, v in kwargs.items() if k not in GENERATION_DEFAULTS}
    cfg = dict(GENERATION_DEFAULTS)
    for layer in (model_gc.to_dict(), given):
        cfg.update({k: v for k, v in layer.items() if k in GENERATION_DEFAULTS and v is not None})
    # an explicit None from the caller unsets a field whose default is None (pad_token_id=None: pad = eos)
    cfg.update({k: v for k, v in user.items() if v is not None or GENERATION_DEFAULTS[k] is None})
    default_max = all(layer.get("max_length") is None for layer in (model_gc.to_dict(), given, user))
    return cfg, model_kwargs, default_max


def _validate(cfg: dict) -> None:
    for key in ("num_beams", "num_return_sequences"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"{key} must be a positive int, got {cfg[key]!r}")
    if cfg["max_new_tokens"] is not None and cfg["max_new_tokens"] < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {cfg['max_new_tokens']!r}")
    if cfg["early_stopping"] not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {cfg['early_stopping']!r}")
    if cfg["num_beams"] == 1 and not cfg["do_sample"] and cfg["num_return_sequences"] != 1:
        raise ValueError("greedy search returns one sequence per input: num_return_sequences must be 1 "
                         "(use do_sample=True or num_beams > 1)")
    if cfg["num_beams"] > 1 and cfg["num_return_sequences"] > cfg["num_beams"]:
        raise ValueError(f"num_return_sequences ({cfg['num_return_sequences']}) must be at most num_beams "
                         f"({cfg['num_beams']})")
    if cfg["do_sample"]:
        if not (isinstance(cfg["temperature"], (int, float)) and cfg["temperature"] > 0):
            raise ValueError(f"temperature must be a positive number, got {cfg['temperature']!r}")
        if cfg["top_p"] is not None and not 0.0 <= cfg["top_p"] <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {cfg['top_p']!r}")
        if cfg["top_k"] is not None and (not isinstance(cfg["top_k"], int) or cfg["top_k"] < 0):
            raise ValueError(f"top_k must be a non-negative int, got {cfg['top_k']!r}")
    bad = cfg["bad_words_ids"]
    if bad is not None and not (isinstance(bad, (list, tuple)) and bad and all(
            isinstance(seq, (list, tuple)) and seq and all(isinstance(t, int) and t >= 0 for t in seq) for seq in bad)):
        raise ValueError(f"bad_words_ids must be a non-empty list of non-empty lists of token ids, got {bad!r}")
    if not cfg["repetition_penalty"] > 0:
        raise ValueError(f"repetition_penalty must be positive, got {cfg['repetition_penalty']!r}")


def _special_tokens(cfg: dict, device) -> tuple[torch.Tensor | None, int | None]:
    eos = cfg["eos_token_id"]
    if eos is not None:
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long, device=device)
    pad = cfg["pad_token_id"]
    if pad is None and eos is not None:
        pad = int(eos[0])
    return eos, pad


def _infer_mask(input_ids: torch.Tensor, eos: torch.Tensor | None, pad: int | None) -> torch.Tensor:
    """transformers' rule: ``input_ids != pad`` when pad occurs in the inputs and is not an eos id, else ones."""
    ones = torch.ones_like(input_ids)
    if pad is None:
        return ones
    pad_in_inputs = bool((input_ids == pad).any())
    pad_is_eos = eos is not None and bool((eos == pad).any())
    return input_ids.ne(pad).long() if pad_in_inputs and not pad_is_eos else ones


def _input_vocab_size(model) -> int | None:
    """The number of ids the model embeds: its input embedding's rows (the encoder's for encoder-decoders,
    as HF's ``get_input_embeddings``), else ``config.vocab_size``; None when the model names neither."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if embedding is not None and hasattr(embedding, "num_embeddings"):
        return int(embedding.num_embeddings)
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if isinstance(size, int) else None


def _check_prompt_ids(model, input_ids: torch.Tensor) -> None:
    """Reject an empty prompt and ids outside the vocabulary before anything runs (an embedding lookup
    would fail with a bare ``IndexError``, or on CUDA with a device-side assert)."""
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {list(input_ids.shape)}): generate needs at least one row "
                         "of at least one prompt token (input_ids=None starts from bos_token_id)")
    vocab = _input_vocab_size(model)
    if vocab is None:
        return
    lo, hi = (int(v) for v in torch.aminmax(input_ids))
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        row = int(((input_ids == bad).any(dim=1)).nonzero()[0])
        raise ValueError(f"input_ids holds token id {bad} (row {row}), outside the vocabulary of "
                         f"{type(model).__name__}: ids must be in [0, {vocab - 1}] (vocabulary size {vocab})")


def _warn_right_padding(model, attention_mask: torch.Tensor) -> None:
    """transformers' warning when a decoder-only model gets right-padded prompts: the continuation of a row
    whose mask ends in 0 starts after its pads, so it is wrong. (transformers checks batches of two or more
    rows; a single right-padded row is just as wrong, so any row is checked here.)"""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):  # input_ids are the encoder's: any padding side works
        return
    if bool((attention_mask[:, -1] == 0).any()):
        warnings.warn("A decoder-only model got right-padded input_ids (attention_mask ends in 0 in some rows): "
                      "their continuations would follow the pads and be wrong. Pad on the left: "
                      "tokenizer(texts, padding=True, padding_side='left')", UserWarning, stacklevel=4)


def generate(model, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             generation_config: GenerationConfig | None = None, *, generator: torch.Generator | None = None,
             use_cuda_graph: bool | None = None, **kwargs: Any):
    """Generate continuations as ``transformers``' ``model.generate`` does (greedy, sampling, beam search,
    beam sampling). Settings come from ``kwargs`` (HF's names: ``max_new_tokens``, ``max_length``,
    ``min_length``, ``min_new_tokens``, ``do_sample``, ``num_beams``, ``num_return_sequences``,
    ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``no_repeat_ngram_size``, ``bad_words_ids``,
    ``length_penalty``, ``early_stopping``, ``eos_token_id`` (int or list), ``pad_token_id``,
    ``bos_token_id``, ``forced_bos_token_id``, ``forced_eos_token_id``, ``return_dict_in_generate``,
    ``output_scores``), then ``generation_config``, then ``model.generation_config`` (the checkpoint's
    ``generation_config.json`` or its config), then transformers' global defaults. Other kwargs go to the
    model's session (FSMT's encoder inputs, say).

    input_ids [B, P] with P >= 1 and ids inside the model's input vocabulary (else ValueError naming the id;
    None: one row holding bos); attention_mask [B, P] (1 = real, left padding for decoder-only models: a row
    whose mask ends in 0 warns, as in transformers), inferred from pad as transformers does when None.
    Sampling draws from
    ``generator`` (default: torch's global generator, so ``torch.manual_seed`` reproduces transformers'
    draws). ``use_cuda_graph``: None = automatic on CUDA (see :class:`CachedDecoderSession`).

    Returns the LongTensor of sequences [B * num_return_sequences, L], or a :class:`GenerateOutput` with
    ``return_dict_in_generate=True``.
    """
    cfg, model_kwargs, default_max = _resolve(model, generation_config, kwargs)
    _validate(cfg)
    device = model.device
    if input_ids is None:
        if cfg["bos_token_id"] is None:
            raise ValueError("input_ids is None and no bos_token_id is set to start from")
        input_ids = torch.full((1, 1), cfg["bos_token_id"], dtype=torch.long, device=device)
    runtime.check_tensor(input_ids, "input_ids", dtypes=(torch.int64, torch.int32), ndim=2)
    input_ids = input_ids.to(device=device, dtype=torch.long)
    _check_prompt_ids(model, input_ids)
    eos, pad = _special_tokens(cfg, device)
    if attention_mask is None:
        attention_mask = _infer_mask(input_ids, eos, pad)
    runtime.check_tensor(attention_mask, "attention_mask", dtypes=None, ndim=2)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {list(input_ids.shape)}, "
                         f"got {list(attention_mask.shape)}")
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    _warn_right_padding(model, attention_mask)

    copies = max(cfg["num_beams"], cfg["num_return_sequences"])
    with torch.no_grad():
        session = model.generation_session(input_ids, attention_mask, num_copies=copies,
                                           use_cuda_graph=use_cuda_graph, **model_kwargs)
        P = session.prompt.shape[1]
        cfg["max_length"] = _max_length(cfg, P, default_max)
        if cfg["min_new_tokens"] is not None:
            cfg["min_length"] = cfg["min_new_tokens"] + P
        if cfg["num_beams"] > 1:
            out = _beam_search(session, cfg, eos, pad, generator)
        else:
            out = _sample(session, cfg, eos, pad, generator)
    if not cfg["return_dict_in_generate"]:
        return out.sequences
    out.cache = session.cache
    return out


def _max_length(cfg: dict, prompt_len: int, default_max: bool) -> int:
    if cfg["max_new_tokens"] is not None:
        max_length = prompt_len + cfg["max_new_tokens"]
    elif default_max:
        warnings.warn(f"no max_length or max_new_tokens given: generating up to {cfg['max_length']} new tokens "
                      "(transformers' default)", UserWarning, stacklevel=3)
        max_length = cfg["max_length"] + prompt_len
    else:
        max_length = cfg["max_length"]
    if prompt_len >= max_length:
        raise ValueError(f"the prompt holds {prompt_len} tokens but max_length is {max_length}; raise "
                         "max_length or set max_new_tokens")
    return max_length


def _prompt_pads(session: DecodeSession) -> torch.Tensor | None:
    mask = session.prompt_mask
    return None if mask is None else (mask != 0).int().argmax(dim=1)


def _stopped(seqs: torch.Tensor, eos: torch.Tensor | None, max_length: int) -> torch.Tensor:
    """transformers' stopping criteria per row: max length reached, or the last token is an eos id."""
    done = torch.full((seqs.shape[0],), seqs.shape[1] >= max_length, dtype=torch.bool, device=seqs.device)
    if eos is not None:
        done = done | torch.isin(seqs[:, -1], eos)
    return done


#: steps the greedy loop may run past a stop before it reads the flag (see :func:`_stop_check_lag`)
STOP_CHECK_LAG = 2


def _stop_check_lag(session: DecodeSession, cfg: dict) -> int:
    """How many steps greedy search reads its "any row unfinished" flag late. Reading it at once
    synchronises every step: on CUDA the GPU then idles while the host prepares the next step. Read
    ``STOP_CHECK_LAG`` steps late, the host waits only for an older step and the GPU keeps the newer ones
    queued; the steps run past the stop are cut from the output and rewound from the cache. Greedy only
    (extra sampling steps would draw extra random numbers) and on CUDA only (on the CPU reading is free)."""
    if cfg["do_sample"] or not session.can_rewind or not session.prompt.is_cuda:
        return 0
    return STOP_CHECK_LAG


def _read_stop(flags: list, keep: int) -> int | None:
    """Read the oldest (length, any-unfinished) flags until ``keep`` remain unread; the sequence length at
    which every row had finished, or None."""
    while len(flags) > keep:
        length, alive = flags.pop(0)
        if not bool(alive):
            flags.clear()
            return length
    return None


def _sample(session: DecodeSession, cfg: dict, eos, pad, generator) -> GenerateOutput:
    """Greedy search (argmax, first index on ties) or multinomial sampling; finished rows get pad. Rows stop
    at an eos id (transformers' stopping criteria) or all at ``max_length``."""
    seqs = session.prompt
    P = seqs.shape[1]
    pads = _prompt_pads(session) if cfg["repetition_penalty"] != 1.0 else None
    unfinished = torch.ones(seqs.shape[0], dtype=torch.bool, device=seqs.device)
    all_scores = [] if cfg["output_scores"] else None
    lag, flags = _stop_check_lag(session, cfg), []
    logits = session.prefill(cfg["max_length"])
    while True:
        scores = process_scores(cfg, seqs, logits.float(), prompt_len=P, eos=eos, prompt_pads=pads,
                                warp=cfg["do_sample"])
        if all_scores is not None:
            all_scores.append(scores)
        if cfg["do_sample"]:
            tokens = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1, generator=generator).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        if eos is not None:
            tokens = torch.where(unfinished, tokens, pad)
            unfinished = unfinished & ~torch.isin(tokens, eos)
        seqs = torch.cat([seqs, tokens[:, None]], dim=-1)
        at_max = seqs.shape[1] >= cfg["max_length"]
        if eos is not None:
            flags.append((seqs.shape[1], unfinished.any()))
            stop = _read_stop(flags, 0 if at_max else lag)
            if stop is not None:
                session.rewind(seqs.shape[1] - stop)  # the steps fed tokens at lengths stop .. now - 1
                seqs = seqs[:, :stop]
                all_scores = all_scores[:stop - P] if all_scores is not None else None
                break
        if at_max:
            break
        logits = session.step(tokens)
    return GenerateOutput(sequences=seqs, scores=tuple(all_scores) if all_scores is not None else None)


def _gather_beams(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


class _BeamState:
    """transformers' vectorised beam-search state: running and finished beams per batch item."""

    def __init__(self, prompt: torch.Tensor, B: int, N: int, max_length: int, fill: int):
        P = prompt.shape[1]
        dev = prompt.device
        self.running = torch.full((B, N, max_length), fill, dtype=torch.long, device=dev)
        self.running[:, :, :P] = prompt.view(B, N, P)
        self.sequences = self.running.clone()
        self.running_scores = torch.zeros(B, N, dtype=torch.float32, device=dev)
        self.running_scores[:, 1:] = -1e9
        self.scores = torch.full((B, N), -1e9, dtype=torch.float32, device=dev)
        self.finished = torch.zeros(B, N, dtype=torch.bool, device=dev)
        self.improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
        self.hits = torch.zeros(B, N, dtype=torch.bool, device=dev)
        self.running_indices = torch.full((B, N, max_length - P), -1, dtype=torch.int32, device=dev)
        self.indices = self.running_indices.clone()


def _beam_search(session: DecodeSession, cfg: dict, eos, pad, generator) -> GenerateOutput:
    """transformers 5's beam search (``_beam_search``), step for step; with ``do_sample`` beam sampling."""
    prompt = session.prompt
    BN, P = prompt.shape
    N = cfg["num_beams"]
    B = BN // N
    max_length, lp, early = cfg["max_length"], cfg["length_penalty"], cfg["early_stopping"]
    n_eos = eos.shape[0] if eos is not None else 0
    K = max(2, 1 + n_eos) * N
    top_n_mask = torch.cat([torch.ones(N, dtype=torch.bool), torch.zeros(K - N, dtype=torch.bool)]).to(prompt.device)
    fill = (pad if pad else int(eos[0])) if eos is not None else -1
    st = _BeamState(prompt, B, N, max_length, fill)
    pads = _prompt_pads(session) if cfg["repetition_penalty"] != 1.0 else None
    keep = (n_eos + 1) if eos is not None else 2
    all_scores = [] if cfg["output_scores"] else None
    cur_len = P
    flat = prompt
    logits = session.prefill(max_length)
    while True:
        log_probs = F.log_softmax(logits.float(), dim=-1)
        log_probs = process_scores(cfg, flat, log_probs, prompt_len=P, eos=eos, prompt_pads=pads,
                                   warp=cfg["do_sample"], min_tokens_to_keep=keep)
        if all_scores is not None:
            all_scores.append(log_probs)
        V = log_probs.shape[-1]
        acc = (log_probs.view(B, N, V) + st.running_scores[:, :, None]).view(B, N * V)
        topk_lp, topk_seqs, topk_idx = _top_k_continuations(st, acc, cur_len, P, K, N, B, V,
                                                            cfg["do_sample"], generator)
        st.hits = _stopped(topk_seqs[:, :, :cur_len + 1].reshape(B * K, cur_len + 1), eos, max_length).view(B, K)
        _next_running(st, topk_lp, topk_seqs, topk_idx, N)
        _update_finished(st, topk_lp, topk_seqs, topk_idx, top_n_mask, N, cur_len, P, lp, early)
        session.reorder(st.running_indices[..., cur_len - P].reshape(-1).long())
        cur_len += 1
        st.improvable = _early_stop_heuristic(st, cur_len, max_length, P, early, lp)
        going = bool(st.improvable.any()) and not (bool(st.finished.all()) and early is True) \
            and not bool(st.hits.all())
        if not going:
            break
        flat = st.running[:, :, :cur_len].reshape(BN, cur_len)
        logits = session.step(flat[:, -1])
    return _finalise_beams(st, cfg["num_return_sequences"], P, all_scores)


def _top_k_continuations(st: _BeamState, acc, cur_len, P, K, N, B, V, do_sample, generator):
    if do_sample:
        idx = torch.multinomial(F.softmax(acc, dim=-1), num_samples=K, generator=generator)
        topk_lp = torch.gather(acc, 1, idx)
    else:
        topk_lp, idx = torch.topk(acc, k=K)
    beam = idx // V
    topk_indices = _gather_beams(st.running_indices, beam)
    topk_seqs = _gather_beams(st.running, beam)
    topk_seqs[:, :, cur_len] = idx % V
    offset = torch.arange(B, device=idx.device).view(-1, 1) * N
    topk_indices[:, :, cur_len - P] = (beam + offset).to(topk_indices.dtype)
    return topk_lp, topk_seqs, topk_indices


def _next_running(st: _BeamState, topk_lp, topk_seqs, topk_idx, N) -> None:
    lp = topk_lp + st.hits.to(torch.float32) * -1.0e9
    nxt = torch.topk(lp, k=N)[1]
    st.running = _gather_beams(topk_seqs, nxt)
    st.running_scores = _gather_beams(lp, nxt)
    st.running_indices = _gather_beams(topk_idx, nxt)


def _update_finished(st: _BeamState, topk_lp, topk_seqs, topk_idx, top_n_mask, N, cur_len, P, lp, early):
    just_finished = st.hits & top_n_mask[None, :]
    scores = topk_lp / ((cur_len + 1 - P) ** lp)
    full = torch.all(st.finished, dim=-1, keepdim=True) & (early is True)
    scores = scores + full.to(torch.float32) * -1.0e9
    scores = scores + (~st.improvable).to(torch.float32) * -1.0e9
    scores = scores + (~just_finished) * -1.0e9
    merged_seqs = torch.cat((st.sequences, topk_seqs), dim=1)
    merged_scores = torch.cat((st.scores, scores), dim=1)
    merged_idx = torch.cat((st.indices, topk_idx), dim=1)
    merged_finished = torch.cat((st.finished, just_finished), dim=1)
    best = torch.topk(merged_scores, k=N)[1]
    st.sequences = _gather_beams(merged_seqs, best)
    st.scores = _gather_beams(merged_scores, best)
    st.indices = _gather_beams(merged_idx, best)
    st.finished = _gather_beams(merged_finished, best)


def _early_stop_heuristic(st: _BeamState, cur_len, max_length, P, early, lp) -> torch.Tensor:
    length = (max_length - P) if (early == "never" and lp > 0.0) else (cur_len - P)
    best_running = st.running_scores[:, :1] / (length ** lp)
    worst_finished = torch.where(st.finished, torch.min(st.scores, dim=1, keepdim=True)[0], -1.0e9)
    return st.improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)


def _finalise_beams(st: _BeamState, n_return: int, P: int, all_scores) -> GenerateOutput:
    sequences = st.sequences[:, :n_return].reshape(-1, st.sequences.shape[-1])
    scores = st.scores[:, :n_return].reshape(-1)
    indices = st.indices[:, :n_return].reshape(-1, st.indices.shape[-1])
    generated = int(((indices + 1).bool()).sum(dim=1).max())
    return GenerateOutput(sequences=sequences[:, :P + generated], sequences_scores=scores,
                          scores=tuple(all_scores) if all_scores is not None else None)


# ----------------------------------------------------------------------------------------------------------
# The mixin
# ----------------------------------------------------------------------------------------------------------

class GenerationMixin:
    """``generate`` for a model class, plus ``generation_config`` loading and saving.

    Put it before the ``PreTrainedMixin`` base (``class XForCausalLM(GenerationMixin, XPreTrainedModel)``):
    ``from_pretrained`` then also reads ``generation_config.json`` (else the model config's generation
    fields) and ``save_pretrained`` writes it. The model sets ``self.generation_config =
    GenerationConfig.from_model_config(config)`` in ``__init__`` and provides either
    ``generation_session`` (any :class:`DecodeSession`) or the two methods of :class:`CachedDecoderSession`.
    """

    supports_cuda_graph: bool = False

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        model = super().from_pretrained(path, *args, **kwargs)
        model.generation_config = load_generation_config(path, model.config)
        return model

    def save_pretrained(self, path, *args, **kwargs):
        out = super().save_pretrained(path, *args, **kwargs)
        gc = getattr(self, "generation_config", None) or GenerationConfig.from_model_config(self.config)
        gc.save_pretrained(path)
        return out

    def generation_session(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_copies: int = 1,
                           use_cuda_graph: bool | None = None, **model_kwargs) -> DecodeSession:
        """The default session: :class:`CachedDecoderSession` over the rows repeated ``num_copies`` times."""
        if model_kwargs:
            raise TypeError(f"{type(self).__name__}.generate got unexpected arguments: {sorted(model_kwargs)}")
        if num_copies > 1:
            input_ids = input_ids.repeat_interleave(num_copies, dim=0)
            attention_mask = attention_mask.repeat_interleave(num_copies, dim=0)
        return CachedDecoderSession(self, input_ids, attention_mask, use_cuda_graph=use_cuda_graph)

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 generation_config: GenerationConfig | None = None, **kwargs):
        """See :func:`generate`."""
        return generate(self, input_ids, attention_mask, generation_config, **kwargs)

"""Checkpoint loading and saving in HuggingFace's on-disk format, for local directories only.

A checkpoint directory holds ``config.json`` and the weights, in transformers' order of precedence:
``model.safetensors``, a sharded ``model.safetensors.index.json``, ``pytorch_model.bin`` or a sharded
``pytorch_model.bin.index.json``. Nothing here touches the network: a path that is not a local directory
(a hub id such as ``"bigscience/bloom-560m"`` included) is a clear ``FileNotFoundError``.

The pieces, bottom-up:

* :func:`read_config` / :func:`write_config`: ``config.json`` as a dict (HF's tagged special floats).
* :class:`ConfigBase`: the base of every family's Config (HF field names, aliases, defaults; unknown fields
  kept and written back).
* :func:`load_state_dict` / :func:`save_state_dict`: the weight files, sharded or not.
* :func:`checkpoint_dtype`: the dtype transformers 5 gives a model loaded with ``dtype=None``.
* :func:`load_into`: checkpoint keys -> a module's keys (base-model prefix either way, tied weights,
  strict check), then the values.
* :class:`PreTrainedMixin`: ``from_pretrained`` / ``save_pretrained`` for the model classes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

__all__ = [
    "ConfigBase", "PreTrainedMixin", "LoadReport", "read_config", "write_config", "load_state_dict",
    "save_state_dict", "load_into", "checkpoint_dtype", "checkpoint_files", "parse_size", "hf_init_",
]

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
PT_WEIGHTS_NAME = "pytorch_model.bin"
PT_INDEX_NAME = "pytorch_model.bin.index.json"
WEIGHT_NAMES = (SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME, PT_WEIGHTS_NAME, PT_INDEX_NAME)

_FLOAT_TAG = "__float__"  # HF writes inf/nan as {"__float__": "Infinity"} so other JSON readers cope
_SPECIAL_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}
_SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


# ----------------------------------------------------------------------------------------------------------
# Paths and config.json
# ----------------------------------------------------------------------------------------------------------

def _local_dir(path: str | os.PathLike) -> Path:
    """``path`` as an existing local directory, else a clear error (never a download)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists():
        raise NotADirectoryError(f"{str(p)!r} is a file; expected a checkpoint directory holding {CONFIG_NAME}")
    raise FileNotFoundError(
        f"no such directory: {str(p)!r}. tritonformers reads local checkpoint directories only and never "
        "downloads; fetch a hub model first (e.g. `hf download org/name --local-dir DIR`) and pass DIR")


def _encode_floats(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return {_FLOAT_TAG: "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")}
    if isinstance(obj, dict):
        return {k: _encode_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode_floats(v) for v in obj]
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    return obj


def _decode_floats(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_FLOAT_TAG} and obj[_FLOAT_TAG] in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[obj[_FLOAT_TAG]]
        return {k: _decode_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_floats(v) for v in obj]
    return obj


def read_config(path: str | os.PathLike) -> dict:
    """The dict in ``<path>/config.json`` (HF's tagged special floats decoded).

    Raises FileNotFoundError naming the directory or the file when either is missing, and
    NotADirectoryError when ``path`` is a file.
    """
    file = _local_dir(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in checkpoint directory {str(file.parent)!r} "
                                f"(missing {str(file)!r})")
    with open(file, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(file)!r} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{str(file)!r} does not hold a JSON object")
    return _decode_floats(d)


def write_config(config: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``config`` to ``<path>/config.json`` as transformers does (sorted keys, indent 2); returns the file.

    The directory is created if needed; torch dtypes become their names ("float16") and inf/nan HF's tags.
    """
    d = Path(path)
    if d.exists() and not d.is_dir():
        raise NotADirectoryError(f"{str(d)!r} is a file; expected a directory to write {CONFIG_NAME} into")
    d.mkdir(parents=True, exist_ok=True)
    file = d / CONFIG_NAME
    with open(file, "w", encoding="utf-8") as f:
        f.write(json.dumps(_encode_floats(dict(config)), indent=2, sort_keys=True) + "\n")
    return file


def _as_dtype(dtype: torch.dtype | str | None, name: str = "dtype") -> torch.dtype | None:
    """A torch dtype from a dtype, its name ("float16", "torch.float16") or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        value = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(value, torch.dtype):
            return value
    raise ValueError(f"{name} must be a torch.dtype or a dtype name such as 'float16', got {dtype!r}")


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------

# transformers 5's PreTrainedConfig fields with their defaults. A value equal to its default is left out of
# config.json (HF's diff), unless the family declares the field in its own ``defaults``.
_COMMON_DEFAULTS: dict[str, Any] = {
    "architectures": None,
    "output_hidden_states": False,
    "output_attentions": False,
    "return_dict": True,
    "dtype": None,
    "chunk_size_feed_forward": 0,
    "is_encoder_decoder": False,
    "id2label": None,  # None here means HF's two labels, {0: "LABEL_0", 1: "LABEL_1"}
    "label2id": None,
    "problem_type": None,
    # Per-family in transformers 5 (each Config declares them); these are transformers 4's base defaults.
    "tie_word_embeddings": True,
    "pad_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
}
_PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


def _default_labels(n: int) -> tuple[dict[int, str], dict[str, int]]:
    id2label = {i: f"LABEL_{i}" for i in range(n)}
    return id2label, {v: k for k, v in id2label.items()}


class ConfigBase:
    """Base of the family configs: HF's ``config.json`` fields as attributes.

    A family declares::

        class BloomConfig(ConfigBase):
            model_type = "bloom"
            attribute_map = {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                             "n_embed": "hidden_size"}          # alias -> stored name, as HF's
            defaults = {"vocab_size": 250880, "hidden_size": 64, "n_layer": 2, ...}

    and gets ``BloomConfig(**fields)``, :meth:`from_dict`, :meth:`from_pretrained`, :meth:`save_pretrained`,
    :meth:`to_dict`, ``repr`` and ``==``. Rules, as transformers 5's ``PreTrainedConfig``:

    * every field of ``defaults`` (merged over the class hierarchy) and of HF's common fields
      (``_COMMON_DEFAULTS``) is an attribute; keys the family does not know are kept as attributes and
      written back, never an error;
    * an alias (a key of ``attribute_map``) reads and writes its stored name; in a dict, an alias given
      beside its stored name wins, as in HF (its extra kwargs are applied after the fields);
    * ``dtype`` is a ``torch.dtype`` or None, read from ``"dtype"`` (transformers 5) or ``"torch_dtype"``
      (4.x), written as ``"dtype"``; ``torch_dtype`` is a property alias;
    * ``id2label`` always holds the labels (int keys); without it, ``num_labels`` (default 2) makes
      ``LABEL_i`` names; ``num_labels`` is ``len(id2label)`` and setting it remakes the labels;
    * ``save_pretrained`` writes the family's fields always and HF's common fields only where they differ
      from the defaults, as HF's ``to_diff_dict`` does, so transformers reads back the same values.

    A family that must normalise legacy keys (renamed fields, say) overrides :meth:`_post_init`, which
    runs at the end of construction and may edit ``self.__dict__``.
    """

    model_type: str = ""
    attribute_map: dict[str, str] = {}
    defaults: dict[str, Any] = {}

    def __init__(self, **kwargs: Any):
        kwargs = dict(kwargs)
        torch_dtype = kwargs.pop("torch_dtype", None)
        if kwargs.get("dtype") is None and torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        self._check_model_type(kwargs)
        num_labels = kwargs.pop("num_labels", None)
        aliases = {k: kwargs.pop(k) for k in list(kwargs) if k in self.attribute_map}
        for key, value in {**self._all_defaults(), **kwargs}.items():
            setattr(self, key, copy.deepcopy(value))
        for key, value in aliases.items():
            setattr(self, key, value)
        self.dtype = _as_dtype(self.dtype, "config dtype") if self.dtype != "auto" else None
        self._init_labels(num_labels)
        self._post_init()

    def _post_init(self) -> None:
        """Hook for families: derive or rename fields after construction (default: nothing)."""

    @classmethod
    def _all_defaults(cls) -> dict[str, Any]:
        merged = dict(_COMMON_DEFAULTS)
        for klass in reversed(cls.__mro__):
            merged.update(klass.__dict__.get("defaults", {}))
        return merged

    @classmethod
    def _family_fields(cls) -> set[str]:
        return {k for klass in cls.__mro__ for k in klass.__dict__.get("defaults", {})}

    def _check_model_type(self, kwargs: dict) -> None:
        if not type(self).model_type:  # the generic base keeps whatever the file says
            return
        given = kwargs.pop("model_type", None)
        if given not in (None, type(self).model_type):
            warnings.warn(f"config.json has model_type {given!r}, read as {type(self).__name__} "
                          f"(model_type {type(self).model_type!r}); some fields may not apply", stacklevel=3)

    def _init_labels(self, num_labels: int | None) -> None:
        if self.id2label is None:
            # as HF's num_labels setter: both maps are made (a lone label2id is replaced)
            self.id2label, self.label2id = _default_labels(2 if num_labels is None else int(num_labels))
        else:
            self.id2label = {int(k): v for k, v in self.id2label.items()}
        if self.problem_type not in _PROBLEM_TYPES:
            raise ValueError(f"problem_type must be one of {_PROBLEM_TYPES}, got {self.problem_type!r}")
        if self.problem_type == "single_label_classification" and self.num_labels == 1:
            raise ValueError('problem_type="single_label_classification" needs num_labels > 1 (use 2 for binary)')

    # Aliases: `attribute_map` maps an alias to the stored name, for reads and writes.
    def __setattr__(self, key: str, value: Any) -> None:
        super().__setattr__(type(self).attribute_map.get(key, key), value)

    def __getattr__(self, key: str) -> Any:  # only called when normal lookup fails
        target = type(self).attribute_map.get(key)
        if target is None:
            raise AttributeError(f"{type(self).__name__} has no attribute {key!r}")
        return getattr(self, target)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, n: int) -> None:
        if n != self.num_labels:
            self.id2label, self.label2id = _default_labels(n)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return self.dtype

    @torch_dtype.setter
    def torch_dtype(self, value) -> None:
        self.dtype = _as_dtype(value, "torch_dtype")

    @property
    def use_return_dict(self) -> bool:
        return self.return_dict

    @use_return_dict.setter
    def use_return_dict(self, value: bool) -> None:
        self.return_dict = value

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **kwargs: Any) -> "ConfigBase":
        """A config from a ``config.json``-style dict; ``kwargs`` override its entries."""
        return cls(**{**d, **kwargs})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> "ConfigBase":
        """The config in ``<path>/config.json`` (a local directory); ``kwargs`` override its entries."""
        return cls.from_dict(read_config(path), **kwargs)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``<path>/config.json`` (created if needed) as transformers would; returns the file."""
        return write_config(self.to_json_dict(), path)

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (``dtype`` as its name), plus ``model_type``."""
        d = copy.deepcopy(self.__dict__)
        if d.get("dtype") is not None:
            d["dtype"] = str(d["dtype"]).removeprefix("torch.")
        if type(self).model_type:
            d["model_type"] = type(self).model_type
        return d

    def to_json_dict(self) -> dict[str, Any]:
        """What ``config.json`` gets: :meth:`to_dict` without HF's common fields left at their defaults."""
        d = self.to_dict()
        family = self._family_fields()
        id2label, label2id = _default_labels(2)
        implied = {**_COMMON_DEFAULTS, "id2label": id2label, "label2id": label2id}
        for key, default in implied.items():
            if key not in family and key in d and d[key] == default:
                del d[key]
        return d

    def to_json_string(self) -> str:
        return json.dumps(_encode_floats(self.to_json_dict()), indent=2, sort_keys=True) + "\n"

    def update(self, d: Mapping[str, Any]) -> None:
        for key, value in d.items():
            setattr(self, key, value)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


# ----------------------------------------------------------------------------------------------------------
# Weight files
# ----------------------------------------------------------------------------------------------------------

def _shard_files(index_file: Path) -> list[Path]:
    with open(index_file, encoding="utf-8") as f:
        try:
            index = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(index_file)!r} is not valid JSON: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{str(index_file)!r} has no 'weight_map' of tensor names to shard files")
    files = [index_file.parent / name for name in sorted(set(weight_map.values()))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"shard files listed in {str(index_file)!r} are missing: {missing}")
    return files


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint, in transformers' precedence (see the module docstring).

    ``path`` is a checkpoint directory, or one ``.safetensors`` / ``.bin`` file. A sharded index gives its
    shard files (sorted, as HF loads them). Raises FileNotFoundError listing what it looked for.
    """
    p = Path(path) if isinstance(path, (str, os.PathLike)) else None
    if p is not None and p.is_file() and p.name.endswith((".safetensors", ".bin")):
        return [p]
    d = _local_dir(path)
    for name in WEIGHT_NAMES:
        file = d / name
        if file.is_file():
            return _shard_files(file) if name.endswith(".index.json") else [file]
    raise FileNotFoundError(f"no weights in {str(d)!r}: looked for {', '.join(WEIGHT_NAMES)}")


def _is_float(dtype: torch.dtype) -> bool:
    # float8 weights are never the model's dtype (HF skips them too when it infers one)
    return dtype.is_floating_point and "float8" not in str(dtype)


def _place(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``, floating tensors cast to ``dtype`` (integers keep theirs)."""
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        return t.to(device=device, dtype=dtype)
    return t.to(device)


def _unreadable(file: Path, error: Exception) -> OSError:
    """The error for a weights file that cannot be parsed: it names the file (the libraries' errors do not)."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return OSError(f"cannot read weights file {str(file)!r} (corrupt or truncated?): "
                   f"{type(error).__name__}: {first_line}")


def _open_safetensors(file: Path, device: str = "cpu"):
    """``safe_open`` on ``file``; a bad header (corrupt or truncated file) becomes an OSError naming it.

    safetensors checks at open that the header parses and that the data covers every tensor it lists, so
    a truncated file fails here, not later in ``get_tensor``.
    """
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt", device=device)
    except SafetensorError as e:
        raise _unreadable(file, e) from e


def _torch_load(file: Path) -> dict:
    """``torch.load(weights_only=True)`` on CPU; an unparsable file becomes an OSError naming it."""
    import pickle

    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError):
        raise
    except (pickle.UnpicklingError, EOFError, OSError, RuntimeError) as e:  # truncated zips raise OSError
        raise _unreadable(file, e) from e


def _read_file(file: Path, dtype: torch.dtype | None, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    if file.name.endswith(".safetensors"):
        # safe_open reads one tensor at a time straight onto the device: no second copy of the file
        target = "cpu" if device.type == "meta" else str(device)
        with _open_safetensors(file, target) as f:
            for key in f.keys():
                yield key, _place(f.get_tensor(key), dtype, device)
    else:
        state = _torch_load(file)
        for key in list(state):
            yield key, _place(state.pop(key), dtype, device)


def load_state_dict(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (directory or single weight file) by their HF names.

    Args:
        path: checkpoint directory; the weights are found as :func:`checkpoint_files` says.
        dtype: cast floating tensors to it (integer buffers, I-BERT's say, keep their dtype); None keeps
            the checkpoint's dtypes.
        device: where the tensors go (default CPU). safetensors shards are read straight onto it, one
            tensor at a time; ``pytorch_model.bin`` is read with ``torch.load(weights_only=True,
            map_location="cpu")`` and then moved.

    A weights file that does not parse (corrupt or truncated, one shard of many included) raises OSError
    naming that file.
    """
    dtype = _as_dtype(dtype)
    device = torch.device("cpu" if device is None else device)
    state: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        state.update(_read_file(file, dtype, device))
    return state


def _first_float_dtype(files: list[Path]) -> torch.dtype | None:
    """The dtype of the first floating tensor of the first weight file (header only for safetensors)."""
    file = files[0]
    if file.name.endswith(".safetensors"):
        with _open_safetensors(file) as f:
            for key in f.keys():
                dtype = _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
                if dtype is not None and _is_float(dtype):
                    return dtype
        return None
    return _state_dict_dtype(_torch_load(file))


def _state_dict_dtype(state: Mapping[str, Any]) -> torch.dtype | None:
    for t in state.values():
        if isinstance(t, torch.Tensor) and _is_float(t.dtype):
            return t.dtype
    return None


def _config_dtype(config: Any) -> torch.dtype | None:
    if isinstance(config, Mapping):
        value = config.get("dtype") or config.get("torch_dtype")
    else:
        value = getattr(config, "dtype", None)
    return None if value in (None, "auto") else _as_dtype(value, "config dtype")


def checkpoint_dtype(source: str | os.PathLike | Mapping[str, Any] | ConfigBase) -> torch.dtype | None:
    """The dtype transformers 5 gives a model loaded with ``dtype=None``.

    transformers 5's ``from_pretrained`` turns ``dtype=None`` into ``"auto"`` (``modeling_utils.py``,
    ``from_pretrained`` then ``_get_dtype``): the config's ``dtype`` (read from ``"dtype"`` or the legacy
    ``"torch_dtype"``) when set, else the dtype of the first floating tensor of the first weight file
    (``get_state_dict_dtype``, float8 skipped). Every floating parameter is then created in that dtype
    and the checkpoint's tensors are cast to it. (transformers 4 used float32 for ``None``.)

    ``source``:
        * a checkpoint directory: the rule above; float32 when it has no floating tensor;
        * a state dict (name -> tensor): the first floating tensor's dtype, float32 if none;
        * a :class:`ConfigBase` or a ``config.json`` dict: its dtype, or None when it names none.
    """
    if isinstance(source, (str, os.PathLike)):
        config_file = _local_dir(source) / CONFIG_NAME
        dtype = _config_dtype(read_config(source)) if config_file.is_file() else None
        return dtype or _first_float_dtype(checkpoint_files(source)) or torch.float32
    if isinstance(source, Mapping) and any(isinstance(v, torch.Tensor) for v in source.values()):
        return _state_dict_dtype(source) or torch.float32
    return _config_dtype(source)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB" (10^9), "20KB", "2GiB" (2^30) or "1000"."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise TypeError(f"max_shard_size must be an int (bytes) or a string like '5GB', got {size!r}")
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
        if m is None:
            raise ValueError(f"max_shard_size {size!r} is not a size such as '5GB', '500MB' or '2GiB'")
        size = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").upper()])
    if size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size}")
    return size


def _dedupe_shared(state: dict[str, torch.Tensor], tied_keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Drop aliases (tied weights) and clone overlapping views: safetensors refuses shared storage.

    Among names that are the very same view, the first one not in ``tied_keys`` is kept (HF keeps the tied
    source, e.g. drops ``lm_head.weight``); different views of one storage are cloned.
    """
    tied = set(tied_keys)
    by_storage: dict[Any, list[str]] = defaultdict(list)
    for name, t in state.items():
        if t.numel():
            by_storage[(t.device, t.untyped_storage().data_ptr())].append(name)
    out = dict(state)
    for names in by_storage.values():
        if len(names) < 2:
            continue
        by_view: dict[Any, list[str]] = defaultdict(list)
        for name in names:
            t = state[name]
            by_view[(t.data_ptr(), t.dtype, tuple(t.shape), t.stride())].append(name)
        kept = []
        for same in by_view.values():
            keep = next((n for n in same if n not in tied), same[0])
            kept.append(keep)
            for name in same:
                if name != keep:
                    del out[name]
        if len(kept) > 1:
            for name in kept:
                out[name] = state[name].clone()
    return out


def _split_shards(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[list[str]]:
    """Greedy in key order, as huggingface_hub splits: a tensor bigger than the limit gets its own shard."""
    if max_bytes is None:
        return [list(state)]
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if nbytes > max_bytes:
            shards.append([name])
            continue
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _remove_stale_weights(directory: Path, keep: set[str]) -> None:
    """Delete safetensors weights of an earlier save that would shadow (or confuse) the new ones."""
    for file in directory.iterdir():
        ours = file.name in (SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME) or _SHARD_RE.fullmatch(file.name)
        if ours and file.is_file() and file.name not in keep:
            file.unlink()


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    max_shard_size: int | str | None = None, *, tied_keys: Iterable[str] = (),
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``state_dict`` as ``<path>/model.safetensors``, or as shards plus an index, as HF does.

    Args:
        state_dict: name -> tensor (any device; meta tensors are an error).
        path: the checkpoint directory (created if needed). Earlier ``model*.safetensors`` files and
            index there are replaced, so a stale file can never shadow the new weights.
        max_shard_size: bytes, or a string such as "5GB" / "20KB"; above it the weights are split into
            ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``
            (``{"metadata": {"total_size"}, "weight_map"}``). None: one file.
        tied_keys: names to drop first when several names share one tensor (tied targets such as
            ``lm_head.weight``); without them the first name in order is kept.
        metadata: the safetensors header metadata (default ``{"format": "pt"}``, what HF writes).

    Returns the weights file or the index file.
    """
    from safetensors.torch import save_file

    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(t).__name__}, not a tensor")
        if t.is_meta:
            raise ValueError(f"state_dict[{name!r}] is on the meta device and has no values to save")
    d = Path(path)
    if d.exists() and not d.is_dir():
        raise NotADirectoryError(f"{str(d)!r} is a file; expected a directory to save weights into")
    d.mkdir(parents=True, exist_ok=True)
    state = _dedupe_shared({k: v.detach() for k, v in state_dict.items()}, tied_keys)
    shards = _split_shards(state, None if max_shard_size is None else parse_size(max_shard_size))
    n = len(shards)
    names = [SAFE_WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    _remove_stale_weights(d, set(names) | ({SAFE_INDEX_NAME} if n > 1 else set()))
    meta = dict(metadata) if metadata is not None else {"format": "pt"}
    for name, keys in zip(names, shards):
        save_file({k: state[k].contiguous().cpu() for k in keys}, str(d / name), metadata=meta)
    if n == 1:
        return d / SAFE_WEIGHTS_NAME
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
        "weight_map": {k: name for name, keys in zip(names, shards) for k in keys},
    }
    with open(d / SAFE_INDEX_NAME, "w", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return d / SAFE_INDEX_NAME


# ----------------------------------------------------------------------------------------------------------
# Mapping a checkpoint onto a module
# ----------------------------------------------------------------------------------------------------------

_SHOW_KEYS = 10


@dataclass
class LoadReport:
    """What :func:`load_into` did.

    ``missing``: module keys the checkpoint did not provide (nor a tied partner, nor an ignore pattern).
    ``unexpected``: checkpoint keys the module has no place for (after the prefix rules and patterns).
    ``ignored``: checkpoint keys skipped on purpose: a task checkpoint's head keys when loading a base
    model, keys matching ``ignore_unexpected``, keys naming a non-persistent buffer.
    ``tied``: module keys filled from their tied partner.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)


def _show(keys: list[str]) -> str:
    more = f", ... and {len(keys) - _SHOW_KEYS} more" if len(keys) > _SHOW_KEYS else ""
    return ", ".join(repr(k) for k in keys[:_SHOW_KEYS]) + more


def _map_keys(ckpt_keys: Iterable[str], expected: set[str], prefix: str) -> tuple[dict[str, str], list[str], bool]:
    """Module key -> checkpoint key, the keys left over, and whether the prefix was stripped anywhere.

    transformers 5's rule (``core_model_loading.rename_source_key``): a key that does not match as is
    loses ``prefix.`` when the rest is a module key (a base model reading a task checkpoint) or gains it
    when that is one (a task model reading a base checkpoint). An exact match wins over a renamed one.
    """
    p = f"{prefix}." if prefix else ""
    keys = list(ckpt_keys)
    mapping = {k: k for k in keys if k in expected}
    leftover, stripped = [], False
    for key in keys:
        if key in expected:
            continue
        target = None
        if p and key.startswith(p) and key[len(p):] in expected:
            target, stripped = key[len(p):], True
        elif p and p + key in expected:
            target = p + key
        if target is None or target in mapping:
            leftover.append(key)
        else:
            mapping[target] = key
    return mapping, leftover, stripped


def _non_persistent_buffers(module: nn.Module) -> set[str]:
    names = set()
    for mod_name, mod in module.named_modules():
        for buf in mod._non_persistent_buffers_set:
            names.add(f"{mod_name}.{buf}" if mod_name else buf)
    return names


def _auto_ignore_patterns(module: nn.Module) -> list[str]:
    """HF's built-in unexpected-key exceptions: stale ``position_ids`` / ``rotary_emb.inv_freq`` buffers."""
    buffers = [name for name, _ in module.named_buffers()]
    patterns = []
    if any(b.endswith("position_ids") for b in buffers):
        patterns.append(r"(^|\.)position_ids$")
    if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
        patterns.append(r"rotary_emb\.inv_freq")
    return patterns


def _matches(key: str, patterns: list[re.Pattern]) -> bool:
    return any(p.search(key) for p in patterns)


def _fill_tied(mapping: dict[str, str], expected: set[str], tied: Mapping[str, str]) -> dict[str, str]:
    """Tied module keys absent from the checkpoint -> the module key to copy from (either direction)."""
    filled = {}
    for target, source in tied.items():
        if target not in expected or source not in expected:
            continue
        if target not in mapping and source in mapping:
            filled[target] = source
        elif source not in mapping and target in mapping:  # HF ties symmetrically
            filled[source] = target
    return filled


def _set_tensor(module: nn.Module, key: str, value: torch.Tensor) -> None:
    """Put ``value`` into the parameter/buffer ``key``: copied into a real tensor (keeping its dtype,
    device and any sharing), or assigned, cast to its dtype, in place of a meta placeholder."""
    owner_name, _, leaf = key.rpartition(".")
    owner = module.get_submodule(owner_name)
    slots = owner._parameters if leaf in owner._parameters else owner._buffers
    current = slots[leaf]
    if not current.is_meta:
        with torch.no_grad():
            current.copy_(value)
        return
    value = value.to(dtype=current.dtype)
    if slots is owner._parameters:
        value = nn.Parameter(value, requires_grad=current.requires_grad and value.is_floating_point())
    slots[leaf] = value


def load_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, prefix: str,
              tied: Mapping[str, str] | None = None, ignore_unexpected: Iterable[str] | None = None,
              ignore_missing: Iterable[str] | None = None, strict: bool = True) -> LoadReport:
    """Load a checkpoint's ``state_dict`` (HF names) into ``module`` by name, as transformers 5 maps them.

    Args:
        module: the model. Its expected keys are ``module.state_dict()``'s (non-persistent buffers are
            not expected). A parameter or buffer on the meta device is replaced by the checkpoint tensor
            (cast to the placeholder's dtype); a real one is copied into (its dtype, device and any
            parameter sharing stay).
        prefix: the base-model attribute (``base_model_prefix``, e.g. ``"transformer"``); keys are
            renamed by adding or dropping ``prefix.`` (see :func:`_map_keys`), so a task model reads base
            and task checkpoints and a base model reads a task checkpoint. In the last case, the leftover
            keys outside the prefix (the task head) are ignored, not unexpected. ``""``: names as they are.
        tied: ``{target: source}`` module keys that share a tensor (``{"lm_head.weight":
            "transformer.word_embeddings.weight"}``); when one side is absent from the checkpoint it is
            filled from the other.
        ignore_unexpected / ignore_missing: regexes (``re.search``) of keys not to report. HF's own
            exceptions are added: checkpoint keys naming one of the module's non-persistent buffers,
            ``position_ids`` and ``rotary_emb.inv_freq`` when the module has such buffers.
        strict: raise ValueError listing the missing and unexpected keys (the first 10 of each, and the
            counts) instead of returning them. Nothing is loaded when it raises.

    Shape mismatches always raise ValueError naming each key and both shapes. Returns a
    :class:`LoadReport`.
    """
    own = module.state_dict(keep_vars=True)
    expected = set(own)
    mapping, leftover, stripped = _map_keys(state_dict.keys(), expected, prefix)
    filled = _fill_tied(mapping, expected, tied or {})

    non_persistent = _non_persistent_buffers(module)
    skip = [re.compile(x) for x in [*(ignore_unexpected or []), *_auto_ignore_patterns(module)]]
    p = f"{prefix}." if prefix else ""
    report = LoadReport(tied=sorted(filled))
    for key in leftover:
        head_key = stripped and not key.startswith(p)
        buffer_key = bool({key, p + key, key.removeprefix(p)} & non_persistent)
        (report.ignored if head_key or buffer_key or _matches(key, skip) else report.unexpected).append(key)
    skip_missing = [re.compile(x) for x in ignore_missing or []]
    report.missing = sorted(k for k in expected - mapping.keys() - filled.keys() if not _matches(k, skip_missing))

    _check_shapes(own, state_dict, mapping)
    if strict and (report.missing or report.unexpected):
        raise ValueError(_mismatch_message(type(module).__name__, report))
    for target, key in mapping.items():
        _set_tensor(module, target, state_dict[key])
    for target, partner in filled.items():
        _set_tensor(module, target, state_dict[mapping[partner]])
    return report


def _check_shapes(own: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor],
                  mapping: Mapping[str, str]) -> None:
    bad = [f"{key!r}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(own[target].shape)}"
           + (f" (model key {target!r})" if key != target else "")
           for target, key in mapping.items() if tuple(state_dict[key].shape) != tuple(own[target].shape)]
    if bad:
        raise ValueError(f"checkpoint shapes do not match the model for {len(bad)} key(s): " + "; ".join(bad))


def _mismatch_message(name: str, report: LoadReport) -> str:
    parts = [f"the checkpoint does not match {name}"]
    if report.missing:
        parts.append(f"{len(report.missing)} missing key(s) (in the model, not in the checkpoint): "
                     f"{_show(report.missing)}")
    if report.unexpected:
        parts.append(f"{len(report.unexpected)} unexpected key(s) (in the checkpoint, not in the model): "
                     f"{_show(report.unexpected)}")
    return "; ".join(parts) + ". Pass strict=False to load anyway."


# ----------------------------------------------------------------------------------------------------------
# from_pretrained / save_pretrained
# ----------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Every parameter registered inside is moved to the meta device: no memory and no init cost.

    Buffers stay real (they are often computed in ``__init__``: ALiBi slopes, sinusoid tables).
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@contextlib.contextmanager
def _build_context(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Construction as HF's: default dtype = the load dtype, tensors on ``device``, parameters on meta."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), _params_on_meta():
            yield
    finally:
        torch.set_default_dtype(old)


def _check_model_type(cls: type, path: str | os.PathLike, config: dict) -> dict:
    """``config`` (a ``config.json`` dict) when its ``model_type`` is absent or ``cls``'s family's, else a
    ValueError naming both types and the way to load it anyway."""
    expected = cls.config_class.model_type
    given = config.get("model_type")
    if not expected or given in (None, expected):
        return config
    raise ValueError(
        f"{str(Path(path) / CONFIG_NAME)!r} has model_type {given!r}, but {cls.__name__} loads model_type "
        f"{expected!r} checkpoints: use the {given!r} model classes, or pass "
        f"config={cls.config_class.__name__}.from_pretrained(path) to load it anyway")


def hf_init_(module: nn.Module, std: float) -> None:
    """transformers' usual ``_init_weights`` rule, in place: Linear and Embedding weights N(0, std), biases
    zero, an embedding's padding row zero, LayerNorm weight one and bias zero; other modules untouched."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.padding_idx is not None and not module.weight.is_meta:
            module.weight.data[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class PreTrainedMixin:
    """``from_pretrained`` / ``save_pretrained`` for an ``nn.Module`` model class built as ``cls(config)``.

    The model class (``class BloomForCausalLM(PreTrainedMixin, nn.Module)``) sets ``self.config`` in
    ``__init__``, calls ``self.tie_weights()`` at its end (as HF's ``post_init``), and declares:

    * ``config_class``: its :class:`ConfigBase` subclass;
    * ``base_model_prefix``: the attribute holding the base model (``"transformer"``); base models
      declare it too (the prefix rules of :func:`load_into` then apply both ways);
    * ``_tied_weights_keys``: ``{target: source}`` names relative to this class, tied only when
      ``config.tie_word_embeddings`` is true (as transformers 5);
    * ``_keys_to_ignore_on_load_unexpected`` / ``_keys_to_ignore_on_load_missing``: regexes.

    Parameters left missing (``strict=False`` or ignored patterns) are initialised by the model's
    ``_init_weights(module)`` when it defines one, else by the owning module's ``reset_parameters()``.
    """

    config_class: type[ConfigBase] | None = None
    base_model_prefix: str = ""
    _tied_weights_keys: dict[str, str] | None = None
    _keys_to_ignore_on_load_unexpected: list[str] | None = None
    _keys_to_ignore_on_load_missing: list[str] | None = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, config: ConfigBase | None = None,
                        strict: bool = True):
        """The model of the local checkpoint directory ``path``, in eval mode.

        Args:
            path: a directory with ``config.json`` (unless ``config`` is given) and the weights.
            dtype: the floating dtype of the model; None or "auto" = the checkpoint's
                (:func:`checkpoint_dtype`), as transformers 5 does.
            device: where the model is built and the weights are read to (default CPU).
            config: a config to use instead of ``config.json``. This is also how to load a checkpoint of
                another ``model_type`` on purpose (``config=XConfig.from_pretrained(path)``, which warns).
            strict: raise on missing or unexpected keys (see :func:`load_into`).

        A ``config.json`` whose ``model_type`` is another family's raises ValueError naming both types
        (transformers only warns, and the load then fails on some unrelated key or shape).
        """
        if config is None:
            if cls.config_class is None:
                raise TypeError(f"{cls.__name__} declares no config_class; pass config=")
            config = cls.config_class.from_dict(_check_model_type(cls, path, read_config(path)))
        else:
            config = copy.deepcopy(config)
        files = checkpoint_files(path)
        dtype = None if dtype == "auto" else _as_dtype(dtype)
        dtype = dtype or _config_dtype(config) or _first_float_dtype(files) or torch.float32
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        device = torch.device("cpu" if device is None else device)
        config.dtype = dtype
        with _build_context(dtype, device):
            model = cls(config)
        floats = {t.dtype for t in model.state_dict().values() if t.is_floating_point()}
        # cast while reading unless some tensor keeps another dtype on purpose (load_into casts those)
        state = load_state_dict(path, dtype=dtype if floats <= {dtype} else None, device=device)
        load_into(model, state, prefix=cls.base_model_prefix, tied=model.all_tied_weights_keys,
                  ignore_unexpected=cls._keys_to_ignore_on_load_unexpected,
                  ignore_missing=cls._keys_to_ignore_on_load_missing, strict=strict)
        del state
        model._init_missing(device)
        model.tie_weights(only_if_equal=True)
        model.eval()
        return model

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int | str | None = "50GB") -> Path:
        """Write ``config.json`` and ``model.safetensors`` (or shards) to ``path``, as transformers does.

        The config records this class in ``architectures`` and the model's dtype; tied copies are left
        out of the weights (HF drops ``lm_head.weight`` when it is the embedding). ``max_shard_size``
        defaults to HF's "50GB"; None writes one file. Returns the directory.
        """
        d = Path(path)
        if d.exists() and not d.is_dir():
            raise NotADirectoryError(f"{str(d)!r} is a file; expected a directory to save the model into")
        config = copy.deepcopy(self.config)
        config.architectures = [type(self).__name__]
        config.dtype = self.dtype
        config.save_pretrained(d)
        save_state_dict(self.state_dict(), d, max_shard_size, tied_keys=self.all_tied_weights_keys)
        return d

    @property
    def all_tied_weights_keys(self) -> dict[str, str]:
        """``{target: source}`` full names of the weights tied in this model and its sub-models."""
        tied = {}
        for name, sub in self.named_modules():
            keys = getattr(type(sub), "_tied_weights_keys", None)
            if not keys or not isinstance(sub, PreTrainedMixin):
                continue
            if not getattr(getattr(sub, "config", None), "tie_word_embeddings", False):
                continue
            p = f"{name}." if name else ""
            tied.update({p + t: p + s for t, s in keys.items()})
        return tied

    def init_and_tie(self) -> None:
        """HF's ``post_init`` for a model built in ``__init__``: ``self._init_weights`` on every module outside
        the base model (``base_model_prefix``; its own constructor initialised it), then :meth:`tie_weights`."""
        p = self.base_model_prefix
        with torch.no_grad():
            for name, module in self.named_modules():
                if not p or not (name == p or name.startswith(p + ".")):
                    self._init_weights(module)
        self.tie_weights()

    def tie_weights(self, *, only_if_equal: bool = False) -> None:
        """Make each tied target the very same parameter as its source.

        With ``only_if_equal`` (after loading) a pair whose values differ stays untied with a warning, as
        transformers does when a checkpoint holds both with different values.
        """
        for target, source in self.all_tied_weights_keys.items():
            owner_name, _, leaf = target.rpartition(".")
            owner = self.get_submodule(owner_name)
            src, tgt = self.get_parameter(source), owner._parameters.get(leaf)
            if tgt is src:
                continue
            if only_if_equal and tgt is not None and not tgt.is_meta and not src.is_meta:
                same = tgt.data_ptr() == src.data_ptr() or torch.equal(tgt, src)
                if not same:
                    warnings.warn(f"{target} and {source} are tied in {type(self).__name__} but the checkpoint "
                                  "holds different values: left untied (set tie_word_embeddings=False)",
                                  stacklevel=2)
                    continue
            setattr(owner, leaf, src)

    def _init_missing(self, device: torch.device) -> None:
        """Materialise parameters still on meta (not in the checkpoint) and initialise them."""
        owners: dict[nn.Module, set[str]] = defaultdict(set)
        fresh: dict[int, nn.Parameter] = {}  # one new tensor per placeholder, so shared ones stay shared
        for name, param in list(self.named_parameters(remove_duplicate=False)):
            if param.is_meta:
                owner_name, _, leaf = name.rpartition(".")
                owner = self.get_submodule(owner_name)
                if id(param) not in fresh:
                    fresh[id(param)] = nn.Parameter(torch.empty_like(param, device=device),
                                                    requires_grad=param.requires_grad)
                owner._parameters[leaf] = fresh[id(param)]
                owners[owner].add(leaf)
        for owner, leaves in owners.items():
            loaded = {k: v.detach().clone() for k, v in owner.named_parameters(recurse=False) if k not in leaves}
            init = getattr(self, "_init_weights", None)
            if init is None and not hasattr(owner, "reset_parameters"):
                raise RuntimeError(f"{type(self).__name__}: parameters {sorted(leaves)} of a "
                                   f"{type(owner).__name__} are not in the checkpoint and nothing can initialise "
                                   "them (define _init_weights(module) or reset_parameters())")
            with torch.no_grad():
                if init is not None:
                    init(owner)
                else:
                    owner.reset_parameters()
                for k, v in loaded.items():  # the init touched the whole module: restore what was loaded
                    owner._parameters[k].copy_(v)

    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix, self)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

"""Backend choice, input validation and launch helpers shared by every kernel module.

Backends (``TRITONFORMERS_BACKEND`` or :func:`use_backend`):

* ``auto`` (default): Triton kernels for CUDA tensors, the PyTorch reference for CPU tensors. A case a
  kernel cannot serve (see :func:`unsupported`) runs the reference and warns once.
* ``triton``: always the Triton kernel. CPU tensors need the Triton interpreter (``TRITON_INTERPRET=1``
  set before triton is imported); a case the kernel cannot serve raises instead of falling back.
* ``torch``: always the PyTorch reference.

Kernel modules import only this module; nothing here imports triton at module level, so choosing the
interpreter stays possible until the first kernel module is imported.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
import weakref
from typing import Iterable, Iterator, Sequence

import torch

BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_state = threading.local()
_warned: set[str] = set()


def _env_backend() -> str:
    name = os.environ.get("TRITONFORMERS_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"TRITONFORMERS_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The backend in force: the innermost :func:`use_backend`, else ``TRITONFORMERS_BACKEND``."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else _env_backend()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Choose the backend for a block of code (thread-local, nests)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield name
    finally:
        stack.pop()


def interpreter_enabled() -> bool:
    """True when Triton runs through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def on_gpu(*tensors: torch.Tensor) -> bool:
    """True when the tensors live on a CUDA device and the kernels run compiled (not interpreted)."""
    return any(t.is_cuda for t in tensors) and not interpreter_enabled()


def use_triton(*tensors: torch.Tensor, op: str) -> bool:
    """Whether ``op`` should run its Triton kernel on these tensors under the current backend."""
    backend = get_backend()
    if backend == "torch":
        return False
    is_cuda = any(t.is_cuda for t in tensors)
    if backend == "auto":
        return is_cuda
    if not is_cuda and not interpreter_enabled():
        raise RuntimeError(
            f"{op}: the 'triton' backend was asked for with CPU tensors, but the Triton interpreter is off; "
            "set TRITON_INTERPRET=1 before triton is imported, move the tensors to CUDA, or use the 'torch' backend"
        )
    return True


def unsupported(op: str, reason: str) -> None:
    """Called by a dispatcher when its kernel cannot serve a case.

    Raises ``ValueError`` under the ``triton`` backend (never a silent fallback); under ``auto`` warns once
    per (op, reason) and returns, so the caller runs the reference.
    """
    if get_backend() == "triton":
        raise ValueError(f"{op}: the Triton kernel does not support {reason}")
    key = f"{op}:{reason}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"{op}: the Triton kernel does not support {reason}; running the PyTorch reference",
                      RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------- validation

def check_tensor(x, name: str, *, dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
                 ndim: int | Iterable[int] | None = None, min_ndim: int | None = None) -> torch.Tensor:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``x`` is a tensor of an allowed dtype and rank."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {str(x.dtype).replace('torch.', '')}")
    if ndim is not None:
        allowed_ndim = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed_ndim:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed_ndim))} dimensions, "
                             f"got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(x.shape)}")
    return x


def check_shape(x: torch.Tensor, name: str, shape: Sequence[int | None]) -> torch.Tensor:
    """Raise ``ValueError`` unless ``x.shape`` matches ``shape`` (``None`` = any size on that axis)."""
    if x.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(x.shape)}")
    return x


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """Raise ``ValueError`` unless every given (non-None) tensor is on one device; returns it."""
    items = [(k, t) for k, t in tensors.items() if t is not None]
    device = items[0][1].device
    for name, t in items[1:]:
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but {items[0][0]} is on {device}; "
                             "all inputs must be on one device")
    return device


def check_same_dtype(**tensors: torch.Tensor | None) -> torch.dtype:
    """Raise ``TypeError`` unless every given (non-None) tensor has one dtype; returns it."""
    items = [(k, t) for k, t in tensors.items() if t is not None]
    dtype = items[0][1].dtype
    for name, t in items[1:]:
        if t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {items[0][0]} has {dtype}; they must match")
    return dtype


MASK_DTYPES = (torch.bool, torch.int8, torch.uint8, torch.int32, torch.int64)


def check_padding_mask(mask: torch.Tensor | None, name: str, shape: Sequence[int]) -> torch.Tensor | None:
    """A [batch, keys] padding mask (HF's attention_mask: nonzero = a real token) of an integer or bool dtype."""
    if mask is not None:
        check_tensor(mask, name, dtypes=MASK_DTYPES, ndim=2)
        check_shape(mask, name, shape)
    return mask


def check_int(value, name: str, minimum: int = 0) -> int:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_probability(value, name: str) -> float:
    """Raise ``ValueError`` unless ``value`` is a number in [0, 1) (a dropout probability)."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def check_out(out: torch.Tensor | None, name: str, like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """Return ``out`` after checking it can receive a result shaped like ``like`` (or allocate one)."""
    shape = tuple(like.shape) if shape is None else tuple(shape)
    dtype = like.dtype if dtype is None else dtype
    if out is None:
        return torch.empty(shape, dtype=dtype, device=like.device)
    check_tensor(out, name, dtypes=(dtype,))
    if tuple(out.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(out.shape)}")
    if out.device != like.device:
        raise ValueError(f"{name} is on {out.device} but the inputs are on {like.device}")
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return out


def write_out(out: torch.Tensor | None, name: str, value: torch.Tensor) -> torch.Tensor:
    """The reference paths' ``out=``: ``value`` itself, or copied into ``out`` after the same checks the
    Triton launchers make (shape, dtype, device, contiguity), so both backends accept and refuse alike."""
    if out is None:
        return value
    return check_out(out, name, value).copy_(value)


# ----------------------------------------------------------------------------------------------- launching

def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


AUTOTUNE_MODES = ("all", "first")


def autotune_configs(configs: list) -> list:
    """All configs on a real GPU; only the first under the interpreter (autotuning needs CUDA events) or with
    ``TRITONFORMERS_AUTOTUNE=first`` (a correctness run, such as the CUDA smoke test, that should not spend its
    time compiling and timing every tile). Read when the kernel modules are imported."""
    mode = os.environ.get("TRITONFORMERS_AUTOTUNE", "all").strip().lower() or "all"
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"TRITONFORMERS_AUTOTUNE must be one of {AUTOTUNE_MODES}, got {mode!r}")
    tune = torch.cuda.is_available() and not interpreter_enabled() and mode == "all"
    return list(configs) if tune else list(configs[:1])


def check_cache_lens(cache_lens: torch.Tensor, name: str, num_queries: int, capacity: int) -> None:
    """Each length must lie in [num_queries, capacity]. Checked when the lengths are on the host; device
    lengths are not read back (that would synchronise every decode step and break CUDA-graph capture): the
    decode kernels clamp them to [0, capacity] instead, so they never read past the cache."""
    if cache_lens.device.type != "cpu" or cache_lens.numel() == 0:
        return
    lo, hi = int(cache_lens.min()), int(cache_lens.max())
    if lo < num_queries or hi > capacity:
        raise ValueError(f"{name} must lie in [{num_queries}, {capacity}] (the new queries .. the cache "
                         f"capacity), got values from {lo} to {hi}")


def int8_mask(mask: torch.Tensor) -> torch.Tensor:
    """A padding mask (bool or integer, 1 = a real token) as the kernels read it: int8, contiguous. Callers
    convert through :func:`derived_once` (key ``"mask_int8"``), so the layers of a step share one copy."""
    return mask.to(torch.int8).contiguous()


_derived: dict[str, tuple] = {}


def derived_once(source: torch.Tensor, what: str, compute):
    """``compute(source)``, reused while ``source`` is the same tensor object, unmodified since (its version
    counter): the layers of one forward or decode step then share what they derive from one attention mask
    (ALiBi positions, an int8 copy) instead of each launching the same small kernels. One entry per ``what``;
    computed afresh under ``torch.compile`` (the graph shares it) and for inference tensors (no version counter).
    An entry made while a CUDA graph is captured serves only that capture (its kernels run on replay, not before),
    and a capture never reuses an eager entry (a replay must recompute from the updated mask)."""
    if torch.compiler.is_compiling() or source.is_inference():
        return compute(source)
    capturing = source.is_cuda and torch.cuda.is_current_stream_capturing()
    entry = _derived.get(what)
    if entry is not None and entry[0]() is source and entry[1:3] == (source._version, capturing):
        return entry[3]
    value = compute(source)
    _derived[what] = (weakref.ref(source), source._version, capturing, value)
    return value


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` as a contiguous 2-D [rows, last_dim] matrix (copies only when it must)."""
    x = x.contiguous()
    return x.view(-1, x.shape[-1]) if x.dim() != 2 else x


__all__ = [
    "BACKENDS", "FLOAT_DTYPES", "get_backend", "use_backend", "interpreter_enabled", "on_gpu", "use_triton",
    "unsupported", "check_tensor", "check_shape", "check_same_device", "check_same_dtype", "check_out",
    "MASK_DTYPES", "check_padding_mask", "check_int", "check_probability",
    "next_power_of_2", "autotune_configs", "as_rows", "check_cache_lens", "write_out",
]

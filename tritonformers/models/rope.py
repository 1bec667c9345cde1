"""Rotary position embedding frequencies for Llama-like families, as transformers 5 computes them
(``modeling_rope_utils``): every RoPE type (``default``, ``linear``, ``dynamic``, ``yarn``, ``longrope``,
``llama3``, ``proportional``), the config normalisation of ``rope_parameters`` (and of the older
``rope_scaling`` + ``rope_theta`` form), and :class:`RotaryEmbedding`, the module that turns position ids
into the (cos, sin) tables that :func:`tritonformers.nn.functional.apply_rotary` consumes.

Every formula repeats HF's torch ops in the same order and dtypes (float32 from integer aranges, Python
floats where HF uses Python floats, float32 tensor arithmetic where HF's sequence length is a tensor), so
the frequencies are bit-identical to transformers' on the same device. The tables are small ([B, N, D])
and built once per forward, so they stay in PyTorch: a kernel would not speed them up.

``config`` below is any object with HF's field names: ``rope_parameters`` (a flat dict, already normalised
by :func:`standardize_rope_parameters`), ``head_dim`` (or ``hidden_size`` / ``num_attention_heads``) and
``max_position_embeddings``.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Mapping

import torch
from torch import nn

__all__ = [
    "DEFAULT_THETA", "ROPE_INIT_FUNCTIONS", "ROPE_TYPES", "RotaryEmbedding", "compute_rope_parameters",
    "rope_head_dim", "standardize_rope_parameters",
]

DEFAULT_THETA = 10000.0
# RoPE types whose pre-training length moves into rope_parameters["original_max_position_embeddings"]
_NEEDS_ORIGINAL_MAX = ("llama3", "yarn", "longrope")


# ----------------------------------------------------------------------------------------------------------
# Config normalisation
# ----------------------------------------------------------------------------------------------------------

def standardize_rope_parameters(rope_parameters: Mapping[str, Any] | None, *, max_position_embeddings: int,
                                rope_scaling: Mapping[str, Any] | None = None, rope_theta: float | None = None,
                                partial_rotary_factor: float | None = None,
                                default_theta: float = DEFAULT_THETA) -> dict[str, Any]:
    """The flat ``rope_parameters`` dict transformers 5 keeps on a config, from whatever a config.json held.

    Rules (``RotaryEmbeddingConfigMixin.convert_rope_params_to_dict`` / ``standardize_rope_params``): a
    non-empty ``rope_scaling`` (4.x name) replaces ``rope_parameters``; a top-level ``rope_theta`` fills
    ``rope_theta`` when the dict has none (else ``default_theta``); a top-level ``partial_rotary_factor``
    likewise; a legacy ``"type"`` key gives ``rope_type`` (the ``"type"`` key stays), missing = "default";
    llama3/yarn/longrope get ``original_max_position_embeddings = max_position_embeddings`` when absent.
    Returns a new dict (the inputs are not modified).
    """
    source = rope_scaling or rope_parameters or {}
    if not isinstance(source, Mapping):
        raise TypeError(f"rope_parameters / rope_scaling must be a dict, got {type(source).__name__}")
    params = copy.deepcopy(dict(source))
    params.setdefault("rope_theta", default_theta if rope_theta is None else rope_theta)
    if partial_rotary_factor is not None:
        params.setdefault("partial_rotary_factor", partial_rotary_factor)
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] in _NEEDS_ORIGINAL_MAX:
        params.setdefault("original_max_position_embeddings", max_position_embeddings)
    return params


def rope_head_dim(config: Any) -> int:
    """HF's head dim for RoPE: ``config.head_dim`` when set, else ``hidden_size // num_attention_heads``."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _param(params: Mapping[str, Any], key: str, rope_type: str) -> Any:
    if params.get(key) is None:
        raise ValueError(f"rope_parameters of rope_type {rope_type!r} need {key!r}; got {dict(params)}")
    return params[key]


def _rotary_dim(config: Any, params: Mapping[str, Any]) -> int:
    return int(rope_head_dim(config) * params.get("partial_rotary_factor", 1.0))


def _inverse_powers(base, dim: int, device) -> torch.Tensor:
    """``1 / base ** (2i / dim)`` in float32 from an integer arange, HF's expression for most types."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))


# ----------------------------------------------------------------------------------------------------------
# The frequency functions: (config, device, seq_len) -> (inv_freq float32 [dim/2], attention_scaling)
# ----------------------------------------------------------------------------------------------------------

def _default(config, device=None, seq_len=None, *, partial: bool = False) -> tuple[torch.Tensor, float]:
    """Plain RoPE. DiffLlama's (and Llama's) default ignores ``partial_rotary_factor`` (``partial`` False)."""
    params = config.rope_parameters
    dim = _rotary_dim(config, params) if partial else rope_head_dim(config)
    base = params["rope_theta"]
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim)), 1.0


def _linear(config, device=None, seq_len=None) -> tuple[torch.Tensor, float]:
    """Position interpolation: the default frequencies divided by ``factor``."""
    params = config.rope_parameters
    factor = _param(params, "factor", "linear")
    inv_freq = _inverse_powers(params["rope_theta"], _rotary_dim(config, params), device)
    inv_freq /= factor
    return inv_freq, 1.0


def _dynamic(config, device=None, seq_len=None) -> tuple[torch.Tensor, float]:
    """Dynamic NTK: base' = base * (factor * L / M - (factor - 1)) ** (dim / (dim - 2)) with L = max(seq_len,
    M). A tensor ``seq_len`` (a forward's max position + 1) makes base' float32 tensor arithmetic, as HF."""
    params = config.rope_parameters
    factor = _param(params, "factor", "dynamic")
    dim = _rotary_dim(config, params)
    M = config.max_position_embeddings
    if seq_len is None:
        seq_len = M
    elif isinstance(seq_len, torch.Tensor):
        seq_len = torch.maximum(seq_len, torch.tensor(M, dtype=seq_len.dtype, device=seq_len.device))
    else:
        seq_len = max(seq_len, M)
    base = params["rope_theta"] * ((factor * seq_len / M) - (factor - 1)) ** (dim / (dim - 2))
    return _inverse_powers(base, dim, device), 1.0


def _yarn_mscale(scale: float, mscale: float = 1) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_range(params: Mapping[str, Any], dim: int, base: float, original: int) -> tuple[float, float]:
    """(low, high) dimension bounds of YaRN's ramp (HF's ``find_correction_range``)."""
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def _yarn(config, device=None, seq_len=None) -> tuple[torch.Tensor, float]:
    """YaRN: per-dimension blend of interpolated (``1/(factor p_i)``) and original frequencies along a linear
    ramp; cos/sin scaled by ``attention_factor`` (given, else from mscale / mscale_all_dim / factor)."""
    params = config.rope_parameters
    base = params["rope_theta"]
    dim = _rotary_dim(config, params)
    original = _param(params, "original_max_position_embeddings", "yarn")
    factor = params.get("factor")
    if factor is None:
        factor = config.max_position_embeddings / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    low, high = _yarn_correction_range(params, dim, base, original)
    if low == high:
        high += 0.001  # HF: prevent a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp.to(device=device, dtype=torch.float)
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, attention_factor


def _longrope(config, device=None, seq_len=None) -> tuple[torch.Tensor, float]:
    """LongRoPE: ``1 / (ext_i * p_i)`` with ``ext = long_factor`` beyond the original length, else
    ``short_factor``; ``attention_factor`` given, else sqrt(1 + ln f / ln O) (1 when f <= 1)."""
    params = config.rope_parameters
    base = params["rope_theta"]
    dim = _rotary_dim(config, params)
    original = _param(params, "original_max_position_embeddings", "longrope")
    long_factor = _param(params, "long_factor", "longrope")
    short_factor = _param(params, "short_factor", "longrope")
    for name, values in (("long_factor", long_factor), ("short_factor", short_factor)):
        if len(values) != dim // 2:
            raise ValueError(f"rope_parameters[{name!r}] must hold {dim // 2} numbers (rotary dim / 2), "
                             f"got {len(values)}")
    factor = params.get("factor")
    if factor is None:
        factor = config.max_position_embeddings / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = long_factor if seq_len and seq_len > original else short_factor
    ext_factors = torch.tensor(ext, dtype=torch.float32, device=device)
    shape = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (ext_factors * base ** shape), attention_factor


def _llama3(config, device=None, seq_len=None) -> tuple[torch.Tensor, float]:
    """Llama 3.1: long wavelengths divided by ``factor``, short ones kept, a smooth blend in between."""
    params = config.rope_parameters
    inv_freq = _inverse_powers(params["rope_theta"], _rotary_dim(config, params), device)
    factor = _param(params, "factor", "llama3")
    low_freq_factor = _param(params, "low_freq_factor", "llama3")
    high_freq_factor = _param(params, "high_freq_factor", "llama3")
    old_context_len = _param(params, "original_max_position_embeddings", "llama3")
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed, inv_freq_llama), 1.0


def _proportional(config, device=None, seq_len=None) -> tuple[torch.Tensor, float]:
    """Proportional RoPE: the first ``partial_rotary_factor`` of the angles rotate (exponents over the full
    head dim), the rest get frequency 0; all divided by ``factor`` (default 1). Width is always head_dim/2."""
    params = config.rope_parameters
    head_dim = rope_head_dim(config)
    base = params["rope_theta"]
    factor = params.get("factor", 1.0)
    rope_angles = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
    rotated = 1.0 / (base ** (torch.arange(0, 2 * rope_angles, 2, dtype=torch.int64).to(
        device=device, dtype=torch.float) / head_dim))
    nope_angles = head_dim // 2 - rope_angles
    inv_freq = rotated
    if nope_angles > 0:
        inv_freq = torch.cat((rotated, torch.zeros(nope_angles, dtype=torch.float32, device=device)), dim=0)
    inv_freq /= factor
    return inv_freq, 1.0


ROPE_INIT_FUNCTIONS: dict[str, Callable[..., tuple[torch.Tensor, float]]] = {
    "default": _default, "linear": _linear, "dynamic": _dynamic, "yarn": _yarn, "longrope": _longrope,
    "llama3": _llama3, "proportional": _proportional,
}
ROPE_TYPES = tuple(ROPE_INIT_FUNCTIONS)


def compute_rope_parameters(config: Any, device=None, seq_len=None, *,
                            default_partial: bool = False) -> tuple[torch.Tensor, float]:
    """(inv_freq float32 [rotary_dim / 2], attention_scaling) for ``config.rope_parameters["rope_type"]``.

    ``default_partial``: whether the ``default`` type honours ``partial_rotary_factor`` (a family choice in
    HF: Llama's and DiffLlama's default ignores it; every other type honours it).
    """
    rope_type = config.rope_parameters.get("rope_type", "default")
    fn = ROPE_INIT_FUNCTIONS.get(rope_type)
    if fn is None:
        raise ValueError(f"unknown rope_type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return _default(config, device, seq_len, partial=default_partial)
    return fn(config, device, seq_len)


# ----------------------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------------------

class RotaryEmbedding(nn.Module):
    """HF's ``<Llama-like>RotaryEmbedding``: ``forward(x, position_ids [B or 1, N])`` -> ``(cos, sin)``
    [B or 1, N, 2 * len(inv_freq)] in x's dtype, computed in float32 (``freqs = pos * inv_freq``, duplicated
    halves, times ``attention_scaling``) then cast.

    State, as HF's: ``dynamic`` regrows its frequencies whenever ``max(position_ids) + 1`` (over the whole
    batch) exceeds the longest length seen, and restores the original ones once a forward is shorter than
    ``max_position_embeddings`` again; ``longrope`` picks its long or short factors per forward (a device-side
    select, so it can be captured in a CUDA graph; ``dynamic`` synchronises with the host and cannot).

    ``default_partial`` as in :func:`compute_rope_parameters`. ``inv_freq`` / ``original_inv_freq`` are
    non-persistent buffers that follow ``.to(device)``; a dtype cast (``model.to(bfloat16)``) recomputes them
    in float32 instead of rounding them, as ``from_pretrained(dtype=...)`` keeps them in HF (HF's own
    ``.to(dtype)`` would round them).
    """

    def __init__(self, config: Any, device=None, *, default_partial: bool = False):
        super().__init__()
        self.config = config
        self.default_partial = default_partial
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        if self.rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"unknown rope_type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self._reset(device)

    def _reset(self, device) -> None:
        inv_freq, self.attention_scaling = compute_rope_parameters(self.config, device,
                                                                   default_partial=self.default_partial)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)
        self.max_seq_len_cached = self.original_max_seq_len
        self.long_inv_freq = None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self._reset(self.inv_freq.device)
        elif self.long_inv_freq is not None:
            self.long_inv_freq = self.long_inv_freq.to(self.inv_freq.device)
        return self

    @property
    def host_synchronising(self) -> bool:
        """True when a forward reads a device value on the host (dynamic RoPE): not CUDA-graph capturable."""
        return self.rope_type == "dynamic"

    def _dynamic_update(self, position_ids: torch.Tensor) -> None:
        seq_len = torch.max(position_ids) + 1
        length = int(seq_len)
        cached = self.max_seq_len_cached
        if length > cached:
            inv_freq, self.attention_scaling = compute_rope_parameters(self.config, position_ids.device, seq_len)
            self.register_buffer("inv_freq", inv_freq, persistent=False)
            self.max_seq_len_cached = length
        if length < self.original_max_seq_len and cached > self.original_max_seq_len:
            self.register_buffer("inv_freq", self.original_inv_freq, persistent=False)
            self.max_seq_len_cached = self.original_max_seq_len

    def _longrope_update(self, position_ids: torch.Tensor) -> None:
        original = self.config.rope_parameters["original_max_position_embeddings"]
        seq_len = torch.max(position_ids) + 1
        if self.long_inv_freq is None:
            self.long_inv_freq = compute_rope_parameters(self.config, self.inv_freq.device, original + 1)[0]
        self.inv_freq.copy_(torch.where(seq_len > original, self.long_inv_freq, self.original_inv_freq))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rope_type == "dynamic":
            self._dynamic_update(position_ids)
        elif self.rope_type == "longrope":
            self._longrope_update(position_ids)
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)

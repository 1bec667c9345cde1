"""``ALiBiAttention``: BLOOM's self-attention (HF's ``BloomAttention``) on the fused attention kernels.

Parameters and state dict are HF's: ``query_key_value`` [3H, H] + bias, whose output rows are interleaved
per head (``[n_head, 3, head_dim]``: head h owns rows ``[3hd, 3(h+1)d)`` as q, k, v), and ``dense`` [H, H]
+ bias. The q/k/v of the fused projection are strided views ``[B, n_head, T, head_dim]`` handed to the
kernels without a copy.

Which op runs:

* no cache, or an empty one (training, prefill): :func:`tritonformers.nn.functional.attention`, causal,
  ALiBi with positions from the 2-D mask, key padding, attention dropout in training;
* a cache holding a past and 1-16 new tokens (decoding): the new k/v are written into the preallocated
  cache, then :func:`tritonformers.nn.functional.decode_attention` reads it (no autograd; CUDA-graph
  friendly);
* a cache with a past and more new tokens (chunked prefill), or gradients wanted with a past:
  :func:`attention` over the filled part of the cache, causal aligned bottom-right;
* ``output_attentions=True``: HF's eager computation (:func:`alibi_attention_eager`), since the
  probabilities are wanted; it returns them exactly as HF does (uniform rows where every key is masked).

The cache is any object with ``length`` (filled positions before this call, a host int), ``capacity``,
``write(layer_idx, k, v)``, ``key_cache``/``value_cache`` (per layer, [B, n_head, capacity, head_dim]) and
``lens`` ([B] int32 on the device, ``length`` + the new tokens): :class:`tritonformers.models.generation.KVCache`, on which the
model calls ``prepare(T)`` before its layers and ``commit(T)`` after them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.attention import MAX_DECODE_QUERIES, alibi_slopes, split_packed_qkv
from .functional import attention, decode_attention, packed_attention

__all__ = ["ALiBiAttention", "alibi_attention_eager", "sliced_linear", "num_attention_heads"]


def num_attention_heads(config) -> int:
    """The head count of a BLOOM-style config: ``n_head`` or its alias ``num_attention_heads``."""
    heads = getattr(config, "n_head", None)
    return int(heads if heads is not None else config.num_attention_heads)


def sliced_linear(x: torch.Tensor, weight: torch.Tensor, slices: int) -> torch.Tensor:
    """HF BLOOM's ``slow_but_exact`` projection: ``sum_i x[..., cols_i] @ weight[:, cols_i].T`` over
    ``slices`` column blocks (bounds ``int(i * in / slices)``), starting from zeros, **without the bias**
    (HF drops it on this path: ``BloomAttention.forward`` and ``BloomMLP.forward`` in
    transformers/models/bloom/modeling_bloom.py)."""
    width = weight.shape[-1] / slices
    out = torch.zeros(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
    for i in range(slices):
        lo, hi = int(i * width), int((i + 1) * width)
        out = out + F.linear(x[..., lo:hi], weight[:, lo:hi])
    return out


def alibi_attention_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                          mask: torch.Tensor | None, dropout_p: float = 0.0, training: bool = False):
    """HF's eager BLOOM attention, op for op; returns ``(context [B, H, T, D], probs [B, H, T, S])``.

    q [B, H, T, D] are the newest T of the S = past + T keys in k/v [B, H, S, D]; ``mask`` [B, S] (1 = real
    token) or None. Scores are ``baddbmm(alibi, q, k^T, alpha=1/sqrt(D))`` in the model dtype with the bias
    ``slope * ((cumsum(mask) - 1) * mask)`` rounded to that dtype, plus ``finfo.min`` where a key is padding
    or in the future, softmax in float32, probabilities cast back, dropout, then ``probs @ v``.
    """
    B, H, T, D = q.shape
    S = k.shape[2]
    dtype, device = q.dtype, q.device
    if mask is None:
        pos = torch.arange(S, device=device)[None, :].expand(B, S)
        allowed = torch.ones(B, S, dtype=torch.bool, device=device)
    else:
        pos = (mask.cumsum(dim=-1) - 1) * mask
        allowed = mask.bool()
    alibi = (slopes[None, :, None] * pos[:, None, :]).reshape(B * H, 1, S).to(dtype)
    scores = torch.baddbmm(alibi, q.reshape(B * H, T, D), k.reshape(B * H, S, D).transpose(1, 2),
                           beta=1.0, alpha=1.0 / math.sqrt(D)).view(B, H, T, S)
    causal = torch.arange(S, device=device)[None, :] <= torch.arange(T, device=device)[:, None] + (S - T)
    allowed = allowed[:, None, None, :] & causal[None, None]
    additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    probs = F.softmax(scores + additive, dim=-1, dtype=torch.float32).to(dtype)
    probs = F.dropout(probs, p=dropout_p, training=training)
    context = torch.bmm(probs.view(B * H, T, S), v.reshape(B * H, S, D)).view(B, H, T, D)
    return context, probs


class ALiBiAttention(nn.Module):
    """BLOOM self-attention with HF's ``BloomAttention`` parameters (see the module docstring).

    ``ALiBiAttention(config, layer_idx=None)``: ``config`` is any object with BLOOM's field names
    (``hidden_size``, ``n_head``/``num_attention_heads``, ``hidden_dropout``, ``attention_dropout``,
    ``pretraining_tp``, ``slow_but_exact``); ``layer_idx`` picks this layer's slot in a cache.

    ``forward(hidden_states, residual=None, attention_mask=None, layer_past=None, use_cache=False,
    output_attentions=False)``: hidden_states [B, T, H]; ``attention_mask`` [B, past + T] (or already
    padded to the cache capacity), 1 = real token, HF's 2-D mask; ``layer_past`` the cache (module
    docstring). Returns ``(out, probs)``: ``out = residual + dropout(dense(context))`` [B, T, H] (without
    the add when ``residual`` is None, so the caller can fuse it into the next LayerNorm), and the
    attention probabilities [B, n_head, T, past + T] in the model dtype when ``output_attentions``, else
    None. ``use_cache`` is accepted for HF's signature: a given cache is always updated, as in HF.

    Gradients flow through the new tokens' q/k/v; keys and values already in a cache are constants.
    """

    def __init__(self, config, layer_idx: int | None = None):
        super().__init__()
        self.hidden_size = int(config.hidden_size)
        self.num_heads = num_attention_heads(config)
        self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError(f"hidden_size must be divisible by the number of heads (got hidden_size "
                             f"{self.hidden_size} and {self.num_heads} heads)")
        self.pretraining_tp = int(getattr(config, "pretraining_tp", 1) or 1)
        self.slow_but_exact = bool(getattr(config, "slow_but_exact", False))
        self.hidden_dropout = float(getattr(config, "hidden_dropout", 0.0) or 0.0)
        self.attention_dropout = float(getattr(config, "attention_dropout", 0.0) or 0.0)
        self.inv_norm_factor = 1.0 / math.sqrt(self.head_dim)
        self.layer_idx = layer_idx
        self.query_key_value = nn.Linear(self.hidden_size, 3 * self.hidden_size, bias=True)
        self.dense = nn.Linear(self.hidden_size, self.hidden_size)
        self._slopes: dict[torch.device, torch.Tensor] = {}

    def alibi_slopes(self, device: torch.device) -> torch.Tensor:
        """HF's float32 slopes [n_head] on ``device``, computed once per device (never cast with the model)."""
        slopes = self._slopes.get(device)
        if slopes is None:
            slopes = self._slopes[device] = alibi_slopes(self.num_heads, device)
        return slopes

    def packed(self, fused_qkv: torch.Tensor) -> torch.Tensor:
        """[B, T, 3H] -> the packed [B, T, n_head, 3, head_dim] view of the interleaved layout (no copy)."""
        B, T, _ = fused_qkv.shape
        return fused_qkv.view(B, T, self.num_heads, 3, self.head_dim)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, layer_past=None, use_cache: bool = False,
                output_attentions: bool = False):
        B, T, _ = hidden_states.shape
        qkv = self.packed(self.query_key_value(hidden_states))
        q, k, v = split_packed_qkv(qkv)
        slopes = self.alibi_slopes(hidden_states.device)
        past = 0
        if layer_past is not None:
            if self.layer_idx is None:
                raise ValueError("ALiBiAttention needs a layer_idx to use a cache")
            past = layer_past.length
            layer_past.write(self.layer_idx, k, v)
        mask = _check_mask(attention_mask, B, past + T, layer_past)
        dropout_p = self.attention_dropout if self.training else 0.0
        probs = None
        if output_attentions:
            keys, values = self._keys_values(layer_past, k, v, past + T)
            context, probs = alibi_attention_eager(q, keys, values, slopes, _head(mask, past + T),
                                                   dropout_p, self.training)
        elif past == 0:  # one packed gradient for the fused projection in training
            context = packed_attention(qkv, causal=True, alibi_slopes=slopes, key_padding_mask=_head(mask, T),
                                       dropout_p=dropout_p)
        elif T <= MAX_DECODE_QUERIES and dropout_p == 0.0 and not (torch.is_grad_enabled() and q.requires_grad):
            kpm = None if mask is None else _pad_to(mask, layer_past.capacity)
            context = decode_attention(q, layer_past.key_cache[self.layer_idx],
                                       layer_past.value_cache[self.layer_idx], layer_past.lens,
                                       alibi_slopes=slopes, key_padding_mask=kpm)
        else:
            keys, values = self._keys_values(layer_past, k, v, past + T)
            context = attention(q, keys, values, causal=True, alibi_slopes=slopes,
                                key_padding_mask=_head(mask, past + T), dropout_p=dropout_p)
        context = context.transpose(1, 2).reshape(B, T, self.hidden_size)
        out = self.project(context)
        out = F.dropout(out, p=self.hidden_dropout, training=self.training)
        return (out if residual is None else residual + out), probs

    def project(self, context: torch.Tensor) -> torch.Tensor:
        """The output projection ``dense``, or HF's bias-less sliced sum under ``slow_but_exact``."""
        if self.pretraining_tp > 1 and self.slow_but_exact:
            return sliced_linear(context, self.dense.weight, self.pretraining_tp)
        return self.dense(context)

    def _keys_values(self, cache, k, v, length: int):
        if cache is None:
            return k, v
        return (cache.key_cache[self.layer_idx][:, :, :length], cache.value_cache[self.layer_idx][:, :, :length])


def _check_mask(mask: torch.Tensor | None, batch: int, kv_len: int, cache) -> torch.Tensor | None:
    """The 2-D mask as an integer/bool tensor [B, kv_len or capacity] (a float 1/0 mask becomes int64)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"attention_mask must be HF's 2-D mask [batch, past + new tokens] (1 = real token), got {got}")
    allowed = {kv_len} | ({cache.capacity} if cache is not None else set())
    if mask.shape[0] != batch or mask.shape[1] not in allowed:
        raise ValueError(f"attention_mask must have shape [{batch}, {kv_len}] (past + new tokens), "
                         f"got {list(mask.shape)}")
    if mask.is_floating_point():
        mask = mask.long()
    return mask


def _head(mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    return mask if mask is None or mask.shape[1] == length else mask[:, :length]


def _pad_to(mask: torch.Tensor, length: int) -> torch.Tensor:
    return mask if mask.shape[1] == length else F.pad(mask, (0, length - mask.shape[1]))

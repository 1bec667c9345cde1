"""Reformer's self-attention modules, drop-in for HF's ``LocalSelfAttention`` and ``LSHSelfAttention``.

They take ``config`` (tritonformers' ReformerConfig or transformers' own: any object with HF's field names),
hold HF's parameters under HF's names (``query``/``key``/``value``, ``query_key``/``value``), so the HF
module's state dict loads, and return HF's output structure: ``(hidden_states, attention_probs, buckets)``
with the merged-head output [B, L, num_heads * head_size] first (the output dense lives in the enclosing attention block, as in HF).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .. import runtime
from ..kernels.local_attention import local_attention_reference
from ..kernels.lsh_attention import (KEY_NORM_EPS, SELF_MASK_VALUES, bucket_count, lsh_attention_reference, lsh_hash,
                                     lsh_sort)
from . import functional as F


class ReformerSelfAttentionOutput(NamedTuple):
    hidden_states: torch.Tensor
    attention_probs: torch.Tensor | None = None
    buckets: torch.Tensor | None = None


def _split_heads(x: torch.Tensor, num_heads: int, head_size: int) -> torch.Tensor:
    return x.view(*x.shape[:2], num_heads, head_size).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


class LocalSelfAttention(nn.Module):
    """Chunked local self-attention on the fused kernel (``tritonformers.nn.functional.local_attention``).

    forward(hidden_states [B, L, hidden], attention_mask=None [B, L] (1 = real token)) ->
    ``ReformerSelfAttentionOutput`` with hidden_states [B, L, heads * head_size]. As in HF only the keys are
    divided by sqrt(head_size); ``is_decoder`` makes it causal; L must be a multiple of the chunk length
    when it exceeds it (the Reformer model pads). ``output_attentions=True`` runs the PyTorch reference instead
    (the kernel never forms the probabilities) and returns them in HF's layout; with the Triton backend forced
    it is an error. ``decode_step`` is HF's cached one-token step.
    """

    def __init__(self, config, layer_idx: int | None = None):
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.attention_head_size
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.chunk_length = config.local_attn_chunk_length
        self.num_chunks_before = config.local_num_chunks_before
        self.num_chunks_after = config.local_num_chunks_after
        self.is_decoder = config.is_decoder
        self.dropout = config.local_attention_probs_dropout_prob
        self.layer_idx = layer_idx
        self.query = nn.Linear(config.hidden_size, self.all_head_size, bias=False)
        self.key = nn.Linear(config.hidden_size, self.all_head_size, bias=False)
        self.value = nn.Linear(config.hidden_size, self.all_head_size, bias=False)

    def forward(self, hidden_states, attention_mask=None, past_buckets_states=None, use_cache=False,
                output_attentions=False, **kwargs) -> ReformerSelfAttentionOutput:
        if past_buckets_states is not None:
            raise ValueError("past_buckets_states: cached decoding is served by the Reformer model "
                             "(tritonformers.models.reformer), not by this module on its own")
        _check_output_attentions(output_attentions)
        L = hidden_states.shape[1]
        chunk = self.chunk_length if self.chunk_length is not None else L
        if self.chunk_length is None and (self.num_chunks_before or self.num_chunks_after):
            raise ValueError("local_attn_chunk_length=None needs local_num_chunks_before/after = 0 (as HF)")
        heads = (self.num_attention_heads, self.attention_head_size)
        q = _split_heads(self.query(hidden_states), *heads)
        k = _split_heads(self.key(hidden_states), *heads) / math.sqrt(self.attention_head_size)
        v = _split_heads(self.value(hidden_states), *heads)
        options = dict(chunk_length=chunk, num_chunks_before=self.num_chunks_before,
                       num_chunks_after=self.num_chunks_after, causal=bool(self.is_decoder),
                       key_padding_mask=attention_mask, dropout_p=self.dropout if self.training else 0.0)
        if output_attentions:
            out, probs = local_attention_reference(q, k, v, **options, return_probs=True)
            return ReformerSelfAttentionOutput(_merge_heads(out), probs)
        return ReformerSelfAttentionOutput(_merge_heads(F.local_attention(q, k, v, **options)))

    def decode_step(self, hidden_states: torch.Tensor, past_states: torch.Tensor) -> torch.Tensor:
        """HF's cached one-token step: hidden_states [B, 1, hidden] (post-LayerNorm, as cached) attends to the
        cached states of its own and ``num_chunks_before`` previous chunks, ``past_states[:, start:]`` with
        ``start = (Lp // c - before) * c`` (Python slice: negative counts from the end), and to itself; no mask
        (the causal one is all true). Returns [B, 1, heads * head_size]. Torch ops: one query row against a
        few chunks is launch-bound glue a kernel would not speed up."""
        c = self.chunk_length
        start = (past_states.shape[1] // c - self.num_chunks_before) * c
        kv = torch.cat([past_states[:, start:], hidden_states], dim=1)
        heads = (self.num_attention_heads, self.attention_head_size)
        q = _split_heads(self.query(hidden_states), *heads)
        k = _split_heads(self.key(kv), *heads) / math.sqrt(self.attention_head_size)
        v = _split_heads(self.value(kv), *heads)
        dots = torch.matmul(q, k.transpose(-1, -2))
        probs = torch.exp(dots - torch.logsumexp(dots, dim=-1, keepdim=True))
        return _merge_heads(torch.matmul(probs, v))


def _check_output_attentions(output_attentions) -> None:
    """The probabilities exist only on the reference path (the kernels never form them): it runs for
    ``output_attentions=True`` unless the Triton backend was demanded, which is an error, not a fallback."""
    if output_attentions and runtime.get_backend() == "triton":
        raise ValueError("output_attentions=True needs the PyTorch reference path (the fused kernels never form "
                         "the attention probabilities); TRITONFORMERS_BACKEND / use_backend says 'triton'")


def _key_norm(x: torch.Tensor) -> torch.Tensor:
    """LSH keys from the shared qk: ``x * rsqrt(mean(x^2) + 1e-6) / sqrt(D)`` (HF's _len_and_dim_norm)."""
    x = x * torch.rsqrt(torch.mean(x**2, -1, keepdim=True) + KEY_NORM_EPS)
    return x / math.sqrt(x.shape[-1])


def _softmax_attend(q, k, v, self_mask):
    """exp(S - logsumexp S) @ v with S = q k^T and the SELF value where ``self_mask``; also the lse."""
    dots = torch.matmul(q, k.transpose(-1, -2))
    dots = torch.where(self_mask, torch.tensor(SELF_MASK_VALUES[dots.dtype], dtype=dots.dtype, device=dots.device),
                       dots)
    lse = torch.logsumexp(dots, dim=-1, keepdim=True)
    return torch.matmul(torch.exp(dots - lse), v), lse


class LSHSelfAttention(nn.Module):
    """LSH self-attention on the fused kernel (``tritonformers.nn.functional.lsh_attention``).

    forward(hidden_states [B, L, hidden], attention_mask=None [B, L], num_hashes=None (config's),
    buckets=None (reuse earlier hashing, as the reversible backward does)) -> ``ReformerSelfAttentionOutput``
    with hidden_states [B, L, heads * head_size] and the buckets [B, heads, num_hashes, L] (None when
    L <= lsh_attn_chunk_length, where HF attends over the whole sequence without hashing).

    Hashing draws its rotations from torch's generator exactly as HF does (one draw per call, after
    ``torch.manual_seed(hash_seed)`` when the config sets it), so the same seed gives the same buckets. With
    ``num_buckets=None`` the first chunked call picks it as HF does and writes it into the config too.
    ``dropout_seed`` (the reversible Reformer layers): hash first, then ``torch.manual_seed(dropout_seed)``
    before the attention draws its dropout, so a recomputation given the buckets draws the same masks (the
    caller restores its RNG state). ``output_attentions`` as for LocalSelfAttention. ``decode_step`` is HF's
    cached one-token step.
    """

    def __init__(self, config, layer_idx: int | None = None):
        super().__init__()
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.attention_head_size
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.chunk_length = config.lsh_attn_chunk_length
        self.num_hashes = config.num_hashes
        self.num_buckets = config.num_buckets
        self.num_chunks_before = config.lsh_num_chunks_before
        self.num_chunks_after = config.lsh_num_chunks_after
        self.hash_seed = config.hash_seed
        self.is_decoder = config.is_decoder
        self.max_position_embeddings = config.max_position_embeddings
        self.dropout = config.lsh_attention_probs_dropout_prob
        self.layer_idx = layer_idx
        self.query_key = nn.Linear(config.hidden_size, self.all_head_size, bias=False)
        self.value = nn.Linear(config.hidden_size, self.all_head_size, bias=False)

    def forward(self, hidden_states, attention_mask=None, num_hashes=None, buckets=None, past_buckets_states=None,
                use_cache=False, output_attentions=False, dropout_seed=None, **kwargs) -> ReformerSelfAttentionOutput:
        if past_buckets_states is not None:
            raise ValueError("past_buckets_states: cached decoding is served by the Reformer model "
                             "(tritonformers.models.reformer), not by this module on its own")
        _check_output_attentions(output_attentions)
        num_hashes = self.num_hashes if num_hashes is None else num_hashes
        L = hidden_states.shape[1]
        if L > self.chunk_length and self.num_buckets is None and buckets is None:
            from ..kernels.lsh_attention import auto_num_buckets
            self.num_buckets = auto_num_buckets(L, self.chunk_length, self.max_position_embeddings)
            self.config.num_buckets = self.num_buckets
        heads = (self.num_attention_heads, self.attention_head_size)
        qk = _split_heads(self.query_key(hidden_states), *heads)
        v = _split_heads(self.value(hidden_states), *heads)
        if dropout_seed is not None:  # hash, then reseed: a recomputation given the buckets draws the same dropout
            if L > self.chunk_length and buckets is None:
                buckets = self._hash(qk, num_hashes, attention_mask)
            torch.manual_seed(dropout_seed)
        if output_attentions:
            return self._attend_with_probs(qk, v, attention_mask, num_hashes, buckets)
        out, buckets = F.lsh_attention(
            qk, v, chunk_length=self.chunk_length, num_hashes=num_hashes, num_buckets=self.num_buckets,
            num_chunks_before=self.num_chunks_before, num_chunks_after=self.num_chunks_after,
            causal=bool(self.is_decoder), key_padding_mask=attention_mask, hash_seed=self.hash_seed,
            dropout_p=self.dropout if self.training else 0.0, buckets=buckets, return_buckets=True)
        return ReformerSelfAttentionOutput(_merge_heads(out), None, buckets)

    def _attend_with_probs(self, qk, v, attention_mask, num_hashes, buckets) -> ReformerSelfAttentionOutput:
        """The reference path, returning HF's probabilities too (sorted layout; [B, H, L, L] unchunked)."""
        B, H, L, _ = qk.shape
        options = dict(chunk_length=self.chunk_length, num_hashes=num_hashes, num_chunks_before=self.num_chunks_before,
                       num_chunks_after=self.num_chunks_after)
        if L <= self.chunk_length:  # HF: the whole sequence, no hashing
            options = dict(chunk_length=L, num_hashes=1, num_chunks_before=0, num_chunks_after=0)
            buckets, perm = None, torch.arange(L, device=qk.device).expand(B, H, L)
        else:
            buckets = self._hash(qk, num_hashes, attention_mask) if buckets is None else buckets
            perm = lsh_sort(buckets)
        out, probs = lsh_attention_reference(qk, v, perm, **options, causal=bool(self.is_decoder),
                                             key_padding_mask=attention_mask,
                                             dropout_p=self.dropout if self.training else 0.0, return_probs=True)
        return ReformerSelfAttentionOutput(_merge_heads(out), probs, buckets)

    def _hash(self, qk: torch.Tensor, num_hashes: int, attention_mask=None) -> torch.Tensor:
        if self.num_buckets is None:
            raise ValueError("num_buckets is None and no chunked call has chosen it yet (HF fails here too): set "
                             "config.num_buckets, or prefill more than lsh_attn_chunk_length tokens")
        return lsh_hash(qk, num_hashes, self.num_buckets, attention_mask, self.hash_seed)

    def decode_step(self, hidden_states: torch.Tensor, past_states: torch.Tensor, past_buckets: torch.Tensor,
                    num_hashes: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """HF's cached one-token step (its forward given past_buckets_states). hidden_states [B, 1, hidden] and
        past_states [B, Lp, hidden] are post-LayerNorm; past_buckets [B, heads, num_hashes, Lp] (offsets
        included) or empty.

        Without cached buckets the token attends to all Lp + 1 states (itself SELF-masked); once Lp + 1 reaches
        the chunk length those are hashed and returned as the layer's buckets. With cached buckets the new
        query is hashed (pad-bucket offsets kept), each (row, head, round) is stably sorted by bucket, and the
        query attends to the window of its sorted chunk and ``before``/``after`` neighbours (mod Lp + 1), the
        rounds combined by their log-sum-exp. Unlike HF (whose gather reads batch row 0 for every row), each row
        reads its own states. Returns ([B, 1, heads * head_size], new buckets or None)."""
        num_hashes = self.num_hashes if num_hashes is None else num_hashes
        heads = (self.num_attention_heads, self.attention_head_size)
        q = _split_heads(self.query_key(hidden_states), *heads)
        states = torch.cat([past_states, hidden_states], dim=1)
        B, Lkv = states.shape[:2]
        if past_buckets.numel() == 0:
            qk = _split_heads(self.query_key(states), *heads)
            v = _split_heads(self.value(states), *heads)
            is_self = torch.arange(Lkv, device=states.device) == Lkv - 1
            out, _ = _softmax_attend(q, _key_norm(qk), v, is_self)
            buckets = self._hash(qk, num_hashes) if Lkv >= self.chunk_length else None
            return _merge_heads(out), buckets
        new = self._hash(q, num_hashes)
        if past_buckets.max() > num_hashes * bucket_count(self.num_buckets)[1] - 1:  # the prefill had a pad bucket
            new = new + torch.arange(num_hashes, device=new.device).view(1, 1, -1, 1)
        all_buckets = torch.cat([past_buckets, new], dim=-1)
        order = torch.argsort(all_buckets * Lkv + torch.arange(Lkv, device=states.device), dim=-1)
        slot = torch.argmax((order == Lkv - 1).int(), dim=-1, keepdim=True)  # the new token's sorted slot
        c, width = self.chunk_length, self.chunk_length * (1 + self.num_chunks_before + self.num_chunks_after)
        window = ((slot // c - self.num_chunks_before) * c + torch.arange(width, device=states.device)) % Lkv
        kpos = torch.gather(order, -1, window)  # [B, H, R, W] original positions
        picked = states[torch.arange(B, device=states.device).view(B, 1, 1, 1), kpos]  # [B, H, R, W, hidden]
        per_head = lambda w: w.view(*heads, -1)  # noqa: E731  [H, dh, hidden]
        qk = torch.einsum("bhrwe,hde->bhrwd", picked, per_head(self.query_key.weight))
        v = torch.einsum("bhrwe,hde->bhrwd", picked, per_head(self.value.weight))
        is_self = (kpos == Lkv - 1)[..., None, :]
        out, lse = _softmax_attend(q[:, :, None].expand(-1, -1, num_hashes, -1, -1), _key_norm(qk), v, is_self)
        if num_hashes > 1:
            out = torch.sum(out * torch.exp(lse - torch.logsumexp(lse, dim=2, keepdim=True)), dim=2)
        else:
            out = out[:, :, 0]
        return _merge_heads(out), new

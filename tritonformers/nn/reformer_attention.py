"""Reformer's self-attention modules, drop-in for HF's ``LocalSelfAttention`` and ``LSHSelfAttention``.

They take ``config`` (tritonformers' ReformerConfig or transformers' own: any object with HF's field names),
hold HF's parameters under HF's names (``query``/``key``/``value``, ``query_key``/``value``), so the HF module's state dict loads,
and return HF's output structure: ``(hidden_states, attention_probs, buckets)`` with the merged-head output
[B, L, num_heads * head_size] first (the output dense lives in the enclosing attention block, as in HF).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

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
    when it exceeds it (the Reformer model pads). ``output_attentions`` is not offered: the point of the
    kernel is never to form the probabilities.
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
        if output_attentions:
            raise ValueError("output_attentions=True is not supported: the fused kernel never forms the "
                             "attention probabilities (use transformers' module to inspect them)")
        L = hidden_states.shape[1]
        chunk = self.chunk_length if self.chunk_length is not None else L
        if self.chunk_length is None and (self.num_chunks_before or self.num_chunks_after):
            raise ValueError("local_attn_chunk_length=None needs local_num_chunks_before/after = 0 (as HF)")
        heads = (self.num_attention_heads, self.attention_head_size)
        q = _split_heads(self.query(hidden_states), *heads)
        k = _split_heads(self.key(hidden_states), *heads) / math.sqrt(self.attention_head_size)
        v = _split_heads(self.value(hidden_states), *heads)
        out = F.local_attention(q, k, v, chunk_length=chunk, num_chunks_before=self.num_chunks_before,
                                num_chunks_after=self.num_chunks_after, causal=bool(self.is_decoder),
                                key_padding_mask=attention_mask, dropout_p=self.dropout if self.training else 0.0)
        return ReformerSelfAttentionOutput(_merge_heads(out))


class LSHSelfAttention(nn.Module):
    """LSH self-attention on the fused kernel (``tritonformers.nn.functional.lsh_attention``).

    forward(hidden_states [B, L, hidden], attention_mask=None [B, L], num_hashes=None (config's),
    buckets=None (reuse earlier hashing, as the reversible backward does)) -> ``ReformerSelfAttentionOutput``
    with hidden_states [B, L, heads * head_size] and the buckets [B, heads, num_hashes, L] (None when
    L <= lsh_attn_chunk_length, where HF attends over the whole sequence without hashing).

    Hashing draws its rotations from torch's generator exactly as HF does (one draw per call, after
    ``torch.manual_seed(hash_seed)`` when the config sets it), so the same seed gives the same buckets. With
    ``num_buckets=None`` the first chunked call picks it as HF does and writes it into the config too.
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
                use_cache=False, output_attentions=False, **kwargs) -> ReformerSelfAttentionOutput:
        if past_buckets_states is not None:
            raise ValueError("past_buckets_states: cached decoding is served by the Reformer model "
                             "(tritonformers.models.reformer), not by this module on its own")
        if output_attentions:
            raise ValueError("output_attentions=True is not supported: the fused kernel never forms the "
                             "attention probabilities (use transformers' module to inspect them)")
        num_hashes = self.num_hashes if num_hashes is None else num_hashes
        L = hidden_states.shape[1]
        if L > self.chunk_length and self.num_buckets is None and buckets is None:
            from ..kernels.lsh_attention import auto_num_buckets
            self.num_buckets = auto_num_buckets(L, self.chunk_length, self.max_position_embeddings)
            self.config.num_buckets = self.num_buckets
        heads = (self.num_attention_heads, self.attention_head_size)
        qk = _split_heads(self.query_key(hidden_states), *heads)
        v = _split_heads(self.value(hidden_states), *heads)
        out, buckets = F.lsh_attention(
            qk, v, chunk_length=self.chunk_length, num_hashes=num_hashes, num_buckets=self.num_buckets,
            num_chunks_before=self.num_chunks_before, num_chunks_after=self.num_chunks_after,
            causal=bool(self.is_decoder), key_padding_mask=attention_mask, hash_seed=self.hash_seed,
            dropout_p=self.dropout if self.training else 0.0, buckets=buckets, return_buckets=True)
        return ReformerSelfAttentionOutput(_merge_heads(out), None, buckets)

"""FSMT (fairseq's WMT19 translation models) on the tritonformers kernels, loading and matching HuggingFace's
``transformers`` FSMT (transformers.models.fsmt.modeling_fsmt): ``FSMTConfig``, ``FSMTModel``, ``FSMTForConditionalGeneration``.

A post-norm encoder-decoder (as transformers' modeling_fsmt):

* every attention (padding-masked encoder self-attention, causal decoder self-attention, cross-attention over
  the encoder output) runs through :func:`tritonformers.nn.functional.attention`, or
  :func:`~tritonformers.nn.functional.decode_attention` for a decoding step against the static caches;
* every residual add happens inside the LayerNorm after it (``LayerNorm(h, residual=x)``, one kernel);
* positions are fairseq's sinusoids (sines then cosines, frequency denominator ``half - 1``, pad row zero,
  first real token at ``pad + 1``), computed, never loaded: checkpoints may or may not hold
  ``embed_positions.weight``, and such keys are ignored;
* with labels and gradients enabled the loss is the fused linear cross-entropy and ``logits`` is None.

Where transformers is plainly wrong this module does the right thing (each place says so):

* the decoder self-attention is always causal. HF's forward skips the causal mask whenever ``use_cache`` is
  on (the default when ``decoder_input_ids`` are given): transformers 5.25 then lets every position see the
  future, 5.17 decodes only the last token. Parity tests compare with HF's ``use_cache=False`` call;
* ``labels`` without ``decoder_input_ids`` train on the labels shifted right (``</s>`` first), as every
  other seq2seq model does; HF decodes the shifted *source* then (its forward without either keeps HF's rule);
* ``generate`` infers the encoder attention mask from pad tokens when none is passed (transformers builds none
  for encoder-decoders and attends to pads).

Generation (:meth:`FSMTForConditionalGeneration.generate`) runs through the shared
:mod:`tritonformers.models.generation`: the encoder runs once per batch, cross-attention keys/values are
projected once per sentence (beams of one sentence share them: beam reordering never touches them), the
decoder's self-attention cache is a static :class:`KVCache`, and the one-token step is CUDA-graph capturable
(positions come from the cache's device-side lengths).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import LayerNorm
from ..nn.functional import attention, decode_attention, fused_linear_cross_entropy, gelu
from .generation import CachedDecoderSession, GenerationConfig, GenerationMixin, KVCache
from .loading import ConfigBase, PreTrainedMixin, hf_init_
from .outputs import ModelOutput, cache_argument
from .outputs import returned as _returned

__all__ = [
    "FSMTConfig", "PretrainedFSMTModel", "FSMTModel", "FSMTForConditionalGeneration", "FSMTEncoder",
    "FSMTDecoder", "FSMTAttention", "EncoderDecoderCache", "BaseModelOutput", "Seq2SeqModelOutput",
    "Seq2SeqLMOutput", "sinusoidal_positions", "shift_tokens_right",
]


class FSMTConfig(ConfigBase):
    """HF's ``FSMTConfig``: same fields, defaults and aliases (``hidden_size`` -> ``d_model``,
    ``vocab_size`` -> ``tgt_vocab_size``, ``num_attention_heads`` -> ``encoder_attention_heads``,
    ``num_hidden_layers`` -> ``encoder_layers``), including the generation defaults it carries (``num_beams``
    5, ``max_length`` 200, forced EOS). A nested ``decoder`` key of old files is dropped, as HF does. A
    config.json of another ``model_type`` is an error (it would build a wrong model silently)."""

    model_type = "fsmt"
    attribute_map = {"num_attention_heads": "encoder_attention_heads", "hidden_size": "d_model",
                     "vocab_size": "tgt_vocab_size", "num_hidden_layers": "encoder_layers"}
    defaults = dict(
        langs=["en", "de"], src_vocab_size=42024, tgt_vocab_size=42024, activation_function="relu", d_model=1024,
        max_length=200, max_position_embeddings=1024, encoder_ffn_dim=4096, encoder_layers=12,
        encoder_attention_heads=16, encoder_layerdrop=0.0, decoder_ffn_dim=4096, decoder_layers=12,
        decoder_attention_heads=16, decoder_layerdrop=0.0, attention_dropout=0.0, dropout=0.1,
        activation_dropout=0.0, init_std=0.02, decoder_start_token_id=2, is_encoder_decoder=True,
        scale_embedding=True, tie_word_embeddings=False, num_beams=5, length_penalty=1.0, early_stopping=False,
        use_cache=True, pad_token_id=1, bos_token_id=0, eos_token_id=2, forced_eos_token_id=2,
    )

    def _check_model_type(self, kwargs: dict) -> None:
        given = kwargs.pop("model_type", None)
        if given not in (None, self.model_type):
            raise ValueError(f"this is a {given!r} checkpoint, not an FSMT one (config.json model_type must be "
                             f"'fsmt')")

    def _post_init(self) -> None:
        self.__dict__.pop("decoder", None)


# ----------------------------------------------------------------------------------------------------------
# Outputs (transformers 5.25's names and field order: the cache field is ``cache``)
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class BaseModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclasses.dataclass(eq=False)
class Seq2SeqModelOutput(ModelOutput):
    """FSMTModel's output; ``last_hidden_state`` holds the LOGITS [B, T, tgt_vocab_size] (HF's quirk: the
    output projection lives inside FSMT's decoder)."""

    last_hidden_state: torch.Tensor = None
    cache: Any = None
    decoder_hidden_states: tuple | None = None
    decoder_attentions: tuple | None = None
    cross_attentions: tuple | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple | None = None
    encoder_attentions: tuple | None = None


@dataclasses.dataclass(eq=False)
class Seq2SeqLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Any = None
    decoder_hidden_states: tuple | None = None
    decoder_attentions: tuple | None = None
    cross_attentions: tuple | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple | None = None
    encoder_attentions: tuple | None = None


# ----------------------------------------------------------------------------------------------------------
# Positions, shifting, activations
# ----------------------------------------------------------------------------------------------------------

def sinusoidal_positions(rows: int, dim: int, padding_idx: int | None, dtype=torch.float32,
                         device=None) -> torch.Tensor:
    """fairseq's table [rows, dim] (fairseq's SinusoidalPositionalEmbedding), in float32 then cast to ``dtype`` (as HF rounds it):
    ``freq_j = exp(-j ln(10000) / (half - 1))``, row r = [sin(r freq), cos(r freq)] (+ a zero column for odd
    dim), row ``padding_idx`` all zeros."""
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freq = torch.exp(torch.arange(half, dtype=torch.int64, device=device).float() * -step)
    angle = torch.arange(rows, dtype=torch.int64, device=device).float().unsqueeze(1) * freq.unsqueeze(0)
    table = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)
    if dim % 2 == 1:
        table = torch.cat([table, torch.zeros(rows, 1, device=device)], dim=1)
    if padding_idx is not None:
        table[padding_idx, :] = 0
    return table.to(dtype)


def shift_tokens_right(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """HF's shift: -100 -> pad, then per row [last non-pad token (normally </s>), ids[:-1]...]. Unlike HF's,
    the argument is not modified in place (HF's in-place -100 -> pad rewrite can turn ignored labels into
    counted pad labels when the tensor is reused)."""
    ids = input_ids.masked_fill(input_ids == -100, pad_token_id)
    out = ids.clone()
    last = (ids.ne(pad_token_id).sum(dim=1) - 1).unsqueeze(-1)
    out[:, 0] = ids.gather(1, last).squeeze(-1)
    out[:, 1:] = ids[:, :-1]
    return out


_ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish")


def _activation(name: str, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """act(x + bias) for transformers' ACT2FN names; the GELUs fuse the bias into the kernel."""
    if name == "gelu":
        return gelu(x, "none", bias=bias)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return gelu(x, "tanh", bias=bias)
    if name == "relu":
        return torch.relu(x + bias)
    return F.silu(x + bias)


# ----------------------------------------------------------------------------------------------------------
# Caches
# ----------------------------------------------------------------------------------------------------------

class EncoderDecoderCache:
    """The decoder's state across forward calls (HF's ``EncoderDecoderCache`` role).

    ``self_attention_cache``: a :class:`KVCache` [B, H_dec, capacity, D] of the decoder's self-attention;
    ``cross_attention_cache``: per layer ``(k, v)`` [B, H_dec, S, D] projected from the encoder output at the
    first call and reused. ``get_seq_length()`` = decoded positions; ``reorder_cache(index)`` permutes rows.
    """

    def __init__(self, self_attention_cache: KVCache, cross_attention_cache: list | None = None):
        self.self_attention_cache = self_attention_cache
        self.cross_attention_cache = cross_attention_cache

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.self_attention_cache.length

    def __len__(self) -> int:
        return len(self.self_attention_cache)

    def reorder_cache(self, index: torch.Tensor) -> None:
        self.self_attention_cache.reorder_cache(index)
        if self.cross_attention_cache is not None:
            index = index.to(self.cross_attention_cache[0][0].device)
            self.cross_attention_cache = [(k.index_select(0, index), v.index_select(0, index))
                                          for k, v in self.cross_attention_cache]

    def __repr__(self) -> str:
        cross = self.cross_attention_cache is not None
        return f"EncoderDecoderCache(self={self.self_attention_cache!r}, cross={cross})"


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------

class FSMTAttention(nn.Module):
    """fairseq's multi-head attention (HF's ``Attention``): ``k_proj``, ``v_proj``, ``q_proj``, ``out_proj``
    (all with bias). q = (x W_q^T + b_q) * D^-0.5 (scaled after its bias, as HF), heads are contiguous
    channel blocks, ``softmax(q k^T + masks) v`` runs in the fused kernels (scale 1: q is pre-scaled)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, layer_idx: int | None = None):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"d_model ({embed_dim}) must be divisible by the number of heads ({num_heads})")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim ** -0.5
        self.dropout = dropout
        self.layer_idx = layer_idx
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, C] -> [B, H, T, D] (a strided view)."""
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self._heads(self.q_proj(x) * self.scaling)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(self.k_proj(x)), self._heads(self.v_proj(x))

    def merge(self, context: torch.Tensor) -> torch.Tensor:
        """[B, H, T, D] -> out_proj([B, T, C])."""
        B, H, T, D = context.shape
        return self.out_proj(context.transpose(1, 2).reshape(B, T, H * D))

    def attend(self, q, k, v, *, causal: bool, key_padding_mask) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        return attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=1.0, dropout_p=p)

    def self_attention(self, x: torch.Tensor, key_padding_mask, causal: bool, cache: KVCache | None):
        """Self-attention of x [B, T, C]; with a cache (already ``prepare``-d for T tokens) the new keys are
        written there and the queries attend to the past too (causal bottom-right). ``key_padding_mask`` is
        [B, T], or [B, past + T] / [B, capacity] with a cache, 1 = a real token."""
        q = self.query(x)
        k, v = self.keys_values(x)
        if cache is None or cache.length == 0:
            if cache is not None:
                cache.write(self.layer_idx, k, v)
            mask = None if key_padding_mask is None else key_padding_mask[:, :x.shape[1]]
            return self.merge(self.attend(q, k, v, causal=causal, key_padding_mask=mask))
        cache.write(self.layer_idx, k, v)
        n = cache.length + x.shape[1]
        if _can_decode(q, self.training, self.dropout):
            mask = None if key_padding_mask is None else F.pad(key_padding_mask,
                                                               (0, cache.capacity - key_padding_mask.shape[1]))
            ctx = decode_attention(q, cache.key_cache[self.layer_idx], cache.value_cache[self.layer_idx],
                                   cache.lens, key_padding_mask=mask, scale=1.0)
        else:
            keys = cache.key_cache[self.layer_idx][:, :, :n]
            values = cache.value_cache[self.layer_idx][:, :, :n]
            mask = None if key_padding_mask is None else key_padding_mask[:, :n]
            ctx = self.attend(q, keys, values, causal=True, key_padding_mask=mask)
        return self.merge(ctx)

    def cross_attention(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], key_padding_mask,
                        lens: torch.Tensor | None = None):
        """Attention of x [B, T, C] over the encoder's keys/values ``kv`` [B, H, S, D] (no causal mask);
        ``lens`` ([B] int32 = S) selects the decode kernel for a no-grad step."""
        q = self.query(x)
        k, v = kv
        if lens is not None and _can_decode(q, self.training, self.dropout):
            return self.merge(decode_attention(q, k, v, lens, key_padding_mask=key_padding_mask, scale=1.0))
        return self.merge(self.attend(q, k, v, causal=False, key_padding_mask=key_padding_mask))


def _can_decode(q: torch.Tensor, training: bool, dropout: float) -> bool:
    """The decode kernel serves 1-16 queries, inference only."""
    no_grad = not (torch.is_grad_enabled() and q.requires_grad)
    return q.shape[2] <= 16 and no_grad and not (training and dropout > 0)


class _FeedForwardMixin:
    """fc1 / fc2 on the layer itself (HF's names): fc2(dropout(act(fc1(x)))), the activation (and fc1's bias,
    for the GELUs) fused."""

    def _init_ffn(self, d_model: int, ffn_dim: int, config) -> None:
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.activation_function = config.activation_function
        self.activation_dropout = config.activation_dropout

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        h = _activation(self.activation_function, F.linear(x, self.fc1.weight), self.fc1.bias)
        h = F.dropout(h, p=self.activation_dropout, training=self.training)
        return self.fc2(h)


class EncoderLayer(_FeedForwardMixin, nn.Module):
    """x = LN(x + SelfAttn(x)); x = LN(x + FFN(x)) (post-norm, dropout after each sublayer)."""

    def __init__(self, config):
        super().__init__()
        C = config.d_model
        self.self_attn = FSMTAttention(C, config.encoder_attention_heads, config.attention_dropout)
        self.self_attn_layer_norm = LayerNorm(C)
        self._init_ffn(C, config.encoder_ffn_dim, config)
        self.final_layer_norm = LayerNorm(C)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.self_attn.self_attention(x, mask, causal=False, cache=None)
        x = self.self_attn_layer_norm(F.dropout(h, p=self.dropout, training=self.training), x)[0]
        h = self.ffn(x)
        return self.final_layer_norm(F.dropout(h, p=self.dropout, training=self.training), x)[0]


class DecoderLayer(_FeedForwardMixin, nn.Module):
    """Post-norm: causal self-attention, cross-attention over the encoder output, FFN (HF's DecoderLayer)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        C = config.d_model
        heads = config.decoder_attention_heads
        self.self_attn = FSMTAttention(C, heads, config.attention_dropout, layer_idx)
        self.self_attn_layer_norm = LayerNorm(C)
        self.encoder_attn = FSMTAttention(C, heads, config.attention_dropout, layer_idx)
        self.encoder_attn_layer_norm = LayerNorm(C)
        self._init_ffn(C, config.decoder_ffn_dim, config)
        self.final_layer_norm = LayerNorm(C)
        self.dropout = config.dropout

    def forward(self, x, cross_kv, encoder_mask, self_mask, cache: KVCache | None, cross_lens=None):
        drop = lambda h: F.dropout(h, p=self.dropout, training=self.training)  # noqa: E731
        h = self.self_attn.self_attention(x, self_mask, causal=True, cache=cache)
        x = self.self_attn_layer_norm(drop(h), x)[0]
        h = self.encoder_attn.cross_attention(x, cross_kv, encoder_mask, cross_lens)
        x = self.encoder_attn_layer_norm(drop(h), x)[0]
        return self.final_layer_norm(drop(self.ffn(x)), x)[0]

    def cross_keys_values(self, encoder_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's cross-attention keys/values (a layer method, so that FSDP2 can gather the layer around it)."""
        return self.encoder_attn.keys_values(encoder_out)


class _Positions(nn.Module):
    """The sinusoid table as a non-persistent buffer that grows on demand (never loaded, never saved)."""

    def __init__(self, dim: int, padding_idx: int, rows: int):
        super().__init__()
        self.dim, self.padding_idx = dim, padding_idx
        self.register_buffer("table", sinusoidal_positions(rows, dim, padding_idx), persistent=False)

    def ensure(self, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """The table with at least ``rows`` rows in ``dtype`` (rebuilt from float32, so rows stay exact)."""
        if self.table.shape[0] < rows or self.table.dtype != dtype:
            rows = max(rows, self.table.shape[0])
            self.table = sinusoidal_positions(rows, self.dim, self.padding_idx, dtype, self.table.device)
        return self.table

    def forward(self, ids: torch.Tensor, past, dtype: torch.dtype, max_past: int | None = None) -> torch.Tensor:
        """Embeddings [B, T, C] of ids [B, T] after ``past`` decoded positions (an int, or a [B] device
        tensor with ``max_past`` its host-side bound): pos = cumsum(m) * m + pad + past, m = (id != pad)."""
        m = ids.ne(self.padding_idx).int()
        pos = (torch.cumsum(m, dim=1).type_as(m) * m).long() + self.padding_idx
        bound = past if isinstance(past, int) else max_past
        table = self.ensure(self.padding_idx + 1 + bound + ids.shape[1], dtype)
        pos = pos + (past if isinstance(past, int) else past.long()[:, None])
        return F.embedding(pos, table)


def _embed(stack: nn.Module, ids, inputs_embeds, past, max_past: int | None = None) -> torch.Tensor:
    """Token embeddings times ``embed_scale`` plus positions, then dropout. Given ``inputs_embeds`` instead of
    ids, positions follow HF's rule: a vector whose first channel is 0 counts as a pad."""
    if inputs_embeds is None:
        x = stack.embed_tokens(ids) * stack.embed_scale
    else:
        x = inputs_embeds * stack.embed_scale
        first = inputs_embeds[:, :, 0]
        ids = first.masked_fill(first.eq(0), stack.embed_positions.padding_idx)
    x = x + stack.embed_positions(ids, past, x.dtype, max_past)
    return F.dropout(x, p=stack.dropout, training=stack.training)


class FSMTEncoder(nn.Module):
    """embed_tokens * embed_scale + positions, dropout, ``encoder_layers`` post-norm layers (no final norm).

    ``forward(input_ids [B, S], attention_mask [B, S] or None)``: pads are attended unless a mask is given
    (HF's forward semantics). Returns (last hidden [B, S, C], hidden states tuple or None)."""

    def __init__(self, config):
        super().__init__()
        C = config.d_model
        self.embed_tokens = nn.Embedding(config.src_vocab_size, C, config.pad_token_id)
        self.embed_scale = math.sqrt(C) if config.scale_embedding else 1.0
        self.embed_positions = _Positions(C, config.pad_token_id,
                                          config.max_position_embeddings + config.pad_token_id + 1)
        self.layers = nn.ModuleList([EncoderLayer(config) for _ in range(config.encoder_layers)])
        self.dropout, self.layerdrop = config.dropout, config.encoder_layerdrop

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, inputs_embeds=None):
        x = _embed(self, input_ids, inputs_embeds, 0)
        states = [] if output_hidden_states else None
        for layer in self.layers:
            if states is not None:
                states.append(x)
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue
            x = layer(x, attention_mask)
        if states is not None:
            states.append(x)
        return x, (tuple(states) if states is not None else None)


class FSMTDecoder(nn.Module):
    """embed_tokens * embed_scale + positions, ``decoder_layers`` post-norm layers, ``output_projection``
    (no bias). ``run(ids, encoder_out, encoder_mask, self_mask, cache)`` returns the pre-projection hidden
    states [B, T, C] (and their per-layer tuple); the projection is :meth:`project`."""

    def __init__(self, config):
        super().__init__()
        C = config.d_model
        self.config = config
        self.embed_tokens = nn.Embedding(config.tgt_vocab_size, C, config.pad_token_id)
        self.embed_scale = math.sqrt(C) if config.scale_embedding else 1.0
        self.embed_positions = _Positions(C, config.pad_token_id,
                                          config.max_position_embeddings + config.pad_token_id + 1)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.decoder_layers)])
        self.output_projection = nn.Linear(C, config.tgt_vocab_size, bias=False)
        self.dropout, self.layerdrop = config.dropout, config.decoder_layerdrop
        self.num_heads = config.decoder_attention_heads
        self.head_dim = C // self.num_heads

    def new_cache(self, batch_size: int, capacity: int, growable: bool = False) -> KVCache:
        w = self.embed_tokens.weight
        return KVCache(len(self.layers), batch_size, self.num_heads, self.head_dim, capacity, dtype=w.dtype,
                       device=w.device, growable=growable)

    def cross_keys_values(self, encoder_out: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's cross-attention keys/values [B, H, S, D], projected once from the encoder output."""
        return [layer.cross_keys_values(encoder_out) for layer in self.layers]

    def embed(self, ids: torch.Tensor | None, past, max_past: int | None = None, inputs_embeds=None) -> torch.Tensor:
        return _embed(self, ids, inputs_embeds, past, max_past)

    def run(self, x, cross_kv, encoder_mask, self_mask, cache: KVCache | None, cross_lens=None,
            output_hidden_states=False):
        """The layers on embedded x [B, T, C]; a cache must already be ``prepare``-d for T tokens."""
        states = [] if output_hidden_states else None
        for layer, kv in zip(self.layers, cross_kv):
            if states is not None:
                states.append(x)
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue
            x = layer(x, kv, encoder_mask, self_mask, cache, cross_lens)
        if states is not None:
            states.append(x)
        return x, (tuple(states) if states is not None else None)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output_projection(hidden)


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------

class PretrainedFSMTModel(PreTrainedMixin, nn.Module):
    """Common base: config class, ``model.`` prefix, HF's initialisation (normal(init_std) for Linear and
    Embedding, zero biases and pad rows), loading and saving. ``embed_positions.weight`` keys of a
    checkpoint are ignored: the table is computed."""

    config_class = FSMTConfig
    base_model_prefix = "model"
    _keys_to_ignore_on_load_unexpected = [r"embed_positions\.weight$"]

    def _init_weights(self, module: nn.Module) -> None:
        hf_init_(module, self.config.init_std)


def _check_ids(ids: torch.Tensor | None, name: str, vocab: int) -> None:
    """Token ids must be an integer tensor [B, T] within the vocabulary (checked before any launch)."""
    if ids is None:
        return
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
        got = f"{ids.dtype} {list(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"{name} must be an int64/int32 tensor [batch, length], got {got}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{name} holds ids outside [0, {vocab}) (min {int(ids.min())}, max {int(ids.max())})")


def _check_mask(mask: torch.Tensor | None, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must have shape {list(shape)} (1 = a real token), got {got}")
    return mask.long() if mask.is_floating_point() else mask


class FSMTModel(PretrainedFSMTModel):
    """The encoder-decoder with its output projection (HF's ``FSMTModel``, whose ``last_hidden_state`` is
    the logits).

    ``forward(input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
    encoder_outputs=None, cache=None, use_cache=None, output_attentions=None, output_hidden_states=None,
    inputs_embeds=None, decoder_inputs_embeds=None, return_dict=None)``: input_ids [B, S] (source,
    ``src_vocab_size``), decoder_input_ids [B, T] (target; None = the source shifted right, HF's rule), masks
    1 = a real token; embeddings instead of ids are scaled as token embeddings are, and take their positions
    from HF's rule (a vector whose first channel is 0 is a pad). The encoder masks pads only when
    ``attention_mask`` is given (HF); the decoder self-attention is causal and masks
    ``decoder_attention_mask`` (default: its pad tokens). ``use_cache`` (default ``config.use_cache`` when
    decoder ids are given, in eval mode) returns an :class:`EncoderDecoderCache`; pass it back as ``cache``
    with the next tokens (and ``encoder_outputs``) for incremental decoding. ``past_key_values=`` is the
    deprecated name of ``cache``. ``output_attentions`` is not served: the fused kernels never form the
    attention probabilities.
    """

    _tied_weights_keys = {"encoder.embed_tokens.weight": "decoder.embed_tokens.weight",
                          "decoder.output_projection.weight": "decoder.embed_tokens.weight"}

    def __init__(self, config: FSMTConfig):
        super().__init__()
        self.config = config
        if config.activation_function not in _ACTIVATIONS:
            raise ValueError(f"activation_function {config.activation_function!r} is not supported; use one "
                             f"of {_ACTIVATIONS}")
        self.encoder = FSMTEncoder(config)
        self.decoder = FSMTDecoder(config)
        self.init_and_tie()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embed_tokens

    def get_output_embeddings(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    def encode(self, input_ids=None, attention_mask=None, output_hidden_states=False, inputs_embeds=None):
        """The encoder's :class:`BaseModelOutput` for input_ids [B, S] (or inputs_embeds [B, S, C])."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        _check_ids(input_ids, "input_ids", self.config.src_vocab_size)
        shape = tuple((input_ids if input_ids is not None else inputs_embeds).shape[:2])
        mask = _check_mask(attention_mask, "attention_mask", shape)
        hidden, states = self.encoder(input_ids, mask, output_hidden_states, inputs_embeds)
        return BaseModelOutput(hidden, states)

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                encoder_outputs=None, cache=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, inputs_embeds=None, decoder_inputs_embeds=None, return_dict=None,
                **kwargs):
        out, hidden = self.decode(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                                  encoder_outputs, cache, use_cache, output_attentions, output_hidden_states,
                                  inputs_embeds, decoder_inputs_embeds, **kwargs)
        out.last_hidden_state = self.decoder.project(hidden)
        return _returned(out, self.config.return_dict if return_dict is None else return_dict)

    def decode(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
               encoder_outputs=None, cache=None, use_cache=None, output_attentions=None,
               output_hidden_states=None, inputs_embeds=None, decoder_inputs_embeds=None,
               **kwargs) -> tuple[Seq2SeqModelOutput, torch.Tensor]:
        """The forward pass up to the decoder's pre-projection hidden states [B, T, C]: (output without
        ``last_hidden_state``, hidden)."""
        cfg = self.config
        cache = cache_argument(cache, kwargs)
        if kwargs:
            raise TypeError(f"{type(self).__name__}.forward got unexpected arguments: {sorted(kwargs)}")
        if output_attentions or (output_attentions is None and cfg.output_attentions):
            raise ValueError("output_attentions is not supported: the fused attention kernels never form the "
                             "probabilities (use transformers' FSMT to inspect them)")
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        if decoder_input_ids is not None and decoder_inputs_embeds is not None:
            raise ValueError("pass decoder_input_ids or decoder_inputs_embeds, not both")
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass decoder_input_ids (or input_ids, whose right shift HF decodes then)")
            _check_ids(input_ids, "input_ids", cfg.src_vocab_size)
            decoder_input_ids, use_cache = shift_tokens_right(input_ids, cfg.pad_token_id), False
        _check_ids(decoder_input_ids, "decoder_input_ids", cfg.tgt_vocab_size)
        use_cache = (cfg.use_cache and not self.training) if use_cache is None else use_cache
        if encoder_outputs is None:
            encoder_outputs = self.encode(input_ids, attention_mask, output_hidden_states, inputs_embeds)
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(*tuple(encoder_outputs)[:3])
        enc = encoder_outputs.last_hidden_state
        B, T = (decoder_input_ids if decoder_input_ids is not None else decoder_inputs_embeds).shape[:2]
        enc_mask = _check_mask(attention_mask, "attention_mask", tuple(enc.shape[:2]))
        cache = self._cache(cache, use_cache, B, T, enc)
        kv_cache = cache.self_attention_cache if cache is not None else None
        past = kv_cache.length if kv_cache is not None else 0
        self_mask = self._decoder_mask(decoder_input_ids, decoder_attention_mask, (B, T), past)
        cross = cache.cross_attention_cache if cache is not None else self.decoder.cross_keys_values(enc)
        x = self.decoder.embed(decoder_input_ids, past, inputs_embeds=decoder_inputs_embeds)
        if kv_cache is not None:
            kv_cache.prepare(T)
        try:
            hidden, states = self.decoder.run(x, cross, enc_mask, self_mask, kv_cache,
                                              output_hidden_states=output_hidden_states)
        finally:
            if kv_cache is not None:
                kv_cache.commit(T)
        out = Seq2SeqModelOutput(None, cache, states, None, None, enc, encoder_outputs.hidden_states)
        return out, hidden

    def _cache(self, cache, use_cache: bool, B: int, T: int, enc: torch.Tensor):
        if cache is None and not use_cache:
            return None
        if cache is None:
            cache = EncoderDecoderCache(self.decoder.new_cache(B, T, growable=True))
        if not isinstance(cache, EncoderDecoderCache):
            raise TypeError(f"cache must be the tritonformers EncoderDecoderCache an earlier call returned, got "
                            f"{type(cache).__name__}")
        if cache.self_attention_cache.batch_size != B:
            raise ValueError(f"the cache holds {cache.self_attention_cache.batch_size} rows but the input has {B}")
        if cache.cross_attention_cache is None:
            cache.cross_attention_cache = self.decoder.cross_keys_values(enc)
        return cache

    def _decoder_mask(self, ids, mask, shape: tuple[int, int], past: int) -> torch.Tensor | None:
        """The decoder's key padding mask: the given one ([B, past + T]), else its pad tokens when there is
        no past and some occur (HF's default), else none."""
        B, T = shape
        if mask is not None:
            return _check_mask(mask, "decoder_attention_mask", (B, past + T))
        if ids is not None and past == 0 and bool((ids == self.config.pad_token_id).any()):
            return ids.ne(self.config.pad_token_id).long()
        return None


class FSMTForConditionalGeneration(GenerationMixin, PretrainedFSMTModel):
    """FSMT with its LM loss and ``generate`` (HF's ``FSMTForConditionalGeneration``).

    ``forward(...)`` takes FSMTModel's arguments plus ``labels`` [B, T] (-100 = ignored; pads are counted, as
    HF): loss = mean cross-entropy of the logits; fused (``logits`` None) when gradients are enabled. Labels
    without ``decoder_input_ids`` decode the labels shifted right (HF decodes the shifted source then).

    ``generate(input_ids, attention_mask=None, ...)``: greedy, sampling and beam search with transformers'
    rules (num_beams, length_penalty, early_stopping, num_return_sequences, no_repeat_ngram_size,
    min_length, ...), defaults from the config / ``generation_config.json`` (5 beams, max_length 200, forced
    EOS). Returns [B * num_return_sequences, L] ids starting with the decoder start token (2). The encoder mask
    is inferred from pad tokens when not given (transformers attends to pads then).
    """

    _tied_weights_keys = None
    supports_cuda_graph = True

    def __init__(self, config: FSMTConfig):
        super().__init__()
        self.config = config
        self.model = FSMTModel(config)
        self.generation_config = GenerationConfig.from_model_config(config)
        self.init_and_tie()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.encoder.embed_tokens

    def get_output_embeddings(self) -> nn.Embedding:
        return self.model.decoder.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                encoder_outputs=None, cache=None, inputs_embeds=None, decoder_inputs_embeds=None, labels=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        if labels is not None:
            use_cache = False
            _check_labels(labels, self.config.tgt_vocab_size)
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id)
        out, hidden = self.model.decode(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                                        encoder_outputs, cache, use_cache, output_attentions, output_hidden_states,
                                        inputs_embeds, decoder_inputs_embeds, **kwargs)
        loss = logits = None
        weight = self.model.decoder.output_projection.weight
        if labels is not None and torch.is_grad_enabled():
            loss = fused_linear_cross_entropy(hidden, weight, labels.to(hidden.device).long())
        else:
            logits = self.model.decoder.project(hidden)
            if labels is not None:
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                       labels.to(logits.device).reshape(-1).long())
        result = Seq2SeqLMOutput(loss, logits, out.cache, out.decoder_hidden_states, None, None,
                                 out.encoder_last_hidden_state, out.encoder_hidden_states)
        return _returned(result, self.config.return_dict if return_dict is None else return_dict)

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return shift_tokens_right(labels, self.config.pad_token_id)

    # -- generation (tritonformers.models.generation)
    def generation_session(self, input_ids, attention_mask, num_copies: int = 1, use_cuda_graph=None,
                           **model_kwargs):
        """Encode the batch once and return the decoding session over ``num_copies`` rows per sentence."""
        if model_kwargs:
            raise TypeError(f"{type(self).__name__}.generate got unexpected arguments: {sorted(model_kwargs)}")
        start = self.generation_config.decoder_start_token_id
        start = self.config.decoder_start_token_id if start is None else start
        source = _EncodedSource(self.model, input_ids, attention_mask, num_copies)
        prompt = torch.full((input_ids.shape[0] * num_copies, 1), start, dtype=torch.long, device=input_ids.device)
        session = CachedDecoderSession(source, prompt, torch.ones_like(prompt), use_cuda_graph=use_cuda_graph)
        return session


def _check_labels(labels: torch.Tensor, vocab: int) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.is_floating_point():
        raise TypeError("labels must be an integer tensor [batch, target length]")
    bad = (labels != -100) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        raise ValueError(f"labels must be -100 or ids in [0, {vocab})")


class _EncodedSource:
    """The model side of a :class:`CachedDecoderSession` for FSMT: the encoder output of a batch and each
    layer's cross-attention keys/values, projected once per sentence and repeated for its copies (beams of
    one sentence share them, so beam reordering, which stays within a sentence, never has to move them).

    ``decode_logits`` runs the decoder on a prepared cache step without host synchronisation: positions come
    from ``cache.lens`` (a device tensor), so the one-token step can be captured in a CUDA graph."""

    supports_cuda_graph = True

    def __init__(self, model: FSMTModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, copies: int):
        self.model = model
        mask = attention_mask if bool((attention_mask == 0).any()) else None
        enc = model.encode(input_ids, mask).last_hidden_state
        self.cross = [(k.repeat_interleave(copies, 0), v.repeat_interleave(copies, 0))
                      for k, v in model.decoder.cross_keys_values(enc)]
        self.mask = None if mask is None else mask.repeat_interleave(copies, 0)
        self.lens = torch.full((input_ids.shape[0] * copies,), enc.shape[1], dtype=torch.int32,
                               device=enc.device)
        self.capacity = 0

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        self.capacity = capacity
        decoder = self.model.decoder
        # the rows a step can read (pad + 1 + max_past + 1 new token), built now: never inside a captured step
        decoder.embed_positions.ensure(decoder.embed_positions.padding_idx + 2 + capacity,
                                       decoder.embed_tokens.weight.dtype)
        return decoder.new_cache(batch_size, capacity)

    def decode_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [N, V] of the last new token (``attention_mask`` is unused: decoder rows hold no pads
        before they finish, and a finished row's later keys never matter)."""
        decoder = self.model.decoder
        past = cache.lens - input_ids.shape[1]
        x = decoder.embed(input_ids, past, max_past=self.capacity)
        hidden = decoder.run(x, self.cross, self.mask, None, cache, cross_lens=self.lens)[0]
        return decoder.project(hidden[:, -1])

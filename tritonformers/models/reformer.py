"""Reformer (HF's ``modeling_reformer``): config, reversible encoder, axial positions, every head, cached generation.

What it reproduces is transformers' ``models/reformer/modeling_reformer.py`` (5.17 to 5.25). The pieces,
bottom-up:

* ``ReformerEmbeddings``: ``dropout(word_emb[ids]) + pos_emb(positions)``; axial positions are
  ``pos_emb[p] = concat(W0[p // S1], W1[p % S1])`` gathered directly (never the S0 x S1 table); in training
  the positions are ``0..L-1`` with ``L == S0 * S1`` (HF's error otherwise) and HF's channel dropout.
* ``ReformerReversibleLayer``: ``Y1 = X1 + Attn(X2)``, ``Y2 = X2 + FF(Y1)``; attention is ``tritonformers.nn.
  LocalSelfAttention`` or ``LSHSelfAttention`` (the kernels) between a pre-LayerNorm and the output dense.
* ``ReformerEncoder``: both streams start as the embeddings; the output is ``LN([X1, X2])`` over 2 * hidden.
  With gradients the layers run inside :class:`ReversibleLayersFunction`, which keeps only the last layer's
  two streams (plus each LSH layer's buckets, int32) and recomputes every layer backwards from its outputs,
  replaying its dropout seeds and buckets: activation memory does not grow with depth.
* Heads: ``ReformerModel``, ``ReformerModelWithLMHead`` (+ ``generate``), ``ReformerForMaskedLM``,
  ``ReformerForSequenceClassification``, ``ReformerForQuestionAnswering``, with HF's arguments, outputs
  and state-dict names.

Differences from HF, all where HF is wrong or unhelpful: training-mode dropout seeds are drawn from torch's
generator (so ``torch.manual_seed`` reproduces a step) inside a forked RNG (the caller's RNG state is not
clobbered); the reversible backward works in eval mode too and replays the forward's ``num_hashes``; cached
LSH decoding gathers each batch row's own states; ``position_ids`` with auto-padding are extended instead of
crashing. ``output_attentions=True`` runs the attention on the PyTorch reference path (the kernels never form
the probabilities), an error when the Triton backend is forced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.lsh_attention import bucket_count
from ..nn import LayerNorm, LocalSelfAttention, LSHSelfAttention
from ..nn.functional import fused_linear_cross_entropy
from .generation import DecodeSession, GenerationConfig, GenerationMixin
from .loading import ConfigBase, PreTrainedMixin
from .outputs import MaskedLMOutput, ModelOutput, QuestionAnsweringModelOutput, SequenceClassifierOutput
from .outputs import causal_lm_targets as _causal_lm_targets, classification_loss as _classification_loss
from .outputs import keep_logits as _keep_logits, returned as _returned

ATTENTION_TYPES = ("local", "lsh")


class ReformerConfig(ConfigBase):
    """HF's ``ReformerConfig``. As HF: ``num_hidden_layers`` is ``len(attn_layers)`` unless given explicitly;
    ``axial_pos_shape`` and ``axial_pos_embds_dim`` are tuples; ``num_buckets=None`` is chosen (and written
    back here) by the first chunked LSH call; unknown keys are kept and written back."""

    model_type = "reformer"
    defaults = dict(
        attention_head_size=64, attn_layers=("local", "lsh", "local", "lsh", "local", "lsh"), axial_norm_std=1.0,
        axial_pos_embds=True, axial_pos_shape=(64, 64), axial_pos_embds_dim=(64, 192), chunk_size_lm_head=0,
        chunk_size_feed_forward=0, eos_token_id=2, feed_forward_size=512, hash_seed=None, hidden_act="relu",
        hidden_dropout_prob=0.05, hidden_size=256, initializer_range=0.02, is_decoder=False, layer_norm_eps=1e-12,
        local_num_chunks_before=1, local_num_chunks_after=0, local_attention_probs_dropout_prob=0.05,
        local_attn_chunk_length=64, lsh_attn_chunk_length=64, lsh_attention_probs_dropout_prob=0.0,
        lsh_num_chunks_before=1, lsh_num_chunks_after=0, max_position_embeddings=4096, num_attention_heads=12,
        num_buckets=None, num_hashes=1, vocab_size=320, tie_word_embeddings=False, use_cache=True,
        classifier_dropout=None, bos_token_id=None, pad_token_id=0, num_hidden_layers=None,
    )

    def _post_init(self) -> None:
        self.attn_layers = tuple(self.attn_layers) if isinstance(self.attn_layers, list) else self.attn_layers
        if self.num_hidden_layers is None:
            self.num_hidden_layers = len(self.attn_layers)
        self.axial_pos_shape = tuple(self.axial_pos_shape)
        self.axial_pos_embds_dim = tuple(self.axial_pos_embds_dim)
        if isinstance(self.num_buckets, tuple):
            self.num_buckets = list(self.num_buckets)


def _check_config(config) -> None:
    """The model-building errors HF raises (or asserts), as ValueErrors naming the field."""
    layers = tuple(config.attn_layers)
    if not layers or any(kind not in ATTENTION_TYPES for kind in layers):
        raise ValueError(f"attn_layers must be a non-empty list of 'local' / 'lsh', got {list(layers)}")
    if not isinstance(config.num_hidden_layers, int) or not 0 < config.num_hidden_layers <= len(layers):
        raise ValueError(f"num_hidden_layers ({config.num_hidden_layers!r}) must be in [1, len(attn_layers) = "
                         f"{len(layers)}] (HF builds the first num_hidden_layers of attn_layers)")
    for name in ("local_attn_chunk_length", "lsh_attn_chunk_length"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 1:
            raise ValueError(f"{name} must be a positive int, got {getattr(config, name)!r}")
    for name in ("local_num_chunks_before", "local_num_chunks_after", "lsh_num_chunks_before",
                 "lsh_num_chunks_after", "chunk_size_feed_forward", "chunk_size_lm_head"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 0:
            raise ValueError(f"{name} must be an int >= 0, got {getattr(config, name)!r}")
    _check_num_hashes(config.num_hashes, "config.num_hashes")
    if config.num_buckets is not None:
        bucket_count(config.num_buckets)
    if config.axial_pos_embds:
        if len(config.axial_pos_shape) != 2 or len(config.axial_pos_embds_dim) != 2:
            raise ValueError(f"axial_pos_shape and axial_pos_embds_dim must have 2 axes (HF's evaluation supports "
                             f"only 2), got {config.axial_pos_shape} and {config.axial_pos_embds_dim}")
        if sum(config.axial_pos_embds_dim) != config.hidden_size:
            raise ValueError(f"Make sure that config.axial_pos_embds factors: {config.axial_pos_embds_dim} sum to "
                             f"config.hidden_size: {config.hidden_size}")


def _check_num_hashes(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def lcm_chunk_length(config) -> int:
    """The multiple inputs are padded to (HF's _get_least_common_mult_chunk_len)."""
    lengths = {"local": config.local_attn_chunk_length, "lsh": config.lsh_attn_chunk_length}
    return math.lcm(*(lengths[kind] for kind in set(config.attn_layers)))


def min_chunk_length(config) -> int:
    lengths = {"local": config.local_attn_chunk_length, "lsh": config.lsh_attn_chunk_length}
    return min(lengths[kind] for kind in set(config.attn_layers))


# ----------------------------------------------------------------------------------------------------------
# Outputs and cache
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class ReformerModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor = None
    past_buckets_states: Any = None
    hidden_states: list | None = None
    attentions: list | None = None


@dataclasses.dataclass(eq=False)
class ReformerModelWithLMHeadOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_buckets_states: Any = None
    hidden_states: list | None = None
    attentions: list | None = None


class ReformerDynamicCache:
    """Reformer's decoding state, as HF's ``ReformerDynamicCache``: per layer the post-LayerNorm attention
    inputs of every past position (``states_cache[i]`` [B, Lp, hidden]) and, for LSH layers that hashed, their
    buckets (``buckets_cache[i]`` [B, heads, num_hashes, Lp], offsets included; an empty tensor otherwise)."""

    def __init__(self):
        self.buckets_cache: list[torch.Tensor] = []
        self.states_cache: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.states_cache)

    def get_start_idx(self) -> int:
        """The number of cached positions (the next token's position id)."""
        return self.states_cache[0].shape[1] if len(self) else 0

    def update(self, buckets: torch.Tensor | None, states: torch.Tensor, layer_idx: int) -> None:
        if len(self.states_cache) <= layer_idx:
            self.states_cache.append(states)
            self.buckets_cache.append(buckets if buckets is not None else states.new_empty(0, dtype=torch.long))
            return
        self.states_cache[layer_idx] = torch.cat([self.states_cache[layer_idx], states], dim=1)
        if buckets is not None:
            old = self.buckets_cache[layer_idx]
            self.buckets_cache[layer_idx] = buckets if old.numel() == 0 else torch.cat([old, buckets], dim=-1)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        for i in range(len(self)):
            self.states_cache[i] = self.states_cache[i].index_select(0, beam_idx.to(self.states_cache[i].device))
            if self.buckets_cache[i].numel():
                self.buckets_cache[i] = self.buckets_cache[i].index_select(0, beam_idx.to(self.buckets_cache[i].device))


# ----------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------

class AxialPositionEmbeddings(nn.Module):
    """Axial positions: ``weights.0`` [S0, 1, d0] and ``weights.1`` [1, S1, d1] (HF's names and shapes);
    ``forward(position_ids [B, L]) -> [B, L, d0 + d1]`` with ``emb[p] = concat(W0[p // S1], W1[p % S1])``."""

    def __init__(self, config):
        super().__init__()
        self.axial_pos_shape = tuple(config.axial_pos_shape)
        self.dropout = config.hidden_dropout_prob
        self.weights = nn.ParameterList()
        for axis, dim in enumerate(config.axial_pos_embds_dim):
            shape = [1] * len(self.axial_pos_shape)
            shape[axis] = self.axial_pos_shape[axis]
            self.weights.append(nn.Parameter(torch.ones(*shape, dim)))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        S0, S1 = self.axial_pos_shape
        B, L = position_ids.shape
        if self.training:
            if S0 * S1 != L:
                raise ValueError(
                    f"If training, make sure that config.axial_pos_shape factors: {self.axial_pos_shape} multiply to "
                    f"sequence length. Got prod({self.axial_pos_shape}) != sequence_length: {L}. You might want to "
                    f"consider padding your sequence length to {S0 * S1} or changing config.axial_pos_shape.")
            position_ids = torch.arange(L, device=position_ids.device).expand(B, L)  # HF ignores them in training
        else:
            if S0 * S1 < L:
                raise ValueError(f"Make sure that config.axial_pos_shape factors: {self.axial_pos_shape} multiply at "
                                 f"least to the sequence length {L}")
            if int(position_ids.max()) >= S0 * S1 or int(position_ids.min()) < 0:
                raise ValueError(f"position_ids must lie in [0, {S0 * S1}) (prod(axial_pos_shape)), got "
                                 f"[{int(position_ids.min())}, {int(position_ids.max())}]")
        w0 = self.weights[0].reshape(S0, -1)[position_ids // S1]
        w1 = self.weights[1].reshape(S1, -1)[position_ids % S1]
        out = torch.cat([w0, w1], dim=-1)
        if self.training and self.dropout > 0:
            # HF's dropout2d over the (B, S1, S0, D) view: one keep/drop per (row, column p % S1), all features
            keep = F.dropout2d(out.new_ones(B, S1, 1, 1), p=self.dropout, training=True).view(B, 1, S1)
            out = out * keep.expand(B, S0, S1).reshape(B, L, 1)
        return out


class PositionEmbeddings(nn.Module):
    """Plain learned positions (``axial_pos_embds=False``): ``embedding.weight`` [max_pos, hidden], dropout."""

    def __init__(self, config):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.embedding(position_ids), p=self.dropout, training=self.training)


class ReformerEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.max_position_embeddings = config.max_position_embeddings
        self.dropout = config.hidden_dropout_prob
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = (AxialPositionEmbeddings(config) if config.axial_pos_embds
                                    else PositionEmbeddings(config))

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None, start_idx_pos_encodings: int = 0):
        """``dropout(word_emb) + pos_emb`` [B, L, hidden]; positions default to ``start + arange(L)``."""
        embeds = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        B, L = embeds.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(start_idx_pos_encodings, start_idx_pos_encodings + L,
                                        device=embeds.device).expand(B, L)
        if position_ids.shape[-1] > self.max_position_embeddings:
            raise ValueError(f"Sequence Length: {position_ids.shape[-1]} has to be less or equal than "
                             f"config.max_position_embeddings {self.max_position_embeddings}.")
        embeds = F.dropout(embeds, p=self.dropout, training=self.training)
        return embeds + self.position_embeddings(position_ids)


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------

class ReformerSelfOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.dense = nn.Linear(config.num_attention_heads * config.attention_head_size, config.hidden_size,
                               bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.dense(hidden_states), p=self.dropout, training=self.training)


class ReformerAttentionBlock(nn.Module):
    """``f(x) = dropout(dense(SelfAttention(LN(x))))``; the self-attention is the layer's kernel module."""

    def __init__(self, config, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id
        self.kind = config.attn_layers[layer_id]
        self.layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        module = LSHSelfAttention if self.kind == "lsh" else LocalSelfAttention
        self.self_attention = module(config, layer_idx=layer_id)
        self.output = ReformerSelfOutput(config)

    def forward(self, hidden_states, attention_mask=None, num_hashes=None, buckets=None, dropout_seed=None,
                output_attentions=False):
        """-> (output [B, L, hidden], buckets [B, H, num_hashes, L] or None, LN(hidden_states), probabilities
        or None)."""
        normed = self.layer_norm(hidden_states)
        if self.kind == "lsh":
            out = self.self_attention(normed, attention_mask, num_hashes=num_hashes, buckets=buckets,
                                      dropout_seed=dropout_seed, output_attentions=output_attentions)
        else:
            out = self.self_attention(normed, attention_mask, output_attentions=output_attentions)
        return self.output(out.hidden_states), out.buckets, normed, out.attention_probs

    def decode_step(self, hidden_states, cache: ReformerDynamicCache, num_hashes=None):
        """One cached token: attends to the cached states, then appends its own (and its buckets)."""
        normed = self.layer_norm(hidden_states)
        past_states = cache.states_cache[self.layer_id]
        if self.kind == "lsh":
            out, buckets = self.self_attention.decode_step(normed, past_states, cache.buckets_cache[self.layer_id],
                                                           num_hashes)
        else:
            out, buckets = self.self_attention.decode_step(normed, past_states), None
        cache.update(buckets, normed, self.layer_id)
        return self.output(out)


class ReformerFeedForwardDense(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.act_fn = _activation(config.hidden_act)
        self.dense = nn.Linear(config.hidden_size, config.feed_forward_size)

    def forward(self, hidden_states):
        # HF's order: dropout before the activation
        return self.act_fn(F.dropout(self.dense(hidden_states), p=self.dropout, training=self.training))


class ReformerFeedForwardOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.dense = nn.Linear(config.feed_forward_size, config.hidden_size)

    def forward(self, hidden_states):
        return F.dropout(self.dense(hidden_states), p=self.dropout, training=self.training)


_ACTIVATIONS = {  # HF's ACT2FN formulas for the common names (same ops, so the same rounding)
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
    "mish": F.mish, "relu6": F.relu6, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def _activation(act):
    """HF's activation for a name (the common ones here; any other of transformers' ACT2FN when transformers
    is installed), or the callable itself."""
    if callable(act):
        return act
    if act in _ACTIVATIONS:
        return _ACTIVATIONS[act]
    try:
        from transformers.activations import ACT2FN
    except ImportError:
        ACT2FN = {}
    if act not in ACT2FN:
        raise ValueError(f"hidden_act {act!r} is not a known activation ({sorted(_ACTIVATIONS)}, or transformers' "
                         "ACT2FN when installed)")
    return ACT2FN[act]


def apply_chunked(fn, chunk_size: int, x: torch.Tensor) -> torch.Tensor:
    """``fn`` over sequence chunks of ``chunk_size`` (0 = whole), as HF's apply_chunking_to_forward, which
    computes the same; a shorter last chunk is allowed (HF raises, so its cached one-token steps fail with
    chunk_size_feed_forward > 1)."""
    if chunk_size <= 0 or x.shape[1] <= chunk_size:
        return fn(x)
    return torch.cat([fn(part) for part in x.split(chunk_size, dim=1)], dim=1)


class ChunkReformerFeedForward(nn.Module):
    """``g(y) = dropout(W2 act(dropout(W1 LN(y) + b1)) + b2)``, over sequence chunks of ``chunk_size_feed_forward``."""

    def __init__(self, config):
        super().__init__()
        self.chunk_size_feed_forward = config.chunk_size_feed_forward
        self.layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dense = ReformerFeedForwardDense(config)
        self.output = ReformerFeedForwardOutput(config)

    def forward(self, attention_output):
        return apply_chunked(self.forward_chunk, self.chunk_size_feed_forward, attention_output)

    def forward_chunk(self, hidden_states):
        return self.output(self.dense(self.layer_norm(hidden_states)))


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Run with torch's generators seeded by ``seed`` (None: untouched), restoring the caller's state after."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed)
        yield


class ReformerReversibleLayer(nn.Module):
    """One reversible block: ``Y1 = X1 + Attn(X2)``, ``Y2 = X2 + FF(Y1)``."""

    def __init__(self, config, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id
        self.attention = ReformerAttentionBlock(config, layer_id)
        self.feed_forward = ChunkReformerFeedForward(config)

    def forward(self, prev_attn_output, hidden_states, attention_mask=None, num_hashes=None, seeds=(None, None),
                cache=None, orig_sequence_length=None, output_attentions=False):
        """-> (Y1, Y2, buckets, attention probabilities or None). ``seeds`` (attention, feed-forward) make dropout
        replayable; with a fresh ``cache`` the layer's states (and buckets) of the first
        ``orig_sequence_length`` positions are stored."""
        with _seeded(seeds[0], hidden_states.device):
            attn, buckets, normed, probs = self.attention(hidden_states, attention_mask, num_hashes, None, seeds[0],
                                                          output_attentions)
        if cache is not None:
            L0 = orig_sequence_length
            kept = buckets[..., :L0] if buckets is not None and L0 > 1 else buckets
            cache.update(kept, normed[:, :L0], self.layer_id)
        y1 = prev_attn_output + attn
        with _seeded(seeds[1], hidden_states.device):
            y2 = hidden_states + self.feed_forward(y1)
        return y1, y2, buckets, probs

    def backward_pass(self, y1, y2, dy1, dy2, attention_mask, num_hashes, buckets, seeds):
        """Recompute the block from its outputs and backpropagate (the reversible trick):
        ``X2 = Y2 - FF(Y1)``, ``X1 = Y1 - Attn(X2)``; returns (X1, X2, dX1, dX2, {param: grad})."""
        grads: dict[nn.Parameter, torch.Tensor] = {}
        with torch.enable_grad():
            y1 = y1.detach().requires_grad_()
            with _seeded(seeds[1], y1.device):
                g = self.feed_forward(y1)
            dy1 = dy1 + _grad(g, y1, self.feed_forward, dy2, grads)
        with torch.no_grad():
            x2 = y2 - g
        with torch.enable_grad():
            x2 = x2.detach().requires_grad_()
            with _seeded(seeds[0], x2.device):
                f = self.attention(x2, attention_mask, num_hashes, buckets, seeds[0])[0]
            dx2 = dy2 + _grad(f, x2, self.attention, dy1, grads)
        with torch.no_grad():
            x1 = y1 - f
        return x1.detach(), x2.detach(), dy1, dx2, grads


def _grad(output, x, module: nn.Module, grad_output, grads: dict) -> torch.Tensor:
    """d(output)/dx and the module's parameter gradients (accumulated into ``grads``) for ``grad_output``."""
    params = [p for p in module.parameters() if p.requires_grad]
    result = torch.autograd.grad(output, [x, *params], grad_output, allow_unused=True)
    for p, g in zip(params, result[1:]):
        if g is not None:
            grads[p] = g if p not in grads else grads[p] + g
    return result[0]


class _ReversibleRun:
    """What one forward through the layers keeps for its backward: the settings, each layer's seeds and
    buckets (int32), nothing else."""

    def __init__(self, layers, attention_mask, num_hashes, training: bool, cache=None, orig_sequence_length=None,
                 all_attentions: list | None = None):
        self.layers, self.attention_mask, self.num_hashes = layers, attention_mask, num_hashes
        self.training, self.cache, self.orig_sequence_length = training, cache, orig_sequence_length
        self.all_attentions = all_attentions
        self.seeds: list[tuple[int | None, int | None]] = []
        self.buckets: list[torch.Tensor | None] = []

    def forward(self, x1, x2, all_hidden_states=None):
        """Run every layer (the caller decides whether under no_grad); fills the cache when there is one."""
        for layer in self.layers:
            if all_hidden_states is not None:
                all_hidden_states.append(x2)
            seeds = (_draw_seed(), _draw_seed()) if self.training else (None, None)
            x1, x2, buckets, probs = layer(x1, x2, self.attention_mask, self.num_hashes, seeds, self.cache,
                                           self.orig_sequence_length, self.all_attentions is not None)
            if self.all_attentions is not None:
                self.all_attentions.append(probs)
            self.seeds.append(seeds)
            self.buckets.append(None if buckets is None else buckets.to(torch.int32))
        if all_hidden_states is not None:
            all_hidden_states.append(x2)
        return x1, x2

    def backward(self, y1, y2, dy1, dy2):
        grads: dict[nn.Parameter, torch.Tensor] = {}
        for layer, seeds, buckets in zip(reversed(self.layers), reversed(self.seeds), reversed(self.buckets)):
            buckets = None if buckets is None else buckets.long()
            y1, y2, dy1, dy2, layer_grads = layer.backward_pass(y1, y2, dy1, dy2, self.attention_mask,
                                                                self.num_hashes, buckets, seeds)
            grads.update(layer_grads)
        return dy1, dy2, grads


def _draw_seed() -> int:
    return int(torch.randint(0, 2**62, (1,)).item())


class ReversibleLayersFunction(torch.autograd.Function):
    """``[Y1, Y2]`` of the layers from ``(X1, X2)``, saving only (Y1, Y2): backward walks the layers in reverse,
    recomputing each one's inputs from its outputs (:meth:`ReformerReversibleLayer.backward_pass`). The layers'
    parameters are inputs, so their gradients flow through autograd as usual (``torch.autograd.grad`` works)."""

    @staticmethod
    def forward(ctx, run: _ReversibleRun, x1, x2, all_hidden_states, *params):
        with torch.no_grad():
            y1, y2 = run.forward(x1, x2, all_hidden_states)
        ctx.run, ctx.params = run, params
        ctx.save_for_backward(y1, y2)
        return torch.cat([y1, y2], dim=-1)

    @staticmethod
    def backward(ctx, grad):
        y1, y2 = ctx.saved_tensors
        dy1, dy2 = (g.contiguous() for g in grad.chunk(2, dim=-1))
        dx1, dx2, grads = ctx.run.backward(y1, y2, dy1, dy2)
        return (None, dx1, dx2, None, *(grads.get(p) for p in ctx.params))


class ReformerEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.layers = nn.ModuleList([ReformerReversibleLayer(config, i) for i in range(config.num_hidden_layers)])
        self.layer_norm = LayerNorm(2 * config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states, attention_mask=None, num_hashes=None, cache=None, orig_sequence_length=None,
                output_hidden_states=False, output_attentions=False):
        """Embeddings [B, L, hidden] -> (dropout(LN([X1, X2])) [B, L, 2 hidden], hidden states list or None,
        attention probabilities list or None)."""
        all_hidden = [] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        if cache is not None and len(cache):  # one cached token through every layer
            if output_attentions:
                raise ValueError("output_attentions=True is not supported for cached one-token steps")
            x1 = x2 = hidden_states
            for layer in self.layers:
                if all_hidden is not None:
                    all_hidden.append(x2)
                x1 = x1 + layer.attention.decode_step(x2, cache, num_hashes)
                x2 = x2 + layer.feed_forward(x1)
            if all_hidden is not None:
                all_hidden.append(x2)
            out = torch.cat([x1, x2], dim=-1)
        else:
            run = _ReversibleRun(self.layers, attention_mask, num_hashes, self.training, cache, orig_sequence_length,
                                 all_attentions)
            params = [p for p in self.layers.parameters() if p.requires_grad]
            if torch.is_grad_enabled() and (hidden_states.requires_grad or params):
                out = ReversibleLayersFunction.apply(run, hidden_states, hidden_states, all_hidden, *params)
            else:
                out = torch.cat(run.forward(hidden_states, hidden_states, all_hidden), dim=-1)
        out = F.dropout(self.layer_norm(out), p=self.dropout, training=self.training)
        return out, all_hidden, all_attentions


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------

class ReformerPreTrainedModel(PreTrainedMixin, nn.Module):
    """Common base: config class, ``reformer.`` prefix, HF's initialisation, loading and saving."""

    config_class = ReformerConfig
    base_model_prefix = "reformer"
    # transformers < 5.25 has no bias in the LM decoder (it is zero-initialised when absent)
    _keys_to_ignore_on_load_missing = [r"lm_head\.decoder\.bias"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, AxialPositionEmbeddings):
            for weight in module.weights:
                nn.init.normal_(weight, std=self.config.axial_norm_std)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, ReformerOnlyLMHead):
            nn.init.zeros_(module.bias)

    def _post_init(self) -> None:
        with torch.no_grad():
            for module in self.modules():
                self._init_weights(module)


class ReformerModel(ReformerPreTrainedModel):
    """HF's ``ReformerModel``: forward(input_ids | inputs_embeds [B, L], attention_mask [B, L], position_ids,
    num_hashes, past_buckets_states, use_cache, output_hidden_states, output_attentions, return_dict) ->
    :class:`ReformerModelOutput` with last_hidden_state [B, L, 2 hidden].

    In evaluation, a length that is not a multiple of the chunk lengths' lcm (and exceeds the smallest chunk)
    is right-padded with ``pad_token_id`` and a zero mask, as HF does, and the output cut back; in training
    that is HF's ValueError. ``hidden_states`` (when asked) are the padded X2 stream before each layer and
    after the last. No cache is built in training mode (HF builds one, whose stored states would undo the
    reversible layers' memory saving): ``past_buckets_states`` is then None."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        _check_config(config)
        self.config = config
        self.embeddings = ReformerEmbeddings(config)
        self.encoder = ReformerEncoder(config)
        self._post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, num_hashes=None,
                past_buckets_states=None, use_cache=None, output_hidden_states=None, output_attentions=None,
                return_dict=None, **kwargs):
        cfg = self.config
        use_cache = cfg.use_cache if use_cache is None else use_cache
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = cfg.return_dict if return_dict is None else return_dict
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        input_ids, inputs_embeds, attention_mask, position_ids = _check_inputs(
            input_ids, inputs_embeds, attention_mask, position_ids)
        if num_hashes is not None:
            _check_num_hashes(num_hashes, "num_hashes")
        cache = past_buckets_states
        if cache is not None:
            if self.training:
                raise ValueError("past_buckets_states can only be used for inference (call model.eval())")
            if not isinstance(cache, ReformerDynamicCache):
                raise TypeError(f"past_buckets_states must be a ReformerDynamicCache, got {type(cache).__name__}")
        B, L0 = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if cache is not None and len(cache) and L0 != 1:
            raise ValueError(f"with a filled past_buckets_states the input must be one token, got {L0}")
        padded = 0
        lcm = lcm_chunk_length(cfg)
        if L0 % lcm and L0 > min_chunk_length(cfg) and cache is None:
            if self.training:
                raise ValueError(f"If training, sequence length {L0} has to be a multiple of least common multiple "
                                 f"chunk_length {lcm}. Please consider padding the input to a length of "
                                 f"{L0 + lcm - L0 % lcm}.")
            padded = lcm - L0 % lcm
            input_ids, inputs_embeds, attention_mask, position_ids = self._pad(
                input_ids, inputs_embeds, attention_mask, position_ids, padded)
        if use_cache and cache is None and not self.training:
            cache = ReformerDynamicCache()
        start = cache.get_start_idx() if cache is not None else 0
        embeds = self.embeddings(input_ids, position_ids, inputs_embeds, start)
        mask = None if attention_mask is None else attention_mask != 0
        out, all_hidden, all_attentions = self.encoder(embeds, mask, num_hashes, cache, L0, output_hidden_states,
                                                       output_attentions)
        if padded:
            out = out[:, :L0]
        result = ReformerModelOutput(out, cache if use_cache else None, all_hidden, all_attentions)
        return _returned(result, return_dict)

    def _pad(self, input_ids, inputs_embeds, attention_mask, position_ids, padding: int):
        """HF's _pad_to_mult_of_chunk_length: pad ids (or their embeddings) and a zero mask on the right; given
        position_ids continue by one per pad (HF crashes there)."""
        embeds = input_ids if input_ids is not None else inputs_embeds
        B, L0, device = embeds.shape[0], embeds.shape[1], embeds.device
        pad_ids = torch.full((B, padding), self.config.pad_token_id, dtype=torch.long, device=device)
        if attention_mask is None:
            attention_mask = torch.ones(B, L0, dtype=torch.bool, device=device)
        attention_mask = torch.cat([attention_mask, attention_mask.new_zeros(B, padding)], dim=-1)
        if input_ids is not None:
            input_ids = torch.cat([input_ids, pad_ids], dim=-1)
        else:
            inputs_embeds = torch.cat([inputs_embeds, self.embeddings.word_embeddings(pad_ids)], dim=1)
        if position_ids is not None:
            extra = position_ids[:, -1:] + torch.arange(1, padding + 1, device=device)
            position_ids = torch.cat([position_ids, extra], dim=-1)
        return input_ids, inputs_embeds, attention_mask, position_ids


def _check_inputs(input_ids, inputs_embeds, attention_mask, position_ids):
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You have to specify either input_ids or inputs_embeds (exactly one)")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"input_ids must be an integer tensor [batch, length], got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        shape = tuple(input_ids.shape)
    else:
        if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3:
            raise ValueError("inputs_embeds must be a float tensor [batch, length, hidden]")
        shape = tuple(inputs_embeds.shape[:2])
    if shape[1] == 0:
        raise ValueError("the input sequence is empty (length 0)")
    if attention_mask is not None and tuple(attention_mask.shape) != shape:
        raise ValueError(f"attention_mask must have shape {list(shape)}, got {list(attention_mask.shape)}")
    if position_ids is not None:
        position_ids = position_ids.expand(shape) if position_ids.dim() == 2 and position_ids.shape[0] == 1 \
            else position_ids
        if tuple(position_ids.shape) != shape:
            raise ValueError(f"position_ids must have shape {list(shape)}, got {list(position_ids.shape)}")
    return input_ids, inputs_embeds, attention_mask, position_ids


class ReformerOnlyLMHead(nn.Module):
    """``decoder`` [V, 2 hidden] over sequence chunks of ``chunk_size_lm_head``. ``decoder.bias`` is used
    (transformers 5.25 has it; older checkpoints lack it and it loads as zeros, which is their behaviour);
    ``bias`` is HF's unused parameter, kept for the state dict."""

    def __init__(self, config):
        super().__init__()
        self.chunk_size_lm_head = config.chunk_size_lm_head
        self.decoder = nn.Linear(2 * config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states):
        return apply_chunked(self.decoder, self.chunk_size_lm_head, hidden_states)


class _WithLMHead:
    """What both LM heads share: the ``lm_head`` (initialised as HF does) and its output-embedding accessors."""

    def _add_lm_head(self, config) -> None:
        self.lm_head = ReformerOnlyLMHead(config)
        nn.init.normal_(self.lm_head.decoder.weight, std=config.initializer_range)
        nn.init.zeros_(self.lm_head.decoder.bias)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head.decoder = value


def _lm_loss(hidden, head: ReformerOnlyLMHead, targets, vocab: int, num_items_in_batch=None, ignore_index=-100):
    """Cross-entropy of the head's logits against ``targets``: fused (no [tokens, V] logits) when gradients
    are on; mean over non-ignored targets, or a sum divided by ``num_items_in_batch`` (HF's rule)."""
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.decoder.weight,
                                      targets.reshape(-1).to(hidden.device), head.decoder.bias,
                                      ignore_index=ignore_index, reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def _logits_loss(logits, targets, num_items_in_batch=None, ignore_index=-100):
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device),
                           ignore_index=ignore_index, reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


class ReformerModelWithLMHead(GenerationMixin, _WithLMHead, ReformerPreTrainedModel):
    """HF's causal ``ReformerModelWithLMHead`` (needs ``is_decoder`` and no chunks after): forward(input_ids,
    position_ids, attention_mask, inputs_embeds, num_hashes, past_buckets_states, use_cache,
    output_hidden_states, output_attentions, return_dict, labels, logits_to_keep=0) ->
    :class:`ReformerModelWithLMHeadOutput`. Labels are shifted inside (HF's ForCausalLMLoss); with labels and
    gradients the loss is the fused linear cross-entropy and ``logits`` is None.

    ``generate`` (greedy, sampling, beam search) feeds Reformer's own cache (:class:`ReformerSession`)."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        if not config.is_decoder:
            raise ValueError("If you want to use `ReformerModelWithLMHead` make sure that `is_decoder=True`.")
        for kind in ("local", "lsh"):
            if kind in config.attn_layers and getattr(config, f"{kind}_num_chunks_after") != 0:
                raise ValueError(f"a causal model needs {kind}_num_chunks_after = 0, got "
                                 f"{getattr(config, f'{kind}_num_chunks_after')}")
        self.config = config
        self.reformer = ReformerModel(config)
        self._add_lm_head(config)
        self.generation_config = GenerationConfig.from_model_config(config)

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, inputs_embeds=None, num_hashes=None,
                past_buckets_states=None, use_cache=None, output_hidden_states=None, output_attentions=None,
                return_dict=None, labels=None, logits_to_keep=0, num_items_in_batch=None, **kwargs):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        base = self.reformer(input_ids, attention_mask, position_ids, inputs_embeds, num_hashes, past_buckets_states,
                             use_cache, output_hidden_states, output_attentions, return_dict=True)
        hidden = _keep_logits(base.last_hidden_state, logits_to_keep)
        loss = logits = None
        if labels is not None:
            targets = _causal_lm_targets(labels.to(hidden.device), kwargs.get("shift_labels"), -100)
        if labels is not None and torch.is_grad_enabled():
            loss = _lm_loss(hidden, self.lm_head, targets, self.config.vocab_size, num_items_in_batch)
        else:
            logits = self.lm_head(hidden)
            if labels is not None:
                loss = _logits_loss(logits, targets, num_items_in_batch)
        out = ReformerModelWithLMHeadOutput(loss, logits, base.past_buckets_states, base.hidden_states,
                                            base.attentions)
        return _returned(out, return_dict)

    def generation_session(self, input_ids, attention_mask, num_copies=1, use_cuda_graph=None, num_hashes=None,
                           **model_kwargs):
        if model_kwargs:
            raise TypeError(f"ReformerModelWithLMHead.generate got unexpected arguments: {sorted(model_kwargs)}")
        if use_cuda_graph:
            raise ValueError("use_cuda_graph=True: Reformer's cache grows (concatenation, data-dependent sort) "
                             "every step, which a CUDA graph cannot capture")
        if num_copies > 1:
            input_ids = input_ids.repeat_interleave(num_copies, dim=0)
            attention_mask = attention_mask.repeat_interleave(num_copies, dim=0)
        return ReformerSession(self, input_ids, attention_mask, num_hashes)


class ReformerSession(DecodeSession):
    """Generation state of :class:`ReformerModelWithLMHead`: the prompt's forward fills a
    :class:`ReformerDynamicCache`, each step feeds one token. As HF's generate, no attention mask reaches the
    model (the cache has none), so prompts must be unpadded: a padded prompt is refused rather than attending
    to its pads silently."""

    def __init__(self, model: ReformerModelWithLMHead, input_ids, attention_mask, num_hashes=None):
        if attention_mask is not None and not bool((attention_mask != 0).all()):
            raise ValueError("Reformer's cache keeps no padding mask (transformers' Reformer generate drops "
                             "attention_mask): generate from unpadded prompts (one length per call)")
        self.model, self.prompt, self.prompt_mask, self.num_hashes = model, input_ids, None, num_hashes
        self.cache: ReformerDynamicCache | None = None

    def _logits(self, input_ids) -> torch.Tensor:
        out = self.model(input_ids, past_buckets_states=self.cache, use_cache=True, num_hashes=self.num_hashes,
                         logits_to_keep=1, return_dict=True)
        self.cache = out.past_buckets_states
        return out.logits[:, -1]

    def prefill(self, max_length: int) -> torch.Tensor:
        return self._logits(self.prompt)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._logits(tokens.view(-1, 1))

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder_cache(index)


class ReformerForMaskedLM(_WithLMHead, ReformerPreTrainedModel):
    """HF's ``ReformerForMaskedLM`` (bidirectional: ``is_decoder`` must be False): forward(input_ids,
    position_ids, attention_mask, inputs_embeds, num_hashes, labels, ...) -> MaskedLMOutput; the loss is the
    unshifted cross-entropy (ignore -100), fused when gradients are on (``logits`` None then)."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        if config.is_decoder:
            raise ValueError("If you want to use `ReformerForMaskedLM` make sure `config.is_decoder=False` for "
                             "bi-directional self-attention.")
        self.config = config
        self.reformer = ReformerModel(config)
        self._add_lm_head(config)

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, inputs_embeds=None, num_hashes=None,
                labels=None, output_hidden_states=None, output_attentions=None, return_dict=None, **kwargs):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        base = self.reformer(input_ids, attention_mask, position_ids, inputs_embeds, num_hashes, None, False,
                             output_hidden_states, output_attentions, return_dict=True)
        hidden = base.last_hidden_state
        loss = logits = None
        if labels is not None and torch.is_grad_enabled():
            loss = _lm_loss(hidden, self.lm_head, labels, self.config.vocab_size)
        else:
            logits = self.lm_head(hidden)
            if labels is not None:
                loss = _logits_loss(logits, labels)
        return _returned(MaskedLMOutput(loss, logits, base.hidden_states, base.attentions), return_dict)


class ReformerClassificationHead(nn.Module):
    """Position 0 of the 2 hidden output: dropout, dense (2 hidden -> hidden), tanh, dropout, out_proj."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(2 * config.hidden_size, config.hidden_size)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, hidden_states):
        x = self.dropout(hidden_states[:, 0, :])
        x = self.dropout(torch.tanh(self.dense(x)))
        return self.out_proj(x)


class ReformerForSequenceClassification(ReformerPreTrainedModel):
    """HF's ``ReformerForSequenceClassification``: the head on position 0; loss by ``config.problem_type``
    (inferred on first use and stored, as HF)."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.reformer = ReformerModel(config)
        self.classifier = ReformerClassificationHead(config)
        self._post_init()

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, inputs_embeds=None, num_hashes=None,
                labels=None, output_hidden_states=None, output_attentions=None, return_dict=None, **kwargs):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        base = self.reformer(input_ids, attention_mask, position_ids, inputs_embeds, num_hashes, None, False,
                             output_hidden_states, output_attentions, return_dict=True)
        logits = self.classifier(base.last_hidden_state)
        loss = None if labels is None else _classification_loss(self.config, logits, labels.to(logits.device))
        return _returned(SequenceClassifierOutput(loss, logits, base.hidden_states, base.attentions), return_dict)


class ReformerForQuestionAnswering(ReformerPreTrainedModel):
    """HF's ``ReformerForQuestionAnswering``: ``qa_outputs`` (2 hidden -> num_labels) split into start/end
    logits [B, L]; the loss averages the two cross-entropies with positions clamped to [0, L], L ignored."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.reformer = ReformerModel(config)
        self.qa_outputs = nn.Linear(2 * config.hidden_size, config.num_labels)
        self._post_init()

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, inputs_embeds=None, num_hashes=None,
                start_positions=None, end_positions=None, output_hidden_states=None, output_attentions=None,
                return_dict=None, **kwargs):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        base = self.reformer(input_ids, attention_mask, position_ids, inputs_embeds, num_hashes, None, False,
                             output_hidden_states, output_attentions, return_dict=True)
        logits = self.qa_outputs(base.last_hidden_state)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = (_span_loss(start_logits, start_positions) + _span_loss(end_logits, end_positions)) / 2
        out = QuestionAnsweringModelOutput(loss, start_logits, end_logits, base.hidden_states, base.attentions)
        return _returned(out, return_dict)


def _span_loss(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    if positions.dim() > 1:
        positions = positions.squeeze(-1)
    ignored = logits.size(1)
    return F.cross_entropy(logits, positions.to(logits.device).clamp(0, ignored), ignore_index=ignored)


__all__ = [
    "ReformerConfig", "ReformerModel", "ReformerModelWithLMHead", "ReformerForMaskedLM",
    "ReformerForSequenceClassification", "ReformerForQuestionAnswering", "ReformerDynamicCache",
    "ReformerModelOutput", "ReformerModelWithLMHeadOutput", "ReversibleLayersFunction", "ReformerSession",
]

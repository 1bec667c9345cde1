"""DiffLlama (differential-attention Llama) on the tritonformers kernels, loading and matching HuggingFace's
``transformers`` DiffLlama (``models/diffllama/modeling_diffllama.py``): ``DiffLlamaConfig``, ``DiffLlamaModel``,
``DiffLlamaForCausalLM``, ``DiffLlamaForSequenceClassification``, ``DiffLlamaForQuestionAnswering``,
``DiffLlamaForTokenClassification``.

A layer is HF's: ``h += o_proj(DiffAttn(RMSNorm(h)))``, ``h += down(swiglu(gate(x), up(x)))`` with
``x = RMSNorm(h)``; the final RMSNorm. The work runs on the kernels:

* attention: :class:`DiffLlamaAttention`, the parameters of :class:`tritonformers.nn.DifferentialAttention`
  with a cached path: q/k/v projections, RoPE (``apply_rotary``) at the given positions, keys (rotated)
  and values (raw) written into the static :class:`~tritonformers.models.generation.KVCache`, then the fused
  ``diff_attention`` kernel (both softmax maps, lambda, the group RMSNorm and ``1 - lambda_init`` in one
  pass) over the cached keys with the 2-D padding mask, causal aligned bottom-right;
* RMSNorm, SwiGLU and RoPE on their kernels; RoPE tables from :mod:`tritonformers.models.rope` (every
  RoPE type HF supports, with dynamic/longrope's per-forward state);
* the LM loss is the fused linear cross-entropy when labels are given with gradients enabled (``logits``
  is None then, DESIGN.md); otherwise logits and loss are HF's.

Parameter names, state-dict keys, forward arguments and output attribute names are transformers'.
Differences from HF, on purpose:

* padded query rows (left padding) give attention output 0 where HF's eager averages every key; valid
  positions are unaffected, so compare those only (no valid output reads a padded query row);
* ``cache`` (``past_key_values`` before transformers 5.25) is a tritonformers ``KVCache`` (static,
  preallocated), not an HF ``Cache``;
  ``use_cache`` defaults to ``config.use_cache`` in eval mode and to False in training mode;
* ``generate`` derives each step's position from the running mask (``sum(mask) - 1``), which equals HF's
  ``last position + 1`` for left padding (the supported layout for decoder-only generation);
* ``model.to(dtype)`` keeps the RoPE frequencies in float32 (HF's ``.to`` rounds them; HF's
  ``from_pretrained(dtype=...)``, which the parity contract uses, keeps float32 as here);
* ``attentions`` (``output_attentions=True``) are computed beside the kernel, in PyTorch, as HF's eager
  path forms them (the first map of every query head, HF's additive mask), only when asked for.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..nn import DifferentialAttention, RMSNorm
from ..nn import functional as TF
from .outputs import (BaseModelOutputWithPast, CausalLMOutputWithPast, QuestionAnsweringModelOutput,
                      SequenceClassifierOutputWithPast, TokenClassifierOutput)
from .outputs import causal_lm_targets as _causal_lm_targets, classification_loss as _classification_loss
from .outputs import keep_logits as _keep_logits, last_token_states as _last_token_states, on_device as _on
from .outputs import cache_argument, returned as _returned
from .generation import GenerationConfig, GenerationMixin, KVCache
from .loading import ConfigBase, PreTrainedMixin, hf_init_
from .rope import RotaryEmbedding, standardize_rope_parameters

__all__ = [
    "DiffLlamaConfig", "DiffLlamaPreTrainedModel", "DiffLlamaModel", "DiffLlamaForCausalLM",
    "DiffLlamaForSequenceClassification", "DiffLlamaForQuestionAnswering", "DiffLlamaForTokenClassification",
    "DiffLlamaAttention", "DiffLlamaMLP", "DiffLlamaDecoderLayer", "BaseModelOutputWithPast",
    "CausalLMOutputWithPast",
]

_LEGACY_ROPE_KEYS = ("rope_scaling", "rope_theta", "partial_rotary_factor")


class DiffLlamaConfig(ConfigBase):
    """HF's ``DiffLlamaConfig`` (transformers/models/diffllama/configuration_diffllama.py): same fields and
    defaults.

    ``num_key_value_heads`` None becomes ``num_attention_heads``; ``head_dim`` None becomes
    ``hidden_size // num_attention_heads``. RoPE lives in ``rope_parameters`` (a flat dict with
    ``rope_type`` and ``rope_theta``); an older config.json's ``rope_scaling`` (which then replaces it) and
    top-level ``rope_theta`` / ``partial_rotary_factor`` are folded in as transformers 5 does
    (:func:`tritonformers.models.rope.standardize_rope_parameters`) and only ``rope_parameters`` is written
    back. ``rope_scaling`` reads and writes ``rope_parameters`` (HF's deprecated alias). The model, not the
    config, rejects an odd ``num_key_value_heads`` and ``attention_dropout > 0``, as HF.
    """

    model_type = "diffllama"
    defaults = dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02,
        rms_norm_eps=1e-5, use_cache=True, pad_token_id=None, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, rope_parameters=None, attention_bias=False, attention_dropout=0.0,
        lambda_std_dev=0.1, head_dim=None,
    )

    def __init__(self, **kwargs: Any):
        legacy = {key: kwargs.pop(key) for key in _LEGACY_ROPE_KEYS if key in kwargs}
        super().__init__(**kwargs)
        self.rope_parameters = standardize_rope_parameters(
            self.rope_parameters, max_position_embeddings=self.max_position_embeddings, **legacy)

    def _post_init(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @property
    def rope_scaling(self) -> dict:
        return self.rope_parameters

    @rope_scaling.setter
    def rope_scaling(self, value: dict) -> None:
        self.rope_parameters = standardize_rope_parameters(
            value, max_position_embeddings=self.max_position_embeddings)


# ----------------------------------------------------------------------------------------------------------
# Outputs (transformers' names and field order; the heads' other outputs are shared with BLOOM)
# ----------------------------------------------------------------------------------------------------------



# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------

_GATED_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu")


def _gated(act: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``act(gate) * up``: SiLU (every released DiffLlama) on the fused SwiGLU kernel."""
    if act in ("silu", "swish"):
        return TF.swiglu(gate, up)
    if act == "relu":
        return torch.relu(gate) * up
    return TF.gelu(gate, "tanh" if act == "gelu_pytorch_tanh" else "none") * up


class DiffLlamaMLP(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))``, bias-free (HF's ``DiffLlamaMLP``)."""

    def __init__(self, config):
        super().__init__()
        if config.hidden_act not in _GATED_ACTIVATIONS:
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; use one of {_GATED_ACTIVATIONS}")
        self.hidden_act = config.hidden_act
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_gated(self.hidden_act, self.gate_proj(x), self.up_proj(x)))


class DiffLlamaAttention(DifferentialAttention):
    """:class:`tritonformers.nn.DifferentialAttention` (HF's ``DiffLlamaAttention`` parameters) with the cached
    path the model needs.

    ``forward(hidden_states [B, N, E], position_embeddings (cos, sin) [B or 1, N, D], attention_mask=None,
    cache=None, kv_length=None, segments=None, allowed=None)`` -> ``(out [B, N, E], probs or None)``:

    * no cache: causal differential attention over the N new tokens, ``attention_mask`` [B, N] (1 = real);
    * with a :class:`KVCache` step opened by ``prepare(N)``: the rotated keys and raw values are written at
      the step's positions, then the N queries attend to the first ``kv_length`` cached positions
      (``attention_mask`` [B, kv_length]), causal aligned bottom-right; ``kv_length=None`` attends to the
      whole capacity with a [B, capacity] mask that is 0 past the valid keys (a one-token decode step
      whose shapes never change: CUDA-graph safe), through the split-K decode kernel when no gradient is
      wanted. When the step is the whole cache (``kv_length == N``)
      the fresh k/v are used directly, so gradients reach k_proj/v_proj;
    * ``segments``: per batch row the (start, end) bounds of packed sequences (HF's block-diagonal mask);
    * ``allowed`` [B, 1, N, Nk] bool: also return HF's eager attention probabilities of the first map.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.scaling = self.head_dim ** -0.5

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None,
                kv_length=None, segments=None, allowed=None, **kwargs):
        B, N, _ = hidden_states.shape
        D = self.head_dim
        q = self.q_proj(hidden_states).view(B, N, self.num_heads, D).transpose(1, 2)
        k = self.k_proj(hidden_states).view(B, N, self.num_key_value_heads, D).transpose(1, 2)
        v = self.v_proj(hidden_states).view(B, N, self.num_key_value_heads, D).transpose(1, 2)
        q, k = TF.apply_rotary(q, k, *position_embeddings)
        if cache is not None:
            cache.write(self.layer_idx, k, v)
            if kv_length != N:
                k, v = cache.key_cache[self.layer_idx], cache.value_cache[self.layer_idx]
                if kv_length is not None:
                    k, v = k[:, :, :kv_length], v[:, :, :kv_length]
        lam = TF.diff_lambda(self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2, self.lambda_init)
        if cache is not None and kv_length is None and N <= 16 and not torch.is_grad_enabled():
            # a decode step over the static capacity: the split-K kernel reads only each row's valid keys
            y = TF.diff_decode_attention(q, k, v, cache.lens, lam, self.lambda_init,
                                         key_padding_mask=attention_mask, eps=self.eps)
        elif segments is None:
            y = TF.diff_attention(q, k, v, lam, self.lambda_init, causal=True, key_padding_mask=attention_mask,
                                  eps=self.eps)
        else:
            y = self._packed(q, k, v, lam, segments)
        probs = _first_map_probs(q, k, allowed, self.scaling) if allowed is not None else None
        return self.o_proj(y.reshape(B, N, self.num_heads * D)), probs

    def _packed(self, q, k, v, lam, segments):
        """Each packed sequence of each row attends only to itself (the same kernel, one call per segment)."""
        rows = []
        for b, bounds in enumerate(segments):
            parts = [TF.diff_attention(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e], lam,
                                       self.lambda_init, causal=True, eps=self.eps) for s, e in bounds]
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows, dim=0)


def _first_map_probs(q, k, allowed, scaling):
    """HF eager's returned attention weights: softmax(q k^T * scaling + additive mask) of the first call,
    float32 softmax cast to the model dtype, [B, H, N, Nk] (fully masked rows are uniform, as HF's)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, torch.finfo(q.dtype).min)
    return torch.softmax(scores + bias, dim=-1, dtype=torch.float32).to(q.dtype)


class DiffLlamaDecoderLayer(nn.Module):
    """Pre-norm residual layer: ``h + attn(input_layernorm(h))``, then ``+ mlp(post_attention_layernorm(.))``.
    ``forward(hidden_states, position_embeddings, ...)`` takes :class:`DiffLlamaAttention`'s extra arguments
    and returns ``(hidden_states, attention probabilities or None)``."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = DiffLlamaAttention(config, layer_idx)
        self.mlp = DiffLlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None,
                kv_length=None, segments=None, allowed=None):
        attn, probs = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask,
                                     cache, kv_length, segments, allowed)
        hidden_states = hidden_states + attn
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, probs


# ----------------------------------------------------------------------------------------------------------
# Masks and positions
# ----------------------------------------------------------------------------------------------------------

def _check_attention_mask(mask, batch: int, length: int):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"attention_mask must be the 2-D padding mask [batch, past + new tokens] "
                         f"(1 = real token); got {got}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"attention_mask must have shape [{batch}, {length}] (past + new tokens), "
                         f"got {list(mask.shape)}")
    return mask if mask.dtype in (torch.bool, torch.int64, torch.int32, torch.int8, torch.uint8) else mask != 0


def _packed_segments(position_ids: torch.Tensor, batch: int) -> list[list[tuple[int, int]]] | None:
    """HF's ``find_packed_sequence_indices``: a new sequence starts wherever a position is not the previous
    one + 1. Returns per row the (start, end) bounds, or None when every row holds one sequence."""
    position_ids = position_ids.expand(batch, -1)
    diff = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    starts = diff != 1
    if not bool(starts.any()):
        return None
    N = position_ids.shape[1]
    segments = []
    for row in starts.cpu():
        idx = row.nonzero().flatten().tolist()
        bounds = [0] + [i for i in idx if i > 0] + [N]
        segments.append([(s, e) for s, e in zip(bounds[:-1], bounds[1:])])
    return segments


def _allowed_keys(mask, batch: int, n: int, kv: int, segments, device) -> torch.Tensor:
    """[B, 1, n, kv] bool: key j visible to query i (causal bottom-right, padding, packed segments)."""
    i = torch.arange(n, device=device)[:, None] + (kv - n)
    j = torch.arange(kv, device=device)[None, :]
    allowed = (j <= i)[None, None].expand(batch, 1, n, kv)
    if mask is not None:
        allowed = allowed & mask.bool()[:, None, None, :]
    if segments is not None:
        seg = torch.zeros(batch, kv, dtype=torch.long)
        for b, bounds in enumerate(segments):
            for s_id, (s, e) in enumerate(bounds):
                seg[b, s:e] = s_id
        seg = seg.to(device)
        allowed = allowed & (seg[:, None, :, None] == seg[:, None, None, :])
    return allowed


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------

class DiffLlamaPreTrainedModel(PreTrainedMixin, nn.Module):
    """Common base: config class, ``model.`` prefix, HF's initialisation, loading and saving."""

    config_class = DiffLlamaConfig
    base_model_prefix = "model"

    def _init_weights(self, module: nn.Module) -> None:
        hf_init_(module, self.config.initializer_range or 0.02)
        if isinstance(module, RMSNorm) and module.weight is not None:
            nn.init.ones_(module.weight)
        if isinstance(module, DiffLlamaAttention):
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                nn.init.normal_(getattr(module, name), 0.0, self.config.lambda_std_dev)

    def _post_init(self) -> None:
        """HF's ``post_init``: initialise (a head skips its base model, already initialised) and tie."""
        prefix = self.base_model_prefix
        with torch.no_grad():
            for name, module in self.named_modules():
                if isinstance(self, DiffLlamaModel) or not (name == prefix or name.startswith(prefix + ".")):
                    self._init_weights(module)
        self.tie_weights()

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer in the backward pass instead of keeping its activations (training, no cache)."""
        for module in self.modules():
            if isinstance(module, DiffLlamaModel):
                module.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if isinstance(module, DiffLlamaModel):
                module.gradient_checkpointing = False


class DiffLlamaModel(DiffLlamaPreTrainedModel):
    """The bare DiffLlama decoder: ``embed_tokens``, ``num_hidden_layers`` layers, ``norm``, ``rotary_emb``.

    ``forward(input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
    use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None)`` as HF's:
    input_ids [B, N] (or inputs_embeds [B, N, E]); attention_mask [B, past + N] (1 = real token; HF's 2-D
    form); position_ids [B or 1, N] (default ``past + arange(N)``: the mask is not used for positions, as
    HF); ``cache`` a :class:`KVCache` (updated in place and returned; ``past_key_values=``, its pre-5.25
    name, still works). Packed sequences (explicit
    position_ids that restart, no mask, no cache) attend block-diagonally, as HF's.

    Returns :class:`BaseModelOutputWithPast`; ``hidden_states`` has L + 1 entries, the last after the final
    norm (HF's); ``attentions`` (when asked for) one [B, H, N, past + N] tensor per layer.
    """

    base_model_prefix = "model"

    def __init__(self, config: DiffLlamaConfig):
        super().__init__()
        self.config = config
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([DiffLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        if self.rotary_emb.inv_freq.numel() * 2 != config.head_dim:
            raise ValueError(f"rope_parameters give rotary tables of width {self.rotary_emb.inv_freq.numel() * 2} "
                             f"but head_dim is {config.head_dim}: DiffLlama rotates the whole head "
                             "(partial_rotary_factor is not supported, HF fails on it too)")
        self.gradient_checkpointing = False
        self._post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:
        self.embed_tokens = embeddings

    def new_cache(self, batch_size: int, capacity: int, growable: bool = False) -> KVCache:
        """An empty static cache: L x [B, num_key_value_heads, capacity, head_dim] in the model dtype."""
        w = self.embed_tokens.weight
        return KVCache(len(self.layers), batch_size, self.config.num_key_value_heads, self.config.head_dim,
                       capacity, dtype=w.dtype, device=w.device, growable=growable)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        cfg = self.config
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = cfg.return_dict if return_dict is None else return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, N = inputs_embeds.shape[:2]
        cache = cache_argument(cache, kwargs)
        hf_cache = cache is not None or (cfg.use_cache if use_cache is None else use_cache)
        use_cache = (cfg.use_cache and not self.training) if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # a recomputed layer would write its keys twice
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a tritonformers KVCache (from an earlier call with "
                            f"use_cache=True or model.new_cache), got {type(cache).__name__}")
        if cache is None and use_cache:
            cache = self.new_cache(B, N, growable=True)
        past = cache.length if cache is not None else 0
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"the cache holds {cache.batch_size} rows but the input has {B}")
        mask = _check_attention_mask(attention_mask, B, past + N)
        segments = None
        if position_ids is None:
            position_ids = torch.arange(past, past + N, device=inputs_embeds.device)[None]
        elif mask is None and not hf_cache:
            segments = _packed_segments(position_ids, B)
        if cache is not None:
            cache.prepare(N)
        try:
            hidden, all_hidden, all_attn = self.run_layers(inputs_embeds, position_ids, mask, cache, past + N,
                                                           segments, output_hidden_states, output_attentions)
        finally:
            if cache is not None:
                cache.commit(N)
        return _returned(BaseModelOutputWithPast(hidden, cache, all_hidden, all_attn), return_dict)

    def run_layers(self, inputs_embeds, position_ids, mask, cache, kv_length, segments=None,
                   output_hidden_states=False, output_attentions=False):
        """RoPE tables, the layers and the final norm, on a cache step already opened by the caller.

        ``kv_length`` = keys each query sees (past + new; None = the cache's whole capacity, ``mask`` then
        [B, capacity]). Returns (last hidden state, hidden states tuple or None, attentions tuple or None).
        """
        hidden = inputs_embeds
        cos_sin = self.rotary_emb(hidden, position_ids)
        B, N = hidden.shape[:2]
        allowed = None
        if output_attentions:
            kv = kv_length if kv_length is not None else cache.capacity
            allowed = _allowed_keys(mask, B, N, kv, segments, hidden.device)
        all_hidden = [] if output_hidden_states else None
        all_attn = [] if output_attentions else None
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden)
            args = (hidden, cos_sin, mask, cache, kv_length, segments, allowed)
            hidden, probs = checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args)
            if all_attn is not None:
                all_attn.append(probs)
        hidden = self.norm(hidden)
        if all_hidden is not None:
            all_hidden.append(hidden)
        return hidden, (tuple(all_hidden) if all_hidden is not None else None), \
            (tuple(all_attn) if all_attn is not None else None)


class DiffLlamaForCausalLM(GenerationMixin, DiffLlamaPreTrainedModel):
    """DiffLlama with its LM head (HF's ``DiffLlamaForCausalLM``), plus ``generate``.

    ``forward(input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
    labels=None, use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
    logits_to_keep=0, num_items_in_batch=None, shift_labels=None, ignore_index=-100)`` ->
    :class:`CausalLMOutputWithPast`. ``logits_to_keep`` slices before ``lm_head`` (HF's rules). The loss is
    HF's ``ForCausalLMLoss`` (labels shifted inside; mean, or sum / ``num_items_in_batch``); with labels and
    gradients enabled it is the fused linear cross-entropy and ``logits`` is None.

    Generation: :meth:`generate` (tritonformers.models.generation: greedy, sampling, beam search) over a
    static :class:`KVCache`; on CUDA the one-token step is replayed from a CUDA graph, except with dynamic
    RoPE (its frequency update reads the positions on the host, as HF's).
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DiffLlamaConfig):
        super().__init__()
        self.config = config
        self.model = DiffLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.generation_config = GenerationConfig.from_model_config(config)
        self._post_init()

    @property
    def supports_cuda_graph(self) -> bool:
        return not self.model.rotary_emb.host_synchronising

    def generation_session(self, input_ids, attention_mask, num_copies=1, use_cuda_graph=None, **model_kwargs):
        if use_cuda_graph and not self.supports_cuda_graph:
            raise ValueError("use_cuda_graph=True: dynamic RoPE recomputes its frequencies from the positions on the "
                             "host at every step, which a CUDA graph cannot capture")
        return super().generation_session(input_ids, attention_mask, num_copies, use_cuda_graph, **model_kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:
        self.model.embed_tokens = embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, embeddings: nn.Linear) -> None:
        self.lm_head = embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, logits_to_keep=0, **kwargs):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        cache = cache_argument(cache, kwargs)
        base = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache,
                          output_attentions, output_hidden_states, return_dict=True)
        hidden = _keep_logits(base.last_hidden_state, logits_to_keep)
        loss = logits = None
        if labels is not None and torch.is_grad_enabled():
            loss = _lm_loss(hidden, labels, lambda h, t, **kw: TF.fused_linear_cross_entropy(
                h, self.lm_head.weight, t, **kw), **kwargs)
        else:
            logits = self.lm_head(hidden)
            if labels is not None:
                loss = _lm_loss(logits, labels, _cross_entropy, **kwargs)
        out = CausalLMOutputWithPast(loss, logits, base.cache, base.hidden_states, base.attentions)
        return _returned(out, return_dict)

    # -- the generation protocol (tritonformers.models.generation.CachedDecoderSession)
    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        return self.model.new_cache(batch_size, capacity)

    def decode_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [N, V] of the last position after feeding ``input_ids`` [N, T] into a cache step opened
        with ``cache.prepare(T)``. Positions come from the mask as in HF's generate (``cumsum - 1``, pads 0);
        a one-token step with the [N, capacity] mask attends to the whole static cache, so its shapes and
        host-side values never change (CUDA-graph safe, but for dynamic RoPE)."""
        T = input_ids.shape[1]
        if T == 1 and attention_mask.shape[1] == cache.capacity:
            position_ids = attention_mask.sum(-1, keepdim=True) - 1
            kv_length = None
        else:
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)[:, -T:]
            kv_length = attention_mask.shape[1]
        embeds = self.model.embed_tokens(input_ids)
        hidden = self.model.run_layers(embeds, position_ids, attention_mask, cache, kv_length)[0]
        return self.lm_head(hidden[:, -1])


def _cross_entropy(logits, target, ignore_index=-100, reduction="mean"):
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)


def _lm_loss(source, labels, loss_fn, num_items_in_batch=None, shift_labels=None, ignore_index=-100, **_):
    """HF's ``ForCausalLMLoss`` over ``source`` (logits, or hidden states for the fused loss)."""
    target = _causal_lm_targets(labels.to(source.device), shift_labels, ignore_index)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = loss_fn(source, target.to(source.device), ignore_index=ignore_index, reduction=reduction)
    return loss if num_items_in_batch is None else loss / _on(num_items_in_batch, loss.device)


class DiffLlamaForSequenceClassification(DiffLlamaPreTrainedModel):
    """HF's ``DiffLlamaForSequenceClassification`` (``GenericForSequenceClassification``): ``score`` (no bias)
    at the rightmost non-pad token of each row (``input_ids != pad_token_id``; the last position without a
    pad id at batch 1, or with ``inputs_embeds``). Loss by ``config.problem_type`` (inferred on first use
    and stored, as HF)."""

    def __init__(self, config: DiffLlamaConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.model = DiffLlamaModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self._post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        cache = cache_argument(cache, kwargs)
        base = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache,
                          output_attentions, output_hidden_states, return_dict=True)
        hidden = base.last_hidden_state
        pooled = self.score(_last_token_states(hidden, input_ids, self.config.pad_token_id))
        loss = _classification_loss(self.config, pooled, labels.to(pooled.device)) if labels is not None else None
        out = SequenceClassifierOutputWithPast(loss, pooled, base.cache, base.hidden_states,
                                               base.attentions)
        return _returned(out, return_dict)


class DiffLlamaForTokenClassification(DiffLlamaPreTrainedModel):
    """HF's ``DiffLlamaForTokenClassification``: dropout (``classifier_dropout``, else ``hidden_dropout``,
    else 0.1; active in train mode only) then ``score`` (bias unless ``token_classification_bias`` is
    False) at every position; float32 cross-entropy over all positions (ignore -100)."""

    def __init__(self, config: DiffLlamaConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.model = DiffLlamaModel(config)
        p = getattr(config, "classifier_dropout", None)
        if p is None:
            p = getattr(config, "hidden_dropout", None)
        self.dropout = nn.Dropout(0.1 if p is None else p)
        self.score = nn.Linear(config.hidden_size, config.num_labels,
                               bias=getattr(config, "token_classification_bias", True))
        self._post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        cache = cache_argument(cache, kwargs)
        base = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache,
                          output_attentions, output_hidden_states, return_dict=True)
        logits = self.score(self.dropout(base.last_hidden_state))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, self.num_labels), labels.to(logits.device).reshape(-1))
        out = TokenClassifierOutput(loss, logits, base.hidden_states, base.attentions)
        return _returned(out, return_dict)


class DiffLlamaForQuestionAnswering(DiffLlamaPreTrainedModel):
    """HF's ``DiffLlamaForQuestionAnswering``: the base model under ``transformer.`` (HF's name for
    compatibility), ``qa_outputs`` -> start/end logits [B, N]; loss = mean of the start and end
    cross-entropies with positions clamped to [0, N] and N ignored (sum / ``num_items_in_batch`` when given).
    No cache is built (HF builds one and drops it)."""

    base_model_prefix = "transformer"

    def __init__(self, config: DiffLlamaConfig):
        super().__init__()
        self.config = config
        self.transformer = DiffLlamaModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self._post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embed_tokens

    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:
        self.transformer.embed_tokens = embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, start_positions=None, end_positions=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, num_items_in_batch=None, **kwargs):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        cache = cache_argument(cache, kwargs)
        base = self.transformer(input_ids, attention_mask, position_ids, cache, inputs_embeds,
                                cache is not None, output_attentions, output_hidden_states,
                                return_dict=True)
        logits = self.qa_outputs(base.last_hidden_state)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = (_span_loss(start_logits, start_positions, num_items_in_batch)
                    + _span_loss(end_logits, end_positions, num_items_in_batch)) / 2
        out = QuestionAnsweringModelOutput(loss, start_logits, end_logits, base.hidden_states, base.attentions)
        return _returned(out, return_dict)


def _span_loss(logits: torch.Tensor, positions: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """HF's QA term: positions clamped to [0, N], N ignored; mean, or sum / ``num_items_in_batch``."""
    if positions.dim() > 1:
        positions = positions.squeeze(-1)
    ignored = logits.size(1)
    positions = positions.to(logits.device).clamp(0, ignored)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, positions, ignore_index=ignored)
    return F.cross_entropy(logits, positions, ignore_index=ignored, reduction="sum") / _on(num_items_in_batch,
                                                                                          logits.device)

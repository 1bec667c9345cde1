"""BLOOM (BigScience) on the tritonformers kernels, loading and matching HuggingFace's ``transformers``
BLOOM (transformers/models/bloom/modeling_bloom.py): ``BloomConfig``, ``BloomModel``, ``BloomForCausalLM``,
``BloomForSequenceClassification``, ``BloomForTokenClassification``, ``BloomForQuestionAnswering``.

The computation is HF's, with the element-wise work fused:

* attention: :class:`tritonformers.nn.ALiBiAttention` (flash attention with ALiBi from the 2-D mask's
  cumulative positions; decode attention over the static :class:`KVCache`);
* every residual add happens inside the LayerNorm that follows it (``layer_norm(x, residual=r)`` returns
  the normalised sum and the sum), so a block reads its input once: the block hands the next one its
  residual stream and its MLP output separately;
* ``dense_h_to_4h``'s bias is fused into BLOOM's tanh-GELU kernel;
* the LM loss is the fused linear cross-entropy when labels are given with gradients enabled (``logits`` is
  None then: the point is never to hold the [tokens, 250880] logits).

Parameter names, state-dict keys, forward arguments and output attribute names are transformers'; base
(``h.0...``) and task (``transformer.h.0...``) checkpoints load into every class. Flax checkpoints
(``flax_model.msgpack``, transformers 4.x's FlaxBloom) load too, through :func:`load_flax_state_dict`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..nn import LayerNorm
from ..nn.attention import ALiBiAttention, num_attention_heads, sliced_linear
from ..nn.functional import fused_linear_cross_entropy, gelu
from .generation import GenerationConfig, GenerationMixin, KVCache
from .outputs import (BaseModelOutputWithPastAndCrossAttentions, CausalLMOutputWithCrossAttentions,
                      QuestionAnsweringModelOutput, SequenceClassifierOutputWithPast, TokenClassifierOutput)
from .outputs import causal_lm_targets as _causal_lm_targets, classification_loss as _classification_loss
from .outputs import keep_logits as _keep_logits, last_token_states as _last_token_states, on_device as _on
from .outputs import cache_argument, returned as _returned
from .loading import ConfigBase, PreTrainedMixin, hf_init_

__all__ = [
    "BloomConfig", "BloomPreTrainedModel", "BloomModel", "BloomForCausalLM", "BloomForSequenceClassification",
    "BloomForTokenClassification", "BloomForQuestionAnswering", "BloomBlock", "BloomMLP",
    "BaseModelOutputWithPastAndCrossAttentions", "CausalLMOutputWithCrossAttentions",
    "SequenceClassifierOutputWithPast", "TokenClassifierOutput", "QuestionAnsweringModelOutput",
    "load_flax_state_dict",
]


class BloomConfig(ConfigBase):
    """HF's ``BloomConfig``: same fields, defaults and aliases (``n_embed`` -> ``hidden_size``, which it
    overrides; ``num_hidden_layers`` <-> ``n_layer``; ``num_attention_heads`` <-> ``n_head``). Legacy
    Megatron keys of real checkpoints are kept and written back, never read."""

    model_type = "bloom"
    attribute_map = {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "n_embed": "hidden_size"}
    defaults = dict(
        vocab_size=250880, hidden_size=64, n_layer=2, n_head=8, layer_norm_epsilon=1e-5, initializer_range=0.02,
        use_cache=True, bos_token_id=1, eos_token_id=2, pad_token_id=None,
        apply_residual_connection_post_layernorm=False, hidden_dropout=0.0, attention_dropout=0.0,
        pretraining_tp=1, slow_but_exact=False, tie_word_embeddings=True,
    )


# ----------------------------------------------------------------------------------------------------------
# Outputs (transformers' names and field order)
# ----------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------

class BloomMLP(nn.Module):
    """``dense_h_to_4h`` -> BLOOM's tanh-GELU (the bias fused into its kernel) -> ``dense_4h_to_h`` ->
    dropout. ``forward(hidden_states, residual=None)`` adds ``residual`` when given (HF's signature)."""

    def __init__(self, config):
        super().__init__()
        h = config.hidden_size
        self.pretraining_tp = int(getattr(config, "pretraining_tp", 1) or 1)
        self.slow_but_exact = bool(getattr(config, "slow_but_exact", False))
        self.hidden_dropout = float(config.hidden_dropout or 0.0)
        self.dense_h_to_4h = nn.Linear(h, 4 * h)
        self.dense_4h_to_h = nn.Linear(4 * h, h)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        x = gelu(F.linear(hidden_states, self.dense_h_to_4h.weight), "bloom", bias=self.dense_h_to_4h.bias)
        if self.pretraining_tp > 1 and self.slow_but_exact:
            out = sliced_linear(x, self.dense_4h_to_h.weight, self.pretraining_tp)
        else:
            out = self.dense_4h_to_h(x)
        out = F.dropout(out, p=self.hidden_dropout, training=self.training)
        return out if residual is None else residual + out


class BloomBlock(nn.Module):
    """One pre-LN BLOOM layer (HF's ``BloomBlock``) with the residual adds fused into the LayerNorms.

    ``forward(hidden_states, attention_mask=None, layer_past=None, use_cache=False, output_attentions=False,
    delta=None)``: the layer's input is ``hidden_states + delta`` (``delta`` = the previous layer's MLP
    output, added inside this layer's first LayerNorm; None = nothing to add). Returns ``(residual, mlp_out,
    attentions, layer_input)``: the layer's output is ``residual + mlp_out`` (left for the next LayerNorm
    to add), ``layer_input`` the materialised input (for ``output_hidden_states``).
    """

    def __init__(self, config, layer_idx: int | None = None):
        super().__init__()
        h = config.hidden_size
        self.input_layernorm = LayerNorm(h, eps=config.layer_norm_epsilon)
        self.self_attention = ALiBiAttention(config, layer_idx)
        self.post_attention_layernorm = LayerNorm(h, eps=config.layer_norm_epsilon)
        self.mlp = BloomMLP(config)
        self.apply_residual_connection_post_layernorm = bool(config.apply_residual_connection_post_layernorm)

    def forward(self, hidden_states, attention_mask=None, layer_past=None, use_cache=False,
                output_attentions=False, delta=None):
        if delta is None:
            a, x = self.input_layernorm(hidden_states), hidden_states
        else:
            a, x = self.input_layernorm(delta, hidden_states)
        post_ln = self.apply_residual_connection_post_layernorm
        attn_out, probs = self.self_attention(a, None, attention_mask, layer_past, use_cache, output_attentions)
        b, s = self.post_attention_layernorm(attn_out, a if post_ln else x)
        return (b if post_ln else s), self.mlp(b), probs, x


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------

class BloomPreTrainedModel(PreTrainedMixin, nn.Module):
    """Common base: config class, ``transformer.`` prefix, HF's initialisation, loading and saving."""

    config_class = BloomConfig
    base_model_prefix = "transformer"

    def _init_weights(self, module: nn.Module) -> None:
        hf_init_(module, self.config.initializer_range)

    def _post_init(self) -> None:
        """HF's ``post_init``: initialise (a head skips its base model, already initialised) and tie."""
        with torch.no_grad():
            for name, module in self.named_modules():
                if not (name == "transformer" or name.startswith("transformer.")):
                    self._init_weights(module)
        self.tie_weights()

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each block in the backward pass instead of keeping its activations (training only;
        no cache is built then, as in HF)."""
        for module in self.modules():
            if isinstance(module, BloomModel):
                module.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if isinstance(module, BloomModel):
                module.gradient_checkpointing = False

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, config=None, strict: bool = True):
        """The model of a local checkpoint directory (see ``PreTrainedMixin.from_pretrained``); a directory
        with only ``flax_model.msgpack`` (transformers 4.x's FlaxBloom) loads too."""
        if _is_flax_dir(path):
            return _from_flax(cls, path, dtype=dtype, device=device, config=config, strict=strict)
        return super().from_pretrained(path, dtype=dtype, device=device, config=config, strict=strict)


class BloomModel(BloomPreTrainedModel):
    """The bare BLOOM transformer: embeddings, embedding LayerNorm, ``n_layer`` blocks, ``ln_f``.

    ``forward(input_ids=None, cache=None, attention_mask=None, inputs_embeds=None, use_cache=None,
    output_attentions=None, output_hidden_states=None, return_dict=None)`` as HF's: input_ids [B, T] (or
    inputs_embeds [B, T, H]), attention_mask [B, past + T] (1 = real token), ``cache`` a
    :class:`KVCache` (updated in place and returned; ``past_key_values=``, its pre-5.25 name, still works).
    ``use_cache`` defaults to ``config.use_cache`` in eval mode and to False in training mode (a cache is
    useless there and would copy every K/V). Returns :class:`BaseModelOutputWithPastAndCrossAttentions`;
    ``hidden_states`` has ``n_layer + 1`` entries, the last after ``ln_f`` (HF's). Only the 2-D mask is accepted (BLOOM's ALiBi needs it).
    """

    def __init__(self, config: BloomConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = num_attention_heads(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, self.embed_dim)
        self.word_embeddings_layernorm = LayerNorm(self.embed_dim, eps=config.layer_norm_epsilon)
        self.h = nn.ModuleList([BloomBlock(config, layer_idx=i) for i in range(config.n_layer)])
        self.ln_f = LayerNorm(self.embed_dim, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self._post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:
        self.word_embeddings = embeddings

    def new_cache(self, batch_size: int, capacity: int, growable: bool = False) -> KVCache:
        """An empty static cache for this model: ``n_layer`` x [B, n_head, capacity, head_dim]."""
        return KVCache(len(self.h), batch_size, self.num_heads, self.embed_dim // self.num_heads, capacity,
                       dtype=self.word_embeddings.weight.dtype, device=self.word_embeddings.weight.device,
                       growable=growable)

    def forward(self, input_ids=None, cache=None, attention_mask=None, inputs_embeds=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        cfg = self.config
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        use_cache = (cfg.use_cache and not self.training) if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # a recomputed block would write its keys twice
        return_dict = cfg.return_dict if return_dict is None else return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        B, T = inputs_embeds.shape[:2]
        cache = cache_argument(cache, kwargs)
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a tritonformers KVCache (from an earlier call with "
                            f"use_cache=True or model.new_cache), got {type(cache).__name__}")
        if cache is None and use_cache:
            cache = self.new_cache(B, T, growable=True)
        past = cache.length if cache is not None else 0
        mask = _check_attention_mask(attention_mask, B, past + T)
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"the cache holds {cache.batch_size} rows but the input has {B}")
            cache.prepare(T)
            if mask is not None and past > 0:
                mask = F.pad(mask, (0, cache.capacity - mask.shape[1]))
        try:
            hidden, all_hidden, all_attn = self.run_layers(inputs_embeds, mask, cache, output_attentions,
                                                           output_hidden_states)
        finally:
            if cache is not None:
                cache.commit(T)
        out = BaseModelOutputWithPastAndCrossAttentions(hidden, cache, all_hidden, all_attn)
        return _returned(out, return_dict)

    def run_layers(self, inputs_embeds, mask, cache, output_attentions=False, output_hidden_states=False):
        """Embedding LayerNorm, the blocks and ``ln_f`` on an already prepared cache step (no bookkeeping:
        the caller opened it with ``cache.prepare(T)``). Returns (last hidden state, hidden states tuple or
        None, attentions tuple or None)."""
        res = self.word_embeddings_layernorm(inputs_embeds)
        delta = None
        all_hidden = [] if output_hidden_states else None
        all_attn = [] if output_attentions else None
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for block in self.h:
            if recompute:
                res, delta, probs, block_input = checkpoint(block, res, mask, None, False, output_attentions, delta,
                                                            use_reentrant=False)
            else:
                res, delta, probs, block_input = block(res, mask, cache, cache is not None, output_attentions, delta)
            if all_hidden is not None:
                all_hidden.append(block_input)
            if all_attn is not None:
                all_attn.append(probs)
        hidden = self.ln_f(res) if delta is None else self.ln_f(delta, res)[0]
        if all_hidden is not None:
            all_hidden.append(hidden)
        return hidden, (tuple(all_hidden) if all_hidden is not None else None), \
            (tuple(all_attn) if all_attn is not None else None)


def _check_attention_mask(mask, batch: int, length: int):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"attention_mask must be the 2-D mask [batch, past + new tokens] (1 = real token); "
                         f"BLOOM builds its ALiBi positions from it. Got {got}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"attention_mask must have shape [{batch}, {length}] (past + new tokens), "
                         f"got {list(mask.shape)}")
    return mask.long() if mask.is_floating_point() else mask


class BloomForCausalLM(GenerationMixin, BloomPreTrainedModel):
    """BLOOM with its (tied) LM head, HF's ``BloomForCausalLM``, plus ``generate``.

    ``forward(input_ids=None, cache=None, attention_mask=None, inputs_embeds=None, labels=None,
    use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None, logits_to_keep=0,
    num_items_in_batch=None, shift_labels=None, ignore_index=-100)`` -> :class:`CausalLMOutputWithCrossAttentions`.
    The loss is HF's ``ForCausalLMLoss`` (labels shifted inside; mean, or sum / ``num_items_in_batch``).
    With labels and gradients enabled it is the fused linear cross-entropy and ``logits`` is None.

    Generation: :meth:`generate` (tritonformers.models.generation) over a static :class:`KVCache`; on
    CUDA the one-token step is replayed from a CUDA graph.
    """

    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}
    supports_cuda_graph = True

    def __init__(self, config: BloomConfig):
        super().__init__()
        self.config = config
        self.transformer = BloomModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.generation_config = GenerationConfig.from_model_config(config)
        self._post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, embeddings: nn.Linear) -> None:
        self.lm_head = embeddings

    def forward(self, input_ids=None, cache=None, attention_mask=None, inputs_embeds=None, labels=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                logits_to_keep=0, **kwargs):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        cache = cache_argument(cache, kwargs)
        base = self.transformer(input_ids, cache, attention_mask, inputs_embeds, use_cache,
                                output_attentions, output_hidden_states, return_dict=True)
        hidden = _keep_logits(base.last_hidden_state, logits_to_keep)
        loss = logits = None
        if labels is not None and torch.is_grad_enabled():
            loss = self._fused_loss(hidden, labels, **kwargs)
        else:
            logits = self.lm_head(hidden)
            if labels is not None:
                loss = self._loss(logits, labels, **kwargs)
        out = CausalLMOutputWithCrossAttentions(loss, logits, base.cache, base.hidden_states,
                                                base.attentions)
        return _returned(out, return_dict)

    def _fused_loss(self, hidden, labels, num_items_in_batch=None, shift_labels=None, ignore_index=-100, **_):
        target = _causal_lm_targets(labels.to(hidden.device), shift_labels, ignore_index)
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = fused_linear_cross_entropy(hidden, self.lm_head.weight, target, self.lm_head.bias,
                                          ignore_index=ignore_index, reduction=reduction)
        return loss if num_items_in_batch is None else loss / _on(num_items_in_batch, loss.device)

    def _loss(self, logits, labels, num_items_in_batch=None, shift_labels=None, ignore_index=-100, **_):
        target = _causal_lm_targets(labels.to(logits.device), shift_labels, ignore_index)
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                               ignore_index=ignore_index, reduction=reduction)
        return loss if num_items_in_batch is None else loss / _on(num_items_in_batch, loss.device)

    # -- the generation protocol (tritonformers.models.generation.CachedDecoderSession)
    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        return self.transformer.new_cache(batch_size, capacity)

    def decode_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [N, V] (model dtype) of the last position after feeding ``input_ids`` [N, T] into a
        cache step already opened with ``cache.prepare(T)``; no host synchronisation (CUDA-graph safe)."""
        embeds = self.transformer.word_embeddings(input_ids)
        hidden = self.transformer.run_layers(embeds, attention_mask, cache)[0]
        return self.lm_head(hidden[:, -1])


class BloomForSequenceClassification(BloomPreTrainedModel):
    """HF's ``BloomForSequenceClassification``: ``score`` (no bias) at the rightmost non-pad token of each
    row (``input_ids != pad_token_id``; the last position without a pad id at batch 1, or with
    ``inputs_embeds``). The pooled position's hidden state is projected alone (HF projects every position
    and then picks one: the same values). Loss by ``config.problem_type`` (inferred on first use)."""

    def __init__(self, config: BloomConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.transformer = BloomModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self._post_init()

    def forward(self, input_ids=None, cache=None, attention_mask=None, inputs_embeds=None, labels=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        cache = cache_argument(cache, kwargs)
        base = self.transformer(input_ids, cache, attention_mask, inputs_embeds, use_cache,
                                output_attentions, output_hidden_states, return_dict=True)
        hidden = base.last_hidden_state
        pooled = self.score(_last_token_states(hidden, input_ids, self.config.pad_token_id, type(self).__name__))
        loss = _classification_loss(self.config, pooled, labels.to(pooled.device)) if labels is not None else None
        out = SequenceClassifierOutputWithPast(loss, pooled, base.cache, base.hidden_states,
                                               base.attentions)
        return _returned(out, return_dict)


class BloomForTokenClassification(BloomPreTrainedModel):
    """HF's ``BloomForTokenClassification``: dropout (``classifier_dropout``, else ``hidden_dropout``, else
    0.1) then ``classifier`` at every position; cross-entropy over all positions (ignore -100).

    Tuple mode returns (loss?, logits, hidden_states?, attentions?): HF's version drops ``hidden_states``
    when ``use_cache=False`` (it skips a slot it assumes is the cache); this one does not."""

    def __init__(self, config: BloomConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.transformer = BloomModel(config)
        p = getattr(config, "classifier_dropout", None)
        if p is None:
            p = config.hidden_dropout if config.hidden_dropout is not None else 0.1
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._post_init()

    def forward(self, input_ids=None, cache=None, attention_mask=None, inputs_embeds=None, labels=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        cache = cache_argument(cache, kwargs)
        base = self.transformer(input_ids, cache, attention_mask, inputs_embeds, use_cache,
                                output_attentions, output_hidden_states, return_dict=True)
        logits = self.classifier(self.dropout(base.last_hidden_state))
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            loss = F.cross_entropy(logits.reshape(-1, self.num_labels), labels.reshape(-1))
        out = TokenClassifierOutput(loss, logits, base.hidden_states, base.attentions)
        return _returned(out, return_dict)


class BloomForQuestionAnswering(BloomPreTrainedModel):
    """HF's ``BloomForQuestionAnswering``: ``qa_outputs`` -> start/end logits [B, T]; loss = mean of the
    start and end cross-entropies with positions clamped to [0, T] and T ignored. No cache is built (HF
    builds one and throws it away)."""

    def __init__(self, config: BloomConfig):
        super().__init__()
        self.config = config
        self.transformer = BloomModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self._post_init()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, start_positions=None,
                end_positions=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        base = self.transformer(input_ids, None, attention_mask, inputs_embeds, False, output_attentions,
                                output_hidden_states, return_dict=True)
        logits = self.qa_outputs(base.last_hidden_state)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.size(1)
            start = start_positions.squeeze(-1) if start_positions.dim() > 1 else start_positions
            end = end_positions.squeeze(-1) if end_positions.dim() > 1 else end_positions
            start = start.to(start_logits.device).clamp(0, ignored)
            end = end.to(end_logits.device).clamp(0, ignored)
            loss = (F.cross_entropy(start_logits, start, ignore_index=ignored)
                    + F.cross_entropy(end_logits, end, ignore_index=ignored)) / 2
        out = QuestionAnsweringModelOutput(loss, start_logits, end_logits, base.hidden_states, base.attentions)
        return _returned(out, return_dict)


# ----------------------------------------------------------------------------------------------------------
# Flax checkpoints (transformers 4.x FlaxBloomModel / FlaxBloomForCausalLM)
# ----------------------------------------------------------------------------------------------------------

FLAX_WEIGHTS_NAME = "flax_model.msgpack"


def _is_flax_dir(path) -> bool:
    p = Path(path) if isinstance(path, (str, Path)) else None
    if p is None or not p.is_dir() or not (p / FLAX_WEIGHTS_NAME).is_file():
        return False
    from .loading import WEIGHT_NAMES

    return not any((p / name).is_file() for name in WEIGHT_NAMES)


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value.get("__msgpack_chunked_array__"):
            flat[prefix + (key,)] = _unchunk(value)
        elif isinstance(value, dict):
            flat.update(_flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def _unchunk(data: dict) -> torch.Tensor:
    """flax.serialization's chunked form of an array over 1 GiB: {"shape": {"0": ..}, "chunks": {"0": ..}}."""
    shape = tuple(data["shape"][str(i)] for i in range(len(data["shape"])))
    chunks = [data["chunks"][str(i)] for i in range(len(data["chunks"]))]
    return torch.cat([c.reshape(-1) for c in chunks]).reshape(shape)


def load_flax_state_dict(path) -> dict[str, torch.Tensor]:
    """A FlaxBloom ``flax_model.msgpack`` as a PyTorch state dict with HF's names.

    Flax names map as transformers' ``load_flax_weights_in_pytorch_model`` maps them: a Dense ``kernel``
    [in, out] becomes ``weight`` [out, in] (transposed), a LayerNorm ``scale`` becomes ``weight``, an
    Embed ``embedding`` becomes ``weight``; the module path is joined with dots (``h/0/self_attention/
    query_key_value/kernel`` -> ``h.0.self_attention.query_key_value.weight``). Needs ``msgpack``
    (imported here only); bf16 arrays (stored as raw bytes with dtype "bfloat16") are read too.
    """
    try:
        import msgpack
    except ImportError as e:  # optional dependency
        raise ImportError("reading flax_model.msgpack needs the 'msgpack' package (pip install msgpack)") from e
    file = Path(path) / FLAX_WEIGHTS_NAME if Path(path).is_dir() else Path(path)
    with open(file, "rb") as f:
        tree = msgpack.unpackb(f.read(), ext_hook=_msgpack_ext_hook, raw=False, strict_map_key=False)
    state = {}
    for keys, array in _flatten(tree).items():
        keys = [str(k) for k in keys]
        leaf = keys[-1]
        tensor = array if isinstance(array, torch.Tensor) else torch.as_tensor(array)
        if leaf == "kernel":
            tensor = tensor.t() if tensor.dim() == 2 else tensor
            leaf = "weight"
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        state[".".join(keys[:-1] + [leaf])] = tensor.contiguous()
    return state


_FLAX_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int32": torch.int32, "int64": torch.int64, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}


def _msgpack_ext_hook(code: int, data: bytes):
    """flax.serialization's ext types: 1 = ndarray (msgpack [shape, dtype name, raw bytes]), others unsupported."""
    import msgpack

    if code != 1:
        raise ValueError(f"flax_model.msgpack holds an extension type {code} that is not an array")
    shape, dtype_name, buffer = msgpack.unpackb(data, raw=False)
    dtype = _FLAX_DTYPES.get(dtype_name)
    if dtype is None:
        raise ValueError(f"flax_model.msgpack holds an array of unsupported dtype {dtype_name!r}")
    flat = torch.frombuffer(bytearray(buffer), dtype=dtype) if len(buffer) else torch.empty(0, dtype=dtype)
    return flat.reshape(tuple(shape))


def _from_flax(cls, path, *, dtype=None, device=None, config=None, strict=True):
    from .loading import _as_dtype, _build_context, checkpoint_dtype, load_into

    config = BloomConfig.from_pretrained(path) if config is None else config
    state = load_flax_state_dict(path)
    dtype = None if dtype == "auto" else _as_dtype(dtype)
    dtype = dtype or checkpoint_dtype(config) or checkpoint_dtype(state)
    device = torch.device("cpu" if device is None else device)
    config.dtype = dtype
    with _build_context(dtype, device):
        model = cls(config)
    state = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
             for k, v in state.items()}
    load_into(model, state, prefix=cls.base_model_prefix, tied=model.all_tied_weights_keys, strict=strict)
    model._init_missing(device)
    model.tie_weights(only_if_equal=True)
    if isinstance(model, GenerationMixin):
        from .generation import load_generation_config

        model.generation_config = load_generation_config(path, model.config)
    return model.eval()

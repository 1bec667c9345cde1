"""``accelerate(model)``: put tritonformers' kernels into a transformers model in place.

The model keeps its class name, its parameters (the same tensors: optimizer state and ``state_dict`` keys
are untouched) and its forward; the modules that compute attention, norms, activations and (opt-in) the
causal-LM loss are switched to ours, either by giving the module our class (``module.__class__``: a
subclass of HF's, or our drop-in with the same attributes) or by replacing a parameterless child (an
activation).

Families: BLOOM (ALiBi attention, LayerNorm, GELU, loss), DiffLlama (differential attention, RMSNorm,
SwiGLU MLP, loss), Reformer (local and LSH self-attention, LayerNorm), FSMT (encoder, decoder and cross
attention, LayerNorm), I-BERT (float path: attention, LayerNorms, GELU; masked-LM loss; quant_mode: the
quant modules' twins, HF's emulation bit for bit, and opt-in integer inference: see the I-BERT section).
Where a call is something our kernel cannot serve (attention probabilities asked for, a mask that is not
causal + padding, Reformer's cached one-token steps), the module runs HF's own forward for that call:
documented per class, with an :class:`HFFallbackWarning` where it depends on the input. Every module of a kind that is
switched must be a class this file knows, with the forward signature it was written against; anything else
(an unknown architecture, a transformers release that changed a module) raises before any module changes,
never a partial patch. A second call is a no-op; :func:`restore` undoes it.

Adding a family is an entry in :data:`FAMILIES`: for each HF class, the kind (attention, norms,
activations, loss) and how to switch it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import warnings
from typing import Callable

import torch
from torch import nn

from . import nn as tnn
from .kernels.attention import alibi_slopes
from .models.diffllama import _lm_loss
from .nn import functional as F

KINDS = ("attention", "norms", "activations", "loss", "quantization", "integer")
"""What accelerate can switch; the last two exist for I-BERT only (see its keywords)."""

KEPT = {
    ("ibert", "loss"): "the fused loss serves IBertForMaskedLM only; the other heads' losses are small",
}
"""Why a kind stays HF's for a family, when asked for; other kinds with no module to switch (a head
without a loss, say) get a generic line."""


# ------------------------------------------------------------------------------------------ HF's masks

class HFFallbackWarning(UserWarning):
    """An accelerated module handed a call to HF's own forward because our kernel cannot serve it."""


class _Unserved(Exception):
    """HF's attention mask is not one our kernels express (causal + key padding)."""


_KEEP = "_tritonformers_keep"


def padding_keep(mask, batch: int, n_q: int, causal: bool = True):
    """The key padding mask [B, Nk] (True = real key) of HF's attention ``mask`` when that mask is exactly
    causal (bottom-right aligned: query i of Nq sees keys j <= i + Nk - Nq) and key padding; None when HF
    passed no mask (causal only: HF drops it only when top-left and bottom-right alignment agree). Nk is the
    mask's key length, so this can run before the cache update (a fallback must not update it twice).
    ``causal=False`` (an encoder's bidirectional mask): exactly key padding, every query row alike.

    ``mask`` is [B, 1, Nq, Nk], bool (True = attend) or additive float (0 = attend), or flash attention's
    [B, Nk] padding mask. Anything else (packed sequences' block-diagonal masks, a static cache's longer
    key axis, a flex BlockMask) raises ``_Unserved``. The check compares the whole mask once, then caches
    the result on the mask tensor, since every layer of a forward receives the same one (one host sync per
    forward, only when a mask is given).
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise _Unserved(f"a {type(mask).__name__} attention mask")
    n_k = mask.shape[-1]
    if mask.dim() == 2 and mask.shape[0] == batch:
        return mask.bool()
    attr = _KEEP if causal else _KEEP + "_bidirectional"
    keep = getattr(mask, attr, None)
    if keep is not None:
        return keep
    if tuple(mask.shape) != (batch, 1, n_q, n_k):
        raise _Unserved(f"an attention mask of shape {list(mask.shape)} for {n_q} queries and {n_k} keys")
    allowed = (mask if mask.dtype == torch.bool else mask == 0)[:, 0]
    keep = allowed[:, -1]
    visible = torch.ones(n_q, n_k, dtype=torch.bool, device=mask.device)
    if causal:
        visible = visible.tril(n_k - n_q)
    if not torch.equal(allowed, visible & keep[:, None, :]):
        raise _Unserved("an attention mask that is not causal + key padding (packed sequences?)" if causal
                        else "an attention mask that is not key padding")
    setattr(mask, attr, keep)
    return keep


def _check_keys(keep, num_keys: int) -> None:
    if keep is not None and keep.shape[1] != num_keys:  # HF's mask and cache disagree: not ours to guess
        raise RuntimeError(f"accelerate: attention mask covers {keep.shape[1]} keys, the cache holds {num_keys}")


def _warn_fallback(module, why: str) -> None:
    warnings.warn(f"tritonformers.accelerate: {type(module).__name__} runs HF's forward for this call: {why}",
                  HFFallbackWarning, stacklevel=3)


# -------------------------------------------------------------------------------------- BLOOM attention

def _bloom_attention_class(hf_module):
    """HF's BloomAttention with its softmax(QK^T + alibi)V done by :func:`tritonformers.nn.functional.attention`."""
    base = hf_module.BloomAttention

    class BloomAttention(base):
        """BloomAttention on the fused ALiBi attention kernel (same parameters; HF's path for
        ``output_attentions`` and tensor-parallel slicing, which need the probabilities or HF's rounding)."""

        def forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                    output_attentions=False, **kwargs):
            if output_attentions or (self.pretraining_tp > 1 and self.slow_but_exact):
                return super().forward(hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
                                       use_cache=use_cache, output_attentions=output_attentions, **kwargs)
            B, T, _ = hidden_states.shape
            try:
                keep = padding_keep(attention_mask, B, T)
            except _Unserved as why:
                _warn_fallback(self, str(why))
                return super().forward(hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
                                       use_cache=use_cache, output_attentions=output_attentions, **kwargs)
            fused = self.query_key_value(hidden_states)
            options = dict(causal=True, alibi_slopes=alibi_slopes(self.num_heads, fused.device),
                           key_padding_mask=keep, scale=self.inv_norm_factor,
                           dropout_p=self.attention_dropout.p if self.training else 0.0)
            if layer_past is None:  # no cache (use_cache=False): one packed q/k/v gradient for the projection
                _check_keys(keep, T)
                ctx = F.packed_attention(fused.view(B, T, self.num_heads, 3, self.head_dim), **options)
            else:
                q, k, v = self._reshape(fused)
                k, v = layer_past.update(k, v, self.layer_idx)
                _check_keys(keep, k.shape[2])
                ctx = F.attention(q, k, v, **options)
            out = self.dense(ctx.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
            return hf_module.dropout_add(out, residual, self.hidden_dropout, self.training), None

    return BloomAttention


# ---------------------------------------------------------------------------------- DiffLlama attention

def _cache_name(base) -> str:
    """The cache argument of HF's forward: ``cache`` since transformers 5.25, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _diffllama_attention_class(hf_module):
    """HF's DiffLlamaAttention with both softmax maps, lambda, the group RMSNorm and ``1 - lambda_init`` in
    one :func:`~tritonformers.nn.functional.diff_attention` call (same parameters)."""
    base = hf_module.DiffLlamaAttention
    cache_name = _cache_name(base)

    class DiffLlamaAttention(base):
        """DiffLlamaAttention on the fused differential attention kernel. With HF's DynamicCache the
        kernel serves prefill and decode steps alike (the new queries are the last Nq of the keys: bottom-right
        causal). HF's forward runs for the eager implementation (it returns the attention probabilities,
        which ``output_attentions`` collects) and, with an ``HFFallbackWarning``, for masks that are not
        causal + padding (packed sequences, a static cache)."""

        def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
            cache = kwargs.pop("past_key_values", cache)  # the layer's keyword before transformers 5.25
            B, N, _ = hidden_states.shape
            hf_call = dict(attention_mask=attention_mask, **{cache_name: cache}, **kwargs)
            if self.config._attn_implementation == "eager":
                return super().forward(hidden_states, position_embeddings, **hf_call)
            try:
                keep = padding_keep(attention_mask, B, N)
            except _Unserved as why:
                _warn_fallback(self, str(why))
                return super().forward(hidden_states, position_embeddings, **hf_call)
            shape = (B, N, -1, self.head_dim)
            q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
            k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
            v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
            q, k = F.apply_rotary(q, k, *position_embeddings)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)  # as 5.25 (5.17's update ignores it)
            _check_keys(keep, k.shape[2])
            lam = F.diff_lambda(self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2, self.lambda_init)
            eps = self.groupnorm.eps if self.groupnorm.eps is not None else torch.finfo(q.dtype).eps
            y = F.diff_attention(q, k, v, lam.to(q.dtype), self.lambda_init, causal=True, key_padding_mask=keep,
                                 eps=eps, scale=self.scaling)  # [B, N, H/2, 2D]
            return self.o_proj(y.reshape(B, N, -1)), None

    return DiffLlamaAttention


# ----------------------------------------------------------------------------------- causal-LM heads' loss

def _fused_loss_head_class(base, final_norm: str):
    """A causal-LM head whose loss, when labels are given and gradients are on (a training step), is
    :func:`~tritonformers.nn.functional.fused_linear_cross_entropy` of the final hidden states: HF's
    ``ForCausalLMLoss`` (shifted labels or ``shift_labels``, ``ignore_index``, ``num_items_in_batch``) without
    the [B, T, V] logits, which the output then leaves as None. HF's forward runs unchanged otherwise
    (no labels, no grad, ``return_dict=False`` whose tuple positions need the logits, a model whose
    ``loss_function`` is not HF's ``ForCausalLMLoss``). HF's forward still
    runs in the fused case, with ``logits_to_keep`` an empty index so its lm_head projects nothing; the
    final norm's output (``final_norm``, a module path) is the hidden state the loss reads."""
    from transformers.loss.loss_utils import ForCausalLMLoss  # here: importing tritonformers must not load transformers

    signature = inspect.signature(base.forward)

    class CausalLMHead(base):
        def forward(self, *args, **kwargs):
            call = signature.bind(self, *args, **kwargs)
            labels = call.arguments.get("labels")
            if labels is None or not torch.is_grad_enabled() or self.loss_function is not ForCausalLMLoss or \
                    kwargs.get("return_dict", getattr(self.config, "return_dict", True)) is False:
                return super().forward(*args, **kwargs)  # (a custom loss_function is the user's: HF's path)
            loss_kwargs = call.arguments.get("kwargs", {})
            call.arguments["labels"] = None
            call.arguments["logits_to_keep"] = torch.empty(0, dtype=torch.long, device=self.lm_head.weight.device)
            hidden = []
            hook = self.get_submodule(final_norm).register_forward_hook(lambda m, i, o: hidden.append(o))
            try:
                out = super().forward(*call.args[1:], **call.kwargs)
            finally:
                hook.remove()
            head = self.lm_head
            loss = _lm_loss(hidden[-1], labels, lambda h, t, **kw: F.fused_linear_cross_entropy(
                h, head.weight, t, head.bias, **kw), **loss_kwargs)
            rest = {key: value for key, value in out.items() if key not in ("loss", "logits")}
            return type(out)(loss=loss, logits=None, **rest)

    CausalLMHead.__name__ = CausalLMHead.__qualname__ = base.__name__
    return CausalLMHead


# ------------------------------------------------------------------------------------ Reformer attention

def _reformer_attention_class(ours: type, hf_name: str):
    """HF's Reformer self-attention module (``hf_name``) served by our drop-in ``ours`` (the same parameters
    and attribute names; our class first in the MRO, HF's behind it so ``isinstance`` checks in HF's
    reversible layers and HF's cached-step helpers keep working). A cached one-token step (HF's
    ``past_buckets_states`` already holding this layer) runs HF's forward: one query against a few cached
    chunks is torch glue in both, and HF's own step (including its batch-row quirk in LSH) is what
    generation was calibrated on."""

    def factory(hf_module):
        base = getattr(hf_module, hf_name)

        class ReformerSelfAttention(ours, base):
            def forward(self, hidden_states, attention_mask=None, *args, past_buckets_states=None, **kwargs):
                if past_buckets_states is not None and len(past_buckets_states) > self.layer_idx:
                    return base.forward(self, hidden_states, attention_mask, *args,
                                        past_buckets_states=past_buckets_states, **kwargs)
                return ours.forward(self, hidden_states, attention_mask, *args, **kwargs)

        ReformerSelfAttention.__name__ = ReformerSelfAttention.__qualname__ = hf_name
        return ReformerSelfAttention

    return factory


# ---------------------------------------------------------------------------------------- FSMT attention

def _causal_float_mask(attn_mask, n_q: int) -> bool:
    """Whether FSMT's additive ``attn_mask`` [Nq, Nk] is exactly causal (0 on and below the bottom-right
    aligned diagonal, -inf or the dtype's minimum above); False for None; ``_Unserved`` for any other mask.
    Checked once per mask tensor (the decoder hands every layer the same one)."""
    if attn_mask is None:
        return False
    if getattr(attn_mask, _KEEP, None) is not None:
        return True
    if attn_mask.dim() != 2 or attn_mask.shape[0] != n_q:
        raise _Unserved(f"an attention mask of shape {list(attn_mask.shape)}")
    n_k = attn_mask.shape[1]
    causal = torch.ones(n_q, n_k, dtype=torch.bool, device=attn_mask.device).tril(n_k - n_q)
    if not (torch.equal(attn_mask == 0, causal) and bool((attn_mask[~causal] <= torch.finfo(attn_mask.dtype).min).all())):
        raise _Unserved("an attention mask that is not causal")
    setattr(attn_mask, _KEEP, True)
    return True


def _fsmt_attention_class(hf_module):
    """FSMT's ``Attention`` (self- and cross-attention, time-major [T, B, E] inputs) with softmax(QK^T)V
    done by :func:`tritonformers.nn.functional.attention`; keys and values, and HF's EncoderDecoderCache
    updates, as HF computes them. HF's forward runs for ``output_attentions`` (the probabilities) and, with
    an ``HFFallbackWarning``, for a mask other than causal."""
    base = hf_module.Attention
    encdec_cache = hf_module.EncoderDecoderCache

    class Attention(base):
        def forward(self, query, key, key_padding_mask=None, layer_state=None, attn_mask=None,
                    output_attentions=False, **kwargs):
            hf_call = (query, key, key_padding_mask, layer_state, attn_mask, output_attentions)
            if output_attentions:
                return super().forward(*hf_call, **kwargs)
            try:
                causal = _causal_float_mask(attn_mask, query.shape[0])
            except _Unserved as why:
                _warn_fallback(self, str(why))
                return super().forward(*hf_call, **kwargs)
            T, B, E = query.shape
            k, v = self._keys_values(query, key, layer_state, kwargs)
            q = self.q_proj(query).view(T, B, self.num_heads, self.head_dim).permute(1, 2, 0, 3)
            if key_padding_mask is not None and key_padding_mask.dim() == 0:  # HF's "no mask" placeholder
                key_padding_mask = None
            keep = None if key_padding_mask is None else ~key_padding_mask.bool()  # HF: True = padding
            out = F.attention(q, k, v, causal=causal, key_padding_mask=keep, scale=self.scaling,
                              dropout_p=self.dropout if self.training else 0.0)
            return self.out_proj(out.permute(2, 0, 1, 3).reshape(T, B, E)), None

        def _keys_values(self, query, key, layer_state, kwargs):
            """k, v [B, H, Nk, D] as HF's forward: projected (cross-attention: from ``key``), through the
            layer's cache; cross-attention reuses the cached encoder keys after the first step."""
            current, updated = layer_state, False
            if isinstance(layer_state, encdec_cache):
                updated = layer_state.is_updated.get(self.layer_idx)
                current = layer_state.cross_attention_cache if self.encoder_decoder_attention \
                    else layer_state.self_attention_cache
            if self.encoder_decoder_attention and layer_state is not None and updated:
                return current.layers[self.layer_idx].keys, current.layers[self.layer_idx].values
            states = key if self.encoder_decoder_attention else query
            B = query.shape[1]
            k = self.k_proj(states).view(-1, B, self.num_heads, self.head_dim).permute(1, 2, 0, 3)
            v = self.v_proj(states).view(-1, B, self.num_heads, self.head_dim).permute(1, 2, 0, 3)
            if layer_state is not None:
                k, v = current.update(k, v, self.layer_idx, kwargs=kwargs)  # as 5.25 (5.17's update ignores it)
                if self.encoder_decoder_attention:
                    layer_state.is_updated[self.layer_idx] = True
            return k, v

    return Attention


# ---------------------------------------------------------------------------------------- DiffLlama MLP

def _swiglu_mlp_class(base):
    """A Llama-style MLP (gate/up/down) whose ``act_fn(gate) * up`` is :func:`~tritonformers.nn.functional.swiglu`."""

    class SwiGLUMLP(base):
        def forward(self, x):
            return self.down_proj(F.swiglu(self.gate_proj(x), self.up_proj(x)))

    SwiGLUMLP.__name__ = SwiGLUMLP.__qualname__ = base.__name__
    return SwiGLUMLP


def _is_silu(mlp) -> bool:
    return isinstance(mlp.act_fn, nn.SiLU) or type(mlp.act_fn).__name__ == "SiLUActivation"


# ----------------------------------------------------------------------------------------------- registry

@dataclasses.dataclass(frozen=True)
class Rule:
    """How to switch one HF class: ``kind``, the HF class name, the forward parameters it was written for
    (one tuple, or a tuple of the accepted tuples where transformers versions differ), and either ``cls`` (our
    class for ``module.__class__``, given the HF module) or ``child`` (a factory of the replacement module);
    ``applies`` can leave an instance alone (an MLP whose activation is not SiLU);
    ``check`` raises ``RuntimeError`` for an instance whose members differ from what ``cls`` was written for
    (run for every instance before anything changes); ``instance_attrs`` gives the attributes ``cls`` needs on
    a switched instance (removed again by :func:`restore`)."""

    kind: str
    hf_class: str
    forward_params: tuple[str, ...] | tuple[tuple[str, ...], ...]
    cls: Callable | None = None
    child: Callable | None = None
    applies: Callable = lambda module: True
    check: Callable | None = None
    instance_attrs: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Family:
    module: str
    rules: tuple[Rule, ...]


def _ours(cls):
    return lambda hf_module: cls


def _versions(*params: str) -> tuple[tuple[str, ...], ...]:
    """A forward signature under transformers 5.25 (``cache``) and before (``past_key_values``)."""
    return tuple(tuple(name if name != "CACHE" else cache for name in params) for cache in ("cache", "past_key_values"))


# ------------------------------------------------------------------------------------------------- I-BERT
#
# Three ways an accelerated HF I-BERT runs, chosen per call by the modules' own ``quant_mode`` flags (HF's
# config.quant_mode at construction, force_dequant applied) and, for the integer path, by opting in:
# * float (quant_mode False): IBertSelfAttention on the fused attention kernel; the QuantLinears and
#   QuantActs still run (float linear, range tracking in train mode), as in HF.
# * HF's float emulation of the integer arithmetic (quant_mode True; the default, training and eval): HF's
#   module tree and forwards, with the quant modules switched to tritonformers.nn.quantization's twins,
#   whose forward is HF's emulation bit for bit (outputs, calibrated ranges, LayerNorm shifts and QAT
#   gradients) without HF's host round trips (batch_frexp on the device).
# * integer inference (``accelerate(model, integer=True)``, quant_mode True, eval, no grad): int8/int32
#   tensors through the twins' ``int_forward`` (models/ibert.py's layer chain, fused GEMM epilogues).
#   Not HF's bits (see _ibert_integer_model_class): opt-in.

class _NoGradient(torch.autograd.Function):
    """The identity whose backward returns no gradient (None, not zeros): what HF's FixedPointMul gives
    its ``identity`` input, so the autograd graph upstream behaves as HF's (its custom functions then see
    zeros, e.g. the embedding tables a zero gradient, where a ``detach()`` would leave them None)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return None


def _ibert_twin_class(name: str):
    """HF's quant module ``name`` with tritonformers' twin of it in front (same attributes, parameters and
    buffers; ``forward`` HF's emulation, plus ``int_forward``); HF's class stays a base, so isinstance
    checks hold. IntLayerNorm (a "norms" rule) runs its float mode (quant_mode off) on the LayerNorm
    kernel: HF's formula, float rounding apart. QuantAct keeps HF's QAT gradients, which give a residual
    (the ``identity``) no gradient through the requantization (HF's FixedPointMul.backward returns its
    gradients shifted by one slot); tritonformers' own IBertModel gives it the straight-through gradient."""
    from .nn import quantization as tq

    def factory(hf_module):
        ours, base = getattr(tq, name), getattr(hf_module, name)
        body = {}
        if name == "IntLayerNorm":
            def forward(self, x, scaling_factor=None):
                if self.quant_mode:
                    return ours.forward(self, x, scaling_factor)
                return F.layer_norm(x, self.weight, self.bias, self.eps), None  # HF's float formula, one kernel
            body["forward"] = forward
        if name == "QuantAct":
            def forward(self, x, pre_act_scaling_factor=None, identity=None, identity_scaling_factor=None,
                        specified_min=None, specified_max=None):
                if identity is not None and self.quant_mode and pre_act_scaling_factor is not None:
                    identity = _NoGradient.apply(identity)  # HF: no gradient reaches the residual here
                return ours.forward(self, x, pre_act_scaling_factor, identity, identity_scaling_factor,
                                    specified_min, specified_max)
            body["forward"] = forward
        return type(name, (ours, base), {**body, "__qualname__": name, "__module__": __name__})

    return factory


_TWIN_ONLY = {"_int_cache"}  # the twins' constant cache, given to each switched module
# IntGELU's float GELU (present only where quant_mode was off at construction); HF's init bookkeeping
_TWIN_OPTIONAL = {"activation_fn", "_is_hf_initialized"}


def _member_names(module: nn.Module) -> set[str]:
    return set(vars(module)) | set(module._parameters) | set(module._buffers) | set(module._modules)


@functools.lru_cache(maxsize=None)
def _twin_members(name: str) -> frozenset:
    from .nn import quantization as tq
    build = {"QuantEmbedding": lambda: tq.QuantEmbedding(2, 2), "QuantAct": lambda: tq.QuantAct(8),
             "QuantLinear": lambda: tq.QuantLinear(2, 2, per_channel=True), "IntGELU": lambda: tq.IntGELU(),
             "IntSoftmax": lambda: tq.IntSoftmax(8), "IntLayerNorm": lambda: tq.IntLayerNorm(2, 1e-5)}[name]
    return frozenset(_member_names(build()) - _TWIN_ONLY)


def _check_twin(module: nn.Module) -> None:
    """Refuse an HF quant module whose attributes, parameters, buffers or children are not those the twin
    was written for (a transformers release that changed the module)."""
    name = type(module).__name__
    differ = (_member_names(module) ^ _twin_members(name)) - _TWIN_OPTIONAL
    if differ:
        raise RuntimeError(f"accelerate: transformers' {name} has members {sorted(differ)} that tritonformers' "
                           f"twin of it does not share (or lacks them); refusing to patch")


def _twin_instance_attrs(module: nn.Module) -> dict:
    from .nn.quantization import _ConstCache
    return {"_int_cache": _ConstCache()}


def _borrow(base: type, ours: type, names: tuple[str, ...], **body) -> type:
    """``base`` (an HF module class) with the methods ``names`` of ours (the same module in
    models/ibert.py, written against the same attribute names) and ``body``; HF's forward unless given."""
    return type(base.__name__, (base,), {**{n: getattr(ours, n) for n in names}, **body,
                                         "__qualname__": base.__name__, "__module__": __name__})


def _ibert_attention_class(hf_module):
    """HF's IBertSelfAttention whose float path (``quant_mode`` off) runs the fused attention kernel with the
    key padding mask read from HF's additive [B, 1, N, N] mask; quant mode runs HF's forward (its integer
    emulation, on the twins of the quant modules). HF's forward also serves ``output_attentions`` (the
    probabilities) and, with an HFFallbackWarning, a mask that is not key padding. Also carries
    models/ibert.py's ``int_forward`` for the opt-in integer path."""
    from .models import ibert as tib
    base = hf_module.IBertSelfAttention

    def forward(self, hidden_states, hidden_states_scaling_factor, attention_mask=None, output_attentions=False):
        hf_call = (hidden_states, hidden_states_scaling_factor, attention_mask, output_attentions)
        if self.quant_mode or output_attentions:
            return base.forward(self, *hf_call)
        try:
            keep = padding_keep(attention_mask, hidden_states.shape[0], hidden_states.shape[1], causal=False)
        except _Unserved as why:
            _warn_fallback(self, str(why))
            return base.forward(self, *hf_call)
        context, _ = self.float_forward(hidden_states, keep)
        return (context,), (None,)

    return _borrow(base, tib.IBertSelfAttention, ("_heads", "_merge", "float_forward", "int_forward"),
                   forward=forward)


def _plain_lm_head(head) -> bool:
    return type(head.dense) is nn.Linear and type(head.decoder) is nn.Linear


def _ibert_lm_features(head, x):
    """IBertLMHead's features ``layer_norm(gelu(dense(x)))`` (exact GELU with the dense bias fused into it)."""
    return head.layer_norm(F.gelu(nn.functional.linear(x, head.dense.weight), bias=head.dense.bias))


def _ibert_lm_head_class(hf_module):
    """HF's IBertLMHead with its dense bias + exact GELU in one kernel (HF: a Linear, then GELUActivation)."""
    base = hf_module.IBertLMHead

    def forward(self, features, **kwargs):
        return self.decoder(_ibert_lm_features(self, features))

    return _borrow(base, base, (), forward=forward)


def _ibert_masked_lm_class(hf_module):
    """HF's IBertForMaskedLM whose loss, given labels with gradients enabled (a training step), is
    :func:`~tritonformers.nn.functional.fused_linear_cross_entropy` of the LM head's features
    (dense -> exact GELU -> LayerNorm) against the decoder's weight and bias (tied to the word embedding and
    ``lm_head.bias``), ignore_index -100 and mean as HF's CrossEntropyLoss, without the [B, N, V] logits:
    the output's ``logits`` is None. HF's forward otherwise (no labels, no grad, ``return_dict=False``,
    a dense or decoder that is not a plain Linear)."""
    from transformers.modeling_outputs import MaskedLMOutput
    base = hf_module.IBertForMaskedLM

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        call = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                    position_ids=position_ids, inputs_embeds=inputs_embeds, output_attentions=output_attentions,
                    output_hidden_states=output_hidden_states)
        head = self.lm_head
        if labels is None or not torch.is_grad_enabled() or not _plain_lm_head(head) or \
                (self.config.return_dict if return_dict is None else return_dict) is False:
            return base.forward(self, labels=labels, return_dict=return_dict, **call, **kwargs)
        out = self.ibert(**call, return_dict=True)
        features = _ibert_lm_features(head, out[0])
        loss = F.fused_linear_cross_entropy(features, head.decoder.weight, labels.to(features.device),
                                            bias=head.decoder.bias)
        return MaskedLMOutput(loss=loss, logits=None, hidden_states=out.hidden_states, attentions=out.attentions)

    return _borrow(base, base, (), forward=forward)


def _ibert_integer_model_class(hf_module):
    """HF's IBertModel that, with quant_mode on, in eval mode and without gradients, runs integer inference:
    models/ibert.py's integer chain (int8 embeddings, per layer the int8 GEMMs with their fused IntGELU /
    requantization / residual epilogues, the integer attention), dequantized for the outputs; HF's forward
    otherwise (float mode, training, gradients on, a mask that is not [B, N]).

    How far from HF's float emulation (the bits HF's quant_mode gives): equal op by op wherever HF's
    arithmetic is integer-valued; HF's float32 softmax division and LayerNorm/GELU internals are not, so
    single LSBs differ and propagate through the layers: end to end the dequantized hidden states and logits
    agree to the quantization-noise level, not bit for bit (tiny 2-3 layer models: within 5% relative, as
    tests/models/test_ibert.py checks; roberta-base, 12 layers: 7.4%, the ``ibert_base_*`` benchmarks'
    check allows 12%; HF's own emulation moves 7.7% when 0.1% of its embedding outputs change by one LSB).
    Rows whose keys are all padding give HF NaN and here a defined value. HF's stale layer scale (every
    layer told the embedding output's scale) is reproduced, as checkpoints were calibrated with it."""
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions
    from .models import ibert as tib
    base = hf_module.IBertModel

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        call = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                    position_ids=position_ids, inputs_embeds=inputs_embeds, output_attentions=output_attentions,
                    output_hidden_states=output_hidden_states, return_dict=return_dict, **kwargs)
        if not self.quant_mode or self.training or torch.is_grad_enabled() or \
                (input_ids is None) == (inputs_embeds is None):  # (HF's errors for both or neither)
            return base.forward(self, **call)
        if attention_mask is not None and attention_mask.dim() != 2:
            _warn_fallback(self, f"an attention mask of shape {list(attention_mask.shape)} (integer path: [B, N])")
            return base.forward(self, **call)
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        keep = None if attention_mask is None else attention_mask != 0
        seq, hidden, probs = tib.IBertModel._run_integer(self, (input_ids, token_type_ids, position_ids,
                                                                inputs_embeds), keep, output_attentions,
                                                         output_hidden_states)
        pooled = self.pooler(seq) if self.pooler is not None else None
        if not (config.return_dict if return_dict is None else return_dict):
            return (seq, pooled) + tuple(v for v in (hidden, probs) if v is not None)
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=seq, pooler_output=pooled,
                                                            hidden_states=hidden, attentions=probs)

    return _borrow(base, base, (), forward=forward)


def _ibert_integer_parts(hf_name: str, ours_name: str, names: tuple[str, ...], **body):
    """An HF I-BERT block given models/ibert.py's integer methods (HF's forward unchanged)."""
    def factory(hf_module):
        from .models import ibert as tib
        return _borrow(getattr(hf_module, hf_name), getattr(tib, ours_name), names, **body)
    return factory


def _ibert_rules() -> tuple[Rule, ...]:
    twin = lambda name, params, kind="quantization": Rule(  # noqa: E731
        kind, name, params, cls=_ibert_twin_class(name), check=_check_twin, instance_attrs=_twin_instance_attrs)
    same = lambda name, params: Rule("integer", name, params,  # noqa: E731
                                     cls=_ibert_integer_parts(name, name, ("int_forward",)))
    hidden = ("self", "hidden_states", "hidden_states_scaling_factor")
    return (
        Rule("attention", "IBertSelfAttention", hidden + ("attention_mask", "output_attentions"),
             cls=_ibert_attention_class),
        Rule("norms", "LayerNorm", ("self", "input"), cls=_ours(tnn.LayerNorm)),
        Rule("activations", "GELU", ("self", "input"), child=lambda m: tnn.GELU("none"),
             applies=lambda m: m.approximate == "none"),
        Rule("activations", "IBertLMHead", ("self", "features", "kwargs"), cls=_ibert_lm_head_class,
             applies=_plain_lm_head),
        Rule("loss", "IBertForMaskedLM", ("self", "input_ids", "attention_mask", "token_type_ids", "position_ids",
                                          "inputs_embeds", "labels", "output_attentions", "output_hidden_states",
                                          "return_dict", "kwargs"), cls=_ibert_masked_lm_class),
        twin("QuantEmbedding", ("self", "x", "positions", "incremental_state")),
        twin("QuantAct", ("self", "x", "pre_act_scaling_factor", "identity", "identity_scaling_factor",
                          "specified_min", "specified_max")),
        twin("QuantLinear", ("self", "x", "prev_act_scaling_factor")),
        twin("IntGELU", ("self", "x", "scaling_factor")),
        twin("IntSoftmax", ("self", "x", "scaling_factor")),
        twin("IntLayerNorm", ("self", "x", "scaling_factor"), kind="norms"),
        Rule("integer", "IBertModel", ("self", "input_ids", "attention_mask", "token_type_ids", "position_ids",
                                       "inputs_embeds", "output_attentions", "output_hidden_states", "return_dict",
                                       "kwargs"), cls=_ibert_integer_model_class),
        Rule("integer", "IBertEncoder", ("self", "hidden_states", "hidden_states_scaling_factor", "attention_mask",
                                         "output_attentions", "output_hidden_states", "return_dict"),
             cls=_ibert_integer_parts("IBertEncoder", "IBertEncoder", (), stale_layer_scale=True)),
        Rule("integer", "IBertEmbeddings", (("self", "input_ids", "token_type_ids", "position_ids", "inputs_embeds",
                                             "cache_length"),
                                            ("self", "input_ids", "token_type_ids", "position_ids", "inputs_embeds",
                                             "past_key_values_length")),
             cls=_ibert_integer_parts("IBertEmbeddings", "IBertEmbeddings", ("_ids", "int_forward"))),
        same("IBertLayer", hidden + ("attention_mask", "output_attentions")),
        same("IBertIntermediate", hidden),
        same("IBertSelfOutput", hidden + ("input_tensor", "input_tensor_scaling_factor")),
        same("IBertOutput", hidden + ("input_tensor", "input_tensor_scaling_factor")),
    )


FAMILIES: dict[str, Family] = {
    "bloom": Family("transformers.models.bloom.modeling_bloom", (
        Rule("attention", "BloomAttention", ("self", "hidden_states", "residual", "alibi", "attention_mask",
                                             "layer_past", "use_cache", "output_attentions", "kwargs"),
             cls=_bloom_attention_class),
        Rule("norms", "LayerNorm", ("self", "input"), cls=_ours(tnn.LayerNorm)),
        Rule("activations", "BloomGelu", ("self", "x"), child=lambda m: tnn.GELU("bloom")),
        Rule("loss", "BloomForCausalLM", _versions(
            "self", "input_ids", "CACHE", "attention_mask", "inputs_embeds", "labels", "use_cache",
            "output_attentions", "output_hidden_states", "return_dict", "logits_to_keep", "kwargs"),
             cls=lambda hf: _fused_loss_head_class(hf.BloomForCausalLM, "transformer.ln_f")),
    )),
    "diffllama": Family("transformers.models.diffllama.modeling_diffllama", (
        Rule("attention", "DiffLlamaAttention", _versions(
            "self", "hidden_states", "position_embeddings", "attention_mask", "CACHE", "kwargs"),
             cls=_diffllama_attention_class),
        Rule("norms", "DiffLlamaRMSNorm", ("self", "hidden_states"), cls=_ours(tnn.RMSNorm)),
        Rule("activations", "DiffLlamaMLP", ("self", "x"),
             cls=lambda hf: _swiglu_mlp_class(hf.DiffLlamaMLP), applies=_is_silu),
        Rule("loss", "DiffLlamaForCausalLM", _versions(
            "self", "input_ids", "attention_mask", "position_ids", "CACHE", "inputs_embeds", "labels",
            "use_cache", "logits_to_keep", "kwargs"),
             cls=lambda hf: _fused_loss_head_class(hf.DiffLlamaForCausalLM, "model.norm")),
    )),
    "reformer": Family("transformers.models.reformer.modeling_reformer", (
        Rule("attention", "LocalSelfAttention", ("self", "hidden_states", "attention_mask", "past_buckets_states",
                                                 "use_cache", "output_attentions", "kwargs"),
             cls=_reformer_attention_class(tnn.LocalSelfAttention, "LocalSelfAttention")),
        Rule("attention", "LSHSelfAttention", ("self", "hidden_states", "attention_mask", "num_hashes", "buckets",
                                               "past_buckets_states", "use_cache", "output_attentions", "kwargs"),
             cls=_reformer_attention_class(tnn.LSHSelfAttention, "LSHSelfAttention")),
        Rule("norms", "LayerNorm", ("self", "input"), cls=_ours(tnn.LayerNorm)),
    )),
    "fsmt": Family("transformers.models.fsmt.modeling_fsmt", (
        Rule("attention", "Attention", ("self", "query", "key", "key_padding_mask", "layer_state", "attn_mask",
                                        "output_attentions", "kwargs"), cls=_fsmt_attention_class),
        Rule("norms", "LayerNorm", ("self", "input"), cls=_ours(tnn.LayerNorm)),
    )),
    "ibert": Family("transformers.models.ibert.modeling_ibert", _ibert_rules()),
}


# ------------------------------------------------------------------------------------------------ apply

@dataclasses.dataclass
class Summary:
    """What :func:`accelerate` switched: per kind, the module paths; and what it left as HF's."""

    family: str
    replaced: dict[str, list[str]]
    kept: dict[str, str]
    _undo: list = dataclasses.field(default_factory=list, repr=False)

    def __str__(self) -> str:
        parts = [f"{kind}: {len(paths)} module(s)" for kind, paths in self.replaced.items() if paths]
        parts += [f"{kind}: kept ({why})" for kind, why in self.kept.items()]
        return f"tritonformers.accelerate({self.family}): " + "; ".join(parts)


_ATTR = "_tritonformers_accelerated"


def _family(model: nn.Module) -> tuple[str, Family]:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"accelerate: unsupported model {type(model).__name__} (model_type {model_type!r}); "
                         f"supported: {sorted(FAMILIES)}")
    return model_type, FAMILIES[model_type]


_TORCH_CLASSES = {"LayerNorm": nn.LayerNorm, "GELU": nn.GELU}  # torch modules HF uses as they are


def _check_rule(hf, rule: Rule) -> type:
    hf_cls = _TORCH_CLASSES.get(rule.hf_class) or getattr(hf, rule.hf_class, None)
    if hf_cls is None:
        raise RuntimeError(f"accelerate: this transformers release has no {rule.hf_class} in {hf.__name__}; "
                           "refusing to patch a model it does not recognise")
    params = tuple(inspect.signature(hf_cls.forward).parameters)
    accepted = rule.forward_params if isinstance(rule.forward_params[0], tuple) else (rule.forward_params,)
    if params not in accepted:
        raise RuntimeError(f"accelerate: {rule.hf_class}.forward{params} differs from the signature this "
                           f"version of tritonformers was written for {rule.forward_params}; refusing to patch")
    return hf_cls


def accelerate(model: nn.Module, *, attention: bool = True, norms: bool = True, activations: bool = True,
               loss: bool = False, quantization: bool = True, integer: bool = False) -> nn.Module:
    """Switch a transformers model's attention, norm, activation (and, with ``loss=True``, LM loss)
    modules to tritonformers' kernels, in place, and return the model; :func:`summary` says what changed.

    ``loss`` is off by default because it changes HF's output contract: HF's LM heads always return the
    [B, T, V] logits, while the fused linear cross-entropy never forms them, so with ``loss=True`` a forward
    given labels with gradients enabled (a training step) returns ``logits=None`` (the loss and its gradients
    are HF's). Without labels, under ``torch.no_grad()`` (evaluation, generation) or with
    ``return_dict=False``, the head is HF's.

    I-BERT only (other families have nothing of these kinds): ``quantization`` (default on) switches HF's
    QuantAct, QuantLinear, QuantEmbedding, IntGELU and IntSoftmax to tritonformers' twins (``norms`` does
    IntLayerNorm's, whose float mode then runs the LayerNorm kernel): the same outputs, ranges, LayerNorm
    shifts and QAT gradients as HF's quant_mode emulation, bit for bit, without HF's host round trips.
    ``integer`` (default off; needs ``quantization``, ``norms`` and ``attention``) makes a quant_mode model
    in eval mode under ``torch.no_grad()`` run integer inference (int8 GEMMs, integer softmax / GELU /
    LayerNorm; the Triton kernels on CUDA, while on the CPU the exact torch integer references run, slower
    than HF's emulation there). It does not give HF's bits: HF's emulation rounds in float32 where the
    integers are exact, so the dequantized outputs agree with it to the quantization-noise level (within 5%
    relative on the tiny test models, 7.4% on roberta-base's 12 layers; see
    ``_ibert_integer_model_class``). Training, gradients on, or float mode keep HF's path.

    Raises ``ValueError`` for an unsupported architecture or options and ``RuntimeError`` for a transformers
    release whose modules differ (before any change).
    """
    if getattr(model, _ATTR, None) is not None:
        return model
    name, family = _family(model)
    if integer and not any(rule.kind == "integer" for rule in family.rules):
        raise ValueError(f"accelerate: integer=True (integer inference) exists for I-BERT only, not {name}")
    if integer and not (quantization and attention and norms):
        raise ValueError("accelerate: integer=True runs the twins' int_forward (IntLayerNorm's is a norms swap) "
                         "and the attention's integer core: it needs quantization, norms and attention True")
    hf = importlib.import_module(family.module)
    wanted = {"attention": attention, "norms": norms, "activations": activations, "loss": loss,
              "quantization": quantization, "integer": integer}
    rules = [(rule, _check_rule(hf, rule)) for rule in family.rules if wanted[rule.kind]]
    ours = {rule: rule.cls(hf) for rule, _ in rules if rule.cls is not None}  # one class per rule, not per module
    plan = [(path, module, rule) for path, module in model.named_modules() for rule, hf_cls in rules
            if type(module) is hf_cls and rule.applies(module)]
    for _, module, rule in plan:
        if rule.check is not None:
            rule.check(module)
    summary = Summary(name, {kind: [] for kind in KINDS}, {})
    for path, module, rule in plan:
        if rule.cls is not None:
            summary._undo.append(("class", module, module.__class__))
            module.__class__ = ours[rule]
            if isinstance(module, tnn.RMSNorm) and "hidden_size" not in vars(module):
                module.hidden_size = module.weight.shape[0]  # our extra_repr reads it
            extra = rule.instance_attrs(module) if rule.instance_attrs is not None else {}
            for attr, value in extra.items():
                setattr(module, attr, value)
            summary._undo.append(("attrs", module, tuple(extra)))
        else:
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            summary._undo.append(("child", parent, attr, module))
            setattr(parent, attr, rule.child(module))
        summary.replaced[rule.kind].append(path or type(model).__name__)
    for kind, on in wanted.items():
        has_rules = any(r.kind == kind for r in family.rules)
        if on and not summary.replaced[kind] and (has_rules or kind in KINDS[:4]):
            generic = "no module of this model has a swap for this kind" if has_rules \
                else f"no {kind} swap for this family yet"
            summary.kept[kind] = KEPT.get((name, kind), generic)
    setattr(model, _ATTR, summary)
    return model


def summary(model: nn.Module) -> Summary | None:
    """What :func:`accelerate` did to ``model`` (None if it was not accelerated)."""
    return getattr(model, _ATTR, None)


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`accelerate`: HF's classes and modules back, parameters untouched."""
    record = getattr(model, _ATTR, None)
    if record is None:
        return model
    for entry in reversed(record._undo):
        if entry[0] == "class":
            entry[1].__class__ = entry[2]
        elif entry[0] == "attrs":
            for attr in entry[2]:
                delattr(entry[1], attr)
        else:
            setattr(entry[1], entry[2], entry[3])
    delattr(model, _ATTR)
    return model


__all__ = ["accelerate", "restore", "summary", "padding_keep", "HFFallbackWarning", "Summary", "FAMILIES"]

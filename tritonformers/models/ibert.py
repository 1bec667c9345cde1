"""I-BERT (Kim et al. 2021, integer-only RoBERTa) on the tritonformers kernels, loading and matching
HuggingFace's ``transformers`` I-BERT (``models/ibert``): ``IBertConfig``, ``IBertModel``, ``IBertForMaskedLM``,
``IBertForSequenceClassification``, ``IBertForMultipleChoice``, ``IBertForTokenClassification``,
``IBertForQuestionAnswering``.

Module tree, parameter and buffer names are HF's (the quantization modules come from
:mod:`tritonformers.nn.quantization`), so HF checkpoints load unchanged, QuantAct ranges included, and
``save_pretrained`` writes what transformers reads back. The encoder runs one of three paths:

* **float** (``config.quant_mode`` False, train or eval): RoBERTa in float32 on the float kernels (fused
  attention, LayerNorm with the residual add fused, GELU with its bias fused). Every QuantAct still sees its
  activation, so train-mode passes calibrate the ranges exactly as HF's float model does.
* **emulated** (quant mode, train mode, or eval with ``use_integer_inference(False)``): HF's float
  emulation of the integer arithmetic, bit for bit, through the modules' ``forward``: the
  quantization-aware-training and calibration path (EMA ranges, LayerNorm shift growth, STE gradients).
* **integer** (quant mode, eval; the default for inference): int8/int32/int64 tensors through the modules'
  ``int_forward`` (Triton integer kernels on CUDA, exact torch integer references on the CPU).
  Ranges are frozen. Every constant that depends only on the weights and the calibrated ranges (integer
  weights, quantized biases, fixed-point multipliers, GELU/softmax/LayerNorm constants, output scales) is
  computed once, at the first integer forward after a change, and cached on the modules (they key on the
  tensors' versions, so loading, calibrating, training or switching modes recomputes them); a forward then
  issues the kernels (11 per layer) and a few views. It equals HF's integers op by op wherever HF's
  arithmetic is integer-valued; where HF's emulation is not integer arithmetic (its float32 softmax
  division, float32 LayerNorm/GELU internals in transformers/models/ibert/quant_modules.py) single LSBs
  differ and propagate, so end to end the outputs agree to the quantization-noise level, not bit for bit
  (roberta-base, 12 layers: 7.4%, as much as HF moves itself when 0.1% of its embedding outputs change by
  one LSB; see benchmarks/cases_ibert.py).

HF quirk reproduced by default: the encoder hands every layer the *embedding* output scale instead of the
previous layer's (``encoder.stale_layer_scale = True``; ``IBertEncoder.forward`` passes one
``hidden_states_scaling_factor`` to every layer). Checkpoints were
calibrated with it; set it False for the mathematically intended scales. ``force_dequant`` must be one of
"none", "gelu", "softmax", "layernorm", "nonlinear" (HF silently treats other strings as "none"; here they
raise ValueError).

Calibration (:meth:`IBertPreTrainedModel.calibrate`): a float checkpoint (the published ones are plain
RoBERTa weights without quantization buffers) is switched to quant mode and run on sample batches in
train mode with dropout off, which sets every activation range as HF's train-mode passes do; the model is
then in eval mode, running integer inference, and ``save_pretrained`` keeps the ranges.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import LayerNorm
from ..nn.functional import attention, fused_linear_cross_entropy, gelu, layer_norm
from ..nn.quantization import (FORCE_DEQUANT_OPTIONS, IntGELU, IntLayerNorm, IntSoftmax, QuantAct, QuantEmbedding,
                               QuantLinear, QuantTensor, int_linear_group, quant_attention)
from .loading import ConfigBase, PreTrainedMixin
from .outputs import (MaskedLMOutput, ModelOutput, QuestionAnsweringModelOutput, SequenceClassifierOutput,
                      TokenClassifierOutput)
from .outputs import classification_loss as _classification_loss

__all__ = [
    "IBertConfig", "IBertPreTrainedModel", "IBertModel", "IBertForMaskedLM", "IBertForSequenceClassification",
    "IBertForMultipleChoice", "IBertForTokenClassification", "IBertForQuestionAnswering",
    "BaseModelOutputWithPoolingAndCrossAttentions", "MaskedLMOutput", "SequenceClassifierOutput",
    "MultipleChoiceModelOutput", "TokenClassifierOutput", "QuestionAnsweringModelOutput",
    "create_position_ids_from_input_ids",
]

_MASK_MIN = torch.finfo(torch.float32).min


class IBertConfig(ConfigBase):
    """HF's ``IBertConfig``: same fields and defaults. ``force_dequant`` is validated (ValueError on an
    unknown value, where HF silently runs as "none")."""

    model_type = "ibert"
    defaults = dict(
        vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
        type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, quant_mode=False, force_dequant="none", tie_word_embeddings=True,
    )

    def _post_init(self) -> None:
        if self.force_dequant not in FORCE_DEQUANT_OPTIONS:
            raise ValueError(f"force_dequant must be one of {FORCE_DEQUANT_OPTIONS}, got {self.force_dequant!r}")


# ----------------------------------------------------------------------------------------------------------
# Outputs (transformers' names and field order)
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class BaseModelOutputWithPoolingAndCrossAttentions(ModelOutput):
    last_hidden_state: torch.Tensor = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple | None = None
    cache: object = None
    attentions: tuple | None = None
    cross_attentions: tuple | None = None


@dataclasses.dataclass(eq=False)
class MultipleChoiceModelOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------

def create_position_ids_from_input_ids(input_ids: torch.Tensor, padding_idx: int, past_key_values_length: int = 0):
    """HF's positions: ``cumsum(ids != pad) * (ids != pad) + pad`` (pads get ``pad``, the first token pad+1)."""
    mask = input_ids.ne(padding_idx).int()
    incremental = (torch.cumsum(mask, dim=1).type_as(mask) + past_key_values_length) * mask
    return incremental.long() + padding_idx


def _real(x: QuantTensor) -> torch.Tensor:
    """HF's float32 value of a quantized tensor (``I * s``), or the float tensor itself."""
    return x.dequantize()


class IBertEmbeddings(nn.Module):
    """Word + token type + position embeddings (QuantEmbedding, 8 bit), summed through ``embeddings_act1``
    (16 bit; HF uses it for both sums and never ``embeddings_act2``), IntLayerNorm, ``output_activation``."""

    def __init__(self, config):
        super().__init__()
        self.quant_mode = config.quant_mode
        self.padding_idx = config.pad_token_id
        c = config.hidden_size
        self.word_embeddings = QuantEmbedding(config.vocab_size, c, padding_idx=config.pad_token_id, weight_bit=8,
                                              quant_mode=self.quant_mode)
        self.token_type_embeddings = QuantEmbedding(config.type_vocab_size, c, weight_bit=8,
                                                    quant_mode=self.quant_mode)
        self.position_ids = nn.Buffer(torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=False)
        self.position_embeddings = QuantEmbedding(config.max_position_embeddings, c, padding_idx=self.padding_idx,
                                                  weight_bit=8, quant_mode=self.quant_mode)
        self.embeddings_act1 = QuantAct(16, quant_mode=self.quant_mode)
        self.embeddings_act2 = QuantAct(16, quant_mode=self.quant_mode)
        self.LayerNorm = IntLayerNorm(c, eps=config.layer_norm_eps, output_bit=32, quant_mode=self.quant_mode,
                                      force_dequant=config.force_dequant)
        self.output_activation = QuantAct(8, quant_mode=self.quant_mode)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def _ids(self, input_ids, token_type_ids, position_ids, inputs_embeds):
        if position_ids is None:
            if input_ids is not None:
                position_ids = create_position_ids_from_input_ids(input_ids, self.padding_idx)
            else:
                n = inputs_embeds.shape[1]
                position_ids = torch.arange(self.padding_idx + 1, n + self.padding_idx + 1, dtype=torch.long,
                                            device=inputs_embeds.device).unsqueeze(0).expand(inputs_embeds.shape[:-1])
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
        if token_type_ids is None:
            token_type_ids = torch.zeros(shape, dtype=torch.long, device=self.position_ids.device)
        return token_type_ids, position_ids

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None, fast_float=False):
        """HF's forward: ``(embeddings, scale)`` (scale None in float mode). ``fast_float`` runs the float
        LayerNorm on the LayerNorm kernel (the float path) instead of HF's formula."""
        token_type_ids, position_ids = self._ids(input_ids, token_type_ids, position_ids, inputs_embeds)
        scale = None
        if inputs_embeds is None:
            inputs_embeds, scale = self.word_embeddings(input_ids)
        t, ts = self.token_type_embeddings(token_type_ids)
        e, es = self.embeddings_act1(inputs_embeds, scale, identity=t, identity_scaling_factor=ts)
        p, ps = self.position_embeddings(position_ids)
        e, es = self.embeddings_act1(e, es, identity=p, identity_scaling_factor=ps)
        if fast_float and not self.LayerNorm.quant_mode:
            e, es = layer_norm(e, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps), None
        else:
            e, es = self.LayerNorm(e, es)
        e = self.dropout(e)
        return self.output_activation(e, es)

    def int_forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None) -> QuantTensor:
        """The integer path: int8 embeddings ``QuantTensor`` (eval; ranges frozen). ``inputs_embeds`` are
        input-quantized and, as in HF, the token-type embedding is then dropped."""
        token_type_ids, position_ids = self._ids(input_ids, token_type_ids, position_ids, inputs_embeds)
        w = self.word_embeddings.int_forward(input_ids) if inputs_embeds is None else QuantTensor(inputs_embeds, None)
        e = self.embeddings_act1.int_forward(w, identity=self.token_type_embeddings.int_forward(token_type_ids))
        e = self.embeddings_act1.int_forward(e, identity=self.position_embeddings.int_forward(position_ids))
        return self.LayerNorm.int_forward(e, output_act=self.output_activation)


class IBertSelfAttention(nn.Module):
    """Q/K/V QuantLinears (8-bit per-channel weights, 32-bit bias), their 8-bit QuantActs, IntSoftmax and
    the context QuantAct ``output_activation``."""

    def __init__(self, config):
        super().__init__()
        if config.hidden_size % config.num_attention_heads != 0:
            raise ValueError(f"The hidden size ({config.hidden_size}) is not a multiple of the number of attention "
                             f"heads ({config.num_attention_heads})")
        self.quant_mode = config.quant_mode
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        for name in ("query", "key", "value"):
            setattr(self, name, QuantLinear(config.hidden_size, self.all_head_size, bias=True, weight_bit=8,
                                            bias_bit=32, quant_mode=self.quant_mode, per_channel=True))
        for name in ("query_activation", "key_activation", "value_activation", "output_activation"):
            setattr(self, name, QuantAct(8, quant_mode=self.quant_mode))
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.softmax = IntSoftmax(8, quant_mode=self.quant_mode, force_dequant=config.force_dequant)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[:2]
        return x.view(b, n, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def _merge(self, ctx: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = ctx.shape
        return ctx.permute(0, 2, 1, 3).contiguous().view(b, n, self.all_head_size)

    def forward(self, hidden_states, hidden_states_scaling_factor, attention_mask=None, output_attentions=False):
        """HF's forward (float emulation in quant mode): ``((context, probs?), (scale, probs scale?))``;
        ``attention_mask`` is the additive [B, 1, 1|N, N] float mask or None."""
        q, sq = self.query_activation(*self.query(hidden_states, hidden_states_scaling_factor))
        k, sk = self.key_activation(*self.key(hidden_states, hidden_states_scaling_factor))
        v, sv = self.value_activation(*self.value(hidden_states, hidden_states_scaling_factor))
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        scores = torch.matmul(q, k.transpose(-1, -2))
        scale = math.sqrt(self.attention_head_size)
        scores = scores / scale
        score_scale = sq * sk / scale if self.quant_mode else None
        if attention_mask is not None:
            scores = scores + attention_mask
        probs, ps = self.softmax(scores, score_scale)
        probs = self.dropout(probs)
        ctx = self._merge(torch.matmul(probs, v))
        ctx, cs = self.output_activation(ctx, ps * sv if ps is not None else None)
        if output_attentions:
            return (ctx, probs), (cs, ps)
        return (ctx,), (cs,)

    def float_forward(self, hidden_states, key_padding_mask=None, additive_mask=None, output_attentions=False):
        """Float mode on the fused attention kernel (eager when the probabilities are asked for); the
        QuantActs only track ranges (train mode). Returns ``(context, probs or None)``."""
        q = self.query_activation(self.query(hidden_states)[0])[0]
        k = self.key_activation(self.key(hidden_states)[0])[0]
        v = self.value_activation(self.value(hidden_states)[0])[0]
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        p = self.dropout.p if self.dropout.training else 0.0
        probs = None
        if output_attentions:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
            if additive_mask is not None:
                scores = scores + additive_mask
            probs = self.dropout(F.softmax(scores, dim=-1))
            ctx = torch.matmul(probs, v)
        else:
            ctx = attention(q, k, v, key_padding_mask=key_padding_mask, scale=1.0 / math.sqrt(self.attention_head_size),
                            dropout_p=p)
        return self.output_activation(self._merge(ctx))[0], probs

    def int_forward(self, h: QuantTensor, assumed_scale=None, mask=None, output_attentions=False):
        """Integer path: int8 ``h`` -> (int8 context QuantTensor, probabilities QuantTensor or None).
        ``assumed_scale``: HF's stale input scale (see :class:`IBertEncoder`); mask: bool [B,1,1,N], true = attend."""
        linears, acts = (self.query, self.key, self.value), (self.query_activation, self.key_activation,
                                                             self.value_activation)
        qkv = int_linear_group(h, linears, acts, assumed_scale=assumed_scale)  # one GEMM, or None: one each
        if qkv is None:
            qkv = [lin.int_forward(h, output_act=act, assumed_scale=assumed_scale) for lin, act in zip(linears, acts)]
        heads = [QuantTensor(self._heads(t.values), t.scale) for t in qkv]
        out = quant_attention(*heads, self.softmax, self.output_activation, mask=mask,
                              output_attentions=output_attentions)
        return out if output_attentions else (out, None)


class _ResidualLN(nn.Module):
    """QuantLinear -> dropout -> 22-bit QuantAct adding the residual -> IntLayerNorm -> 8-bit QuantAct
    (HF's IBertSelfOutput and IBertOutput)."""

    def __init__(self, config, in_features):
        super().__init__()
        self.quant_mode = config.quant_mode
        self.dense = QuantLinear(in_features, config.hidden_size, bias=True, weight_bit=8, bias_bit=32,
                                 quant_mode=self.quant_mode, per_channel=True)
        self.ln_input_act = QuantAct(22, quant_mode=self.quant_mode)
        self.LayerNorm = IntLayerNorm(config.hidden_size, eps=config.layer_norm_eps, output_bit=32,
                                      quant_mode=self.quant_mode, force_dequant=config.force_dequant)
        self.output_activation = QuantAct(8, quant_mode=self.quant_mode)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, hidden_states_scaling_factor, input_tensor, input_tensor_scaling_factor):
        """HF's forward: ``(output, scale)``."""
        x, s = self.dense(hidden_states, hidden_states_scaling_factor)
        x = self.dropout(x)
        x, s = self.ln_input_act(x, s, identity=input_tensor, identity_scaling_factor=input_tensor_scaling_factor)
        x, s = self.LayerNorm(x, s)
        return self.output_activation(x, s)

    def float_forward(self, hidden_states, input_tensor):
        """Float mode: the residual add fused into the LayerNorm kernel; the QuantActs track ranges."""
        x = self.dropout(self.dense(hidden_states)[0])
        y, total = layer_norm(x, self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps, residual=input_tensor)
        self.ln_input_act(total)  # range tracking only (train mode): HF's QuantAct sees input + x here
        return self.output_activation(y)[0]

    def int_forward(self, x: QuantTensor, residual: QuantTensor) -> QuantTensor:
        r = self.dense.int_forward(x, output_act=self.ln_input_act, identity=residual)
        return self.LayerNorm.int_forward(r, output_act=self.output_activation)


class IBertSelfOutput(_ResidualLN):
    def __init__(self, config):
        super().__init__(config, config.hidden_size)


class IBertOutput(_ResidualLN):
    def __init__(self, config):
        super().__init__(config, config.intermediate_size)


class IBertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.quant_mode = config.quant_mode
        self.self = IBertSelfAttention(config)
        self.output = IBertSelfOutput(config)


class IBertIntermediate(nn.Module):
    """QuantLinear -> IntGELU -> 8-bit QuantAct (one fused GEMM epilogue on the integer path)."""

    def __init__(self, config):
        super().__init__()
        self.quant_mode = config.quant_mode
        self.dense = QuantLinear(config.hidden_size, config.intermediate_size, bias=True, weight_bit=8, bias_bit=32,
                                 quant_mode=self.quant_mode, per_channel=True)
        if config.hidden_act != "gelu":
            raise ValueError("I-BERT only supports 'gelu' for `config.hidden_act`")
        self.intermediate_act_fn = IntGELU(quant_mode=self.quant_mode, force_dequant=config.force_dequant)
        self.output_activation = QuantAct(8, quant_mode=self.quant_mode)

    def forward(self, hidden_states, hidden_states_scaling_factor):
        x, s = self.dense(hidden_states, hidden_states_scaling_factor)
        x, s = self.intermediate_act_fn(x, s)
        return self.output_activation(x, s)

    def float_forward(self, hidden_states):
        x = gelu(F.linear(hidden_states, self.dense.weight), bias=self.dense.bias)
        return self.output_activation(x)[0]

    def int_forward(self, x: QuantTensor) -> QuantTensor:
        return self.dense.int_forward(x, gelu=self.intermediate_act_fn, output_act=self.output_activation)


class IBertLayer(nn.Module):
    """Attention block, then ``pre_intermediate_act`` (whose output is also the FFN residual, as in HF),
    the intermediate block, ``pre_output_act`` and the output block."""

    def __init__(self, config):
        super().__init__()
        self.quant_mode = config.quant_mode
        self.attention = IBertAttention(config)
        self.intermediate = IBertIntermediate(config)
        self.output = IBertOutput(config)
        self.pre_intermediate_act = QuantAct(8, quant_mode=self.quant_mode)
        self.pre_output_act = QuantAct(8, quant_mode=self.quant_mode)

    def forward(self, hidden_states, hidden_states_scaling_factor, attention_mask=None, output_attentions=False):
        """HF's forward: ``((output, probs?), output scale)`` (HF drops the scale; the encoder keeps it
        only for ``stale_layer_scale=False``)."""
        (ctx, *probs), (cs, *_) = self.attention.self(hidden_states, hidden_states_scaling_factor, attention_mask,
                                                      output_attentions)
        a, sa = self.attention.output(ctx, cs, hidden_states, hidden_states_scaling_factor)
        a, sa = self.pre_intermediate_act(a, sa)
        g, sg = self.intermediate(a, sa)
        g, sg = self.pre_output_act(g, sg)
        out, so = self.output(g, sg, a, sa)
        return (out, *probs), so

    def float_forward(self, h, key_padding_mask=None, additive_mask=None, output_attentions=False):
        ctx, probs = self.attention.self.float_forward(h, key_padding_mask, additive_mask, output_attentions)
        a = self.attention.output.float_forward(ctx, h)
        a = self.pre_intermediate_act(a)[0]
        g = self.pre_output_act(self.intermediate.float_forward(a))[0]
        return self.output.float_forward(g, a), probs

    def int_forward(self, h: QuantTensor, assumed_scale=None, mask=None, output_attentions=False):
        """Integer layer. With ``assumed_scale`` (HF's stale scale s_E), Q/K/V see ``h * s_in / s_E`` and the
        attention residual is ``rhe(f32(h * s_in) / s_E)`` with scale s_E, exactly what HF's QuantAct recovers."""
        ctx, probs = self.attention.self.int_forward(h, assumed_scale, mask, output_attentions)
        residual = h
        if assumed_scale is not None:
            residual = QuantTensor(torch.round(_real(h) / assumed_scale.view(1, 1, -1)).to(torch.int32), assumed_scale)
        a = self.attention.output.int_forward(ctx, residual)
        a = self.pre_intermediate_act.int_forward(a)
        g = self.pre_output_act.int_forward(self.intermediate.int_forward(a))
        return self.output.int_forward(g, a), probs


class IBertEncoder(nn.Module):
    """The stack of layers. ``stale_layer_scale`` (default True, HF's behaviour): every layer is told the
    embedding output's scale, not its input's true scale (HF's ``IBertEncoder.forward`` never updates it)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.quant_mode = config.quant_mode
        self.stale_layer_scale = True
        self.layer = nn.ModuleList([IBertLayer(config) for _ in range(config.num_hidden_layers)])


class IBertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.quant_mode = config.quant_mode
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states):
        return self.activation(self.dense(hidden_states[:, 0]))


class IBertLMHead(nn.Module):
    """dense -> exact GELU -> LayerNorm -> decoder (tied to the float word embedding) + bias."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def features(self, x):
        return self.layer_norm(gelu(F.linear(x, self.dense.weight), bias=self.dense.bias))

    def forward(self, features, **kwargs):
        return self.decoder(self.features(features))


class IBertClassificationHead(nn.Module):
    """Token 0 -> dropout -> dense -> tanh -> dropout -> out_proj."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, features, **kwargs):
        x = self.dropout(features[:, 0, :])
        x = self.dropout(torch.tanh(self.dense(x)))
        return self.out_proj(x)


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------

_QUANT_BUFFERS = r"\.(weight_integer|weight_scaling_factor|fc_scaling_factor|bias_integer|x_min|x_max|" \
                 r"act_scaling_factor|shift)$"
_DEAD_ACTS = ("embeddings.embeddings_act2", "LayerNorm.activation")  # HF never calls these


class IBertPreTrainedModel(PreTrainedMixin, nn.Module):
    """Common base: config class, ``ibert.`` prefix, HF's initialisation, loading (a float-only checkpoint
    without quantization buffers loads: they keep their initial values), saving, and the quantization
    controls :meth:`calibrate`, :meth:`set_quant_mode`, :meth:`use_integer_inference`."""

    config_class = IBertConfig
    base_model_prefix = "ibert"
    _keys_to_ignore_on_load_missing = [_QUANT_BUFFERS]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (QuantLinear, nn.Linear)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, QuantEmbedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, (IntLayerNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, IBertLMHead):
            nn.init.zeros_(module.bias)

    def _post_init(self) -> None:
        """HF's ``post_init``: initialise (a head skips its base model, already initialised) and tie."""
        with torch.no_grad():
            for name, module in self.named_modules():
                if not (name == "ibert" or name.startswith("ibert.")):
                    self._init_weights(module)
        self.tie_weights()

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, config=None, strict: bool = True):
        """The model of a local checkpoint directory (see ``PreTrainedMixin.from_pretrained``). Quantization
        buffers absent from the checkpoint (hub checkpoints are float-only) keep their initial values; in
        quant mode that model is uncalibrated (a warning says so): run :meth:`calibrate` first."""
        model = super().from_pretrained(path, dtype=dtype, device=device, config=config, strict=strict)
        if model.config.quant_mode and not model.is_calibrated():
            warnings.warn(f"{cls.__name__} is in quant mode but some activation ranges are not calibrated (their "
                          "buffers were not in the checkpoint): call calibrate(batches) before inference", stacklevel=2)
        return model

    def quant_acts(self) -> dict[str, QuantAct]:
        """The QuantActs the forward uses (HF's dead ``embeddings_act2`` / ``*.LayerNorm.activation`` left out)."""
        return {n: m for n, m in self.named_modules() if isinstance(m, QuantAct) and not n.endswith(_DEAD_ACTS)}

    def is_calibrated(self) -> bool:
        """Whether every used activation range has left its initial [-1e-5, 1e-5] (softmax ranges count only
        where the softmax is quantized, since only then do they move)."""
        for name, act in self.quant_acts().items():
            if name.endswith("softmax.act") and not act.quant_mode:
                continue
            if bool((act.x_max.abs() < 1.1e-5).all() and (act.x_min.abs() < 1.1e-5).all()):
                return False
        return True

    def set_quant_mode(self, quant_mode: bool = True):
        """Switch every module between float mode and quant mode (``config.quant_mode``), as if the model had
        been built with it; ``config.force_dequant`` still keeps its non-linear modules in float. Returns self."""
        quant_mode = bool(quant_mode)
        self.config.quant_mode = quant_mode
        forced = self.config.force_dequant
        for module in self.modules():
            if hasattr(module, "quant_mode"):
                module.quant_mode = quant_mode
        for module in self.modules():
            if isinstance(module, IntGELU):
                module.quant_mode = quant_mode and forced not in ("gelu", "nonlinear")
                if not hasattr(module, "activation_fn"):
                    module.activation_fn = nn.GELU()
            elif isinstance(module, IntSoftmax):
                module.quant_mode = module.act.quant_mode = quant_mode and forced not in ("softmax", "nonlinear")
            elif isinstance(module, IntLayerNorm):
                module.quant_mode = module.activation.quant_mode = quant_mode and forced not in ("layernorm",
                                                                                                  "nonlinear")
        return self.reset_integer_constants()

    def reset_integer_constants(self):
        """Drop the cached constants of the integer path (integer weights, quantized biases, fixed-point
        multipliers, GELU/softmax/LayerNorm constants, output scales); the next integer forward computes
        them once again. They are recomputed by themselves when a weight, range or ``shift`` changes
        (loading, calibration, optimizer steps, ``.to()``) or the mode does; call this only after editing a
        tensor through ``.data`` (which bypasses the version counter they key on). Returns self."""
        for module in self.modules():
            cache = getattr(module, "_int_cache", None)
            if cache is not None:
                cache.clear()
        return self

    def use_integer_inference(self, enabled: bool = True):
        """Eval in quant mode: integer kernels (True, the default) or HF's float emulation, bit for bit
        HF's outputs but slow (False). Returns self."""
        self.base_model.integer_inference = bool(enabled)
        return self.reset_integer_constants()

    def calibrate(self, batches: Iterable, *, quant_mode: bool = True):
        """Set the activation ranges from sample batches, then switch to (integer) inference.

        ``batches``: an iterable of ``input_ids`` tensors or of dicts of forward arguments (``input_ids``,
        ``attention_mask``, ``token_type_ids``, ...). With ``quant_mode`` (default) the model is first
        switched to quant mode (:meth:`set_quant_mode`), so that the softmax's 16-bit range and the
        LayerNorm shifts calibrate too; ``quant_mode=False`` calibrates a float model, as HF's float
        fine-tuning does. Each batch is one train-mode forward under ``no_grad`` with dropout off: the first
        widens the initial range by the batch min/max, later ones follow HF's EMA (momentum 0.95);
        ``embeddings_act1`` updates twice per batch, as in HF. Ranges already calibrated (a QAT checkpoint)
        continue their EMA. Returns the model in eval mode.
        """
        if quant_mode and not self.config.quant_mode:
            self.set_quant_mode(True)
        self.train()
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.eval()
        try:
            with torch.no_grad():
                for batch in batches:
                    if isinstance(batch, Mapping):
                        self(**batch)
                    else:
                        self(batch)
        finally:
            self.eval()
        return self.reset_integer_constants()


class IBertModel(IBertPreTrainedModel):
    """The bare I-BERT encoder (embeddings, layers, optional pooler). ``integer_inference`` (default True)
    picks the integer path for quant-mode eval (see the module docstring). Loading a task checkpoint without
    a pooler (the published ones are IBertForMaskedLM) initialises the pooler, as HF does."""

    _keys_to_ignore_on_load_missing = [_QUANT_BUFFERS, r"^pooler\."]

    def __init__(self, config: IBertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.quant_mode = config.quant_mode
        self.integer_inference = True
        self.embeddings = IBertEmbeddings(config)
        self.encoder = IBertEncoder(config)
        self.pooler = IBertPooler(config) if add_pooling_layer else None
        with torch.no_grad():
            for module in self.modules():
                self._init_weights(module)

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def resize_token_embeddings(self, new_num_tokens=None):
        raise NotImplementedError("`resize_token_embeddings` is not supported for I-BERT.")

    def _path(self) -> str:
        if not self.quant_mode:
            return "float"
        return "emulated" if self.training or not self.integer_inference else "integer"

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (self.config.output_hidden_states if output_hidden_states is None
                                else output_hidden_states)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("You cannot specify both input_ids and inputs_embeds at the same time")
        if input_ids is None and inputs_embeds is None:
            raise ValueError("You have to specify either input_ids or inputs_embeds")
        ref = input_ids if input_ids is not None else inputs_embeds
        b, n = ref.shape[:2]
        if attention_mask is not None and tuple(attention_mask.shape) != (b, n):
            raise ValueError(f"attention_mask must have shape [{b}, {n}] (1 = token, 0 = padding), "
                             f"got {list(attention_mask.shape)}")
        if token_type_ids is None:
            token_type_ids = torch.zeros((b, n), dtype=torch.long, device=ref.device)
        args = (input_ids, token_type_ids, position_ids, inputs_embeds)
        path = self._path()
        # the integer kernels take the boolean mask as is (an all-true mask gives the unmasked result bit
        # for bit), which spares a host sync per forward; the float path drops an all-true mask
        keep = None if attention_mask is None else attention_mask != 0
        if path != "integer" and keep is not None and bool(keep.all()):
            keep = None
        if path == "integer":
            seq, hidden, probs = self._run_integer(args, keep, output_attentions, output_hidden_states)
        else:
            seq, hidden, probs = self._run_float(args, keep, path == "float", output_attentions, output_hidden_states)
        pooled = self.pooler(seq) if self.pooler is not None else None
        if not return_dict:
            return (seq, pooled) + tuple(v for v in (hidden, probs) if v is not None)
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=seq, pooler_output=pooled,
                                                            hidden_states=hidden, attentions=probs)

    def _run_float(self, args, keep, fast, output_attentions, output_hidden_states):
        """The float path (``fast``) or HF's emulation: float32 tensors with HF's (value, scale) pairs."""
        h, s = self.embeddings(*args, fast_float=fast)
        additive = None
        if keep is not None:
            additive = torch.zeros(keep.shape, dtype=h.dtype, device=h.device).masked_fill(~keep, _MASK_MIN)
            additive = additive[:, None, None, :]
        hidden, probs = [], []
        s_layer = s
        for layer in self.encoder.layer:
            hidden.append(h)
            if fast:
                h, p = layer.float_forward(h, keep, additive, output_attentions)
            else:
                (h, *p), s_out = layer(h, s_layer, additive, output_attentions)
                p = p[0] if p else None
                s_layer = s if self.encoder.stale_layer_scale else s_out
            probs.append(p)
        hidden.append(h)
        return h, (tuple(hidden) if output_hidden_states else None), (tuple(probs) if output_attentions else None)

    def _run_integer(self, args, keep, output_attentions, output_hidden_states):
        """Integer inference: int8 hidden states between layers, dequantized for the outputs."""
        h = self.embeddings.int_forward(*args)
        s_e = h.scale
        mask = keep[:, None, None, :] if keep is not None else None
        hidden, probs = [], []
        for i, layer in enumerate(self.encoder.layer):
            hidden.append(_real(h))
            assumed = s_e if (self.encoder.stale_layer_scale and i > 0) else None
            h, p = layer.int_forward(h, assumed, mask, output_attentions)
            probs.append(_real(p) if p is not None else None)
        seq = _real(h)
        hidden.append(seq)
        return seq, (tuple(hidden) if output_hidden_states else None), (tuple(probs) if output_attentions else None)


def _base_outputs(model, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, output_attentions,
                  output_hidden_states):
    return model.ibert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                       position_ids=position_ids, inputs_embeds=inputs_embeds, output_attentions=output_attentions,
                       output_hidden_states=output_hidden_states, return_dict=True)


def _tuple(loss, heads, out):
    """HF's tuple form: ``(loss?,) + heads + (hidden_states?, attentions?)``."""
    rest = tuple(v for v in (out.hidden_states, out.attentions) if v is not None)
    return ((loss,) if loss is not None else ()) + heads + rest


class IBertForMaskedLM(IBertPreTrainedModel):
    """I-BERT with the RoBERTa LM head (float; decoder tied to the float word embedding). With labels and
    gradients enabled the loss is the fused linear cross-entropy and ``logits`` is None."""

    _tied_weights_keys = {"lm_head.decoder.weight": "ibert.embeddings.word_embeddings.weight",
                          "lm_head.decoder.bias": "lm_head.bias"}

    def __init__(self, config: IBertConfig):
        super().__init__()
        self.config = config
        self.ibert = IBertModel(config, add_pooling_layer=False)
        self.lm_head = IBertLMHead(config)
        self._post_init()

    def get_output_embeddings(self):
        return self.lm_head.decoder

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = _base_outputs(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                            output_attentions, output_hidden_states)
        loss = logits = None
        if labels is not None and torch.is_grad_enabled():
            x = self.lm_head.features(out.last_hidden_state)
            loss = fused_linear_cross_entropy(x, self.lm_head.decoder.weight, labels.to(x.device),
                                              bias=self.lm_head.decoder.bias)
        else:
            logits = self.lm_head(out.last_hidden_state)
            if labels is not None:
                loss = F.cross_entropy(logits.view(-1, self.config.vocab_size), labels.to(logits.device).view(-1))
        result = MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)
        return result if return_dict else _tuple(loss, (logits,) if logits is not None else (), out)


class IBertForSequenceClassification(IBertPreTrainedModel):
    def __init__(self, config: IBertConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.ibert = IBertModel(config, add_pooling_layer=False)
        self.classifier = IBertClassificationHead(config)
        self._post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = _base_outputs(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                            output_attentions, output_hidden_states)
        logits = self.classifier(out.last_hidden_state)
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            loss = _classification_loss(self.config, logits, labels)
        result = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                          attentions=out.attentions)
        return result if return_dict else _tuple(loss, (logits,), out)


class IBertForMultipleChoice(IBertPreTrainedModel):
    """Inputs [B, n_choices, N] flattened to [B * n_choices, N]; pooler -> dropout -> Linear(C, 1)."""

    def __init__(self, config: IBertConfig):
        super().__init__()
        self.config = config
        self.ibert = IBertModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self._post_init()

    def forward(self, input_ids=None, token_type_ids=None, attention_mask=None, labels=None, position_ids=None,
                inputs_embeds=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        num_choices = input_ids.shape[1] if input_ids is not None else inputs_embeds.shape[1]
        flat = lambda t: None if t is None else t.reshape(-1, t.size(-1))  # noqa: E731
        embeds = None if inputs_embeds is None else inputs_embeds.reshape(-1, *inputs_embeds.shape[-2:])
        out = _base_outputs(self, flat(input_ids), flat(attention_mask), flat(token_type_ids), flat(position_ids),
                            embeds, output_attentions, output_hidden_states)
        logits = self.classifier(self.dropout(out.pooler_output)).view(-1, num_choices)
        loss = F.cross_entropy(logits, labels.to(logits.device)) if labels is not None else None
        result = MultipleChoiceModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                           attentions=out.attentions)
        return result if return_dict else _tuple(loss, (logits,), out)


class IBertForTokenClassification(IBertPreTrainedModel):
    def __init__(self, config: IBertConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.ibert = IBertModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = _base_outputs(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                            output_attentions, output_hidden_states)
        logits = self.classifier(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.to(logits.device).view(-1))
        result = TokenClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                       attentions=out.attentions)
        return result if return_dict else _tuple(loss, (logits,), out)


class IBertForQuestionAnswering(IBertPreTrainedModel):
    def __init__(self, config: IBertConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.ibert = IBertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self._post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, start_positions=None, end_positions=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = _base_outputs(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                            output_attentions, output_hidden_states)
        logits = self.qa_outputs(out.last_hidden_state)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.size(1)
            start = start_positions.to(start_logits.device).reshape(-1).clamp(0, ignored)
            end = end_positions.to(end_logits.device).reshape(-1).clamp(0, ignored)
            loss = (F.cross_entropy(start_logits, start, ignore_index=ignored)
                    + F.cross_entropy(end_logits, end, ignore_index=ignored)) / 2
        result = QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                              hidden_states=out.hidden_states, attentions=out.attentions)
        return result if return_dict else _tuple(loss, (start_logits, end_logits), out)

"""I-BERT's quantization modules, drop-in for transformers' ``models/ibert/quant_modules.py``.

Same class names, constructor signatures, attributes, parameters and buffers as HF (so HF state dicts
load unchanged, including the QuantAct ranges ``x_min``/``x_max``/``act_scaling_factor`` and QuantLinear's
``weight_integer``/``fc_scaling_factor``/``bias_integer``), and two ways to run each module:

* ``forward(...)``: HF's signature and HF's float emulation, bit for bit: every tensor is a float32 real
  value ``I * s`` passed with its scale ``s`` (HF's ``(x, scaling_factor)`` pairs), rounding and floors
  are straight-through estimators (round_ste / floor_ste), quantizers divide the gradient by the scale,
  QuantAct calibrates its range in train mode (EMA, momentum 0.95). This is the quantization-aware
  training path: gradients equal HF's.
* ``int_forward(...)``: inference on integer tensors (:class:`QuantTensor` = integer values + float32
  scale), through the integer kernels of :mod:`tritonformers.kernels.int_ops` / ``int_gemm`` (Triton on
  CUDA, exact torch integer references on the CPU). It never updates ranges or buffers (frozen, whatever
  the train/eval mode), and derives the integer weights and every constant from the float parameters and
  ranges as HF does, once: each module caches them (:class:`_ConstCache`) until a tensor they come from
  changes, so a forward runs only the kernels. Successive modules fuse: ``QuantLinear.int_forward(x, gelu=...,
  output_act=..., identity=...)`` runs the GEMM, IntGELU and the requantization with the residual in one
  kernel; ``IntLayerNorm.int_forward(x, output_act=...)`` and ``IntGELU.int_forward(x, output_act=...)``
  requantize in their own kernels. A module whose ``quant_mode`` is off (``force_dequant``) returns a
  float :class:`QuantTensor` (scale None) from the dequantized input, as HF returns ``(x, None)``.

Where the integer path differs from HF's float emulation (HF's own non-integer arithmetic in
transformers/models/ibert/quant_modules.py: the float32 division of IntSoftmax, float32 IntLayerNorm and
IntGELU internals), the op docstrings in the kernel modules say so; tests/kernels/test_quant_modules.py measures it.
``force_dequant`` must be one of :data:`FORCE_DEQUANT_OPTIONS` (HF silently ignores unknown strings).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from ..kernels.int_ops import (FixedPoint, GeluConstants, QuantTensor, fixed_point, gelu_constants, int_dtype,
                               layer_norm_constants, requant_params, softmax_constants, symmetric_scale)
from .functional import int_attention, int_gelu, int_layer_norm, int_linear, int_softmax, quantize, requantize

FORCE_DEQUANT_OPTIONS = ("none", "gelu", "softmax", "layernorm", "nonlinear")


def _check_force_dequant(value) -> str:
    if value not in FORCE_DEQUANT_OPTIONS:
        raise ValueError(f"force_dequant must be one of {FORCE_DEQUANT_OPTIONS}, got {value!r}")
    return value


# ------------------------------------------------------------------------------ HF's float emulation (QAT)

class SymmetricQuantFunction(Function):
    """HF's symmetric quantizer: ``clamp(round(1.0 / scale * x), -n, n - 1)``; backward ``grad / scale``."""

    @staticmethod
    def forward(ctx, x, k, percentile_mode, scale):
        n = 2 ** (k - 1) - 1
        if x.dim() == 4:
            view = scale.view(-1, 1, 1, 1)
        elif x.dim() == 2:
            view = scale.view(-1, 1)
        else:
            view = scale.view(-1)
        q = torch.round(1.0 / view * x + torch.tensor(0.0, device=scale.device))
        ctx.scale = scale
        return torch.clamp(q, -n, n - 1)

    @staticmethod
    def backward(ctx, grad_output):
        scale = ctx.scale
        if grad_output.dim() == 4:
            scale = scale.view(-1, 1, 1, 1)
        elif grad_output.dim() == 2:
            scale = scale.view(-1, 1)
        else:
            scale = scale.view(-1)
        return grad_output.clone() / scale, None, None, None


class floor_ste(Function):  # noqa: N801 - HF's name
    """torch.floor with an identity gradient."""

    @staticmethod
    def forward(ctx, x):
        return torch.floor(x)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output.clone()


class round_ste(Function):  # noqa: N801 - HF's name
    """torch.round (half to even) with an identity gradient."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output.clone()


def batch_frexp(inputs: torch.Tensor, max_bit: int = 31) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's ``batch_frexp`` (mantissa scaled to ``max_bit`` bits, rounded half away from zero; exponent
    ``max_bit - ex``) as float64 tensors, computed on the device (no host round trip)."""
    if max_bit != 31:
        raise ValueError(f"max_bit must be 31 (HF's only value), got {max_bit}")
    fp = fixed_point(inputs)
    return fp.multiplier.to(torch.float64), fp.shift.to(torch.float64)


class FixedPointMul(Function):
    """HF's requantization in float64: ``round(round(x / s_x) * m / 2**e)`` (+ the identity branch),
    clamped to ``[-2**(b-1), 2**(b-1) - 1]``; backward ``grad / s_z`` for x and the identity.

    HF's backward returns seven gradients for six inputs, shifted by one, so there the identity (every
    residual connection of the encoder) gets no gradient and its gradient is dropped on
    ``identity_scaling_factor``. Here the identity gets ``grad / s_z``, the straight-through gradient HF
    intends; everything else equals HF's gradients.
    """

    @staticmethod
    def forward(ctx, pre_act, pre_act_scaling_factor, bit_num, z_scaling_factor, identity=None,
                identity_scaling_factor=None):
        reshape = (lambda t: t) if pre_act_scaling_factor.dim() == 3 else (lambda t: t.view(1, 1, -1))
        ctx.identity = identity
        n = 2 ** (bit_num - 1) - 1
        with torch.no_grad():
            ctx.z_scaling_factor = z_scaling_factor
            output = FixedPointMul._branch(pre_act, reshape(pre_act_scaling_factor), z_scaling_factor, reshape)
            if identity is not None:
                output = output + FixedPointMul._branch(identity, reshape(identity_scaling_factor),
                                                        z_scaling_factor, reshape)
            return torch.clamp(output.type(torch.float), -n - 1, n)

    @staticmethod
    def _branch(x, x_scale, z_scale, reshape):
        z_int = torch.round(x / x_scale)
        m, e = batch_frexp(reshape(x_scale.type(torch.double) / z_scale.type(torch.float).type(torch.double)))
        return torch.round(z_int.type(torch.double) * m / (2.0 ** e))

    @staticmethod
    def backward(ctx, grad_output):
        identity_grad = None
        if ctx.identity is not None:
            identity_grad = grad_output.clone() / ctx.z_scaling_factor
        return grad_output.clone() / ctx.z_scaling_factor, None, None, None, identity_grad, None


def symmetric_linear_quantization_params(num_bits, saturation_min, saturation_max, per_channel=False):
    """HF's scale of a symmetric range: ``clamp(max(|min|, |max|), 1e-8) / (2**(b-1) - 1)``."""
    return symmetric_scale(num_bits, saturation_min, saturation_max, per_channel)


# ------------------------------------------------------------------------------ helpers of the integer path

def _stamp(t: torch.Tensor) -> tuple:
    """What identifies a tensor's contents without reading them: its in-place edit counter (inference
    tensors have none, and nothing here edits them) and its storage (``module.to()`` swaps a parameter's
    ``.data``, keeping the object)."""
    return (-1 if t.is_inference() else t._version, t.data_ptr(), t.device)


class _ConstCache:
    """Constants of the integer path (integer weights, quantized biases, fixed-point multipliers, GELU /
    softmax / LayerNorm constants, output scales), computed once and returned until a dependency changes.

    ``get(deps, compute)``: ``deps`` is a tuple of tensors (parameters, buffers, or scales that other
    caches return, so the same objects forward after forward) and plain values (flags, sizes, a tag).
    A tensor dependency matches only the same object with the same :func:`_stamp`, so a reassigned
    buffer (train-mode calibration, ``shift`` growth), an in-place edit (``load_state_dict``, optimizer
    steps), a device move or a mode change (another branch, other deps) recomputes. An edit through
    ``param.data`` bypasses the version counter: call ``clear()`` (or the model's
    ``reset_integer_constants()``) after one. Keeps the last :attr:`SIZE` entries (``embeddings_act1``
    runs twice per forward on different scales; the stale-scale switch alternates two inputs).
    """

    SIZE = 8

    def __init__(self):
        self.entries = []

    def clear(self) -> None:
        self.entries = []

    @staticmethod
    def _matches(old: tuple, new: tuple) -> bool:
        if len(old) != len(new):
            return False
        for a, b in zip(old, new):
            if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
                if a is not b:
                    return False
            elif a != b:
                return False
        return True

    def get(self, deps: tuple, compute):
        stamps = tuple(_stamp(d) if isinstance(d, torch.Tensor) else None for d in deps)
        for old, old_stamps, value in self.entries:
            if old_stamps == stamps and self._matches(old, deps):
                return value
        value = compute()
        self.entries = [(deps, stamps, value)] + self.entries[:self.SIZE - 1]
        return value


def _check_quant_tensor(x, name: str, *, quantized: bool | None = None) -> QuantTensor:
    if not isinstance(x, QuantTensor):
        raise TypeError(f"{name} must be a QuantTensor (values, scale), got {type(x).__name__}")
    if not isinstance(x.values, torch.Tensor):
        raise TypeError(f"{name}.values must be a torch.Tensor, got {type(x.values).__name__}")
    if x.scale is None:
        if quantized:
            raise ValueError(f"{name} must be quantized (an integer tensor with a scale), got scale None")
        if not x.values.is_floating_point():
            raise TypeError(f"{name}.values must be float when its scale is None, got {x.values.dtype}")
        return x
    if quantized is False:
        raise ValueError(f"{name} must be a float tensor (scale None)")
    if x.values.is_floating_point() or x.values.dtype == torch.bool:
        raise TypeError(f"{name}.values must be an integer tensor when it has a scale, got {x.values.dtype}")
    if not isinstance(x.scale, torch.Tensor) or x.scale.dtype != torch.float32 or x.scale.dim() != 1:
        raise TypeError(f"{name}.scale must be a 1-D float32 tensor")
    if x.scale.numel() not in (1, x.values.shape[-1]):
        raise ValueError(f"{name}.scale must have 1 or {x.values.shape[-1]} elements, got {x.scale.numel()}")
    return x


def _act_chain(y: QuantTensor, output_act, identity) -> QuantTensor:
    """Run the QuantAct that follows an unfused module (a no-op without one)."""
    if output_act is None:
        if identity is not None:
            raise ValueError("identity is added by the output_act: pass output_act too")
        return y
    return output_act.int_forward(y, identity)


def _fusable_act(output_act, identity) -> bool:
    """Whether ``output_act`` can be applied as the fused requantization of an integer result."""
    if output_act is None:
        if identity is not None:
            raise ValueError("identity is added by the output_act: pass output_act too")
        return False
    if not isinstance(output_act, QuantAct):
        raise TypeError(f"output_act must be a QuantAct, got {type(output_act).__name__}")
    if identity is not None:
        _check_quant_tensor(identity, "identity")
        if output_act.quant_mode and identity.scale is None:
            raise ValueError("identity must be quantized (HF's FixedPointMul needs its scale)")
    return output_act.quant_mode


def _residual_args(identity: QuantTensor | None, output_act: "QuantAct"):
    """The residual's values and the (cached) fixed point of its scale to ``output_act``'s."""
    if identity is None:
        return None, None
    return identity.values, output_act.requant_from(identity.scale)


# ------------------------------------------------------------------------------ modules

class QuantEmbedding(nn.Module):
    """HF's QuantEmbedding: an embedding table quantized per tensor to ``weight_bit`` bits.

    ``forward(x)`` -> ``(Wq[x] * s, s)`` (float emulation); ``int_forward(input_ids)`` ->
    ``QuantTensor(int8 rows [..., C], s [1])``.
    """

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, max_norm=None, norm_type=2.0,
                 scale_grad_by_freq=False, sparse=False, _weight=None, weight_bit=8, momentum=0.95, quant_mode=False):
        super().__init__()
        self.num_ = num_embeddings
        self.dim = embedding_dim
        self.padding_idx = padding_idx
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.scale_grad_by_freq = scale_grad_by_freq
        self.sparse = sparse
        self.weight = nn.Parameter(torch.zeros([num_embeddings, embedding_dim]))
        self.weight_scaling_factor = nn.Buffer(torch.zeros(1))
        self.weight_integer = nn.Buffer(torch.zeros_like(self.weight))
        self.weight_bit = weight_bit
        self.momentum = momentum
        self.quant_mode = quant_mode
        self.percentile_mode = False
        self.weight_function = SymmetricQuantFunction.apply
        self._int_cache = _ConstCache()

    def _embedding(self, x, weight):
        return F.embedding(x, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                           self.sparse)

    def forward(self, x, positions=None, incremental_state=None):
        if not self.quant_mode:
            return self._embedding(x, self.weight), None
        w = self.weight.data.detach()
        self.weight_scaling_factor = symmetric_scale(self.weight_bit, w.min().expand(1), w.max().expand(1))
        self.weight_integer = self.weight_function(self.weight, self.weight_bit, self.percentile_mode,
                                                   self.weight_scaling_factor)
        return self._embedding(x, self.weight_integer) * self.weight_scaling_factor, self.weight_scaling_factor

    def quantized_weight(self) -> QuantTensor:
        """The integer table (int dtype of ``weight_bit``) and its per-tensor scale, from the float weight
        (cached while the weight is unchanged, see :class:`_ConstCache`)."""
        def compute():
            w = self.weight.detach()
            scale = symmetric_scale(self.weight_bit, w.min().expand(1), w.max().expand(1))
            return QuantTensor(quantize(w, scale, self.weight_bit), scale)
        return self._int_cache.get(("weight", self.weight, self.weight_bit), compute)

    def int_forward(self, input_ids: torch.Tensor) -> QuantTensor:
        """Integer rows ``Wq[input_ids]`` [..., C] with the table's scale (a gather: no kernel needed)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError("input_ids must be an int32/int64 tensor")
        if not self.quant_mode:
            return QuantTensor(self._embedding(input_ids, self.weight), None)
        table = self.quantized_weight()
        return QuantTensor(F.embedding(input_ids, table.values, self.padding_idx), table.scale)


class QuantAct(nn.Module):
    """HF's QuantAct: symmetric per-tensor activation quantization with a calibrated range.

    Train mode (any quant_mode) updates ``x_min``/``x_max`` from ``x (+ identity)``: the first batch adds
    its min/max to the 1e-5 init, later ones an EMA with ``act_range_momentum``. ``int_forward`` is frozen.
    """

    def __init__(self, activation_bit, act_range_momentum=0.95, per_channel=False, channel_len=None, quant_mode=False):
        super().__init__()
        self.activation_bit = activation_bit
        self.act_range_momentum = act_range_momentum
        self.quant_mode = quant_mode
        self.per_channel = per_channel
        self.percentile = False
        self.act_function = SymmetricQuantFunction.apply
        if self.per_channel:
            raise NotImplementedError("per-channel mode is not currently supported for activation.")
        self.x_min = nn.Buffer(torch.zeros(1))
        self.x_max = nn.Buffer(torch.zeros(1))
        self.act_scaling_factor = nn.Buffer(torch.zeros(1))
        self.x_min -= 1e-5
        self.x_max += 1e-5
        self._int_cache = _ConstCache()

    def __repr__(self):
        return (f"{self.__class__.__name__}(activation_bit={self.activation_bit}, "
                f"quant_mode: {self.quant_mode}, Act_min: {self.x_min.item():.2f}, "
                f"Act_max: {self.x_max.item():.2f})")

    def _update_range(self, x_act: torch.Tensor) -> None:
        x_min = x_act.data.min()
        x_max = x_act.data.max()
        if x_max.isnan() or x_min.isnan():
            raise ValueError("NaN detected when computing min/max of the activation")
        if self.x_min.min() > -1.1e-5 and self.x_max.max() < 1.1e-5:
            self.x_min = self.x_min + x_min
            self.x_max = self.x_max + x_max
        elif self.act_range_momentum == -1:
            self.x_min = torch.min(self.x_min, x_min)
            self.x_max = torch.max(self.x_max, x_max)
        else:
            self.x_min = self.x_min * self.act_range_momentum + x_min * (1 - self.act_range_momentum)
            self.x_max = self.x_max * self.act_range_momentum + x_max * (1 - self.act_range_momentum)

    def forward(self, x, pre_act_scaling_factor=None, identity=None, identity_scaling_factor=None,
                specified_min=None, specified_max=None):
        x_act = x if identity is None else identity + x
        if self.training:
            self._update_range(x_act)
        if not self.quant_mode:
            return x_act, None
        x_min = self.x_min if specified_min is None else specified_min
        x_max = self.x_max if specified_max is None else specified_max
        self.act_scaling_factor = symmetric_scale(self.activation_bit, x_min, x_max, per_channel=self.per_channel)
        if pre_act_scaling_factor is None:
            # input quantization: like HF, the identity is not added on this path
            quant_act_int = self.act_function(x, self.activation_bit, self.percentile, self.act_scaling_factor)
        else:
            quant_act_int = FixedPointMul.apply(x, pre_act_scaling_factor, self.activation_bit,
                                                self.act_scaling_factor, identity, identity_scaling_factor)
        return quant_act_int * self.act_scaling_factor.view(-1), self.act_scaling_factor

    def output_scale(self) -> torch.Tensor:
        """The scale of this QuantAct's output for its current range (float32 [1]); cached: the same
        tensor object until ``x_min``/``x_max`` change, so the constants derived from it stay cached too."""
        return self._int_cache.get(("scale", self.x_min, self.x_max, self.activation_bit),
                                   lambda: symmetric_scale(self.activation_bit, self.x_min, self.x_max))

    def requant_from(self, in_scale: torch.Tensor) -> FixedPoint:
        """The fixed point of ``in_scale -> output_scale()`` (HF's FixedPointMul multiplier; cached)."""
        out_scale = self.output_scale()
        return self._int_cache.get(("requant", in_scale, out_scale), lambda: requant_params(in_scale, out_scale))

    def int_forward(self, x: QuantTensor, identity: QuantTensor | None = None) -> QuantTensor:
        """Requantize integer ``x`` (+ ``identity``, each rounded separately) to ``activation_bit`` bits
        (HF's FixedPointMul, exact), or quantize a float ``x`` (scale None; the identity is then ignored,
        as HF does). Returns ``QuantTensor(int dtype of activation_bit, scale [1])``."""
        _check_quant_tensor(x, "x")
        if identity is not None:
            _check_quant_tensor(identity, "identity")
        if not self.quant_mode:
            real = x.dequantize() if identity is None else identity.dequantize() + x.dequantize()
            return QuantTensor(real, None)
        scale = self.output_scale()
        if x.scale is None:
            return QuantTensor(quantize(x.values, scale, self.activation_bit), scale)
        if identity is not None and identity.scale is None:
            raise ValueError("identity must be quantized when x is (HF's FixedPointMul needs its scale)")
        res, res_q = _residual_args(identity, self)
        values = requantize(x.values, self.requant_from(x.scale), self.activation_bit, residual=res,
                            residual_requant=res_q)
        return QuantTensor(values, scale)


class QuantLinear(nn.Module):
    """HF's QuantLinear: weights quantized to ``weight_bit`` (per output channel when ``per_channel``),
    bias to ``bias_bit`` with scale ``s_w * s_in``; the input must be quantized per tensor.

    ``int_forward`` runs the int8 GEMM (``acc`` int32, scale ``s_w * s_in`` [N]) with an optional fused
    IntGELU and the following QuantAct (with its residual).
    """

    def __init__(self, in_features, out_features, bias=True, weight_bit=8, bias_bit=32, per_channel=False,
                 quant_mode=False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.zeros([out_features, in_features]))
        self.weight_integer = nn.Buffer(torch.zeros_like(self.weight))
        self.fc_scaling_factor = nn.Buffer(torch.zeros(self.out_features))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features))
            self.bias_integer = nn.Buffer(torch.zeros_like(self.bias))
        else:  # HF leaves the attribute unset (and then fails); None is what F.linear expects
            self.register_parameter("bias", None)
        self.weight_bit = weight_bit
        self.quant_mode = quant_mode
        self.per_channel = per_channel
        self.bias_bit = bias_bit
        self.percentile_mode = False
        self.weight_function = SymmetricQuantFunction.apply
        self._int_cache = _ConstCache()

    def __repr__(self):
        s = super().__repr__()
        return f"({s} weight_bit={self.weight_bit}, quant_mode={self.quant_mode})"

    def _weight_range(self, w):
        if self.per_channel:
            return torch.min(w, dim=1)[0], torch.max(w, dim=1)[0]
        return w.min().expand(1), w.max().expand(1)

    def forward(self, x, prev_act_scaling_factor=None):
        if not self.quant_mode:
            return F.linear(x, weight=self.weight, bias=self.bias), None
        if prev_act_scaling_factor is None or prev_act_scaling_factor.shape != (1,):
            raise ValueError("Input activation to the QuantLinear layer should be globally (non-channel-wise) "
                             "quantized: prev_act_scaling_factor must have shape (1,)")
        w_min, w_max = self._weight_range(self.weight.data.detach())
        self.fc_scaling_factor = symmetric_scale(self.weight_bit, w_min, w_max, self.per_channel)
        self.weight_integer = self.weight_function(self.weight, self.weight_bit, self.percentile_mode,
                                                   self.fc_scaling_factor)
        bias_scaling_factor = self.fc_scaling_factor * prev_act_scaling_factor
        bias_integer = None
        if self.bias is not None:
            self.bias_integer = self.weight_function(self.bias, self.bias_bit, False, bias_scaling_factor)
            bias_integer = self.bias_integer
        x_int = x / prev_act_scaling_factor.view(1, -1)
        return (F.linear(x_int, weight=self.weight_integer, bias=bias_integer) * bias_scaling_factor,
                bias_scaling_factor)

    def quantized_weight(self) -> QuantTensor:
        """The int8 weight [N, K] and its scale ([N] per channel, else [1]), from the float weight
        (cached while the weight is unchanged; ``self._int_cache.clear()`` after edits through ``.data``,
        see :class:`_ConstCache`)."""
        def compute():
            w = self.weight.detach()
            scale = symmetric_scale(self.weight_bit, *self._weight_range(w), self.per_channel)
            return QuantTensor(quantize(w, scale, self.weight_bit), scale)
        return self._int_cache.get(("weight", self.weight, self.weight_bit, self.per_channel), compute)

    def quantized_bias(self, weight_scale: torch.Tensor, in_scale: torch.Tensor):
        """HF's accumulator scale ``s_w * s_in`` [N] and the bias quantized to it (int32 [N], None without
        a bias), cached while the bias and both scales are unchanged."""
        def compute():
            acc_scale = weight_scale * in_scale
            if self.bias is None:
                return acc_scale, None
            return acc_scale, quantize(self.bias.detach(), acc_scale, self.bias_bit).to(torch.int32)
        return self._int_cache.get(("bias", self.bias, weight_scale, in_scale, self.bias_bit), compute)

    def _gemm_args(self, x: QuantTensor, assumed_scale: torch.Tensor | None):
        """What the int8 GEMM of ``x`` takes (all cached): int8 weight [N, K], int32 bias [N] or None, the
        prescale fixed point (HF's stale scale, else None) and the accumulator scale ``s_w * s_in`` [N]."""
        if x.scale is None or x.scale.shape != (1,) or x.values.dtype != torch.int8:
            raise ValueError("QuantLinear's input must be int8, quantized per tensor (scale of shape [1])")
        table = self.quantized_weight()
        in_scale = x.scale if assumed_scale is None else assumed_scale
        acc_scale, bias = self.quantized_bias(table.scale, in_scale)
        prescale = None
        if assumed_scale is not None:
            prescale = self._int_cache.get(("prescale", x.scale, assumed_scale),
                                           lambda: requant_params(x.scale, assumed_scale))
        return table.values, bias, prescale, acc_scale

    def int_forward(self, x: QuantTensor, *, gelu: IntGELU | None = None, output_act: QuantAct | None = None,
                    identity: QuantTensor | None = None, assumed_scale: torch.Tensor | None = None) -> QuantTensor:
        """Integer linear layer on int8 ``x`` [..., K] with its per-tensor scale.

        ``gelu`` (an IntGELU) and ``output_act`` (the QuantAct after it, with ``identity`` its residual)
        fuse into the GEMM's epilogue. ``assumed_scale`` reproduces HF's stale layer scale: HF feeds
        ``x * s_in / s_assumed`` and quantizes the bias with ``s_w * s_assumed``; the kernel rescales the
        exact accumulator by the fixed point of ``s_in / s_assumed`` before adding that bias.
        Returns int32 ``acc`` (scale ``s_w * s``), int64 after a bare GELU, or the QuantAct's output.
        """
        if gelu is not None and not isinstance(gelu, IntGELU):
            raise TypeError(f"gelu must be an IntGELU, got {type(gelu).__name__}")
        fuse_act = _fusable_act(output_act, identity)
        _check_quant_tensor(x, "x")
        if not self.quant_mode:
            y = QuantTensor(F.linear(x.dequantize(), self.weight, self.bias), None)
            y = gelu.int_forward(y) if gelu is not None else y
            return _act_chain(y, output_act, identity)
        weight, bias, prescale, acc_scale = self._gemm_args(x, assumed_scale)
        gelu_c = gelu.constants(acc_scale) if gelu is not None and gelu.quant_mode else None
        if gelu is not None and gelu_c is None:  # GELU dequantized: no fusion past the accumulator
            acc = QuantTensor(int_linear(x.values, weight, bias, prescale=prescale), acc_scale)
            return _act_chain(gelu.int_forward(acc), output_act, identity)
        out_scale = gelu_c.scale if gelu_c is not None else acc_scale
        if not fuse_act:
            y = QuantTensor(int_linear(x.values, weight, bias, prescale=prescale, gelu=gelu_c), out_scale)
            return _act_chain(y, output_act, identity)
        scale = output_act.output_scale()
        res, res_q = _residual_args(identity, output_act)
        values = int_linear(x.values, weight, bias, prescale=prescale, gelu=gelu_c,
                            requant=output_act.requant_from(out_scale), bits=output_act.activation_bit,
                            residual=res, residual_requant=res_q)
        return QuantTensor(values, scale)


def int_linear_group(x: QuantTensor, linears, acts, *, assumed_scale: torch.Tensor | None = None):
    """QuantLinear -> QuantAct pairs that read the same int8 ``x`` (I-BERT's query, key and value) as one
    int8 GEMM: weights, biases and the per-channel requantization fixed points concatenated along the output
    channels (cached while every part is unchanged). Each output column gets exactly the integer arithmetic of
    its own ``linear.int_forward(x, output_act=act)``; one launch fills the GPU where three narrow ones did not.

    Returns one ``QuantTensor`` per pair (column views of one int8 [..., sum N] tensor), or None when a pair
    cannot fuse (a module or QuantAct not in quant_mode, or acts of different widths): run them one by one."""
    if not linears or len(linears) != len(acts):
        raise ValueError("int_linear_group needs one QuantAct per QuantLinear")
    _check_quant_tensor(x, "x")
    if not all(isinstance(lin, QuantLinear) and lin.quant_mode and _fusable_act(act, None)
               for lin, act in zip(linears, acts)) or len({act.activation_bit for act in acts}) != 1:
        return None
    parts = [lin._gemm_args(x, assumed_scale) for lin in linears]
    requants = [act.requant_from(acc_scale) for act, (_, _, _, acc_scale) in zip(acts, parts)]
    widths = [weight.shape[0] for weight, *_ in parts]
    deps = ("group", *(t for weight, bias, _, _ in parts for t in (weight, bias)),
            *(t for fp in requants for t in fp))

    def concatenate():
        weight = torch.cat([w for w, *_ in parts])
        biases = [b if b is not None else torch.zeros(n, dtype=torch.int32, device=weight.device)
                  for (_, b, _, _), n in zip(parts, widths)]
        bias = None if all(b is None for _, b, _, _ in parts) else torch.cat(biases)
        requant = FixedPoint(*(torch.cat([t.expand(n) for t, n in zip(ts, widths)]) for ts in zip(*requants)))
        return weight, bias, requant

    weight, bias, requant = linears[0]._int_cache.get(deps, concatenate)
    # the prescale depends on x's scale and the assumed scale only: the same fixed point for every part
    values = int_linear(x.values, weight, bias, prescale=parts[0][2], requant=requant, bits=acts[0].activation_bit)
    return [QuantTensor(v, act.output_scale()) for v, act in zip(values.split(widths, dim=-1), acts)]


class IntGELU(nn.Module):
    """HF's IntGELU (i-GELU, second-order erf polynomial); ``force_dequant`` "gelu"/"nonlinear" turns it
    into the exact float GELU."""

    def __init__(self, quant_mode=True, force_dequant="none"):
        super().__init__()
        self.quant_mode = quant_mode
        if _check_force_dequant(force_dequant) in ["nonlinear", "gelu"]:
            self.quant_mode = False
        if not self.quant_mode:
            self.activation_fn = nn.GELU()
        self.k = 1.4142
        self.const = 14  # dummy integer constant
        self.coeff = [-0.2888, -1.769, 1]  # a(x+b)**2 + c
        self.coeff[2] /= self.coeff[0]
        self._int_cache = _ConstCache()

    def int_erf(self, x_int, scaling_factor):
        b_int = torch.floor(self.coeff[1] / scaling_factor)
        c_int = torch.floor(self.coeff[2] / scaling_factor ** 2)
        sign = torch.sign(x_int)
        abs_int = torch.min(torch.abs(x_int), -b_int)
        y_int = sign * ((abs_int + b_int) ** 2 + c_int)
        scaling_factor = scaling_factor ** 2 * self.coeff[0]
        y_int = floor_ste.apply(y_int / 2 ** self.const)
        scaling_factor = scaling_factor * 2 ** self.const
        return y_int, scaling_factor

    def forward(self, x, scaling_factor=None):
        if not self.quant_mode:
            return self.activation_fn(x), None
        x_int = x / scaling_factor
        sigmoid_int, sigmoid_scaling_factor = self.int_erf(x_int, scaling_factor / self.k)
        shift_int = 1.0 // sigmoid_scaling_factor
        x_int = x_int * (sigmoid_int + shift_int)
        scaling_factor = scaling_factor * sigmoid_scaling_factor / 2
        return x_int * scaling_factor, scaling_factor

    def constants(self, scale: torch.Tensor) -> GeluConstants:
        """:func:`gelu_constants` of the input scale (cached per scale tensor)."""
        return self._int_cache.get(("gelu", scale), lambda: gelu_constants(scale))

    def int_forward(self, x: QuantTensor, output_act: QuantAct | None = None) -> QuantTensor:
        """IntGELU on the integer accumulator ``x`` (int32, per-channel scale): int64 values with the
        (negative) output scale, or, with ``output_act``, requantized in the same kernel."""
        fuse_act = _fusable_act(output_act, None)
        _check_quant_tensor(x, "x")
        if not self.quant_mode:
            return _act_chain(QuantTensor(F.gelu(x.dequantize()), None), output_act, None)
        if x.scale is None:
            raise ValueError("IntGELU's input must be quantized (an integer accumulator with its scale)")
        c = self.constants(x.scale)
        if not fuse_act:
            return _act_chain(QuantTensor(int_gelu(x.values, c), c.scale), output_act, None)
        scale = output_act.output_scale()
        return QuantTensor(int_gelu(x.values, c, output_act.requant_from(c.scale), output_act.activation_bit), scale)


class IntSoftmax(nn.Module):
    """HF's IntSoftmax (i-exp, 16-bit requantization through its QuantAct ``act``, 8-bit output);
    ``force_dequant`` "softmax"/"nonlinear" turns it into the float softmax."""

    def __init__(self, output_bit, quant_mode=False, force_dequant="none"):
        super().__init__()
        self.output_bit = output_bit
        self.max_bit = 32
        self.quant_mode = quant_mode
        if _check_force_dequant(force_dequant) in ["nonlinear", "softmax"]:
            self.quant_mode = False
        self.act = QuantAct(16, quant_mode=self.quant_mode)
        self.x0 = -0.6931  # -ln2
        self.const = 30  # dummy integer constant
        self.coef = [0.35815147, 0.96963238, 1.0]  # ax**2 + bx + c
        self.coef[1] /= self.coef[0]
        self.coef[2] /= self.coef[0]
        self._int_cache = _ConstCache()

    def int_polynomial(self, x_int, scaling_factor):
        with torch.no_grad():
            b_int = torch.floor(self.coef[1] / scaling_factor)
            c_int = torch.floor(self.coef[2] / scaling_factor ** 2)
        z = (x_int + b_int) * x_int + c_int
        scaling_factor = self.coef[0] * scaling_factor ** 2
        return z, scaling_factor

    def int_exp(self, x_int, scaling_factor):
        with torch.no_grad():
            x0_int = torch.floor(self.x0 / scaling_factor)
        x_int = torch.max(x_int, self.const * x0_int)
        q = floor_ste.apply(x_int / x0_int)
        r = x_int - x0_int * q
        exp_int, exp_scaling_factor = self.int_polynomial(r, scaling_factor)
        exp_int = torch.clamp(floor_ste.apply(exp_int * 2 ** (self.const - q)), min=0)
        scaling_factor = exp_scaling_factor / 2 ** self.const
        return exp_int, scaling_factor

    def forward(self, x, scaling_factor):
        if not self.quant_mode:
            return F.softmax(x, dim=-1), None
        x_int = x / scaling_factor
        x_int_max, _ = x_int.max(dim=-1, keepdim=True)
        x_int = x_int - x_int_max
        exp_int, exp_scaling_factor = self.int_exp(x_int, scaling_factor)
        exp, exp_scaling_factor = self.act(exp_int, exp_scaling_factor)  # avoid overflow
        exp_int = exp / exp_scaling_factor
        exp_int_sum = exp_int.sum(dim=-1, keepdim=True)
        factor = floor_ste.apply(2 ** self.max_bit / exp_int_sum)
        exp_int = floor_ste.apply(exp_int * factor / 2 ** (self.max_bit - self.output_bit))
        scaling_factor = 1 / 2 ** self.output_bit
        return exp_int * scaling_factor, scaling_factor

    def constants(self, scale: torch.Tensor):
        """:func:`softmax_constants` for the score scale ``scale`` and this module's 16-bit act range (cached)."""
        act_scale = self.act.output_scale()
        return self._int_cache.get(("softmax", scale, act_scale), lambda: softmax_constants(scale, act_scale))

    def output_scale(self, device=None) -> torch.Tensor:
        """1 / 2**output_bit as a float32 [1] tensor (HF returns the Python float); cached per device."""
        return self._int_cache.get(("out", self.output_bit, str(torch.device(device or "cpu"))),
                                   lambda: torch.full((1,), 1 / 2 ** self.output_bit, dtype=torch.float32,
                                                      device=device))

    def int_forward(self, scores: QuantTensor, mask: torch.Tensor | None = None) -> QuantTensor:
        """IntSoftmax of int32 scores [..., Nk] (scale [1]) with a bool mask (true = attend): int16
        probabilities in [0, 256] with scale 1/256 (:func:`~tritonformers.kernels.int_ops.int_softmax`)."""
        _check_quant_tensor(scores, "scores")
        if self.output_bit != 8:
            raise ValueError(f"the integer softmax produces 8-bit probabilities; output_bit is {self.output_bit}")
        if not self.quant_mode:
            x = scores.dequantize()
            if mask is not None:
                x = x.masked_fill(~mask, torch.finfo(torch.float32).min)
            return QuantTensor(F.softmax(x, dim=-1), None)
        if scores.scale is None or scores.scale.numel() != 1:
            raise ValueError("IntSoftmax's scores must be quantized per tensor (scale [1])")
        p = int_softmax(scores.values, self.constants(scores.scale), mask)
        return QuantTensor(p, self.output_scale(p.device))


class IntLayerNorm(nn.Module):
    """HF's IntLayerNorm (integer statistics, ``shift`` against overflow, grown in train mode);
    ``force_dequant`` "layernorm"/"nonlinear" turns it into the float LayerNorm with ``eps``."""

    def __init__(self, normalized_shape, eps, output_bit=8, quant_mode=False, force_dequant="none"):
        super().__init__()
        self.normalized_shape = normalized_shape
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.quant_mode = quant_mode
        if _check_force_dequant(force_dequant) in ["nonlinear", "layernorm"]:
            self.quant_mode = False
        self.shift = nn.Buffer(torch.zeros(1))
        self.output_bit = output_bit
        self.max_bit = 32
        self.dim_sqrt = None
        self.activation = QuantAct(self.output_bit, quant_mode=self.quant_mode)
        self._int_cache = _ConstCache()

    def set_shift(self, y_int):
        with torch.no_grad():
            var_int = torch.sum(y_int ** 2, axis=2, keepdim=True)
            shift = (torch.log2(torch.sqrt(var_int / 2 ** self.max_bit)).ceil()).max()
            self.shift = torch.max(self.shift, shift)

    def overflow_fallback(self, y_int):
        """Grow ``shift`` (train mode) so that the variance of ``y >> shift`` fits 32 bits, then recompute it."""
        self.set_shift(y_int)
        y_int_shifted = floor_ste.apply(y_int / 2 ** self.shift)
        return torch.sum(y_int_shifted ** 2, axis=2, keepdim=True)

    def forward(self, x, scaling_factor=None):
        if not self.quant_mode:
            mean = x.mean(axis=2, keepdim=True)
            y = x - mean
            var = torch.mean(y ** 2, axis=2, keepdim=True)
            x = y / torch.sqrt(self.eps + var)
            return x * self.weight + self.bias, None
        if self.dim_sqrt is None:
            n = torch.tensor(x.shape[2], dtype=torch.float)
            self.dim_sqrt = torch.sqrt(n).to(x.device)
        x_int = x / scaling_factor
        mean_int = round_ste.apply(x_int.mean(axis=2, keepdim=True))
        y_int = x_int - mean_int
        y_int_shifted = floor_ste.apply(y_int / 2 ** self.shift)
        var_int = torch.sum(y_int_shifted ** 2, axis=2, keepdim=True)
        if self.training and var_int.max() >= 2 ** self.max_bit:
            var_int = self.overflow_fallback(y_int)
            if var_int.max() >= 2 ** self.max_bit + 0.1:
                raise ValueError("Error detected in overflow handling: `var_int` exceeds `self.max_bit`")
        std_int = floor_ste.apply(torch.sqrt(var_int)) * 2 ** self.shift
        factor = floor_ste.apply(2 ** 31 / std_int)
        y_int = floor_ste.apply(y_int * factor / 2)
        scaling_factor = self.dim_sqrt / 2 ** 30
        bias = self.bias.data.detach() / (self.weight.data.detach())
        bias_int = floor_ste.apply(bias / scaling_factor)
        y_int = y_int + bias_int
        scaling_factor = scaling_factor * self.weight
        return y_int * scaling_factor, scaling_factor

    def int_forward(self, x: QuantTensor, output_act: QuantAct | None = None) -> QuantTensor:
        """IntLayerNorm of integer ``x`` [..., C] (int16/int32, per-tensor scale: the integer result does
        not depend on it): int64 values with the per-channel scale ``sqrt(C) / 2**30 * gamma``, or, with
        ``output_act``, requantized per channel in the same kernel. Uses the ``shift`` buffer, never grows it."""
        fuse_act = _fusable_act(output_act, None)
        _check_quant_tensor(x, "x")
        if not self.quant_mode:
            real = x.dequantize()
            mean = real.mean(dim=-1, keepdim=True)
            y = real - mean
            var = torch.mean(y ** 2, dim=-1, keepdim=True)
            out = y / torch.sqrt(self.eps + var) * self.weight.detach() + self.bias.detach()
            return _act_chain(QuantTensor(out, None), output_act, None)
        if x.scale is None or x.scale.numel() != 1:
            raise ValueError("IntLayerNorm's input must be quantized per tensor (scale [1])")
        bias_int, out_scale = self._int_cache.get(("ln", self.weight, self.bias),
                                                  lambda: layer_norm_constants(self.weight, self.bias))
        # the float32 ``shift`` buffer as the int64 the kernels take (converted once, not per call)
        shift = self._int_cache.get(("shift", self.shift), lambda: self.shift.reshape(1).to(torch.int64))
        if not fuse_act:
            return QuantTensor(int_layer_norm(x.values, shift, bias_int), out_scale)
        scale = output_act.output_scale()
        values = int_layer_norm(x.values, shift, bias_int, output_act.requant_from(out_scale),
                                output_act.activation_bit)
        return QuantTensor(values, scale)


def quant_attention(query: QuantTensor, key: QuantTensor, value: QuantTensor, softmax: IntSoftmax,
                    output_act: QuantAct, mask: torch.Tensor | None = None,
                    output_attentions: bool = False):
    """I-BERT's self-attention core on integers (what IBertSelfAttention does between its Q/K/V
    QuantActs and its ``output_activation``).

    query/key/value: int8 [B, H, N, D] QuantTensors with per-tensor scales; mask: bool broadcastable to
    [B, H, Nq, Nk], true = attend. The score scale is HF's ``s_q * s_k / sqrt(D)``; the context scale
    ``(1 / 256) * s_v``. Returns the context ``QuantTensor(int [B, N, H * D], s_out)`` from
    ``output_act``, and with ``output_attentions`` also the probabilities ``QuantTensor(int16, 1/256)``
    (floats when the softmax is dequantized). The quantized case runs one fused kernel.
    """
    if not isinstance(softmax, IntSoftmax):
        raise TypeError(f"softmax must be an IntSoftmax, got {type(softmax).__name__}")
    if not isinstance(output_act, QuantAct):
        raise TypeError(f"output_act must be a QuantAct, got {type(output_act).__name__}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_quant_tensor(t, name, quantized=True)
        if t.values.dtype != torch.int8 or t.values.dim() != 4 or t.scale.numel() != 1:
            raise ValueError(f"{name} must be int8 [B, H, N, D] with a per-tensor scale")
    b, h, n, d = query.values.shape
    score_scale, ctx_scale = softmax._int_cache.get(
        ("attention", query.scale, key.scale, value.scale, d),
        lambda: (query.scale * key.scale / math.sqrt(d), softmax.output_scale(value.scale.device) * value.scale))
    if softmax.quant_mode and output_act.quant_mode and softmax.output_bit == 8:
        scale = output_act.output_scale()
        out = int_attention(query.values, key.values, value.values, softmax.constants(score_scale),
                            output_act.requant_from(ctx_scale), output_act.activation_bit, mask=mask,
                            return_probs=output_attentions)
        ctx, probs = out if output_attentions else (out, None)
        ctx = QuantTensor(ctx.view(b, n, h * d), scale)
        return (ctx, QuantTensor(probs, softmax.output_scale(probs.device))) if output_attentions else ctx
    # unfused: exact integer scores, the (possibly float) softmax, P V, then the QuantAct
    from ..kernels.int_gemm import int_matmul_reference
    scores = QuantTensor(int_matmul_reference(query.values, key.values.transpose(-1, -2)).to(torch.int32),
                         score_scale)
    probs = softmax.int_forward(scores, mask)
    if probs.scale is None:
        ctx = QuantTensor(torch.matmul(probs.values, value.dequantize()), None)
    else:
        ctx = QuantTensor(int_matmul_reference(probs.values, value.values).to(torch.int32), ctx_scale)
    ctx = QuantTensor(ctx.values.transpose(1, 2).reshape(b, n, h * d), ctx.scale)
    ctx = output_act.int_forward(ctx)
    return (ctx, probs) if output_attentions else ctx


__all__ = ["QuantTensor", "FixedPoint", "FORCE_DEQUANT_OPTIONS", "QuantEmbedding", "QuantAct", "QuantLinear",
           "int_linear_group", "IntGELU", "IntSoftmax", "IntLayerNorm", "quant_attention", "SymmetricQuantFunction", "FixedPointMul",
           "floor_ste", "round_ste", "batch_frexp", "symmetric_linear_quantization_params", "int_dtype"]

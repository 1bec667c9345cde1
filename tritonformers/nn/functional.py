"""The public functional ops of tritonformers, re-exported from the kernel modules.

Each op validates its arguments, then runs its Triton kernel or its PyTorch reference as the backend
says (``tritonformers.runtime``); every ``<op>_reference`` is exported too, as the eager oracle.
"""

from ..kernels.activations import gelu, gelu_reference, swiglu, swiglu_reference
from ..kernels.attention import (alibi_slopes, attention, attention_reference, decode_attention,
                                 decode_attention_reference)
from ..kernels.cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from ..kernels.diff_attention import (diff_attention, diff_attention_reference, diff_decode_attention,
                                      diff_decode_attention_reference, diff_lambda)
from ..kernels.int_gemm import int_attention, int_attention_reference, int_linear, int_linear_reference
from ..kernels.int_ops import (fixed_point, gelu_constants, int_gelu, int_gelu_reference, int_layer_norm,
                               int_layer_norm_reference, int_softmax, int_softmax_reference, layer_norm_constants,
                               quantize, quantize_reference, requant_params, requantize, requantize_reference,
                               softmax_constants, symmetric_scale)
from ..kernels.local_attention import local_attention, local_attention_reference
from ..kernels.lsh_attention import lsh_attention, lsh_attention_reference
from ..kernels.norms import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference
from ..kernels.rotary import apply_rotary, apply_rotary_reference

__all__ = [
    "layer_norm", "layer_norm_reference", "rms_norm", "rms_norm_reference",
    "gelu", "gelu_reference", "swiglu", "swiglu_reference",
    "apply_rotary", "apply_rotary_reference",
    "fused_linear_cross_entropy", "fused_linear_cross_entropy_reference",
    "attention", "attention_reference", "decode_attention", "decode_attention_reference", "alibi_slopes",
    "diff_attention", "diff_attention_reference", "diff_lambda", "diff_decode_attention",
    "diff_decode_attention_reference", "local_attention", "local_attention_reference",
    "lsh_attention", "lsh_attention_reference",
    "int_attention", "int_attention_reference", "int_linear", "int_linear_reference", "fixed_point",
    "gelu_constants", "int_gelu", "int_gelu_reference", "int_layer_norm", "int_layer_norm_reference", "int_softmax",
    "int_softmax_reference", "layer_norm_constants", "quantize", "quantize_reference", "requant_params",
    "requantize", "requantize_reference", "softmax_constants", "symmetric_scale",
]

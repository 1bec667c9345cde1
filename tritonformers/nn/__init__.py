"""Drop-in ``torch.nn`` modules built on the tritonformers kernels, with HuggingFace parameter names."""

from . import functional
from .activation import GELU, SwiGLU
from .attention import ALiBiAttention
from .differential_attention import DifferentialAttention
from .loss import FusedLinearCrossEntropyLoss
from .normalization import LayerNorm, RMSNorm
from .quantization import (IntGELU, IntLayerNorm, IntSoftmax, QuantAct, QuantEmbedding, QuantLinear, QuantTensor,
                           quant_attention)
from .reformer_attention import LocalSelfAttention, LSHSelfAttention

__all__ = ["functional", "LayerNorm", "RMSNorm", "GELU", "SwiGLU", "FusedLinearCrossEntropyLoss",
           "LocalSelfAttention", "LSHSelfAttention",
           "DifferentialAttention", "ALiBiAttention",
           "QuantLinear", "QuantAct", "IntGELU", "IntSoftmax", "IntLayerNorm", "QuantEmbedding", "QuantTensor",
           "quant_attention"]

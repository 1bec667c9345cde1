"""Activation modules: GELU (with an optional fused bias) and SwiGLU, thin wrappers over the functional ops."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.activations import GELU_MODES
from .functional import gelu, swiglu


class GELU(nn.Module):
    """``GELU(approximate)``: "none" (erf), "tanh" (torch's) or "bloom" (BLOOM's ``BloomGelu``).

    ``forward(x, bias=None)`` returns GELU(x + bias), the bias [x.shape[-1]] fused into the kernel.
    """

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in GELU_MODES:
            raise ValueError(f"approximate must be one of {GELU_MODES}, got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return gelu(x, self.approximate, bias)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class SwiGLU(nn.Module):
    """``forward(gate, up)`` returns ``silu(gate) * up`` (the Llama/DiffLlama MLP's activation)."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return swiglu(gate, up)


__all__ = ["GELU", "SwiGLU"]

"""Loss modules built on the tritonformers kernels."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.cross_entropy import REDUCTIONS
from .functional import fused_linear_cross_entropy


class FusedLinearCrossEntropyLoss(nn.Module):
    """Cross-entropy of a linear head's logits, ``F.cross_entropy(F.linear(hidden, weight, bias).float(),
    target)``, computed in token chunks so the [tokens, vocabulary] logits never exist whole.

    The module holds no parameters: the head's ``weight`` [V, d] (and ``bias`` [V]) are passed to ``forward``
    with ``hidden`` [..., d] and ``target`` [...] int64, so a model's own (possibly tied) LM head is used.
    Returns a float32 scalar for ``mean``/``sum`` and float32 losses shaped like ``target`` for ``none``.
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return fused_linear_cross_entropy(hidden, weight, target, bias, ignore_index=self.ignore_index,
                                          reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"


__all__ = ["FusedLinearCrossEntropyLoss"]

"""LayerNorm and RMSNorm modules on the Triton kernels, with HuggingFace's parameter names.

``LayerNorm`` is a ``torch.nn.LayerNorm`` (same constructor, parameters, state dict and init) whose
forward runs :func:`tritonformers.kernels.norms.layer_norm` and can fuse the pre-norm residual add.
``RMSNorm`` has the signature and state dict of HF's ``LlamaRMSNorm``/``DiffLlamaRMSNorm``.
"""

from __future__ import annotations

import torch

from .functional import layer_norm, rms_norm


class LayerNorm(torch.nn.LayerNorm):
    """Drop-in ``torch.nn.LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True)``.

    ``forward(x, residual=None)``: x [..., *normalized_shape] -> y of the same shape and dtype; with a
    ``residual`` of x's shape it returns ``(layer_norm(x + residual), x + residual)`` from one fused
    kernel (the pre-norm residual stream). A multi-dimensional ``normalized_shape`` is flattened into
    one row, which is the same normalisation.
    """

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        dims = len(self.normalized_shape)
        if not isinstance(x, torch.Tensor) or tuple(x.shape[-dims:]) != tuple(self.normalized_shape):
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must end with the normalized_shape {list(self.normalized_shape)}, got {got}")
        if dims == 1:
            return layer_norm(x, self.weight, self.bias, self.eps, residual)
        flat = lambda t: None if t is None else t.reshape(*t.shape[:t.dim() - dims], -1)  # noqa: E731
        if residual is not None and residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {list(x.shape)}, got {list(residual.shape)}")
        out = layer_norm(flat(x), flat(self.weight), flat(self.bias), self.eps, flat(residual))
        if residual is None:
            return out.view(x.shape)
        return out[0].view(x.shape), out[1].view(x.shape)


class RMSNorm(torch.nn.Module):
    """HuggingFace's RMSNorm: ``RMSNorm(hidden_size, eps=1e-6)``, state dict ``{"weight": [hidden_size]}``.

    ``forward(hidden_states)`` = ``weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)`` with x32 the
    float32 input (:func:`tritonformers.kernels.norms.rms_norm`); the output dtype is the promoted dtype
    of (weight, input). ``elementwise_affine=False`` gives the weightless norm (DiffLlama's group norm,
    empty state dict).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, elementwise_affine: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.hidden_size = hidden_size
        self.variance_epsilon = eps  # HF's attribute name
        if elementwise_affine:
            self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    @property
    def eps(self) -> float:
        return self.variance_epsilon

    def reset_parameters(self) -> None:
        if self.weight is not None:
            torch.nn.init.ones_(self.weight)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        affine = "" if self.weight is not None else ", elementwise_affine=False"
        return f"({self.hidden_size},), eps={self.variance_epsilon}{affine}"


__all__ = ["LayerNorm", "RMSNorm"]

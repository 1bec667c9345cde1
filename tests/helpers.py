"""Shared test helpers: dtypes per device, tolerances, random inputs (never zeros), NaN poisoning."""

from __future__ import annotations

import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

# bf16 is wrong under the Triton interpreter (DESIGN.md), so it is tested on CUDA only.
FLOAT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])

_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> dict:
    """atol/rtol for comparing a kernel with its reference in ``dtype``; ``scale`` widens both."""
    tol = _TOL[dtype]
    return dict(atol=tol["atol"] * scale, rtol=tol["rtol"] * scale)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 scale: float = 1.0, msg: str = "") -> None:
    """Compare in float32 with the tolerance of ``dtype`` (default: ``expected``'s), failing on any NaN."""
    dtype = expected.dtype if dtype is None else dtype
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{msg} non-finite values (an unwritten output?)"
    torch.testing.assert_close(actual.float(), expected.float(), **tolerance(dtype, scale), msg=msg or None)


def randn(*shape: int, dtype=torch.float32, device=DEVICE, scale: float = 1.0, offset: float = 0.0,
          requires_grad: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal draws in float32, scaled, shifted, rounded to ``dtype``; never all zeros."""
    x = torch.randn(*shape, generator=generator, dtype=torch.float32) * scale + offset
    x = x.to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a preallocated output with NaN (floats) or the minimum value (integers) before a launch."""
    if t.dtype.is_floating_point:
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).min)


def nan_like(t: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """A NaN-filled output buffer shaped like ``t`` (or ``shape``)."""
    return poison(torch.empty(t.shape if shape is None else shape, dtype=dtype or t.dtype, device=t.device))


def clone_leaf(*tensors: torch.Tensor):
    """Detached copies that require grad, so two paths get identical leaves."""
    out = tuple(t.detach().clone().requires_grad_(True) for t in tensors)
    return out if len(out) > 1 else out[0]


def transformers_version() -> tuple[int, int]:
    """(major, minor) of the installed transformers, to gate tests where its behaviour changed between 5.17
    (the GPU machine's) and the newest release."""
    import transformers

    return tuple(int(part) for part in transformers.__version__.split(".")[:2])

"""tritonformers: hand-written Triton kernels and lean HuggingFace-compatible models.

Layers: ``models`` -> ``nn`` (drop-in modules) -> ``nn.functional`` (ops) -> ``kernels`` (autograd
Functions, launchers, ``@triton.jit``) -> ``runtime`` (backend choice and checks).
"""

from .runtime import get_backend, use_backend

__version__ = "0.1.0"
__all__ = ["get_backend", "use_backend", "__version__"]

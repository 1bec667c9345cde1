"""tritonformers: hand-written Triton kernels and lean HuggingFace-compatible models.

Layers: ``models`` -> ``nn`` (drop-in modules) -> ``nn.functional`` (ops) -> ``kernels`` (autograd
Functions, launchers, ``@triton.jit``) -> ``runtime`` (backend choice and checks).
"""

from .transformers_patch import HFFallbackWarning, accelerate, restore
from .runtime import get_backend, use_backend

__version__ = "0.1.0"
__all__ = ["accelerate", "restore", "HFFallbackWarning", "get_backend", "use_backend", "__version__"]

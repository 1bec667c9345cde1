"""The benchmark harness behind ``tritonformers bench``.

* :mod:`.registry`: :class:`Case`, :class:`Impl`, :func:`register`; cases live in ``cases_<topic>.py``
  modules of this package, imported by :func:`load_cases` (``cases_shared``: norms, activations, rotary,
  fused linear cross-entropy).
* :mod:`.runner`: correctness against the first baseline, ``do_bench`` timings, peak memory, ceilings.
* :mod:`.report`: rates, speed-ups, the JSON / markdown / PNG result files.

Importing this package imports neither triton nor the kernels (the cases import them when they run).
"""

from .registry import OURS, Case, Count, Impl, all_cases, load_cases, register, select

__all__ = ["OURS", "Case", "Count", "Impl", "all_cases", "load_cases", "register", "select"]

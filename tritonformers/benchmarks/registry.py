"""The benchmark case registry: what is timed, on which shapes, against which baselines.

A :class:`Case` is one operation at one shape: how to build its inputs (``setup``), how much work one
call does (``flops``/``bytes``, minimal counts used for TFLOP/s, TB/s and the fraction of the ceiling),
and the implementations timed side by side (:class:`Impl`): ours (``tritonformers``) first, then the
baselines, the first of which is the correctness oracle for the others.

Cases live in modules named ``tritonformers/benchmarks/cases_<topic>.py`` that call :func:`register`
at import; :func:`load_cases` imports every such module, so a new family adds its own module and
nothing else changes (the runner, the CLI and ``bench/`` pick it up).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from typing import Any, Callable, Iterable, NamedTuple

import torch

OURS = "tritonformers"
BOUNDS = ("memory", "compute")
DIFFERENT_FUNCTION = "computes a different function"  # why a comparable=False impl is not compared, by default


class Count(NamedTuple):
    """A work count (FLOPs, integer ops or bytes) for the forward pass and for forward+backward."""

    fwd: float | None
    fwd_bwd: float | None = None


@dataclasses.dataclass(frozen=True)
class Impl:
    """One implementation of a case.

    ``fwd(inputs)`` runs the forward pass on the dict built by the case's ``setup`` and returns its
    output (a tensor or a tuple of tensors). ``fwd_bwd(inputs)``, when given, runs forward and backward
    itself; when left None the runner calls ``fwd`` and back-propagates fixed random output gradients
    (drawn once, outside the timed region). ``prepare(inputs) -> inputs``, when given, runs once and
    untimed before the first call (build an HF module, wrap in ``torch.compile``); it may import
    optional packages, and a failure there is recorded on this impl's row only. ``cuda_only`` impls
    (torch.compile, FlexAttention) are skipped without CUDA. An impl whose outputs cannot be compared
    is timed but neither checked nor used as the oracle; ``not_compared`` says why, in words that
    follow "not compared (...)" in the results (a training step: "the step updates the weights in
    place ..."). ``comparable=False`` alone means the usual reason, a speed-of-light baseline that
    computes a different function (attention without the ALiBi bias); giving ``not_compared`` implies
    ``comparable=False``.
    """

    name: str
    fwd: Callable[[dict], Any]
    fwd_bwd: Callable[[dict], Any] | None = None
    prepare: Callable[[dict], dict] | None = None
    cuda_only: bool = False
    comparable: bool = True
    description: str = ""
    not_compared: str = ""

    def __post_init__(self):
        # frozen: the two fields are made consistent here, so readers may look at either
        if self.not_compared:
            object.__setattr__(self, "comparable", False)
        elif not self.comparable:
            object.__setattr__(self, "not_compared", DIFFERENT_FUNCTION)

    @property
    def ours(self) -> bool:
        return self.name == OURS


@dataclasses.dataclass
class Case:
    """One benchmark case (see the module docstring).

    ``name`` is the case name of DESIGN.md's speed-target table (or a new descriptive one); cases that
    share a name differ by ``variant`` (``norm_bandwidth`` has ``layer_norm`` and ``rms_norm``), and
    ``fields`` are extra constant columns of their rows (``{"op": "rms_norm"}``). ``gpu_shape`` is the
    timed shape on CUDA, ``cpu_shape`` a tiny one for the CPU smoke run; both are dicts of named sizes
    that become columns of the results. ``setup(shape, dtype, device)`` returns the inputs dict; tensors
    that should receive gradients are leaves with ``requires_grad=True``. ``bound`` picks the ceiling
    for ``frac_of_ceiling``: ``memory`` (bytes / copy bandwidth) or ``compute`` (FLOPs / bf16 matmul
    rate, or integer ops when ``int_ops``). ``tokens(shape)`` gives tokens per call for tokens/s.
    """

    name: str
    setup: Callable[[dict, torch.dtype, torch.device], dict]
    impls: list[Impl]
    gpu_shape: dict
    cpu_shape: dict
    dtype: torch.dtype = torch.bfloat16
    bound: str = "memory"
    flops: Callable[[dict], Count] | None = None
    bytes: Callable[[dict, torch.dtype], Count] | None = None
    tokens: Callable[[dict], int] | None = None
    backward: bool = True
    int_ops: bool = False
    variant: str | None = None
    fields: dict = dataclasses.field(default_factory=dict)
    check_tol: float | None = None  # relative-norm tolerance of the check, when the dtype's default does not fit
    description: str = ""

    def __post_init__(self):
        if self.bound not in BOUNDS:
            raise ValueError(f"bound must be one of {BOUNDS}, got {self.bound!r}")
        names = [impl.name for impl in self.impls]
        if len(set(names)) != len(names):
            raise ValueError(f"case {self.id}: duplicate impl names {names}")
        if not names:
            raise ValueError(f"case {self.id}: no impls")

    @property
    def id(self) -> str:
        """Unique key: ``name`` or ``name/variant``."""
        return self.name if self.variant is None else f"{self.name}/{self.variant}"

    def reference_for(self, cuda: bool) -> Impl | None:
        """The correctness oracle: the first comparable baseline that can run here (CUDA-only ones need CUDA)."""
        return next((impl for impl in self.impls
                     if not impl.ours and impl.comparable and (cuda or not impl.cuda_only)), None)


_CASES: dict[str, Case] = {}
_LOAD_ERRORS: dict[str, str] = {}
_loaded = False


def register(*cases: Case) -> Case:
    """Add cases to the registry (duplicate ids are an error); returns the first, so it can wrap a factory."""
    for case in cases:
        if not isinstance(case, Case):
            raise TypeError(f"register takes Case objects, got {type(case).__name__}")
        if case.id in _CASES and _CASES[case.id] is not case:
            raise ValueError(f"benchmark case {case.id!r} is already registered")
        _CASES[case.id] = case
    return cases[0]


def load_cases() -> dict[str, str]:
    """Import every ``tritonformers.benchmarks.cases_*`` module; return {module: error} for those that failed.

    A failing module (a model family not written yet, a syntax error) does not stop the others; the
    runner prints and records these errors.
    """
    global _loaded
    if not _loaded:
        from . import __path__ as package_path
        for info in sorted(pkgutil.iter_modules(package_path), key=lambda m: m.name):
            if not info.name.startswith("cases_"):
                continue
            module = f"{__package__}.{info.name}"
            try:
                importlib.import_module(module)
            except Exception as exc:  # noqa: BLE001 - recorded and reported, the other modules still load
                _LOAD_ERRORS[module] = f"{type(exc).__name__}: {exc}"
        _loaded = True
    return dict(_LOAD_ERRORS)


def all_cases() -> list[Case]:
    """Every registered case, in registration order (loads the case modules first)."""
    load_cases()
    return list(_CASES.values())


def _matches(pattern: str, text: str) -> bool:
    try:
        return re.search(pattern, text) is not None
    except re.error:
        return pattern in text


def select(filters: Iterable[str] | None = None) -> list[Case]:
    """Cases whose id matches any filter (a regular expression, or a plain substring if it is not one)."""
    filters = [f for f in (filters or []) if f]
    cases = all_cases()
    if not filters:
        return cases
    return [case for case in cases if any(_matches(f, case.id) for f in filters)]


__all__ = ["OURS", "Count", "Impl", "Case", "register", "load_cases", "all_cases", "select"]

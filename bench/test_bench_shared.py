"""The registered benchmark cases as pytest-benchmark tests: one per case x impl x pass.

``pytest bench/ --benchmark-only`` times them (``--benchmark-compare``, ``--benchmark-histogram`` and the
other pytest-benchmark tools apply); plain ``pytest bench/`` runs each call once as a smoke test. On CUDA
the cases run at their GPU shapes with the device synchronised before and after each timed call; without
CUDA at their tiny CPU shapes, ours through the Triton interpreter (set by conftest.py). Every module
``tritonformers/benchmarks/cases_*.py`` is collected, so new cases appear here without edits.
The headline numbers (do_bench medians, rates, ceilings) come from ``tritonformers bench``.
"""

from __future__ import annotations

import pytest
import torch

from tritonformers.benchmarks import registry, runner

CUDA = torch.cuda.is_available()
SETTINGS = runner.Settings(cuda=CUDA)
ROUNDS, WARMUP_ROUNDS = (20, 3) if CUDA else (3, 1)


def _params():
    params = []
    for case in registry.all_cases():
        passes = ("fwd", "fwd_bwd") if case.backward else ("fwd",)
        for impl in case.impls:
            for pass_ in passes:
                marks = [pytest.mark.cuda] if impl.cuda_only else []
                params.append(pytest.param(case, impl, pass_, id=f"{case.id}-{impl.name}-{pass_}", marks=marks))
    return params


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("case, impl, pass_", _params())
def test_bench(benchmark, case: registry.Case, impl: registry.Impl, pass_: str):
    if impl.cuda_only and not CUDA:
        pytest.skip(f"{impl.name} runs on CUDA only")
    shape = SETTINGS.case_shape(case)
    dtype = SETTINGS.case_dtype(case)
    torch.manual_seed(0)
    inputs = case.setup(shape, dtype, SETTINGS.device)
    leaves = runner.leaves_of(inputs)
    with runner.backend_for(impl, SETTINGS):
        if impl.prepare is not None:
            try:
                inputs = impl.prepare(inputs)
            except ImportError as exc:  # an optional baseline package (transformers) is not installed
                pytest.skip(f"{impl.name} needs {exc.name or exc}")
        state = runner.CaseState(inputs=inputs, leaves=leaves)
        outs = runner.output_tensors(impl.fwd(inputs))  # untimed first call: compiles and warms up
        assert outs and all(bool(torch.isfinite(t).all()) for t in outs), f"{impl.name}: non-finite output"
        del outs
        fn = (lambda: impl.fwd(inputs)) if pass_ == "fwd" else runner.fwd_bwd_fn(impl, inputs, state)

        def timed():
            fn()
            _sync()

        def before_each():
            runner.clear_grads(leaves)
            _sync()

        sizes = " ".join(f"{k}={v}" for k, v in shape.items())
        benchmark.group = f"{case.id} {pass_} {sizes} {str(dtype).replace('torch.', '')}"
        benchmark.extra_info.update(case=case.name, variant=case.variant, impl=impl.name, pass_=pass_,
                                    dtype=str(dtype).replace("torch.", ""), backend=SETTINGS.ours_backend
                                    if impl.ours else None, **shape)
        benchmark.pedantic(timed, setup=before_each, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)

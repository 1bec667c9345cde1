"""The compiled-vs-eager benchmark cases (``tritonformers/benchmarks/cases_compile.py``) in the CPU smoke run.

Every ``compile_<family>_{fwd,train}`` case runs through the runner at its tiny shape with ``aot_eager``, on the
PyTorch reference path (our kernels under compile are tests/test_compile.py's subject; through the interpreter
these cases take minutes): no row fails, the compiled forward logits match eager, the compiled row did compile,
and no graph is compiled inside a timed call (compilation belongs to the untimed warm-up).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.utils

from tritonformers.benchmarks import cases_compile, registry, runner
from tritonformers.benchmarks.registry import OURS

CPU = runner.Settings(cuda=False, quick=True)


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.fixture
def graphs_in_timed_calls(monkeypatch):
    """The number of graphs compiled during each timed call of the runner (``runner.time_ms``); one CPU thread,
    as ``runner.run`` times tiny shapes."""
    counts: list[int] = []
    time_ms = runner.time_ms

    def counted(fn, leaves, settings):
        before = _graphs()
        ms = time_ms(fn, leaves, settings)
        counts.append(_graphs() - before)
        return ms
    monkeypatch.setattr(runner, "time_ms", counted)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield counts
    torch.set_num_threads(threads)
    torch._dynamo.reset()


def test_every_family_has_a_forward_and_a_training_case():
    names = [case.id for case in registry.select([r"^compile_"])]
    assert names == [f"compile_{family}_{kind}" for family in ("bloom", "diffllama", "ibert", "reformer", "fsmt")
                     for kind in ("fwd", "train")]
    for case in registry.select([r"^compile_"]):
        assert (case.cpu_shape["compiler"], case.gpu_shape["compiler"]) == ("aot_eager", "inductor")
        assert "Inductor on CUDA, aot_eager on CPU" in case.impls[0].description


@pytest.mark.parametrize("family", list(cases_compile.FAMILIES))
@pytest.mark.parametrize("kind", ["fwd", "train"])
def test_case_runs_with_compilation_outside_the_timed_calls(family, kind, monkeypatch, graphs_in_timed_calls):
    monkeypatch.setenv("TRITONFORMERS_BACKEND", "torch")  # ours: the reference path, as the eager row on CPU
    (case,) = registry.select([f"^compile_{family}_{kind}$"])
    before = _graphs()
    rows = {row["impl"]: row for row in runner.run_case(case, CPU, {})}
    assert list(rows) == [OURS, "eager"]
    assert _graphs() > before, "nothing was compiled"
    for row in rows.values():
        assert row["error"] is None and row["fwd_ms"] is not None, (row["impl"], row["error"])
    if case.backward:
        assert rows[OURS]["fwd_bwd_ms"] is not None and "updates the weights" in rows[OURS]["check_note"]
    else:
        assert rows[OURS]["matches_baseline"] is True and rows[OURS]["checked_against"] == "eager", rows[OURS]
    # per impl one timed pass (forward) or two (forward + loss, the step)
    assert graphs_in_timed_calls == [0] * (4 if case.backward else 2)

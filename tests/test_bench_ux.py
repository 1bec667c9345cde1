"""First use of the benchmark runner (issue 12, item 10): the shapes ``--list`` shows, honest check notes,
where the result files go, and the per-case speed-up plot.

Most tests use a tiny synthetic case (an elementwise op on a [4, 8] tensor) so they run in milliseconds;
one runs a registered case end to end through the command line, on the PyTorch reference path.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tritonformers.benchmarks import lm, registry, report, runner
from tritonformers.benchmarks.registry import OURS, Case, Impl
from tritonformers.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H200_RESULTS = os.path.join(ROOT, "bench", "results", "nvidia-h200-20261204-1537.json")
CPU = runner.Settings(cuda=False, quick=True)


def _setup(shape, dtype, device):
    return {"x": torch.randn(shape["T"], shape["d"], dtype=dtype, device=device, requires_grad=True)}


def _double(i):
    return i["x"] * 2


def _case(*impls: Impl, name: str = "toy") -> Case:
    return Case(name, setup=_setup, impls=[Impl(OURS, _double), *impls], gpu_shape={"T": 4096, "d": 1024},
                cpu_shape={"T": 4, "d": 8})


def _notes(case: Case) -> dict[str, str | None]:
    return {row["impl"]: row["check_note"] for row in runner.run_case(case, CPU, {})}


# ------------------------------------------------------------------------------------------- --list

@pytest.mark.parametrize("argv", [["--cpu"], []], ids=["--cpu", "no-cuda"])
def test_list_shows_the_shapes_a_run_here_uses(argv, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without CUDA
    assert main(["bench", "--list", "--filter", "norm_bandwidth/rms_norm", *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("shapes: the tiny CPU smoke shapes") and "case names give the GPU sizes" in lines[0]
    case_line = next(line for line in lines if line.startswith("norm_bandwidth/rms_norm"))
    assert "T=64 d=256 float32 [memory]" in case_line  # what runs here: the CPU shape, in float32
    assert any(line.strip() == "on CUDA: T=16384 d=4096 bfloat16" for line in lines)


def test_list_honours_dtype_and_shows_gpu_shapes_on_cuda(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # listing never touches the device
    assert main(["bench", "--list", "--filter", "^swiglu$", "--dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("shapes: the GPU shapes\n")
    assert "swiglu  T=4096 I=8192 float16 [memory]" in out and "on CUDA:" not in out


def test_results_name_the_shape_set():
    case = _case(Impl("peer", _double))
    data = runner.environment(CPU)
    data["results"] = runner.run_case(case, CPU, {})
    assert data["shapes"] == runner.shape_set(CPU)
    assert f"Shapes: {runner.shape_set(CPU)}." in report.markdown(data)
    assert "| toy | T=4 d=8 | float32 | tritonformers |" in report.markdown(data)


# ------------------------------------------------------------------------------------------- check notes

def test_not_compared_reason_is_stated():
    impl = Impl("stepper", _double, not_compared="it updates the weights in place")
    assert impl.comparable is False
    assert Impl("other_fn", _double, comparable=False).not_compared == registry.DIFFERENT_FUNCTION
    notes = _notes(_case(Impl("oracle", _double), impl, Impl("other_fn", _double, comparable=False)))
    assert notes == {OURS: None, "oracle": "oracle", "stepper": "not compared (it updates the weights in place)",
                     "other_fn": "not compared (computes a different function)"}


def test_compute_bound_rates_use_the_ceiling_of_their_dtype():
    case = Case("toy", setup=_setup, impls=[Impl(OURS, _double)], gpu_shape={"T": 1, "d": 1},
                cpu_shape={"T": 1, "d": 1}, bound="compute", flops=lambda s: registry.Count(fwd=2e12))
    ceilings = {"bf16_tflops": 800.0, "fp32_tflops": 50.0, "int8_tops": 1600.0}
    for dtype, ceiling in ((torch.bfloat16, 800.0), (torch.float16, 800.0), (torch.float32, 50.0)):
        row = {"fwd_ms": 100.0}  # 2 TFLOP in 0.1 s: 20 TFLOP/s
        report.add_rates(row, case, {}, dtype, ceilings)
        assert row["tflops"] == pytest.approx(20.0) and row["frac_of_ceiling"] == pytest.approx(20.0 / ceiling)


def test_training_cases_say_the_step_updates_the_weights():
    impls = lm.train_impls(lambda *a: None, "hf_eager", "ours", "theirs")
    assert [i.name for i in impls] == [OURS, "hf_eager"]
    for impl in impls:
        assert not impl.comparable and "updates the weights in place" in impl.not_compared
    for case in registry.select(["_train_"]):
        notes = {i.name: i.not_compared for i in case.impls}
        assert all("updates the weights" in n for n in notes.values()), (case.id, notes)


def test_no_oracle_note_names_the_cause():
    cuda_only = _case(Impl("compiled", _double, cuda_only=True))
    notes = _notes(cuda_only)
    assert notes[OURS] == "not checked: the baseline compiled needs CUDA"
    assert notes["compiled"] is None  # skipped row: the table says "skipped (needs CUDA)"
    two = _case(Impl("a", _double, cuda_only=True), Impl("b", _double, cuda_only=True))
    assert _notes(two)[OURS] == "not checked: the baselines a, b need CUDA"
    speed_refs = _case(Impl("flash", _double, comparable=False), Impl("step", _double, not_compared="a step"))
    assert _notes(speed_refs)[OURS] == ("not checked: no baseline is compared "
                                        "(flash: computes a different function; step: a step)")
    assert _notes(_case())[OURS] == "not checked: no baseline"


# ------------------------------------------------------------------------------------------- results location

def _tree(root, *dirs, pyproject: str | None = None) -> str:
    for d in dirs:
        os.makedirs(os.path.join(root, d))
    if pyproject is not None:
        with open(os.path.join(root, "pyproject.toml"), "w") as f:
            f.write(pyproject)
    return str(root)


def test_checkout_detection(tmp_path):
    assert runner.is_checkout(ROOT)
    assert runner.is_checkout(_tree(tmp_path / "pkg", "bench", "tritonformers"))
    assert runner.is_checkout(_tree(tmp_path / "sdist", "bench", pyproject='[project]\nname = "tritonformers"\n'))
    assert not runner.is_checkout(_tree(tmp_path / "other", "bench", pyproject='[project]\nname = "other"\n'))
    assert not runner.is_checkout(_tree(tmp_path / "bench_only", "bench"))
    assert not runner.is_checkout(_tree(tmp_path / "no_bench", "tritonformers"))


def test_default_out_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert runner.default_out_dir(ROOT) == os.path.join(ROOT, "bench", "results")
    assert runner.default_out_dir(str(tmp_path)) == str(tmp_path / "xdg" / "tritonformers" / "bench")
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert runner.default_out_dir(str(tmp_path)) == str(tmp_path / "home" / ".local" / "share" / "tritonformers"
                                                        / "bench")


def test_run_outside_a_checkout_writes_to_the_user_dir_and_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    lines: list[str] = []
    result = runner.run([_case(Impl("peer", _double))], quick=True, cuda=False, echo=lines.append)
    want = str(tmp_path / "xdg" / "tritonformers" / "bench")
    assert os.path.dirname(result.json_path) == want and os.path.isfile(result.json_path)
    assert not os.path.exists(tmp_path / "bench")
    assert f"results go to {want} (not inside a tritonformers checkout; --out DIR to choose)" in lines
    assert f"wrote {result.json_path}" in lines
    out = tmp_path / "chosen"
    assert os.path.dirname(runner.run([_case()], out_dir=str(out), cuda=False, echo=lines.append).json_path) == str(out)


def test_cli_without_out_outside_a_checkout(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TRITONFORMERS_BACKEND", "torch")  # the reference path: fast
    assert main(["bench", "--cpu", "--quick", "--filter", "^gelu_bloom$"]) == 0
    out = capsys.readouterr().out
    files = os.listdir(tmp_path / "xdg" / "tritonformers" / "bench")
    assert {os.path.splitext(f)[1] for f in files} >= {".json", ".md"}
    assert "not inside a tritonformers checkout" in out and os.listdir(tmp_path) == ["xdg"]


# ------------------------------------------------------------------------------------------- the plot

def _row(case, impl, fwd, fwd_bwd=None, **extra):
    return {"case": case, "variant": None, "T": 4, "impl": impl, "dtype": "float32", "fwd_ms": fwd,
            "fwd_bwd_ms": fwd_bwd, "check_note": None, "error": None, "skipped": None, **extra}


def _synthetic_results() -> dict:
    rows = [_row("a", OURS, 1.0, 2.0), _row("a", "fast", 0.5, 1.0), _row("a", "slow", 4.0, 8.0,
                                                                          check_note="not compared (x)"),
            _row("a", "compiled", None, skipped="needs CUDA"),
            _row("b", OURS, 3.0), _row("b", "peer", 6.0),
            _row("c", OURS, None, error="boom"), _row("c", "peer", 1.0)]
    for case in "abc":
        report.add_ratios([r for r in rows if r["case"] == case])
    return {"device": "toy", "date": "2026-12-04T15:37:16+00:00", "note": None, "results": rows}


def test_speedup_panels_are_peer_time_over_ours():
    a, b, c = report.speedup_panels(_synthetic_results())
    assert [p.case_id for p in (a, b, c)] == ["a", "b", "c"]
    assert [(x.peer, x.ratio, x.basis, x.compared, x.why) for x in a.bars] == [
        ("fast", 0.5, "fwd+bwd", True, None), ("slow", 4.0, "fwd+bwd", False, None),
        ("compiled", None, None, True, "skipped: needs CUDA")]
    assert a.ours_ms == 2.0 and a.subtitle == "T=4 float32"
    assert [(x.peer, x.ratio, x.basis) for x in b.bars] == [("peer", 2.0, "fwd")] and b.ours_ms == 3.0
    assert c.bars == [] and "failed" in c.why


def test_plot_has_one_panel_per_case(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from matplotlib.image import imread
    with open(H200_RESULTS) as f:
        data = json.load(f)
    cases = {(r["case"], r.get("variant")) for r in data["results"]}
    fig = report.speedup_figure(data)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == len(cases) == 12
    assert all(ax.get_xscale() == "log" for ax in panels)
    titles = [ax.get_title().splitlines()[0] for ax in panels]
    assert titles[0] == "alibi_causal_h32_d128" and "norm_bandwidth/rms_norm" in titles
    first = [t.get_text() for t in panels[0].get_yticklabels()]
    assert first == ["reference_fp32", "hf_eager *", "sdpa_bias", "flex", "flash_no_alibi *"]  # impl names only
    width, height = fig.get_size_inches()
    assert 12 <= width <= 16 and height < width
    plt.close(fig)
    path = str(tmp_path / "plot.png")
    assert report.plot(data, path) is None
    pixels = imread(path)
    assert pixels.shape[1] == 16 * report.PLOT_DPI and pixels.shape[0] < pixels.shape[1]
    assert report.plot(_synthetic_results(), str(tmp_path / "toy.png")) is None

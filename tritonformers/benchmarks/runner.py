"""Run registered benchmark cases: check each impl against the first baseline, time it, measure memory.

On CUDA every impl is timed with ``triton.testing.do_bench`` (CUDA events, L2 flushed before each call,
median), forward and forward+backward, with leaf gradients reset to None before each timed call so
gradient accumulation is not timed; the peak memory of one forward+backward call is measured above what
was allocated before it. The device's copy bandwidth and bf16 matmul rate are measured once per run and
each result gets its fraction of the one that bounds it. Without CUDA the tiny CPU shapes run with a
wall-clock median; ours runs the PyTorch reference path unless ``TRITON_INTERPRET=1`` is set (and
``TRITONFORMERS_BACKEND`` is not ``torch``), and the timings mean nothing (the run says so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.metadata
import math
import os
import platform
import re
import statistics
import sys
import time
from datetime import datetime
from typing import Any, Callable, Iterable

import torch

from .. import runtime
from .registry import Case, Impl, load_cases
from . import report

CPU_BANNER = "No CUDA device: tiny shapes, timings mean nothing"
FORCED_CPU_BANNER = "CPU run asked for (--cpu): tiny shapes, timings mean nothing"
PEAK_BASIS = "max allocated during one forward+backward call (forward only when the case has no backward), " \
             "minus what was allocated before it (the inputs)"
# loose relative-norm tolerances for "ours computes the same function as the baseline"
CHECK_TOL = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
               "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclasses.dataclass
class Settings:
    """How to run: device, dtype override, timing budget."""

    cuda: bool
    dtype: torch.dtype | None = None
    quick: bool = False

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.cuda else "cpu")

    @property
    def warmup_ms(self) -> int:
        return 25 if self.quick else 100

    @property
    def rep_ms(self) -> int:
        return 100 if self.quick else 500

    @property
    def cpu_repeats(self) -> int:
        return 3 if self.quick else 5

    @property
    def ours_backend(self) -> str:
        """Backend for our impl: the kernels on CUDA; on CPU the kernels through the interpreter when it is on
        (``TRITON_INTERPRET=1``) unless ``TRITONFORMERS_BACKEND=torch`` says otherwise, else the reference."""
        if self.cuda:
            return "triton"
        return "triton" if runtime.interpreter_enabled() and runtime.get_backend() != "torch" else "torch"

    def timing_method(self) -> str:
        if self.cuda:
            return (f"triton.testing.do_bench median, warmup {self.warmup_ms} ms, rep {self.rep_ms} ms, "
                    "L2 flushed before each call, gradients reset to None before each call")
        return f"wall-clock median of {self.cpu_repeats} calls after 2 to 10 warm-up calls, one CPU thread"

    def case_shape(self, case: Case) -> dict:
        """The sizes this run uses: the case's GPU shape on CUDA, its tiny CPU shape otherwise."""
        return dict(case.gpu_shape if self.cuda else case.cpu_shape)

    def case_dtype(self, case: Case) -> torch.dtype:
        if not case.dtype.is_floating_point:
            return case.dtype
        if self.dtype is not None:
            return self.dtype
        # bf16 is broken in the Triton interpreter and slow in CPU eager: float32 for the CPU smoke run
        return case.dtype if self.cuda else torch.float32


def shape_set(settings: Settings) -> str:
    """Which shapes a run with ``settings`` uses, in words (for ``--list`` and the result files)."""
    if settings.cuda:
        return "the GPU shapes"
    why = "--cpu" if torch.cuda.is_available() else "no CUDA device"
    return f"the tiny CPU smoke shapes ({why}); case names give the GPU sizes"


def shape_text(case: Case, settings: Settings) -> str:
    """``"T=64 d=256 float32"``: the sizes and dtype of ``case`` in a run with ``settings``."""
    sizes = " ".join(f"{k}={v}" for k, v in settings.case_shape(case).items())
    return f"{sizes} {str(settings.case_dtype(case)).replace('torch.', '')}"


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPE_NAMES[name.lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {name!r}") from None


# ------------------------------------------------------------------------------------------- environment

def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(cuda: bool) -> str:
    if cuda:
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.machine() or 'unknown'}, {os.cpu_count()} cores)"


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def device_slug(cuda: bool) -> str:
    return slugify(torch.cuda.get_device_name(0)) if cuda else slugify(f"cpu-{platform.machine()}")


def environment(settings: Settings) -> dict:
    """The top-level fields of the results file (everything but ``results``)."""
    note = None
    if not settings.cuda:
        path = ("the Triton kernels through the interpreter" if settings.ours_backend == "triton"
                else "the PyTorch reference path (TRITON_INTERPRET=1 runs the kernels through the interpreter)"
                if not runtime.interpreter_enabled() else "the PyTorch reference path (TRITONFORMERS_BACKEND=torch)")
        banner = FORCED_CPU_BANNER if torch.cuda.is_available() else CPU_BANNER
        note = f"{banner}; ours ran {path}"
    return {
        "device": device_name(settings.cuda),
        "device_slug": device_slug(settings.cuda),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "tritonformers": _version("tritonformers"),
        "python": platform.python_version(),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "mode": "cuda" if settings.cuda else "cpu",
        "note": note,
        "shapes": shape_set(settings),
        "ours_backend": settings.ours_backend,
        "timing": settings.timing_method(),
        "peak_mib_basis": PEAK_BASIS if settings.cuda else None,
        "quick": settings.quick,
    }


# ------------------------------------------------------------------------------------------- where results go

CHECKOUT_RESULTS = os.path.join("bench", "results")


def is_checkout(path: str) -> bool:
    """Whether ``path`` is the root of a tritonformers source checkout: a ``bench/`` folder beside the
    ``tritonformers/`` package or beside a ``pyproject.toml`` whose project name is tritonformers."""
    if not os.path.isdir(os.path.join(path, "bench")):
        return False
    if os.path.isdir(os.path.join(path, "tritonformers")):
        return True
    try:
        with open(os.path.join(path, "pyproject.toml")) as f:
            text = f.read()
    except OSError:
        return False
    return re.search(r"""^name\s*=\s*["']tritonformers["']""", text, re.MULTILINE) is not None


def user_results_dir() -> str:
    """``$XDG_DATA_HOME/tritonformers/bench``, by default ``~/.local/share/tritonformers/bench``."""
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data_home, "tritonformers", "bench")


def default_out_dir(cwd: str | None = None) -> str:
    """Where results go without ``--out``: ``bench/results`` inside a checkout (the files the repository keeps),
    elsewhere (an installed package run from any folder) the user's data directory, never a stray folder."""
    cwd = os.getcwd() if cwd is None else cwd
    return os.path.join(cwd, CHECKOUT_RESULTS) if is_checkout(cwd) else user_results_dir()


# ------------------------------------------------------------------------------------------- timing

def clear_grads(leaves: list[torch.Tensor]) -> None:
    """Reset the leaves' gradients to None (so a timed backward allocates rather than accumulates)."""
    for t in leaves:
        t.grad = None


def time_ms(fn: Callable[[], Any], leaves: list[torch.Tensor], settings: Settings) -> float:
    """Median milliseconds of one call of ``fn``."""
    if settings.cuda:
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=settings.warmup_ms, rep=settings.rep_ms, grad_to_none=leaves,
                              return_mode="median"))
    # CPU thread pools and lazy kernels warm up over the first few calls: at least 2, up to 10 or 20 ms
    start, calls = time.perf_counter(), 0
    while calls < 2 or (calls < 10 and time.perf_counter() - start < 0.02):
        clear_grads(leaves)
        fn()
        calls += 1
    times = []
    for _ in range(settings.cpu_repeats):
        clear_grads(leaves)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_mib(fn: Callable[[], Any], leaves: list[torch.Tensor]) -> float:
    """MiB allocated at the peak of one call of ``fn`` above what was allocated before it (CUDA)."""
    clear_grads(leaves)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure_ceilings(settings: Settings) -> dict:
    """Device copy bandwidth (bytes read + written) and the bf16 and float32 8192^3 matmul rates, measured
    once."""
    if not settings.cuda:
        return {"copy_tbps": None, "bf16_tflops": None}
    from triton.testing import do_bench
    ceilings: dict[str, Any] = {}
    try:
        src = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)  # 1 GiB, far beyond L2
        dst = torch.empty_like(src)
        ms = do_bench(lambda: dst.copy_(src), warmup=settings.warmup_ms, rep=settings.rep_ms, return_mode="median")
        ceilings["copy_tbps"] = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e12
        del src, dst
        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)  # random data: zeros run faster
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
        ms = do_bench(lambda: torch.matmul(a, b, out=c), warmup=settings.warmup_ms, rep=settings.rep_ms,
                      return_mode="median")
        ceilings["bf16_tflops"] = 2 * n**3 / (ms * 1e-3) / 1e12
        # Tensor cores run dense int8 at twice the bf16 rate (H100 SXM datasheet: 1979 vs 989); torch._int_mm
        # is far from that, so the int8 ceiling is derived from the measured bf16 rate rather than measured.
        ceilings["int8_tops"] = 2 * ceilings["bf16_tflops"]
        ceilings["int8_tops_basis"] = "2 x measured bf16 matmul rate (Hopper's dense int8:bf16 ratio)"
        a, b, c = (t.float() for t in (a, b, c))  # float32 cases (IEEE dots on the CUDA cores) use this one
        ms = do_bench(lambda: torch.matmul(a, b, out=c), warmup=settings.warmup_ms, rep=settings.rep_ms,
                      return_mode="median")
        ceilings["fp32_tflops"] = 2 * n**3 / (ms * 1e-3) / 1e12
        ceilings["fp32_tflops_basis"] = (f"{n}^3 float32 matmul, float32 matmul precision "
                                         f"{torch.get_float32_matmul_precision()!r} ('highest': no TF32)")
        del a, b, c
    except Exception as exc:  # noqa: BLE001 - the cases still run; fractions of a missing ceiling are null
        ceilings["error"] = _describe(exc)
    ceilings.setdefault("copy_tbps", None)
    ceilings.setdefault("bf16_tflops", None)
    _free()
    return ceilings


def _free() -> None:
    """Give cached device memory back between impls, so one impl's peak does not shape the next one's."""
    if torch.cuda.is_available():
        gc.collect()  # slow with transformers loaded (0.2 s), so only where device memory is at stake
        torch.cuda.empty_cache()


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:400]


# ------------------------------------------------------------------------------------------- checking

def output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of an impl's output (a tensor, or nested tuples/lists/dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in output_tensors(item)]
    return []


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float32 (inf on a shape mismatch or a non-finite value)."""
    if actual.shape != expected.shape:
        return math.inf
    a, e = actual.detach().float(), expected.detach().float()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    denom = torch.linalg.vector_norm(e).item()
    diff = torch.linalg.vector_norm(a - e).item()
    return diff / denom if denom > 0 else diff


@dataclasses.dataclass
class CaseState:
    """What the impls of one case share: inputs, leaves, fixed output gradients, the oracle's results."""

    inputs: dict
    leaves: list[torch.Tensor]
    ref_name: str | None = None
    ref_out: list[torch.Tensor] | None = None
    ref_grads: list[torch.Tensor | None] | None = None
    grad_outputs: dict = dataclasses.field(default_factory=dict)

    def grads_for(self, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Fixed random output gradients (ones for a scalar loss), drawn once per output shape, untimed.

        Impls with the same output shapes get the same values, so their input gradients compare; an impl
        with another layout (an HF module's [B, N, hidden] against [B, H, N, D]) still gets timed.
        """
        key = tuple(tuple(o.shape) for o in outs)
        if key not in self.grad_outputs:
            gen = torch.Generator(device=outs[0].device).manual_seed(1234)
            self.grad_outputs[key] = [
                torch.ones_like(o) if o.numel() == 1 else
                torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float32).to(o.dtype)
                for o in outs]
        # an impl whose output dtype differs (a float32 loss against a bf16 one) gets the same values
        return [g.to(o.dtype) for g, o in zip(self.grad_outputs[key], outs)]


def _differentiable(out: Any) -> list[torch.Tensor]:
    return [t for t in output_tensors(out) if t.requires_grad]


def fwd_bwd_fn(impl: Impl, inputs: dict, state: CaseState) -> Callable[[], Any]:
    """The impl's forward+backward call: its own ``fwd_bwd``, else forward then the fixed output gradients."""
    if impl.fwd_bwd is not None:
        return lambda: impl.fwd_bwd(inputs)

    def run():
        outs = _differentiable(impl.fwd(inputs))
        torch.autograd.backward(outs, state.grads_for(outs))
    return run


def _forward_and_grads(impl: Impl, inputs: dict, state: CaseState, backward: bool):
    """One untimed forward (and backward) call: detached outputs and the leaves' gradients."""
    clear_grads(state.leaves)
    out = impl.fwd(inputs)
    outs = [t.detach().clone() for t in output_tensors(out)]
    grads = None
    if backward:
        diff = _differentiable(out)
        if diff:
            torch.autograd.backward(diff, state.grads_for(diff))
        grads = [None if t.grad is None else t.grad.detach().clone() for t in state.leaves]
        clear_grads(state.leaves)
    del out
    return outs, grads


def _compare(outs, grads, state: CaseState, dtype: torch.dtype, tol: float | None = None) -> tuple[bool, float]:
    errs = [_rel_err(a, e) for a, e in zip(outs, state.ref_out)]
    if len(outs) != len(state.ref_out):
        errs.append(math.inf)
    if grads is not None and state.ref_grads is not None:
        for g, e in zip(grads, state.ref_grads):
            if (g is None) != (e is None):
                errs.append(math.inf)
            elif g is not None:
                errs.append(_rel_err(g, e))
    err = max(errs) if errs else 0.0
    return err <= (tol if tol is not None else CHECK_TOL.get(dtype, 3e-2)), err


def no_oracle_note(case: Case, cuda: bool) -> str:
    """Why a case has no oracle here: no baseline at all, the comparable ones need CUDA, or none is comparable."""
    baselines = [impl for impl in case.impls if not impl.ours]
    if not baselines:
        return "not checked: no baseline"
    need_cuda = [impl.name for impl in baselines if impl.comparable and impl.cuda_only and not cuda]
    if len(need_cuda) == 1:
        return f"not checked: the baseline {need_cuda[0]} needs CUDA"
    if need_cuda:
        return f"not checked: the baselines {', '.join(need_cuda)} need CUDA"
    reasons: dict[str, list[str]] = {}
    for impl in baselines:
        reasons.setdefault(impl.not_compared, []).append(impl.name)
    why = "; ".join(f"{', '.join(names)}: {reason}" for reason, names in reasons.items())
    return f"not checked: no baseline is compared ({why})"


# ------------------------------------------------------------------------------------------- one case

def _base_row(case: Case, impl: Impl, shape: dict, dtype: torch.dtype, settings: Settings) -> dict:
    row = {"case": case.name, "variant": case.variant, **case.fields, **shape, "impl": impl.name,
           "dtype": str(dtype).replace("torch.", ""),
           "backend": settings.ours_backend if impl.ours else None}
    for key in report.METRIC_KEYS:
        row.setdefault(key, None)
    row.update({"matches_baseline": None, "checked_against": None, "max_rel_err": None, "check_note": None,
                "error": None, "skipped": None})
    return row


def _run_impl(case: Case, impl: Impl, row: dict, state: CaseState, dtype: torch.dtype,
              settings: Settings) -> None:
    """Fill ``row`` for one impl: correctness, then timings and memory. Errors land in ``row["error"]``."""
    if impl.cuda_only and not settings.cuda:
        row["skipped"] = "needs CUDA"
        return
    with backend_for(impl, settings):
        inputs = impl.prepare(state.inputs) if impl.prepare else state.inputs
        outs, grads = _forward_and_grads(impl, inputs, state, case.backward)  # also warms up / compiles
        if state.ref_out is None and impl.name == state.ref_name:
            state.ref_out, state.ref_grads = outs, grads
            row["check_note"] = "oracle"
        elif not impl.comparable:
            row["check_note"] = f"not compared ({impl.not_compared})"
        elif state.ref_out is not None:
            row["matches_baseline"], err = _compare(outs, grads, state, dtype, case.check_tol)
            row["max_rel_err"] = err if math.isfinite(err) else None
            row["checked_against"] = state.ref_name
        else:
            row["check_note"] = (f"not checked: the oracle {state.ref_name} failed" if state.ref_name
                                 else no_oracle_note(case, settings.cuda))
        del outs, grads
        fwd = lambda: impl.fwd(inputs)  # noqa: E731
        row["fwd_ms"] = time_ms(fwd, state.leaves, settings)
        fwd_bwd = fwd_bwd_fn(impl, inputs, state) if case.backward else None
        if fwd_bwd is not None:
            row["fwd_bwd_ms"] = time_ms(fwd_bwd, state.leaves, settings)
        if settings.cuda:
            row["peak_mib"] = peak_mib(fwd_bwd or fwd, state.leaves)
        clear_grads(state.leaves)


def leaves_of(inputs: dict) -> list[torch.Tensor]:
    """The inputs that receive gradients: leaf tensors with ``requires_grad``."""
    return [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf]


def backend_for(impl: Impl, settings: Settings):
    """The backend context an impl runs under: ours pinned to ``settings.ours_backend``, baselines untouched."""
    return runtime.use_backend(settings.ours_backend) if impl.ours else contextlib.nullcontext()


def run_case(case: Case, settings: Settings, ceilings: dict, on_impl: Callable[[Case, Impl, dict], None] | None = None
             ) -> list[dict]:
    """All rows of one case, in the case's impl order; the oracle (first baseline) runs first."""
    shape = settings.case_shape(case)
    dtype = settings.case_dtype(case)
    rows = {impl.name: _base_row(case, impl, shape, dtype, settings) for impl in case.impls}
    torch.manual_seed(0)
    try:
        inputs = case.setup(shape, dtype, settings.device)
    except Exception as exc:  # noqa: BLE001 - recorded on every row of the case
        for impl in case.impls:
            rows[impl.name]["error"] = f"setup: {_describe(exc)}"
            if on_impl:
                on_impl(case, impl, rows[impl.name])
        return list(rows.values())
    leaves = leaves_of(inputs)
    ref = case.reference_for(settings.cuda)
    state = CaseState(inputs=inputs, leaves=leaves, ref_name=ref.name if ref else None)
    order = ([ref] if ref else []) + [impl for impl in case.impls if impl is not ref]
    for impl in order:
        row = rows[impl.name]
        try:
            _run_impl(case, impl, row, state, dtype, settings)
        except Exception as exc:  # noqa: BLE001 - OOM, a missing baseline package, a kernel error
            row["error"] = _describe(exc)
            clear_grads(leaves)
        _free()
        report.add_rates(row, case, shape, dtype, ceilings)
        if on_impl:
            on_impl(case, impl, row)
    report.add_ratios(list(rows.values()))
    del state, inputs, leaves
    _free()
    return list(rows.values())


# ------------------------------------------------------------------------------------------- the run

class _Progress:
    """A tqdm bar on a terminal when tqdm is installed (the ``bench`` extra), plain lines otherwise (logs)."""

    def __init__(self, total: int, echo: Callable[[str], None]):
        self.total, self.done, self.echo = total, 0, echo
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, desc="bench", unit="impl", file=sys.stderr, leave=False)
            except ImportError:
                pass

    def __call__(self, case: Case, impl: Impl, row: dict) -> None:
        self.done += 1
        text = f"{case.id} {impl.name}: {report.summary(row)}"
        if self.bar is not None:
            self.bar.set_postfix_str(f"{case.id} {impl.name}", refresh=False)
            self.bar.update(1)
            self.bar.write(f"  {text}", file=sys.stderr)
        else:
            self.echo(f"[{self.done}/{self.total}] {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclasses.dataclass
class RunResult:
    data: dict
    json_path: str
    md_path: str
    png_path: str | None


def run(cases: Iterable[Case], *, out_dir: str | None = None, dtype: torch.dtype | None = None,
        quick: bool = False, cuda: bool | None = None, echo: Callable[[str], None] = print) -> RunResult:
    """Run ``cases``, write ``<out_dir>/<device-slug>-<YYYYMMDD-HHMM>.{json,md,png}``, return the data.

    ``out_dir`` None: :func:`default_out_dir` (``bench/results`` in a checkout, else the user's data directory).
    """
    cases = list(cases)
    if out_dir is None:
        out_dir = default_out_dir()
        why = "inside a checkout" if is_checkout(os.getcwd()) else "not inside a tritonformers checkout"
        echo(f"results go to {out_dir} ({why}; --out DIR to choose)")
    settings = Settings(cuda=torch.cuda.is_available() if cuda is None else cuda, dtype=dtype, quick=quick)
    data = environment(settings)
    if data["note"]:
        banner, detail = data["note"].split("; ", 1)
        echo(banner)
        echo(f"  ({detail})")
    load_errors = load_cases()
    for module, err in load_errors.items():
        echo(f"warning: benchmark module {module} failed to import: {err}")
    data["load_errors"] = load_errors
    echo(f"device: {data['device']} | torch {data['torch']} | triton {data['triton']} | "
         f"transformers {data['transformers']}")
    data["ceilings"] = measure_ceilings(settings)
    if settings.cuda:
        echo(f"ceilings: copy {report.fmt(data['ceilings']['copy_tbps'])} TB/s, "
             f"bf16 matmul {report.fmt(data['ceilings']['bf16_tflops'])} TFLOP/s")
    stem = report.result_stem(out_dir, data["device_slug"])
    data["results"], data["interrupted"] = [], False
    progress = _Progress(sum(len(c.impls) for c in cases), echo)
    threads = torch.get_num_threads()
    if not settings.cuda:
        torch.set_num_threads(1)  # tiny shapes: threads only add barrier stalls on a busy machine
    try:
        for case in cases:
            data["results"].extend(run_case(case, settings, data["ceilings"], progress))
            report.write_tables(data, stem)  # a run killed later still leaves the finished cases
    except KeyboardInterrupt:  # a timeout sends SIGINT: keep what was measured
        data["interrupted"] = True
        echo("interrupted: writing the results of the finished cases")
    finally:
        progress.close()
        torch.set_num_threads(threads)
    paths = report.write_all(data, stem, echo=echo)
    return RunResult(data=data, **paths)


__all__ = ["CPU_BANNER", "FORCED_CPU_BANNER", "Settings", "RunResult", "CaseState", "run", "run_case",
           "measure_ceilings", "time_ms", "peak_mib", "parse_dtype", "environment", "device_slug", "clear_grads",
           "leaves_of", "backend_for", "fwd_bwd_fn", "output_tensors", "default_out_dir", "is_checkout",
           "user_results_dir", "no_oracle_note", "shape_set", "shape_text"]

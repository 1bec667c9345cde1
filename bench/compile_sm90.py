"""Lower every Triton kernel of tritonformers for Hopper (sm_90) on a machine without a GPU.

    python bench/compile_sm90.py [--filter REGEX] [--json PATH]

The interpreter runs kernels on the CPU but never lowers them, so layout, dot-shape, dtype and shared-memory
errors (and a Triton release that rejects what another accepted) first show on the GPU. This script runs the
public ops, forward and backward, and the I-BERT integer model, with the real launchers on CPU tensors while
Triton believes it drives an sm_90 device: each launch is compiled through the full CUDA pipeline (ptxas
included, shipped with triton) and not run. Autotuned kernels compile every config that survives pruning,
as the autotuner would on the GPU (a config the autotuner would skip for lack of resources is reported, not
failed, unless all of a launch's configs are). Outputs are left unwritten, so only the launches are checked,
not the numbers (the interpreter tests do that).

It prints one line per compiled kernel variant (shared memory, registers and spilled bytes from
``cuobjdump --dump-resource-usage``) and ends with ``ALL COMPILED`` or the failures. Run it under every
Triton the project supports: the GPU machine's (3.6) and CI's (3.9), e.g. from a venv with
``pip install torch==2.13.0 triton==3.6.0``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be JITFunctions, not interpreted ones

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SM_COUNT = 132  # H100 SXM / H200: what the launchers read for persistent and split-K grids


class _Props:
    multi_processor_count = SM_COUNT
    name = "sm_90 (lowering only)"
    major, minor = 9, 0
    total_memory = 80 << 30


def _pretend_cuda() -> None:
    """Before tritonformers is imported: full autotune config lists and device properties as on a GPU."""
    torch.cuda.is_available = lambda: True
    torch.cuda.get_device_properties = lambda *a, **k: _Props()
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)


_pretend_cuda()

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

try:
    from triton.compiler.errors import CompileTimeAssertionFailure
except ImportError:  # pragma: no cover
    CompileTimeAssertionFailure = OutOfResources
try:
    from triton.runtime.errors import PTXASError
except ImportError:  # pragma: no cover
    PTXASError = OutOfResources
SKIPPED_BY_AUTOTUNER = (OutOfResources, CompileTimeAssertionFailure, PTXASError)


class _LoweringDriver:
    """Enough of Triton's active driver for JITFunction.run to compile for sm_90 without a device."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_device_interface(self):
        return torch.cuda

    def get_active_torch_device(self):
        return torch.device("cpu")


COMPILED: dict[tuple, dict] = {}
REJECTED: list[str] = []


def _resources(kernel) -> dict:
    cubin = kernel.asm.get("cubin")
    info = {"shared": kernel.metadata.shared, "regs": None, "spill": None}
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if cubin is None or not os.path.exists(tool):
        return info
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", text), re.search(r"STACK:(\d+)", text)
    info["regs"] = int(regs.group(1)) if regs else None
    info["spill"] = int(stack.group(1)) if stack else None
    return info


_jit_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _jit_run(self, *args, grid=grid, warmup=True, **kwargs)
    consts = {k: v for k, v in kwargs.items() if k.isupper() and isinstance(v, (int, bool, str))}
    key = (self.__name__, tuple(sorted(consts.items())), kwargs.get("num_warps"), kwargs.get("num_stages"),
           str(getattr(kernel, "src", "")))
    if key[:4] not in {k[:4] for k in COMPILED}:
        COMPILED[key] = {"kernel": self.__name__, "meta": consts, "num_warps": kernel.metadata.num_warps,
                         "num_stages": kernel.metadata.num_stages, **_resources(kernel)}
        r = COMPILED[key]
        blocks = " ".join(f"{k}={v}" for k, v in consts.items() if k.startswith("BLOCK"))
        print(f"  {r['kernel']:34s} w{r['num_warps']} s{r['num_stages']} {blocks:40s} shared={r['shared']:6d} "
              f"regs={r['regs']} spill={r['spill']}", flush=True)
    return kernel


def _compile_every_config(self, *args, **kwargs):
    """Compile each config that survives pruning, as the autotuner benchmarks each one on the GPU; the first
    that compiles stands in as the ``best_config`` (launchers may read it)."""
    self.nargs = dict(zip(self.arg_names, args))
    configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
    accepted, rejected = [], []
    for config in configs:
        try:
            if config.pre_hook is not None:  # e.g. TMA descriptors take the config's block shapes
                config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
            self.fn.run(*args, **kwargs, **config.all_kwargs())
            accepted.append(config)
        except SKIPPED_BY_AUTOTUNER as e:
            rejected.append(f"{self.base_fn.__name__} {config}: {type(e).__name__}")
    self.nargs = None
    REJECTED.extend(rejected)
    if not accepted:
        raise RuntimeError(f"every autotune config of {self.base_fn.__name__} was rejected: {rejected}")
    self.best_config = accepted[0]


def lowering_mode() -> None:
    driver.set_active(_LoweringDriver())
    JITFunction.run = _compile_only
    Autotuner.run = _compile_every_config


# ------------------------------------------------------------------------------------------- the plan

def _plan():
    """(name, thunk) pairs; each thunk runs public ops (forward and backward) on CPU tensors."""
    from tritonformers import runtime
    import tritonformers.nn.functional as TF

    runtime.interpreter_enabled = lambda: True  # let the 'triton' backend take CPU tensors...
    runtime.on_gpu = lambda *tensors: True  # ...and size blocks as the launchers do on a GPU
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32, grad=True):
        t = torch.randn(*shape, generator=g).to(dtype)
        return t.requires_grad_(grad) if dtype.is_floating_point else t

    def fwd_bwd(out):
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()

    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    plan = []
    for dt in dtypes:
        n = str(dt).split(".")[1]
        plan.append((f"norms {n}", lambda dt=dt: (
            fwd_bwd(TF.layer_norm(rnd(64, 4096, dtype=dt), rnd(4096, dtype=dt), rnd(4096, dtype=dt))),
            fwd_bwd(TF.layer_norm(rnd(64, 1024, dtype=dt), rnd(1024, dtype=dt), rnd(1024, dtype=dt),
                                  residual=rnd(64, 1024, dtype=dt))),
            fwd_bwd(TF.rms_norm(rnd(64, 4096, dtype=dt), rnd(4096, dtype=dt))),
            fwd_bwd(TF.rms_norm(rnd(4, 8, 64, dtype=dt))))))
        plan.append((f"activations {n}", lambda dt=dt: (
            [fwd_bwd(TF.gelu(rnd(64, 512, dtype=dt), approximate=a, bias=rnd(512, dtype=dt)))
             for a in ("none", "tanh", "bloom")],
            fwd_bwd(TF.gelu(rnd(64, 512, dtype=dt))),
            fwd_bwd(TF.swiglu(rnd(64, 512, dtype=dt), rnd(64, 512, dtype=dt))))))
        for D in (64, 128):
            plan.append((f"rotary {n} D{D}", lambda dt=dt, D=D: fwd_bwd(TF.apply_rotary(
                rnd(2, 4, 64, D, dtype=dt), rnd(2, 2, 64, D, dtype=dt), rnd(1, 64, D, dtype=dt, grad=False),
                rnd(1, 64, D, dtype=dt, grad=False)))))
            plan.append((f"attention {n} D{D}", lambda dt=dt, D=D: _attention(TF, rnd, fwd_bwd, dt, D)))
            plan.append((f"diff attention {n} D{D}", lambda dt=dt, D=D: _diff_attention(TF, rnd, fwd_bwd, dt, D)))
            plan.append((f"local/lsh attention {n} D{D}", lambda dt=dt, D=D: _reformer(TF, rnd, fwd_bwd, dt, D)))
        plan.append((f"fused linear cross-entropy {n}", lambda dt=dt: fwd_bwd(TF.fused_linear_cross_entropy(
            rnd(256, 256, dtype=dt), rnd(4096, 256, dtype=dt), torch.randint(0, 4096, (256,), generator=g)))))
    plan.append(("int8 GEMM and integer ops", lambda: _integer(TF, rnd, g)))
    plan.append(("int8 GEMM, TMA persistent", lambda: _integer_tma(TF, rnd, g)))
    plan.append(("I-BERT integer model", _ibert_model))
    return plan


def _attention(TF, rnd, fwd_bwd, dt, D):
    B, H, N = 2, 4, 256
    q, k, v = (rnd(B, H, N, D, dtype=dt) for _ in range(3))
    slopes = TF.alibi_slopes(H).requires_grad_(True)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, :7] = False
    fwd_bwd(TF.attention(q, k, v))
    fwd_bwd(TF.attention(q, k, v, causal=True, alibi_slopes=slopes, key_padding_mask=mask))
    fwd_bwd(TF.attention(q, k, v, causal=True, dropout_p=0.1, return_lse=True))
    fwd_bwd(TF.attention(q[:, :, :100], k, v, causal=True, alibi_slopes=TF.alibi_slopes(H)))
    fwd_bwd(TF.packed_attention(rnd(B, N, H, 3, D, dtype=dt), causal=True, alibi_slopes=slopes, key_padding_mask=mask))
    caches = [rnd(B, H, 512, D, dtype=dt, grad=False) for _ in range(2)]
    lens = torch.tensor([300, 512])
    with torch.no_grad():
        TF.decode_attention(rnd(B, H, 1, D, dtype=dt, grad=False), *caches, lens, alibi_slopes=TF.alibi_slopes(H))
        TF.decode_attention(rnd(B, H, 4, D, dtype=dt, grad=False), *caches, lens)


def _diff_attention(TF, rnd, fwd_bwd, dt, D):
    B, H, HKV, N = 2, 8, 4, 256
    q, k, v = rnd(B, H, N, D, dtype=dt), rnd(B, HKV, N, D, dtype=dt), rnd(B, HKV, N, D, dtype=dt)
    lam = torch.full((1,), 0.3, requires_grad=True)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, :5] = False
    fwd_bwd(TF.diff_attention(q, k, v, lam, 0.2, causal=True, key_padding_mask=mask))
    fwd_bwd(TF.diff_attention(q, k, v, lam, 0.2, causal=False))
    caches = [rnd(B, HKV, 512, D, dtype=dt, grad=False) for _ in range(2)]
    with torch.no_grad():
        TF.diff_decode_attention(rnd(B, H, 1, D, dtype=dt, grad=False), *caches, torch.tensor([100, 512]),
                                 lam.detach(), 0.2)


def _reformer(TF, rnd, fwd_bwd, dt, D):
    B, H, N = 1, 2, 256
    q, k, v = (rnd(B, H, N, D, dtype=dt) for _ in range(3))
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, -9:] = False
    fwd_bwd(TF.local_attention(q, k, v, chunk_length=64, num_chunks_before=1, num_chunks_after=1, causal=True,
                               key_padding_mask=mask, dropout_p=0.1))
    fwd_bwd(TF.local_attention(q, k, v, chunk_length=64))
    fwd_bwd(TF.lsh_attention(q, v, chunk_length=64, num_hashes=2, num_buckets=8, causal=True,
                             key_padding_mask=mask, dropout_p=0.1, hash_seed=0))
    fwd_bwd(TF.lsh_attention(q, v, chunk_length=64, num_hashes=1, num_buckets=[2, 4], hash_seed=0))


def _integer(TF, rnd, g, gemm_only=False):
    def i8(*shape):
        return torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)

    w = i8(1024, 512)
    bias = torch.randint(-1000, 1000, (1024,), dtype=torch.int32, generator=g)
    s_in, s_w = torch.tensor([0.02]), torch.full((1024,), 0.01)
    requant = TF.requant_params(s_in * s_w, torch.tensor([0.05]))
    gelu = TF.gelu_constants(s_in * s_w)
    res_requant = TF.requant_params(torch.tensor([0.03]), torch.tensor([0.05]))
    prescale = TF.fixed_point(torch.tensor([0.7]))
    for m in (256, 8192):
        x = i8(m, 512)
        TF.int_linear(x, w)
        TF.int_linear(x, w, bias)
        TF.int_linear(x, w, bias, requant=requant)
        TF.int_linear(x, w, bias, gelu=gelu, requant=requant)
        TF.int_linear(x, w, bias, gelu=gelu)
        TF.int_linear(x, w, bias, prescale=prescale, requant=requant, residual=i8(m, 1024),
                      residual_requant=res_requant)
    if gemm_only:
        return
    consts = TF.softmax_constants(torch.tensor([0.001]), torch.tensor([1 / 2 ** 15]))
    for D in (64, 128):
        q, k, v = (i8(2, 4, 128, D) for _ in range(3))
        mask = torch.ones(2, 1, 1, 128, dtype=torch.bool)
        mask[0, ..., :5] = False
        TF.int_attention(q, k, v, consts, TF.requant_params(torch.tensor([0.01 / 256]), torch.tensor([0.02])),
                         mask=mask, return_probs=True)
        TF.int_attention(q, k, v, consts)
    scores = torch.randint(-5000, 5000, (2, 4, 64, 64), dtype=torch.int32, generator=g)
    TF.int_softmax(scores, consts, mask=torch.ones(2, 1, 1, 64, dtype=torch.bool))
    x32 = torch.randint(-30000, 30000, (64, 768), dtype=torch.int32, generator=g)
    TF.int_gelu(x32, TF.gelu_constants(torch.tensor([0.001])), TF.requant_params(torch.tensor([0.001]),
                                                                                 torch.tensor([0.02])))
    TF.requantize(x32, TF.requant_params(torch.tensor([0.001]), torch.tensor([0.02])))
    TF.quantize(rnd(64, 768, grad=False), torch.tensor([0.02]))
    gamma, beta = rnd(768, grad=False), rnd(768, grad=False)
    bias_int, _ = TF.layer_norm_constants(gamma, beta)
    TF.int_layer_norm(x32, 0, bias_int, TF.requant_params(torch.tensor([0.001]), torch.tensor([0.02])))


def _integer_tma(TF, rnd, g):
    """The Hopper int8 GEMM (TMA descriptors, persistent), which the launcher picks on a GPU by timing."""
    from tritonformers.kernels import int_gemm

    int_gemm._force_linear_kernel = "tma"
    try:
        _integer(TF, rnd, g, gemm_only=True)
    finally:
        int_gemm._force_linear_kernel = None


def _ibert_model():
    """The integer-only I-BERT forward: the GEMM epilogues, attention, softmax and LayerNorm as the model
    launches them (calibrated on the reference path first)."""
    import transformers

    from tritonformers import runtime
    from tritonformers.models.ibert import IBertForMaskedLM

    cfg = transformers.IBertConfig(vocab_size=128, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=256, max_position_embeddings=80, quant_mode=True)
    with tempfile.TemporaryDirectory() as d:
        transformers.IBertForMaskedLM(cfg).save_pretrained(d)
        model = IBertForMaskedLM.from_pretrained(d).eval()
    ids = torch.randint(3, 128, (2, 32))
    with torch.no_grad():
        with runtime.use_backend("torch"):
            model.calibrate([{"input_ids": ids}])
        with runtime.use_backend("triton"):
            model(ids)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--filter", default="", help="only the plan steps whose name matches this regex")
    parser.add_argument("--json", help="write the compiled variants (kernel, blocks, shared, regs, spill) here")
    args = parser.parse_args(argv)
    lowering_mode()
    from tritonformers import runtime

    print(f"triton {triton.__version__}, torch {torch.__version__}: lowering for sm_90", flush=True)
    failures = []
    with runtime.use_backend("triton"):
        for name, thunk in _plan():
            if not re.search(args.filter, name):
                continue
            t = time.time()
            print(f"== {name}", flush=True)
            try:
                thunk()
            except Exception as e:  # report every failing step, not only the first
                failures.append(name)
                traceback.print_exc()
                print(f"FAILED: {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            print(f"   ({time.time() - t:.1f}s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "variants": list(COMPILED.values()),
                       "rejected_configs": REJECTED}, f, indent=1)
    spilled = [r for r in COMPILED.values() if r["spill"]]
    print(f"{len(COMPILED)} kernel variants compiled; {len(REJECTED)} autotune configs rejected for resources; "
          f"{len(spilled)} variants spill ({', '.join(sorted({r['kernel'] for r in spilled})) or 'none'})")
    if failures:
        print("FAILED:", ", ".join(failures))
        return 1
    print("ALL COMPILED")
    return 0


if __name__ == "__main__":
    sys.exit(main())

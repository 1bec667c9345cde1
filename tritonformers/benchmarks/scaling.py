"""Time and peak memory of Reformer's attention modules against sequence length (DESIGN.md's scaling plot).

``python -m tritonformers.benchmarks.scaling [--out DIR] [--max-tokens N] [--kinds local lsh]`` times
forward+backward of one LocalSelfAttention / LSHSelfAttention layer (hidden 1024, 8 heads of 128, fp16;
chunk 128 local / 256 LSH with 2 hash rounds) for N = 4K, 8K, ... up to 512K tokens, ours against
transformers' module with the same weights, HF as far as it fits (an out-of-memory row records the error).
Writes ``reformer-scaling-<device>-<date>.json`` and a PNG (time and memory against N, log-log).
On a machine without CUDA it runs N = 256..1024 and says the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _config(kind: str, n: int):
    from transformers import ReformerConfig
    return ReformerConfig(hidden_size=1024, num_attention_heads=8, attention_head_size=128, is_decoder=False,
                          local_attn_chunk_length=128, local_num_chunks_before=1, local_num_chunks_after=0,
                          local_attention_probs_dropout_prob=0.0, lsh_attn_chunk_length=256, num_hashes=2,
                          num_buckets=max(2, 2 * n // 256), hash_seed=1234, lsh_attention_probs_dropout_prob=0.0,
                          max_position_embeddings=n)


def _modules(kind: str, n: int, device, dtype):
    import tritonformers.nn as tnn
    from transformers.models.reformer import modeling_reformer as hf
    cfg = _config(kind, n)
    name = "LocalSelfAttention" if kind == "local" else "LSHSelfAttention"
    theirs = getattr(hf, name)(cfg, layer_idx=0).to(device, dtype)
    ours = getattr(tnn, name)(cfg, layer_idx=0).to(device, dtype)
    ours.load_state_dict(theirs.state_dict())
    return {"tritonformers": ours, "hf_eager": theirs}


def _measure(module, x, dout, cuda: bool) -> dict:
    def step():
        x.grad = None
        module(x).hidden_states.backward(dout)
    if cuda:
        import triton.testing
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = triton.testing.do_bench(step, warmup=5, rep=40, return_mode="median")
        return {"fwd_bwd_ms": ms, "peak_mib": peak}
    step()
    start = time.perf_counter()
    step()
    return {"fwd_bwd_ms": (time.perf_counter() - start) * 1e3, "peak_mib": None}


def run(out_dir: Path, max_tokens: int, kinds: list[str]) -> Path:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    lengths = [2**p for p in range(12, 20) if 2**p <= max_tokens] if cuda else [256, 512, 1024]
    rows = []
    for kind in kinds:
        failed = set()
        for n in lengths:
            torch.manual_seed(0)
            x = torch.randn(1, n, 1024, device=device, dtype=dtype, requires_grad=True)
            dout = torch.randn(1, n, 1024, device=device, dtype=dtype)
            for impl, module in _modules(kind, n, device, dtype).items():
                row = {"kind": kind, "impl": impl, "N": n, "dtype": str(dtype).replace("torch.", "")}
                if impl in failed:
                    row["error"] = "skipped: ran out of memory at a shorter length"
                else:
                    try:
                        row.update(_measure(module, x, dout, cuda))
                    except torch.OutOfMemoryError as exc:
                        failed.add(impl)
                        row["error"] = f"OutOfMemoryError: {str(exc).splitlines()[0]}"
                    finally:
                        if cuda:
                            torch.cuda.empty_cache()
                rows.append(row)
                print(row, flush=True)
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in device_name.lower()).strip("-")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"reformer-scaling-{slug}-{time.strftime('%Y%m%d-%H%M')}"
    result = {"device": device_name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
              "note": None if cuda else "No CUDA device: tiny lengths, the numbers mean nothing", "results": rows}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    _plot(rows, stem.with_suffix(".png"), device_name)
    print(f"wrote {stem}.json / .png")
    return stem.with_suffix(".json")


def _plot(rows: list[dict], path: Path, device: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'tritonformers[bench]')")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (kind, impl) in sorted({(r["kind"], r["impl"]) for r in rows}):
        pts = [r for r in rows if r["kind"] == kind and r["impl"] == impl and "fwd_bwd_ms" in r]
        for ax, key in zip(axes, ("fwd_bwd_ms", "peak_mib")):
            xs = [r["N"] for r in pts if r.get(key) is not None]
            ys = [r[key] for r in pts if r.get(key) is not None]
            if xs:
                ax.plot(xs, ys, marker="o", label=f"{kind} {impl}")
    for ax, label in zip(axes, ("forward+backward ms", "peak MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"Reformer attention layer, hidden 1024, 8x128 heads ({device})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--max-tokens", type=int, default=2**19)
    parser.add_argument("--kinds", nargs="+", default=["local", "lsh"], choices=["local", "lsh"])
    args = parser.parse_args(argv)
    run(args.out, args.max_tokens, args.kinds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Derived figures (rates, fractions of the ceiling, speed-ups) and the result files: JSON, markdown, PNG."""

from __future__ import annotations

import json
import math
import os
from datetime import datetime
from typing import Any, Callable

import torch

# DESIGN.md's result keys (beside case, impl, dtype and the shape fields); each is a number or null
METRIC_KEYS = ("fwd_ms", "fwd_bwd_ms", "peak_mib", "tokens_per_s", "tflops", "tops", "tbps", "frac_of_ceiling")
PASSES = ("fwd", "fwd_bwd")


def _rate(count: float | None, ms: float | None) -> float | None:
    """count per second, in units of 1e12 (TFLOP/s, TOPS, TB/s)."""
    if count is None or ms is None or ms <= 0:
        return None
    return count / (ms * 1e-3) / 1e12


def _frac(value: float | None, ceiling: float | None) -> float | None:
    return None if value is None or not ceiling else value / ceiling


def add_rates(row: dict, case, shape: dict, dtype: torch.dtype, ceilings: dict) -> None:
    """Per-pass and headline rates of a row; the headline is forward+backward where it was timed."""
    flops = case.flops(shape) if case.flops else None
    nbytes = case.bytes(shape, dtype) if case.bytes else None
    unit = "tops" if case.int_ops else "tflops"
    compute_ceiling = ceilings.get("int8_tops") if case.int_ops else ceilings.get("bf16_tflops")
    for p in PASSES:
        ms = row.get(f"{p}_ms")
        row[f"{p}_{unit}"] = _rate(getattr(flops, p) if flops else None, ms)
        row[f"{p}_tbps"] = _rate(getattr(nbytes, p) if nbytes else None, ms)
        if case.bound == "memory":
            row[f"{p}_frac_of_ceiling"] = _frac(row[f"{p}_tbps"], ceilings.get("copy_tbps"))
        else:
            row[f"{p}_frac_of_ceiling"] = _frac(row[f"{p}_{unit}"], compute_ceiling)
    basis = "fwd_bwd" if row.get("fwd_bwd_ms") is not None else ("fwd" if row.get("fwd_ms") is not None else None)
    row["rate_basis"] = basis
    row["bound"] = case.bound
    if basis is None:
        return
    row[unit] = row[f"{basis}_{unit}"]
    row["tbps"] = row[f"{basis}_tbps"]
    row["frac_of_ceiling"] = row[f"{basis}_frac_of_ceiling"]
    if case.tokens is not None:
        row["tokens_per_s"] = case.tokens(shape) / (row[f"{basis}_ms"] * 1e-3)


def add_ratios(rows: list[dict]) -> None:
    """On our row: each baseline's time (and peak memory) over ours, per pass (> 1 means ours is better)."""
    ours = next((r for r in rows if r["impl"] == "tritonformers"), None)
    if ours is None or ours.get("error"):
        return
    ratios = {}
    for other in rows:
        if other is ours or other.get("error") or other.get("skipped"):
            continue
        entry = {}
        for key, name in (("fwd_ms", "fwd"), ("fwd_bwd_ms", "fwd_bwd"), ("peak_mib", "peak")):
            a, b = ours.get(key), other.get(key)
            entry[name] = b / a if a and b is not None else None
        ratios[other["impl"]] = entry
    ours["speedup"] = ratios


def clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become null, dtypes and devices strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


# ------------------------------------------------------------------------------------------- text

def fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    if pct:
        return f"{100 * x:.0f}%"
    ax = abs(x)
    if ax >= 100:
        return f"{x:,.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _shape_text(row: dict, shape_keys: list[str]) -> str:
    parts = [row["variant"]] if row.get("variant") else []
    parts += [f"{k}={row[k]}" for k in shape_keys]
    return " ".join(parts)


def _speedup_text(row: dict) -> str:
    out = []
    for name, r in (row.get("speedup") or {}).items():
        value = r.get("fwd_bwd") if r.get("fwd_bwd") is not None else r.get("fwd")
        text = f"{fmt(value)}x {name}"
        if r.get("peak") is not None and row.get("peak_mib"):
            text += f" (mem {fmt(r['peak'])}x)"
        out.append(text)
    return ", ".join(out)


def _check_text(row: dict) -> str:
    if row.get("skipped"):
        return f"skipped ({row['skipped']})"
    if row.get("error"):
        return "error: " + row["error"].replace("|", "/")[:160]
    if row.get("matches_baseline") is None:
        return row.get("check_note") or ""
    verdict = "ok" if row["matches_baseline"] else "MISMATCH"
    err = row.get("max_rel_err")
    detail = f"rel {fmt(err)}" if err is not None else "other shapes or non-finite"
    return f"{verdict} vs {row['checked_against']} ({detail})"


def summary(row: dict) -> str:
    """One line for progress output."""
    if row.get("skipped"):
        return f"skipped ({row['skipped']})"
    if row.get("error"):
        return f"error: {row['error']}"
    text = f"fwd {fmt(row.get('fwd_ms'))} ms, fwd+bwd {fmt(row.get('fwd_bwd_ms'))} ms"
    if row.get("matches_baseline") is False:
        text += f"  {_check_text(row)}"
    return text


def _shape_keys(row: dict) -> list[str]:
    known = set(METRIC_KEYS) | {"case", "variant", "impl", "dtype", "backend", "matches_baseline", "checked_against",
                                "max_rel_err", "check_note", "error", "skipped", "speedup", "rate_basis", "bound", "op"}
    return [k for k, v in row.items()
            if k not in known and not k.startswith(("fwd_", "fwd_bwd_")) and isinstance(v, int)]


def markdown(data: dict) -> str:
    """The results as a markdown table with a header naming the device, versions and ceilings."""
    c = data.get("ceilings") or {}
    lines = [f"### Benchmarks: {data['device']}", "",
             f"torch {data['torch']}, triton {data['triton']}, transformers {data['transformers']}, {data['date']}. "
             f"Ceilings: copy {fmt(c.get('copy_tbps'))} TB/s, bf16 matmul {fmt(c.get('bf16_tflops'))} TFLOP/s. "
             f"Timing: {data['timing']}. Rates and % of ceiling are for fwd+bwd where timed; "
             "speed-up = baseline time / ours (fwd+bwd), mem = baseline peak / ours.", ""]
    if data.get("note"):
        lines += [f"> **{data['note']}**", ""]
    if data.get("interrupted"):
        lines += ["> **Interrupted: only the cases that finished are listed.**", ""]
    lines += ["| case | shape | dtype | impl | fwd ms | fwd+bwd ms | peak MiB | TFLOP/s (TOPS int) | TB/s | % ceiling "
              "| speed-up | check |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for row in data["results"]:
        rate = row.get("tflops") if row.get("tflops") is not None else row.get("tops")
        lines.append("| " + " | ".join([
            row["case"], _shape_text(row, _shape_keys(row)), row["dtype"], row["impl"], fmt(row.get("fwd_ms")),
            fmt(row.get("fwd_bwd_ms")), fmt(row.get("peak_mib")), fmt(rate), fmt(row.get("tbps")),
            fmt(row.get("frac_of_ceiling"), pct=True), _speedup_text(row), _check_text(row)]) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- files

def plot(data: dict, path: str) -> str | None:
    """Bar chart of fwd and fwd+bwd ms per case x impl (log scale); returns why not when it writes none."""
    if not any(r.get("fwd_ms") is not None for r in data["results"]):
        return "no timed rows: no plot written"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'tritonformers[bench]'): no plot written"
    rows = [r for r in data["results"] if r.get("fwd_ms") is not None]
    labels = [f"{r['case']}{'/' + r['variant'] if r.get('variant') else ''}\n{r['impl']}" for r in rows]
    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows) + 2), 5.5))
    width = 0.4
    fwd = [r["fwd_ms"] for r in rows]
    bwd = [r["fwd_bwd_ms"] if r.get("fwd_bwd_ms") is not None else float("nan") for r in rows]
    ax.bar([i - width / 2 for i in x], fwd, width, label="fwd")
    ax.bar([i + width / 2 for i in x], bwd, width, label="fwd+bwd")
    ax.set_yscale("log")
    ax.set_ylabel("median ms (log scale)")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    title = f"tritonformers benchmarks: {data['device']}"
    if data.get("note"):
        title += "\n" + data["note"].split(";")[0]
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def result_stem(out_dir: str, slug: str) -> str:
    """``<out_dir>/<slug>-<YYYYMMDD-HHMM>`` (with ``-2``, ``-3``... if a run of the same minute exists)."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"{slug}-{datetime.now().strftime('%Y%m%d-%H%M')}")
    stem, n = base, 2
    while os.path.exists(stem + ".json"):
        stem, n = f"{base}-{n}", n + 1
    return stem


def write_tables(data: dict, stem: str) -> str:
    """Write ``stem.json`` and ``stem.md`` (also after each case, so a killed run leaves its rows); return the table."""
    with open(stem + ".json", "w") as f:
        json.dump(clean(data), f, indent=1, allow_nan=False)
        f.write("\n")
    table = markdown(data)
    with open(stem + ".md", "w") as f:
        f.write(table)
    return table


def write_all(data: dict, stem: str, echo: Callable[[str], None] = print) -> dict:
    """Write the JSON, the markdown table and the plot; print the table and the paths; return the paths."""
    paths = {"json_path": stem + ".json", "md_path": stem + ".md", "png_path": stem + ".png"}
    table = write_tables(data, stem)
    echo("")
    echo(table)
    why_not = plot(data, paths["png_path"])
    if why_not:
        echo(why_not)
        paths["png_path"] = None
    for key in ("json_path", "md_path", "png_path"):
        if paths[key]:
            echo(f"wrote {paths[key]}")
    return paths

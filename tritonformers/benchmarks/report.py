"""Derived figures (rates, fractions of the ceiling, speed-ups) and the result files: JSON, markdown, PNG."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import textwrap
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
    if case.int_ops:
        compute_ceiling = ceilings.get("int8_tops")
    else:
        compute_ceiling = ceilings.get("fp32_tflops" if dtype == torch.float32 else "bf16_tflops")
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
             f"Ceilings: copy {fmt(c.get('copy_tbps'))} TB/s, bf16 matmul {fmt(c.get('bf16_tflops'))} TFLOP/s, "
             f"float32 matmul {fmt(c.get('fp32_tflops'))} TFLOP/s (the ceiling of float32 cases). "
             f"Shapes: {data.get('shapes') or 'not recorded'}. Timing: {data['timing']}. "
             "Rates and % of ceiling are for fwd+bwd where timed; "
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

PLOT_COLUMNS = 4  # panels per row: 4 x 4 inches keeps the figure 16 inches wide, readable scaled to a screen
PLOT_DPI = 110
_FASTER, _SLOWER, _MISSING = "#2a9d8f", "#e76f51", "#777777"
_TICKS = [b * 10.0**e for e in range(-3, 4) for b in (1, 2, 5)]


@dataclasses.dataclass
class Bar:
    """One peer in a speed-up panel: ``ratio`` = peer time / ours (None: not timed, ``why`` says so)."""

    peer: str
    ratio: float | None
    basis: str | None  # "fwd+bwd" or "fwd": the pass the ratio is of
    compared: bool  # False: timed but not checked against ours (another function, a training step)
    why: str | None = None


@dataclasses.dataclass
class Panel:
    """One case of the plot: its id, the shape line under it, and the bars of its peers (or why there are none)."""

    case_id: str
    subtitle: str
    bars: list[Bar]
    why: str | None = None  # ours has no time (error, skipped): no bars
    ours_ms: float | None = None  # our median time of the pass the bars are of


def _case_groups(rows: list[dict]) -> list[list[dict]]:
    """The rows of each case (case + variant), in the order the cases ran."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["case"], row.get("variant")), []).append(row)
    return list(groups.values())


def _bar(ours: dict, row: dict) -> Bar:
    compared = not (row.get("check_note") or "").startswith("not compared")
    if row.get("skipped"):
        return Bar(row["impl"], None, None, compared, f"skipped: {row['skipped']}")
    if row.get("error"):
        return Bar(row["impl"], None, None, compared, "error")
    entry = (ours.get("speedup") or {}).get(row["impl"]) or {}
    for key, basis in (("fwd_bwd", "fwd+bwd"), ("fwd", "fwd")):
        if entry.get(key) is not None:
            return Bar(row["impl"], entry[key], basis, compared)
    return Bar(row["impl"], None, None, compared, "not timed")


def speedup_panels(data: dict) -> list[Panel]:
    """One :class:`Panel` per case of ``data["results"]``: ours against each other impl of the case, as
    speed-up = peer median time / ours (forward+backward where both were timed, else forward); > 1 means ours
    is faster."""
    panels = []
    for rows in _case_groups(data["results"]):
        first = rows[0]
        case_id = first["case"] + (f"/{first['variant']}" if first.get("variant") else "")
        subtitle = " ".join(f"{k}={first[k]}" for k in _shape_keys(first)) + f" {first['dtype']}"
        ours = next((r for r in rows if r["impl"] == "tritonformers"), None)
        if ours is None:
            panels.append(Panel(case_id, subtitle, [], "no tritonformers row"))
            continue
        why = (f"tritonformers skipped ({ours['skipped']})" if ours.get("skipped")
               else "tritonformers failed (see the table)" if ours.get("error")
               else "tritonformers not timed" if ours.get("fwd_ms") is None else None)
        bars = [] if why else [_bar(ours, r) for r in rows if r is not ours]
        ms = ours.get("fwd_bwd_ms") if ours.get("fwd_bwd_ms") is not None else ours.get("fwd_ms")
        panels.append(Panel(case_id, subtitle, bars, why or (None if bars else "no baseline"), ms))
    return panels


def _draw_panel(ax, panel: Panel, slots: int) -> None:
    """Horizontal log-scale bars from 1x to each peer's speed-up, a line at 1x, the value at the bar's end;
    ``slots`` bar positions at least, so bars are equally thick in every panel."""
    from matplotlib.transforms import blended_transform_factory

    # the shape line of an LM case is long: two lines of at most 46 characters fit a 4-inch panel
    shape = textwrap.fill(textwrap.shorten(panel.subtitle, 92, placeholder=" ..."), 46)
    ax.set_title(f"{panel.case_id}\n{shape}", fontsize=8)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=1)
    if panel.why:
        ax.text(0.5, 0.5, panel.why, transform=ax.transAxes, ha="center", va="center", fontsize=9, color=_MISSING)
        ax.set_xlim(0.5, 2)
        ax.set_yticks([])
    ratios = [b.ratio for b in panel.bars if b.ratio is not None]
    lo, hi = min(ratios + [1.0]) / 1.5, max(ratios + [1.0]) * 3  # room for the value labels right of the bars
    bases = {b.basis for b in panel.bars if b.basis}
    right_edge = blended_transform_factory(ax.transAxes, ax.transData)  # x in axes fractions, y in bar slots
    for y, bar in enumerate(panel.bars):
        if bar.ratio is None:  # no bar: why, at the right edge inside the panel
            ax.text(0.97, y, bar.why, transform=right_edge, va="center", ha="right", fontsize=8, color=_MISSING,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})  # readable over the 1x line
            continue
        color = _FASTER if bar.ratio >= 1 else _SLOWER
        ax.barh(y, bar.ratio - 1.0, left=1.0, height=0.6, color=color)
        label = f"{bar.ratio:.3g}x" + (f" {bar.basis}" if len(bases) > 1 else "")
        # right of the bar's end, or right of the 1x line for a bar to its left: never over the peer names
        ax.text(max(bar.ratio, 1.0) * 1.08, y, label, va="center", ha="left", fontsize=8)
    if panel.bars:
        ax.set_yticks(range(len(panel.bars)))
        ax.set_yticklabels([b.peer + ("" if b.compared else " *") for b in panel.bars], fontsize=9)
        ax.set_ylim(max(len(panel.bars), slots) - 0.5, -0.5)  # first peer on top
        ax.set_xlim(lo, hi)
        ax.set_xlabel(f"speed-up, {'/'.join(sorted(bases)) or '-'} (ours {fmt(panel.ours_ms)} ms)", fontsize=8)
    _times_axis(ax)


def _times_axis(ax) -> None:
    """x ticks at 1-2-5 steps labelled ``2x``, inside the limits (log axes default to decades only)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    lo, hi = ax.get_xlim()
    ax.xaxis.set_major_locator(FixedLocator([t for t in _TICKS if lo <= t <= hi]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.tick_params(axis="x", labelsize=8)


def speedup_figure(data: dict):
    """The matplotlib figure of :func:`speedup_panels`: a grid of :data:`PLOT_COLUMNS` panels per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = speedup_panels(data)
    cols = min(PLOT_COLUMNS, len(panels))
    rows = math.ceil(len(panels) / cols)
    most = max([len(p.bars) for p in panels] + [1])
    panel_h = 1.4 + 0.28 * most  # title and axis, then one bar height per peer of the fullest panel
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, panel_h * rows + 1.2), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        _draw_panel(ax, panel, slots=min(most, 3))
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    title = (f"tritonformers speed-up over each peer (peer time / ours; right of 1x: ours faster): "
             f"{data['device']}, {data['date'][:16].replace('T', ' ')}")
    if data.get("note"):
        title += "\n" + data["note"].split(";")[0]
    if data.get("interrupted"):
        title += " (interrupted: finished cases only)"
    fig.suptitle(title, fontsize=11)
    fig.text(0.5, 0.005, "* timed but not checked against ours (computes another function, or a training step); "
             "fwd+bwd where timed, else fwd", ha="center", va="bottom", fontsize=8, color=_MISSING)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return fig


def plot(data: dict, path: str) -> str | None:
    """PNG of :func:`speedup_figure` (one panel per case); returns why not when it writes none."""
    if not any(r.get("fwd_ms") is not None for r in data["results"]):
        return "no timed rows: no plot written"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install 'tritonformers[bench]'): no plot written"
    import matplotlib.pyplot as plt
    fig = speedup_figure(data)
    fig.savefig(path, dpi=PLOT_DPI)
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

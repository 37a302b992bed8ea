"""PNG plots of latency tables: one layer's table as a heatmap over (c_in, c_out), and
predicted vs measured latency as a scatter. matplotlib is imported lazily (optional extra
`plots`); nothing else in latprune needs it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from latprune.types import InputError


def _save(fig, plt, out: Path) -> None:
    """Write the PNG; a folder that does not exist (or cannot be written) is a clear error."""
    try:
        fig.savefig(out, dpi=110)
    except OSError as exc:
        raise InputError(f"{out}: cannot write the PNG ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise InputError("plots need matplotlib: pip install 'latprune[plots]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def layer_heatmap(table, layer, in_values: list[int], out_values: list[int], out: Path, title: str = "") -> dict:
    """Heatmap (PNG at `out`) of the table's latency (ms) for `layer` over in_values × out_values
    (interpolated where not measured); measured cells are marked with dots."""
    plt = _pyplot()
    from latprune.lut.predict import layer_ms

    sig = layer.spec.signature()
    ms = np.array([[layer_ms(table, layer, ci, co) for co in out_values] for ci in in_values])
    measured = table.cells(sig)
    fig, ax = plt.subplots(figsize=(7, 5.5))
    im = ax.imshow(ms, origin="lower", aspect="auto", cmap="viridis",
                   extent=(-0.5, len(out_values) - 0.5, -0.5, len(in_values) - 0.5))
    fig.colorbar(im, ax=ax, label="latency (ms)")
    pts = [(out_values.index(co), in_values.index(ci)) for ci, row in measured.items() for co, _ in row
           if ci in in_values and co in out_values]
    if pts:
        xs, ys = zip(*pts)
        ax.scatter(xs, ys, s=14, c="white", edgecolors="black", linewidths=0.5, label="measured")
        ax.legend(loc="upper left", fontsize=8)
    _ticks(ax.set_xticks, ax.set_xticklabels, out_values)
    _ticks(ax.set_yticks, ax.set_yticklabels, in_values)
    ax.set_xlabel("output channels" if not layer.spec.depthwise else "channels")
    ax.set_ylabel("input channels")
    ax.set_title(title or f"{layer.name}: {layer.spec.op} {'x'.join(map(str, layer.spec.kernel))}", fontsize=10)
    fig.tight_layout()
    _save(fig, plt, out)
    return {"png": str(out), "cells_shown": int(ms.size), "cells_measured": len(pts),
            "min_ms": float(ms.min()), "max_ms": float(ms.max())}


def _ticks(set_ticks, set_labels, values: list[int], most: int = 12) -> None:
    step = max(1, int(np.ceil(len(values) / most)))
    idx = list(range(0, len(values), step))
    set_ticks(idx)
    set_labels([str(values[i]) for i in idx], fontsize=8)


def scatter_points(path: Path) -> list[tuple[str, float, float]]:
    """(label, predicted ms, measured ms) from a report.json (its re-solve rounds) or from
    bench/lut_fidelity.py's JSON (every configuration, in-graph calibrated prediction)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable JSON file ({exc})") from None
    points: list[tuple[str, float, float]] = []
    if isinstance(data, dict) and isinstance(data.get("rounds"), list):  # report.json
        label = Path(str(data.get("model", path))).stem
        for r in data["rounds"]:
            if isinstance(r, dict) and _num(r.get("predicted_ms")) and _num(r.get("measured_ms")):
                points.append((label, float(r["predicted_ms"]), float(r["measured_ms"])))
    elif isinstance(data, dict) and isinstance(data.get("whole_model"), list):  # the fidelity bench
        for m in data["whole_model"]:
            configs = m.get("configs") if isinstance(m, dict) else None
            for c in configs if isinstance(configs, list) else []:
                pred = c.get("in-graph_calibrated_ms") if isinstance(c, dict) else None
                if _num(pred) and _num(c.get("measured_ms")):
                    points.append((str(m.get("model")), float(pred), float(c["measured_ms"])))
    if not points:
        raise InputError(f"{path}: no predicted/measured pairs (expected a report.json with rounds "
                         "or the JSON of bench/lut_fidelity.py)")
    return points


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v > 0


def scatter(points: list[tuple[str, float, float]], out: Path, title: str = "predicted vs measured") -> dict:
    """Scatter (PNG at `out`) of predicted against measured latency (ms), one colour per label,
    with the y = x line and ±10% band. Returns the median and p95 absolute relative error."""
    plt = _pyplot()
    pred = np.array([p for _, p, _ in points])
    meas = np.array([m for _, _, m in points])
    err = np.abs(pred - meas) / meas
    fig, ax = plt.subplots(figsize=(6, 6))
    for label in dict.fromkeys(lbl for lbl, _, _ in points):
        sel = [i for i, (lbl, _, _) in enumerate(points) if lbl == label]
        ax.scatter(meas[sel], pred[sel], s=16, label=label)
    lo, hi = float(min(pred.min(), meas.min())) * 0.9, float(max(pred.max(), meas.max())) * 1.1
    xs = np.array([lo, hi])
    ax.plot(xs, xs, "k-", lw=0.8, label="y = x")
    ax.fill_between(xs, xs * 0.9, xs * 1.1, color="grey", alpha=0.15, label="±10%")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured (ms)")
    ax.set_ylabel("predicted (ms)")
    ax.set_title(f"{title}\nmedian |err| {100 * np.median(err):.1f}%, p95 {100 * np.percentile(err, 95):.1f}%",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, plt, out)
    return {"png": str(out), "points": len(points), "median_abs_err": float(np.median(err)),
            "p95_abs_err": float(np.percentile(err, 95)), "within_10pct": float(np.mean(err <= 0.1))}

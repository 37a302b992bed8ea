"""One self-contained HTML page for a pipeline `report.json`: summary table, inline SVG charts,
rounds, layers and warnings. No external CSS/JS/fonts, no network. All latencies are in ms.

Every string taken from the report is passed through `html.escape` (layer names and model paths
come from user uploads). Any key may be missing or None; it renders as "—".
"""
from __future__ import annotations

import math
import os
import tempfile
from html import escape
from pathlib import Path

DASH = "—"
_CSS = ("body{font:14px system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}.ok{color:#1a7f37}.bad{color:#c62828}"
        "svg text{font:12px system-ui,sans-serif}")
_COLORS = {"dense": "#9e9e9e", "predicted": "#1976d2", "measured": "#2e7d32", "removed": "#c62828"}


def _num(v) -> float | None:
    """A finite float, or None for missing/non-numeric/NaN values (bools are not numbers)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _e(v) -> str:
    """Escaped text of any value; "—" for None."""
    return DASH if v is None else escape(str(v))


def _f(v, fmt: str = "{:.3f}") -> str:
    n = _num(v)
    return DASH if n is None else escape(fmt.format(n))


def _d(v) -> dict:
    return v if isinstance(v, dict) else {}


def _l(v) -> list:
    return v if isinstance(v, list) else []


def _table(head: list[str], rows: list[list[str]], left: int = 1) -> str:
    """A table whose cells are already-escaped HTML; the first `left` columns are left-aligned."""
    cls = lambda i: ' class="l"' if i < left else ""
    out = ["<table><tr>" + "".join(f"<th{cls(i)}>{h}</th>" for i, h in enumerate(head)) + "</tr>"]
    out += ["<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows]
    return "\n".join(out) + "</table>"


def _latency_svg(report: dict) -> str:
    """Horizontal bars for dense / predicted / measured ms; the budget (ms) as a vertical line."""
    bars = [(k, _num(report.get(f"{k}_ms"))) for k in ("dense", "predicted", "measured")]
    bars = [(k, v) for k, v in bars if v is not None and v >= 0]
    budget = _num(report.get("budget_ms"))
    top = max([v for _, v in bars] + ([budget] if budget and budget > 0 else []), default=0.0)
    if top <= 0:
        return "<p>No latency figures to chart.</p>"
    x0, w, bh = 90, 480, 22
    height = 20 + bh * 1.5 * max(len(bars), 1) + 10
    sx = lambda v: x0 + w * v / top
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{x0 + w + 110}" height="{height:.0f}" '
             'role="img" aria-label="latency: dense, budget, predicted, measured">']
    for i, (k, v) in enumerate(bars):
        y = 20 + i * bh * 1.5
        parts.append(f'<text x="{x0 - 6}" y="{y + 15}" text-anchor="end">{k}</text>'
                     f'<rect x="{x0}" y="{y}" width="{sx(v) - x0:.1f}" height="{bh}" fill="{_COLORS[k]}"/>'
                     f'<text x="{sx(v) + 4:.1f}" y="{y + 15}">{_f(v)} ms</text>')
    if budget is not None and budget > 0:
        parts.append(f'<line x1="{sx(budget):.1f}" x2="{sx(budget):.1f}" y1="12" y2="{height - 4:.0f}" '
                     f'stroke="#c62828" stroke-width="2" stroke-dasharray="5,3"/>'
                     f'<text x="{sx(budget):.1f}" y="10" text-anchor="middle" fill="#c62828">'
                     f'budget {_f(budget)} ms</text>')
    return "".join(parts) + "</svg>"


def _layers_svg(layers: list) -> str:
    """Per layer a pair of horizontal bars: dense ms (grey) and predicted ms (blue); removed
    layers are labelled and drawn in red."""
    rows = [(_d(layer), _num(_d(layer).get("dense_ms")) or 0.0, _num(_d(layer).get("predicted_ms")) or 0.0)
            for layer in layers]
    top = max([max(a, b) for _, a, b in rows], default=0.0)
    if top <= 0:
        return "<p>No per-layer latencies to chart.</p>"
    x0, w, bh, gap = 220, 460, 8, 6
    height = 24 + len(rows) * (2 * bh + gap)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{x0 + w + 110}" height="{height}" '
             'role="img" aria-label="per-layer latency, dense vs predicted">',
             f'<rect x="{x0}" y="4" width="10" height="10" fill="{_COLORS["dense"]}"/>'
             f'<text x="{x0 + 14}" y="13">dense ms</text>'
             f'<rect x="{x0 + 90}" y="4" width="10" height="10" fill="{_COLORS["predicted"]}"/>'
             f'<text x="{x0 + 104}" y="13">predicted ms</text>']
    for i, (layer, dense, pred) in enumerate(rows):
        y = 22 + i * (2 * bh + gap)
        removed = bool(layer.get("removed"))
        name = str(layer.get("name", DASH))
        name = name if len(name) <= 32 else name[:31] + "…"
        label = escape(name) + (" (removed)" if removed else "")
        fill = _COLORS["removed"] if removed else _COLORS["predicted"]
        text_fill = fill if removed else "#222"
        parts.append(f'<text x="{x0 - 6}" y="{y + bh + 4}" text-anchor="end" fill="{text_fill}">{label}</text>'
                     f'<rect x="{x0}" y="{y}" width="{w * dense / top:.1f}" height="{bh}" '
                     f'fill="{_COLORS["dense"]}"/>'
                     f'<rect x="{x0}" y="{y + bh}" width="{w * pred / top:.1f}" height="{bh}" fill="{fill}"/>'
                     f'<text x="{x0 + w * max(dense, pred) / top + 4:.1f}" y="{y + bh + 4}">'
                     f'{_f(dense)} → {_f(pred)}</text>')
    return "".join(parts) + "</svg>"


def render_report_html(report: dict, plan: dict | None = None) -> str:
    """The whole page as a string. `report` is a `report.json` dict (latencies in ms; any key may
    be missing), `plan` an optional `plan.json` dict (group widths, removed blocks)."""
    r, plan = _d(report), _d(plan)
    solver, device, budget = _d(r.get("solver")), _d(r.get("device")), _d(r.get("budget"))
    model = r.get("model")
    meets = r.get("meets_budget")
    verdict = ('<span class="ok">meets the budget</span>' if meets is True else
               '<span class="bad">misses the budget</span>' if meets is False else "budget verdict " + DASH)
    err = _num(r.get("prediction_error"))
    dev = device.get("cpu") or device.get("device") or device.get("name")
    summary = [["dense ms", _f(r.get("dense_ms"))], ["budget ms", _f(r.get("budget_ms"))],
               ["predicted ms", _f(r.get("predicted_ms"))], ["measured ms", _f(r.get("measured_ms"))],
               ["measured p90 ms", _f(r.get("measured_p90_ms"))], ["speedup", _f(r.get("speedup"), "{:.2f}×")],
               ["prediction error", DASH if err is None else escape(f"{100 * err:+.1f} %")],
               ["solver method", _e(solver.get("method"))],
               ["solver seconds", _f(solver.get("seconds"), "{:.2f}")],
               ["solver status", _e(solver.get("status"))], ["device", _e(dev)],
               ["wall seconds", _f(r.get("wall_seconds"), "{:.1f}")]]
    if budget:
        summary[1:1] = [[f"budget ({_e(budget.get('kind'))})",
                         f"{_f(budget.get('ratio'), '{:g}')}× of {_f(budget.get('dense'), '{:.4g}')}: limit "
                         f"{_f(budget.get('limit'), '{:.4g}')}, achieved {_f(budget.get('achieved'), '{:.4g}')} "
                         f"{_e(budget.get('unit'))}"]]
    groups, blocks = _d(r.get("groups")), _d(r.get("blocks"))
    n_removed = len(_l(blocks.get("removed"))) if "removed" in blocks else None
    summary += [["groups pruned / prunable / total",
                 " / ".join(_e(groups.get(k)) for k in ("pruned", "prunable", "total"))],
                ["blocks removed / removable", f"{_e(n_removed)} / {_e(blocks.get('removable'))}"]]
    rounds = [_d(x) for x in _l(r.get("rounds"))]
    round_rows = [[_e(x.get("round")), _f(x.get("target_ms")), _f(x.get("predicted_ms")), _f(x.get("measured_ms")),
                   _f(x.get("budget_ms")), _e(x.get("status"))] for x in rounds]
    layers = [_d(x) for x in _l(r.get("layers"))]
    layer_rows = [[_e(x.get("name")), _e(x.get("op")), _e(x.get("block")), "yes" if x.get("removed") else "",
                   f"{_e(x.get('dense_c_in'))}→{_e(x.get('c_in'))}",
                   f"{_e(x.get('dense_c_out'))}→{_e(x.get('c_out'))}",
                   _f(x.get("dense_ms")), _f(x.get("predicted_ms"))] for x in layers]
    warnings = [str(w) for w in _l(r.get("warnings"))]
    body = [f"<h1>latprune report: {_e(model)}</h1>", f"<p>Verdict: <b>{verdict}</b></p>",
            "<h2>Summary</h2>", _table(["", "value"], summary),
            "<h2>Latency: dense, budget, predicted, measured</h2>", _latency_svg(r)]
    if warnings:
        body += ["<h2>Warnings</h2><ul>", *(f"<li>{escape(w)}</li>" for w in warnings), "</ul>"]
    if layers:
        body += ["<h2>Per-layer latency (ms)</h2>", _layers_svg(layers)]
    if round_rows:
        body += ["<h2>Rounds</h2>", _table(["round", "target ms", "predicted ms", "measured ms", "budget ms",
                                            "status"], round_rows, left=0)]
    if layer_rows:
        body += ["<h2>Layers</h2>", _table(["name", "op", "block", "removed", "c_in dense→pruned",
                                            "c_out dense→pruned", "dense ms", "predicted ms"], layer_rows, left=2)]
    widths, gone = _d(plan.get("widths")), _l(plan.get("removed_blocks"))
    if widths or gone:
        listed = ", ".join(f"{_e(k)}: {_e(v)}" for k, v in widths.items()) or DASH
        body += ["<h2>Plan</h2>", f"<p>group widths: {listed}; removed blocks: "
                 f"{', '.join(_e(b) for b in gone) or 'none'}</p>"]
    if device:
        body += ["<h2>Device</h2>", _table(["key", "value"], [[_e(k), _e(v)] for k, v in device.items()], left=2)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>latprune: {_e(model)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_report_html(out_dir: Path, report: dict, plan: dict | None = None) -> Path:
    """Write `out_dir/report.html` atomically (temp file in `out_dir`, then os.replace)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".report-", suffix=".html.partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(render_report_html(report, plan))
        os.replace(tmp, out_dir / "report.html")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_dir / "report.html"

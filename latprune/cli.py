"""The `latprune` command line (typer + rich). Contract: ../ARCHITECTURE.md.

Bad input exits with code 2 and one line on stderr; nothing is half-written.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn
from rich.table import Table

from latprune.options import help_text
from latprune.types import LatpruneError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Latency-budgeted pruning of ONNX CNNs, measured on the device.")
err = Console(stderr=True)


def _fail(exc: Exception) -> None:
    msg = " ".join(str(exc).split())
    err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


class _RichProgress:
    """pipeline.Progress rendered on stderr with rich (stages, a bar with an ETA).

    Shown when stderr is a terminal (or with --progress), so that scripts reading stderr see
    exactly one line on bad input."""

    def __init__(self, quiet: bool = False, force: bool | None = None) -> None:
        self.quiet = quiet or (force is False) or (force is None and not err.is_terminal)
        self.bar: RichProgress | None = None
        self.task = None

    def stage(self, name: str) -> None:
        self._close()
        if not self.quiet:
            err.print(f"[cyan]•[/] {name}")

    def advance(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            self.bar = RichProgress(TextColumn("  cells"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                    TimeRemainingColumn(), console=err, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("", total=total)
        self.bar.update(self.task, completed=done)
        if done >= total:
            self._close()

    def info(self, message: str) -> None:
        if not self.quiet:
            err.print(f"  [yellow]{message}[/]")

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


CPUS_OPTION = typer.Option(None, "--cpus", help="pin this process and its timing processes to these "
                           "CPUs, e.g. 0 or 0,2-3 (default: no pinning)")


def _pin(cpus: Optional[str]) -> None:
    """Pin the process to the CPUs in `cpus` ('0,2-3'); child processes inherit it."""
    if not cpus:
        return
    wanted: set[int] = set()
    try:
        for part in cpus.split(","):
            lo, _, hi = part.strip().partition("-")
            wanted |= set(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise LatpruneError(f"--cpus {cpus!r}: expected CPU numbers like 0 or 0,2-3") from None
    allowed = os.sched_getaffinity(0)
    if not wanted or not wanted <= allowed:
        raise LatpruneError(f"--cpus {cpus!r}: this process may use CPUs {sorted(allowed)} only")
    os.sched_setaffinity(0, wanted)


TIMING_OPTION = typer.Option("in-graph", "--timing", help="how table cells are timed: in-graph "
                           "(kernels inside pruned copies of the model, the runtime's profiler) | isolated (one-layer models)")
BACKEND_OPTION = typer.Option("ort-cpu", "--backend", help="target runtime: ort-cpu (ONNX Runtime) | openvino | "
                              "ort-cuda | ort-trt | trt (TensorRT); tables are kept apart per backend")
PRECISION_OPTION = typer.Option(None, "--precision", help=help_text("precision"))


@app.command()
def optimize(
    model: Path = typer.Argument(..., help="ONNX model to prune"),
    out: Path = typer.Option(..., "--out", help="output folder: pruned.onnx, plan.json, report.json, report.html"),
    budget_ms: Optional[float] = typer.Option(None, "--budget-ms", help=help_text("budget_ms")),
    speedup: Optional[float] = typer.Option(None, "--speedup", help=help_text("speedup")),
    device: str = typer.Option("cpu", "--device", help="target device (cpu: this machine; the backend picks the runtime)"),
    backend: str = BACKEND_OPTION,
    precision: Optional[str] = PRECISION_OPTION,
    threads: int = typer.Option(1, "--threads", help=help_text("threads")),
    lut: Optional[Path] = typer.Option(None, "--lut", help="latency table (SQLite); default ~/.cache/latprune/lut.sqlite"),
    timing: str = TIMING_OPTION,
    cpus: Optional[str] = CPUS_OPTION,
    flops_ratio: Optional[float] = typer.Option(None, "--flops-ratio", help=help_text("flops_ratio")),
    params_ratio: Optional[float] = typer.Option(None, "--params-ratio", help=help_text("params_ratio")),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration inputs: FILE.npz (array x: float model "
                                        "inputs, or uint8 NHWC images) or 'noise' (zero-data mode)"),
    calib_samples: int = typer.Option(256, "--calib-samples", help=help_text("calib_samples")),
    method: str = typer.Option("milp", "--method", help=help_text("method")),
    objective: str = typer.Option("auto", "--objective", help=help_text("objective")),
    importance: str = typer.Option("l1", "--importance", help=help_text("importance")),
    distortion: str = typer.Option("forward", "--distortion", help=help_text("distortion")),
    repair: str = typer.Option("auto", "--repair", help=help_text("repair")),
    recover_steps: Optional[int] = typer.Option(None, "--recover-steps", help=help_text("recover_steps")),
    recover_seconds: float = typer.Option(600.0, "--recover-seconds", help=help_text("recover_seconds")),
    step: Optional[int] = typer.Option(None, "--step", help=help_text("step")),
    max_candidates: int = typer.Option(16, "--max-candidates", help=help_text("max_candidates")),
    remove_blocks: str = typer.Option("auto", "--remove-blocks", help=help_text("remove_blocks")),
    rounds: int = typer.Option(4, "--rounds", help=help_text("rounds")),
    prune_streams: str = typer.Option("auto", "--prune-streams", help=help_text("prune_streams")),
    sequence_length: Optional[int] = typer.Option(None, "--sequence-length", help=help_text("sequence_length")),
    time_limit: float = typer.Option(60.0, "--time-limit", help=help_text("time_limit_s")),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress and no summary table"),
    show_progress: Optional[bool] = typer.Option(None, "--progress/--no-progress",
                                                 help="progress on stderr (default: when it is a terminal)"),
) -> None:
    """Prune MODEL to meet a latency budget measured on this device."""
    from latprune.pipeline import OptimizeOptions, optimize as run

    try:
        if device != "cpu":
            raise LatpruneError(f"--device {device}: only 'cpu' (this machine) is available; "
                                "choose the runtime with --backend")
        _pin(cpus)
        opts = OptimizeOptions.from_flags(budget_ms=budget_ms, speedup=speedup, threads=threads, lut_path=lut,
                               backend=backend, precision=precision,
                               method=method, step=step, max_candidates=max_candidates,
                               remove_blocks=remove_blocks, rounds=rounds, prune_streams=prune_streams,
                               sequence_length=sequence_length,
                               time_limit_s=time_limit, importance=importance, objective=objective,
                               distortion=distortion, calib=calib, calib_samples=calib_samples,
                               repair=repair, recover_steps=recover_steps, recover_seconds=recover_seconds, flops_ratio=flops_ratio,
                               params_ratio=params_ratio, timing=timing)
        report = run(model, out, opts, _RichProgress(quiet, show_progress))
    except LatpruneError as exc:
        _fail(exc)
        return
    if not quiet:
        t = Table(title=f"latprune: {model.name}")
        for col in ("dense ms", "budget ms", "predicted ms", "measured ms", "speedup", "solver", "solve s"):
            t.add_column(col, justify="right")
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731 (count budgets have no ms)
        t.add_row(f"{report['dense_ms']:.3f}", fmt(report['budget_ms']), fmt(report['predicted_ms']),
                  f"{report['measured_ms']:.3f}", f"{report['speedup']:.2f}×", report["solver"]["method"],
                  f"{report['solver']['seconds']:.2f}")
        err.print(t)
        for w in report["warnings"]:
            err.print(f"[yellow]warning:[/] {w}")
        if report.get("budget_use_note"):
            err.print(f"note: {report['budget_use_note']}")
        extra = [a for a in report.get("backend", {}).get("artifacts", []) if a != "pruned.onnx"]
        err.print(f"wrote {out}/pruned.onnx, {', '.join(extra + ['plan.json', 'report.json', 'report.html'])}")
    if not report["meets_budget"]:
        raise typer.Exit(3)


@app.command()
def measure(
    model: Path = typer.Argument(...),
    threads: int = typer.Option(1, "--threads"),
    backend: str = BACKEND_OPTION,
    precision: Optional[str] = PRECISION_OPTION,
    cpus: Optional[str] = CPUS_OPTION,
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Median and p90 end-to-end latency of MODEL on the backend (default ONNX Runtime, this CPU)."""
    from latprune.pipeline import make_backend
    from latprune.pruner.model_io import load_model

    try:
        if threads < 1:
            raise LatpruneError(f"--threads must be at least 1, not {threads}")
        _pin(cpus)
        load_model(model)
        runtime = make_backend(backend, threads, precision)
        stats = runtime.measure(model.read_bytes())
    except LatpruneError as exc:
        _fail(exc)
        return
    except Exception as exc:  # the runtime refusing a checked model (unsupported op, ...)
        _fail(LatpruneError(f"{model}: {backend} cannot run it: {str(exc).strip().splitlines()[0]}"))
        return
    out = {"median_ms": stats.median_ms, "p90_ms": stats.p90_ms, "runs": stats.runs}
    print(json.dumps(out) if as_json else f"median {stats.median_ms:.3f} ms, p90 {stats.p90_ms:.3f} ms over {stats.runs} runs")


@app.command()
def predict(
    model: Path = typer.Argument(...),
    lut: Optional[Path] = typer.Option(None, "--lut"),
    threads: int = typer.Option(1, "--threads"),
    backend: str = BACKEND_OPTION,
    precision: Optional[str] = PRECISION_OPTION,
    timing: str = TIMING_OPTION,
    sequence_length: Optional[int] = typer.Option(None, "--sequence-length", help=help_text("sequence_length")),
    like: Optional[Path] = typer.Option(None, "--like", help="the dense model MODEL was pruned from (by any "
                                        "tool): its calibration applies"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Predicted latency of MODEL from the latency table (any model the table covers, at any
    widths), with a band and which layers were interpolated or extrapolated."""
    from latprune.pipeline import predict_model

    try:
        out = predict_model(model, lut, threads, timing, backend, precision, sequence_length, like)
    except LatpruneError as exc:
        _fail(exc)
        return
    if as_json:
        print(json.dumps(out))
        return
    lo, hi = out["band_ms"]
    cells = out["cells"]
    print(f"predicted {out['predicted_ms']:.3f} ms (band {lo:.3f}-{hi:.3f} ms)"
          + ("" if out["calibrated"] else " (uncalibrated: sum of layers; run latprune profile)"))
    print(f"layers: {cells['measured']} measured, {cells['interpolated']} interpolated, "
          f"{cells['extrapolated']} extrapolated, {cells['modelled']} from the other regime x the probed penalty")
    reorders = out["layout_reorders"]
    if reorders["ms"] > 0:
        print(f"layout reorders: {reorders['ms']:.3f} ms " + (
            f"({reorders['count']} in the runtime's compiled graph, {reorders['melements']:.2f} M elements)"
            if reorders["from"] == "graph" else "(modelled from the blocking rules)"))
    outside = out["outside_kernels"]
    if outside is not None:
        print(f"other kernels outside the layers: {outside['ms']:.3f} ms ({outside['count']} in the compiled graph, "
              f"priced by operator and layout)" + (f"; never timed: {', '.join(outside['unpriced_classes'])}"
                                                    if outside["unpriced_classes"] else ""))
    for line in out["extrapolated_layers"][:10]:
        print(f"  outside the table: {line}")
    if out["extrapolated_layers"]:
        print(f"  measure them: latprune profile {model}" + (f" --lut {lut}" if lut else ""))


@app.command()
def profile(
    model: Path = typer.Argument(...),
    lut: Optional[Path] = typer.Option(None, "--lut"),
    device: str = typer.Option("cpu", "--device"),
    backend: str = BACKEND_OPTION,
    precision: Optional[str] = PRECISION_OPTION,
    threads: int = typer.Option(1, "--threads"),
    points: int = typer.Option(5, "--points", help="measured widths per axis of each layer"),
    timing: str = TIMING_OPTION,
    cpus: Optional[str] = CPUS_OPTION,
    passes: int = typer.Option(1, "--passes", help="in-graph: measure every cell in this many "
                               "different runs and keep the median"),
    refine: bool = typer.Option(False, "--refine/--no-refine", help="also measure widths between grid "
                                "widths where interpolation misses the measured cells by more than 5%"),
    sequence_length: Optional[int] = typer.Option(None, "--sequence-length", help=help_text("sequence_length")),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    show_progress: Optional[bool] = typer.Option(None, "--progress/--no-progress"),
) -> None:
    """Measure the table cells MODEL needs (only those missing; with --refine also where
    latency bends between grid widths) and calibrate."""
    from latprune.pipeline import profile_model

    try:
        if device != "cpu":
            raise LatpruneError(f"--device {device}: only 'cpu' is available; choose the runtime with --backend")
        _pin(cpus)
        out = profile_model(model, lut, threads, points, _RichProgress(quiet, show_progress), timing, passes,
                            refine, backend, precision, sequence_length=sequence_length)
    except LatpruneError as exc:
        _fail(exc)
        return
    print(json.dumps(out))


lut_app = typer.Typer(no_args_is_help=True, help="Inspect and exchange latency tables.")
app.add_typer(lut_app, name="lut")


@lut_app.command("show")
def lut_show(lut: Path = typer.Argument(..., help="SQLite latency table"),
             as_json: bool = typer.Option(False, "--json")) -> None:
    """Fingerprints in the table with their signature, cell and calibration counts."""
    from latprune.lut.exchange import summary

    try:
        rows = summary(lut)
    except LatpruneError as exc:
        _fail(exc)
        return
    if as_json:
        print(json.dumps(rows))
        return
    t = Table(title=str(lut))
    for col in ("device", "runtime", "threads", "layer signatures", "cells", "calibration points"):
        t.add_column(col)
    for r in rows:
        fp = r["fingerprint"]
        t.add_row(str(fp.get("cpu", fp.get("gpu", fp.get("device")))), str(fp.get("runtime")), str(fp.get("threads")),
                  str(r["signatures"]), str(r["cells"]), str(r["calibration_points"]))
    Console().print(t)
    for r in rows:
        print(f"channel blocking: {r['blocking']}")


@lut_app.command("export")
def lut_export(lut: Path = typer.Argument(...), out: Path = typer.Option(..., "--out", help="JSON file")) -> None:
    """Write the table in the documented JSON exchange format (lut/exchange.py)."""
    from latprune.lut.exchange import export_tables

    try:
        data = export_tables(lut)
    except LatpruneError as exc:
        _fail(exc)
        return
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(out)
    print(json.dumps({"tables": len(data["tables"]), "cells": sum(len(t["cells"]) for t in data["tables"])}))


@lut_app.command("import")
def lut_import(lut: Path = typer.Argument(..., help="SQLite table to merge into (created if missing)"),
               src: Path = typer.Argument(..., help="JSON file from `latprune lut export`")) -> None:
    """Merge a JSON export into the table (same fingerprint: samples combined)."""
    from latprune.lut.exchange import import_tables

    try:
        try:
            data = json.loads(src.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LatpruneError(f"{src}: not a JSON table export ({exc})") from None
        print(json.dumps(import_tables(lut, data)))
    except LatpruneError as exc:
        _fail(exc)


@lut_app.command("merge")
def lut_merge(lut: Path = typer.Argument(..., help="destination SQLite table"),
              sources: list[Path] = typer.Argument(..., help="SQLite tables from other machines")) -> None:
    """Merge tables: same fingerprint combines samples, different fingerprints stay apart."""
    from latprune.lut.exchange import merge_files

    try:
        print(json.dumps(merge_files(lut, sources)))
    except LatpruneError as exc:
        _fail(exc)


@lut_app.command("coverage")
def lut_coverage(lut: Path = typer.Argument(..., help="SQLite latency table"),
                 model: Path = typer.Option(..., "--model", help="ONNX model"),
                 points: int = typer.Option(5, "--points", help="grid widths per axis (as profile --points)"),
                 threads: int = typer.Option(1, "--threads"),
                 backend: str = BACKEND_OPTION,
                 precision: Optional[str] = PRECISION_OPTION,
                 timing: str = TIMING_OPTION,
                 as_json: bool = typer.Option(False, "--json")) -> None:
    """Which of MODEL's layers and grid cells the table holds (exit 1 when a layer cannot be predicted)."""
    from latprune.lut.predict import coverage
    from latprune.pipeline import make_backend, open_table, prepare

    try:
        if points < 1:
            raise LatpruneError(f"--points must be at least 1, not {points}")
        _existing_table(lut)
        runtime = make_backend(backend, threads, precision)
        _, _, analysis = prepare(model, backend=runtime)
        table = open_table(lut, runtime, timing)
        try:
            res = coverage(analysis.problem, table, points)
        finally:
            table.close()
    except LatpruneError as exc:
        _fail(exc)
        return
    if as_json:
        print(json.dumps(res))
    else:
        t = Table(title=f"{lut} ({timing}) for {model.name}: {res['measured']}/{res['grid_cells']} grid cells")
        for col in ("layer", "op", "grid cells", "measured", "predictable"):
            t.add_column(col)
        for r in res["layers"]:
            op = f"{r['op']} {'x'.join(map(str, r['kernel']))}{' dw' if r['depthwise'] else ''}"
            t.add_row(r["layer"], op, str(r["grid_cells"]), str(r["measured"]), "yes" if r["predictable"] else "[red]no[/]")
        Console().print(t)
    if res["unpredictable_layers"]:
        raise typer.Exit(1)


@lut_app.command("validate")
def lut_validate(lut: Path = typer.Argument(...)) -> None:
    """Check every cell (exit 1 on errors); warn about latencies that fall as widths grow."""
    from latprune.lut.exchange import validate_file

    try:
        res = validate_file(lut)
    except LatpruneError as exc:
        _fail(exc)
        return
    print(json.dumps({"fingerprints": res["fingerprints"], "cells": res["cells"],
                      "errors": len(res["errors"]), "warnings": len(res["warnings"])}))
    for e in res["errors"][:20]:
        err.print(f"[red]error:[/] {e}", highlight=False)
    for w in res["warnings"][:20]:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    if res["errors"]:
        raise typer.Exit(1)


def _existing_table(lut: Path) -> None:
    if not lut.is_file():
        raise LatpruneError(f"{lut}: no such latency table (latprune profile MODEL --lut {lut} makes one)")


@lut_app.command("heatmap")
def lut_heatmap(lut: Path = typer.Argument(..., help="SQLite latency table"),
                model: Path = typer.Option(..., "--model", help="ONNX model whose layer to show"),
                layer: Optional[str] = typer.Option(None, "--layer", help="node name of the layer "
                                                    "(default: the slowest layer at dense widths)"),
                out: Path = typer.Option(Path("heatmap.png"), "--out", help="PNG file"),
                threads: int = typer.Option(1, "--threads"),
                backend: str = BACKEND_OPTION,
                precision: Optional[str] = PRECISION_OPTION,
                timing: str = TIMING_OPTION) -> None:
    """PNG heatmap of one layer's latency table over its (c_in, c_out) candidate widths."""
    from latprune.lut.plots import layer_heatmap
    from latprune.lut.predict import layer_ms, space_values
    from latprune.pipeline import make_backend, open_table, prepare

    try:
        _existing_table(lut)
        runtime = make_backend(backend, threads, precision)
        _, _, analysis = prepare(model, backend=runtime)
        prob = analysis.problem
        table = open_table(lut, runtime, timing)
        try:
            covered = [ly for ly in prob.layers if table.cells(ly.spec.signature())]
            if not covered:
                raise LatpruneError(f"the table has no cells for any layer of {model}; run: latprune profile "
                                    f"{model} --lut {lut} --timing {timing}")
            if layer is None:
                dense = {g.id: g.size for g in prob.groups}
                chosen = max(covered, key=lambda ly: layer_ms(table, ly, ly.c_in.width(dense), ly.c_out.width(dense)))
            else:
                named = [ly for ly in prob.layers if ly.name == layer]
                if not named:
                    raise LatpruneError(f"{model} has no prunable conv/gemm layer named {layer!r} "
                                        f"(e.g. {', '.join(ly.name for ly in prob.layers[:3])})")
                chosen = named[0]
                if chosen not in covered:
                    raise LatpruneError(f"the table has no cells for layer {layer!r}; run latprune profile first")
            ins = space_values(prob, chosen.c_in)
            outs = ins if chosen.spec.depthwise else space_values(prob, chosen.c_out)
            res = layer_heatmap(table, chosen, ins, outs, out)
        finally:
            table.close()
    except LatpruneError as exc:
        _fail(exc)
        return
    print(json.dumps({"layer": chosen.name, **res}))


@lut_app.command("scatter")
def lut_scatter(sources: list[Path] = typer.Argument(..., help="report.json files (their re-solve rounds) "
                                                     "or bench/out/lut_fidelity.json"),
                out: Path = typer.Option(Path("scatter.png"), "--out", help="PNG file")) -> None:
    """PNG scatter of predicted vs measured latency, with the error summary."""
    from latprune.lut.plots import scatter, scatter_points

    try:
        points = [p for src in sources for p in scatter_points(src)]
        print(json.dumps(scatter(points, out)))
    except LatpruneError as exc:
        _fail(exc)


@app.command("demo-model")
def demo_model(out: Path = typer.Argument(Path("runs/demo.onnx"), help="where to write the ONNX file")) -> None:
    """Write a small ResNet-style demo CNN (3×64×64 input) to try the pipeline on."""
    from latprune.demo import build_demo_model

    print(build_demo_model(out))


# ---- the HTTP service (service/) ------------------------------------------------------------
@contextlib.contextmanager
def _database_errors():
    """The service database unreachable or broken: one line and exit 2, not a traceback."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except SQLAlchemyError as exc:
        _fail(ValueError(f"service database: {str(exc).splitlines()[0]}"))


token_app = typer.Typer(no_args_is_help=True, help="API tokens of the HTTP service (hashed at rest).")
app.add_typer(token_app, name="token")


@app.command()
def serve(host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0 in a container)"),
          port: int = typer.Option(8000, help="TCP port"),
          log_level: str = typer.Option("info", help="uvicorn log level")) -> None:
    """Run the HTTP service (FastAPI + uvicorn): OpenAPI at /openapi.json, routes under /v1.

    Configured by LATPRUNE_* environment variables (service/settings.py): LATPRUNE_HOME (default
    ~/.cache/latprune), LATPRUNE_DATABASE_URL (default SQLite under HOME), LATPRUNE_EXECUTOR
    (inprocess | celery), LATPRUNE_WORKERS, LATPRUNE_MAX_UPLOAD_MB, ..."""
    import uvicorn

    from latprune.service.app import create_app
    from latprune.service.settings import get_settings

    settings = get_settings()
    err.print(f"latprune service on http://{host}:{port} (database {settings.db_url.split('@')[-1]}, "
              f"executor {settings.executor}); create a token with: latprune token create NAME")
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)


@token_app.command("create")
def token_create(user: str = typer.Argument(..., help="user name (created if new)"),
                 role: str = typer.Option("user", help="user, or agent (may register devices and upload tables)")) -> None:
    """Create an API token and print it (shown once; only its SHA-256 is stored)."""
    from latprune.service.auth import create_token
    from latprune.service.db import session_scope
    from latprune.service.settings import get_settings

    if role not in ("user", "agent"):
        _fail(ValueError(f"--role must be user or agent, not {role!r}"))
    if not 0 < len(user) <= 100:
        _fail(ValueError("the user name must be 1 to 100 characters"))
    with _database_errors():
        with session_scope(get_settings().db_url) as session:
            print(create_token(session, user, role))


@token_app.command("list")
def token_list() -> None:
    """Tokens: id, user, role, first characters, created, revoked."""
    from sqlalchemy import select

    from latprune.service.db import Token, User, session_scope
    from latprune.service.settings import get_settings

    table = Table("id", "user", "role", "starts with", "revoked")
    with _database_errors(), session_scope(get_settings().db_url) as session:
        for tok, name in session.execute(select(Token, User.name).join(User, User.id == Token.user_id)):
            table.add_row(tok.id, name, tok.role, tok.prefix + "…", "yes" if tok.revoked else "")
    Console().print(table)


@token_app.command("revoke")
def token_revoke(token_id: str = typer.Argument(..., help="token id or its first characters (token list)")) -> None:
    """Revoke a token: requests with it get 401 from now on."""
    from latprune.service.auth import revoke_token
    from latprune.service.db import session_scope
    from latprune.service.settings import get_settings

    with _database_errors(), session_scope(get_settings().db_url) as session:
        n = revoke_token(session, token_id)
    if n == 0:
        _fail(ValueError(f"no token {token_id!r}"))
    print(f"revoked {n} token(s)")


# ---- the device farm: Celery agents, beat and the nightly re-profile (service/agent.py) -----
def _farm_settings():
    from latprune.service.settings import Settings

    try:
        return Settings()
    except ValueError as exc:  # pydantic: a LATPRUNE_* variable of the wrong type
        _fail(ValueError(f"settings: {' '.join(str(exc).split())}"))


@contextlib.contextmanager
def _farm_errors():
    """Database, broker and input errors of the farm commands: one line and exit 2."""
    from kombu.exceptions import OperationalError

    with _database_errors():
        try:
            yield
        except OperationalError as exc:
            _fail(ValueError(f"broker (LATPRUNE_REDIS_URL): {exc}"))
        except (LatpruneError, ValueError) as exc:
            _fail(exc)


@app.command()
def agent(
    device: str = typer.Option(..., "--device", help="this device's name; its jobs come from queue device.NAME"),
    concurrency: int = typer.Option(1, "--concurrency", min=1, max=64,
                                    help="jobs at once (more than 1 makes concurrent timings noisy)"),
    loglevel: str = typer.Option("info", "--loglevel", help="Celery log level"),
    backend: Optional[str] = typer.Option(None, "--backend",
                                          help="ort-cpu | openvino | trt | ort-cuda | ort-trt (default: trt when TensorRT works here, else ort-cpu)"),
) -> None:
    """Run this machine as farm device NAME: a Celery worker that runs the device's jobs.

    The agent shares the API server's database (LATPRUNE_DATABASE_URL, e.g. a PostgreSQL URL)
    and data dir (LATPRUNE_DATA_DIR: a shared volume holding models, artifacts and latency
    tables), and takes job ids from Redis (LATPRUNE_REDIS_URL). On start it registers the device
    (executor celery, this machine's fingerprint), requeues jobs whose worker died and re-sends
    lost queue messages. SIGTERM hands a running job back to the queue and stops."""
    from latprune.service.agent import run_agent

    settings = _farm_settings()
    with _farm_errors():
        run_agent(settings, device, concurrency=concurrency, loglevel=loglevel, backend=backend)


@app.command()
def beat(loglevel: str = typer.Option("info", "--loglevel", help="Celery log level")) -> None:
    """Run the farm's scheduler (celery beat in a worker on queue `latprune`; run one per farm).

    Queues the nightly re-profile of every device at 02:00 (LATPRUNE_NIGHTLY_CRON="MINUTE HOUR"
    changes it; LATPRUNE_TIMEZONE sets the zone, default the host's). Schedule state:
    LATPRUNE_HOME/celerybeat-schedule. Without beat, use cron: `0 2 * * * latprune nightly`."""
    from latprune.service.agent import run_beat

    settings = _farm_settings()
    with _farm_errors():
        run_beat(settings, loglevel=loglevel)


@app.command()
def nightly() -> None:
    """Queue the nightly re-profile once (the cron alternative to `latprune beat`).

    One reprofile job per device that has a latency table (unless one is queued or running
    already), and the queue messages of older queued jobs that were lost are sent again. Prints
    {"queued": [job ids], "skipped": {device: reason}, "resent": [...], "unsent": [...]}.
    Crontab line:  0 2 * * * latprune nightly"""
    from latprune.service.agent import queue_nightly

    settings = _farm_settings()
    with _farm_errors():
        out = queue_nightly(settings)
    err.print(f"queued {len(out['queued'])} reprofile job(s)", highlight=False)
    print(json.dumps(out))


@app.command()
def finetune(
    model: str = typer.Option("resnet56", "--model", help="resnet20 | resnet56 (trained weights from the data "
                              "folder) or a .pt/.th state dict of a CIFAR ResNet (depth read from its keys)"),
    out: Path = typer.Option(..., "--out", help="output folder: pruned.onnx, plan.json, report.json"),
    speedup: Optional[float] = typer.Option(None, "--speedup", help=help_text("speedup")),
    budget_ms: Optional[float] = typer.Option(None, "--budget-ms", help=help_text("budget_ms")),
    method: str = typer.Option("oneshot", "--method", help="oneshot (zero at once, then fine-tune; the "
                               "default: it beat DPM by 1.7-2.1 points on 156- and 780-step schedules) | dpm "
                               "(smooth decay) | dpm-sr (decay with self-rectifying swaps)"),
    epochs: float = typer.Option(2.0, "--epochs", help="fine-tuning epochs (fractions allowed)"),
    decay_steps: Optional[int] = typer.Option(None, "--decay-steps", help="DPM decay length N in optimizer "
                                              "steps (default: half of the training steps)"),
    rate_threshold: float = typer.Option(0.8, "--rate-threshold", help="dpm-sr: escape-rate threshold T_rate"),
    length_threshold: float = typer.Option(1.5, "--length-threshold", help="dpm-sr: gradient-length threshold T_len"),
    lr: float = typer.Option(0.01, "--lr", help="initial learning rate (cosine to 0)"),
    batch_size: int = typer.Option(128, "--batch-size"),
    seed: int = typer.Option(0, "--seed"),
    subset: Optional[int] = typer.Option(None, "--subset", help="train on this many images (balanced); default all 50,000"),
    test_limit: Optional[int] = typer.Option(None, "--test-limit", help="evaluate on this many test images; default all"),
    data: Optional[Path] = typer.Option(None, "--data", help="CIFAR data folder (default $LATPRUNE_DATA or ../shared/data)"),
    lut: Optional[Path] = typer.Option(None, "--lut", help="latency table (SQLite); default ~/.cache/latprune/lut.sqlite"),
    threads: int = typer.Option(1, "--threads", help=help_text("threads")),
    solver: str = typer.Option("milp", "--solver", help="plan solver, as optimize --method"),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration inputs for the distortion objective "
                                        "(as optimize --calib); default: 256 of the training images "
                                        "themselves; 'none': the magnitude prior"),
    distortion: str = typer.Option("forward", "--distortion", help="with --calib: forward | fisher"),
    step: Optional[int] = typer.Option(None, "--step", help="channel widths are multiples of STEP"),
    torch_threads: int = typer.Option(0, "--torch-threads", help="torch intra-op threads for training "
                                      "(0: torch's default)"),
    distill: float = typer.Option(0.5, "--distill", help="share (0-1) of the loss that is distillation from the "
                                  "dense model (KL divergence at temperature 4); 0: labels only (no teacher forward "
                                  "pass per step)"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    show_progress: Optional[bool] = typer.Option(None, "--progress/--no-progress"),
) -> None:
    """Prune a CIFAR ResNet (torch) to a latency budget and fine-tune it (one-shot or DPM).

    The plan comes from the optimize pipeline on the module's ONNX export (same latency tables,
    solvers and measurement); the module is fine-tuned at full width while the removed channels
    decay (pruner.dpm), then cut by ONNX surgery and measured. Writes pruned.onnx, plan.json (the
    final plan, after DPM swaps) and report.json (top-1 dense / one-shot / after, latency, swaps,
    history); exit 3 when the measured latency misses the budget, as optimize. Your own training
    loop: see the hook in latprune/pruner/dpm.py."""
    try:
        _run_finetune(model, out, speedup, budget_ms, method, epochs, decay_steps, rate_threshold,
                      length_threshold, lr, batch_size, seed, subset, test_limit, data, lut, threads,
                      solver, calib, distortion, step, torch_threads, quiet, show_progress, distill)
    except LatpruneError as exc:
        _fail(exc)


def _load_cifar_module(model: str, data: Optional[Path]):
    from latprune.models_cifar import cifar_resnet, load_cifar_resnet, load_state

    names = {"resnet20": 20, "resnet56": 56}
    if model in names:
        try:
            return load_cifar_resnet(names[model], data), model
        except FileNotFoundError as exc:
            raise LatpruneError(str(exc)) from None
    path = Path(model)
    if not path.is_file():
        raise LatpruneError(f"--model {model}: not resnet20, resnet56 or a state-dict file")
    try:
        state = load_state(path)
    except Exception as exc:  # torch.load refusing the file
        raise LatpruneError(f"{path}: not a torch state dict ({type(exc).__name__})") from None
    blocks = {k.split(".")[1] for k in state if k.startswith("layer1.")}
    try:
        module = cifar_resnet(6 * len(blocks) + 2)
        module.load_state_dict(state, strict=True)
    except (ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LatpruneError(f"{path}: not a CIFAR ResNet state dict: {first}") from None
    return module.eval(), path.stem


def _run_finetune(model, out, speedup, budget_ms, method, epochs, decay_steps, rate_threshold,
                  length_threshold, lr, batch_size, seed, subset, test_limit, data, lut, threads,
                  solver, calib, distortion, step, torch_threads, quiet, show_progress, distill=0.0) -> None:
    import shutil
    import tempfile
    import time

    try:
        import torch
    except ImportError:
        raise LatpruneError("latprune finetune needs PyTorch: pip install torch") from None
    import numpy as np

    from latprune.finetune import METHODS, cifar_test, data_dir, evaluate, finetune as run_finetune
    from latprune.finetune import load_train_images, normalise_images
    from latprune.pipeline import OptimizeOptions, check_options
    from latprune.profiler.compare import compare_in_subprocesses
    from latprune.pruner.model_io import save_model_atomic
    from latprune.pruner.torch_frontend import export_pruned, optimize_module

    wall0 = time.perf_counter()
    if method not in METHODS:
        raise LatpruneError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    if (speedup is None) == (budget_ms is None):
        raise LatpruneError("give exactly one budget: --speedup or --budget-ms")
    if epochs <= 0 or lr <= 0 or batch_size < 1 or (subset is not None and subset < 1):
        raise LatpruneError("--epochs, --lr, --batch-size and --subset must be positive")
    if decay_steps is not None and decay_steps < 1:
        raise LatpruneError(f"--decay-steps must be at least 1, not {decay_steps}")
    own_calib = calib is None  # plan from the training inputs the command holds (issue 16)
    if calib is not None and calib.lower() == "none":
        calib = None
    opts = OptimizeOptions.from_flags(budget_ms=budget_ms, speedup=speedup, threads=threads, lut_path=lut, method=solver,
                           step=step, calib=calib, distortion=distortion, repair="none",
                           measure_processes=2)
    check_options(opts)
    if torch_threads < 0:
        raise LatpruneError(f"--torch-threads must be at least 0, not {torch_threads}")
    if torch_threads:
        torch.set_num_threads(torch_threads)
    data = data_dir(data)
    progress = _RichProgress(quiet, show_progress)
    progress.stage(f"loading {model}")
    module, label = _load_cifar_module(model, data)
    x_test, y_test = cifar_test(test_limit, data)
    top1_dense = evaluate(module, x_test, y_test)
    example = torch.from_numpy(x_test[:1].copy())
    work = Path(tempfile.mkdtemp(prefix="latprune-finetune-"))
    try:
        if own_calib:
            progress.stage(f"taking {opts.calib_samples} training images as calibration inputs")
            x_cal, _ = load_train_images(opts.calib_samples, data, seed=seed + 1)
            np.savez(work / "calib.npz", x=normalise_images(x_cal))
            opts = opts.replace(calib=str(work / "calib.npz"), calib_label=f"{len(x_cal)} training images")
        graph, plan, opt_report = optimize_module(module, example, work / "plan", opts, progress,
                                                  output_names=["logits"])
        progress.stage(f"fine-tuning ({method}, {epochs:g} epochs) towards the plan")

        def log(rec: dict) -> None:
            progress.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))

        res = run_finetune(module, graph, plan, method, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                           subset=subset, decay_steps=decay_steps, rate_threshold=rate_threshold,
                           length_threshold=length_threshold, data=data, progress=log, log_every=100,
                           distill=distill)
        top1_masked = evaluate(module, x_test, y_test)
        progress.stage("cutting the channels (ONNX surgery) and measuring")
        pruned = export_pruned(graph, res.plan)
        save_model_atomic(pruned, work / "pruned.onnx")
        top1_onnx = _onnx_top1(work / "pruned.onnx", x_test, y_test)
        timed = compare_in_subprocesses({"dense": work / "plan" / "dense.onnx", "pruned": work / "pruned.onnx"},
                                        threads, processes=2)
        budget = budget_ms if budget_ms is not None else timed["dense"].median_ms / speedup
        pd = res.pruner
        report = {
            "model": label, "method": method, "distill": distill, "dense_ms": timed["dense"].median_ms,
            "budget_ms": budget,
            "predicted_ms": opt_report.get("predicted_ms"), "measured_ms": timed["pruned"].median_ms,
            "measured_p90_ms": timed["pruned"].p90_ms, "meets_budget": timed["pruned"].median_ms <= budget,
            "speedup": timed["dense"].median_ms / timed["pruned"].median_ms,
            "top1_dense": top1_dense, "top1_oneshot_no_finetune": None,
            "top1_after": top1_onnx, "top1_after_torch": top1_masked, "test_images": int(len(y_test)),
            "solver": opt_report.get("solver"), "scoring": opt_report.get("scoring"),
            "optimize": {k: opt_report.get(k) for k in (
                "dense_ms", "budget_ms", "predicted_ms", "measured_ms", "speedup", "groups", "blocks")},
            "finetune": {"epochs": epochs, "steps": res.total_steps, "decay_steps": res.decay_steps,
                         "lr": lr, "batch_size": batch_size, "seed": seed, "subset": subset,
                         "rate_threshold": rate_threshold if method == "dpm-sr" else None,
                         "length_threshold": length_threshold if method == "dpm-sr" else None,
                         "seconds": res.seconds},
            "swaps": [s.__dict__ for s in getattr(pd, "swaps", [])],
            "history": res.history, "threads": threads, "wall_seconds": time.perf_counter() - wall0,
        }
        report["top1_oneshot_no_finetune"] = _oneshot_top1(work / "plan" / "pruned.onnx", x_test, y_test)
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=".partial-"))
        try:
            shutil.copyfile(work / "pruned.onnx", tmp / "pruned.onnx")
            (tmp / "plan.json").write_text(res.plan.to_json())
            (tmp / "report.json").write_text(json.dumps(report, indent=1, default=float))
            for name in ("pruned.onnx", "plan.json", "report.json"):
                (tmp / name).replace(out / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not quiet:
        err.print(f"top-1 {top1_dense:.4f} dense -> {report['top1_after']:.4f} pruned ({method}); "
                  f"{report['measured_ms']:.3f} ms vs dense {report['dense_ms']:.3f} ms "
                  f"(budget {budget:.3f}); {len(report['swaps'])} swaps", highlight=False)
        err.print(f"wrote {out}/pruned.onnx, plan.json, report.json")
    if not report["meets_budget"]:
        raise typer.Exit(3)


def _onnx_top1(path: Path, x, y) -> float:
    """Top-1 of an ONNX classifier with a static batch-1 input, one image at a time."""
    from latprune.profiler.onnxrt import make_session

    sess = make_session(path.read_bytes(), 1)
    name = sess.get_inputs()[0].name
    correct = sum(int(sess.run(None, {name: x[i:i + 1]})[0].argmax() == y[i]) for i in range(len(x)))
    return correct / max(len(x), 1)


def _oneshot_top1(path: Path, x, y) -> float | None:
    """Top-1 of the pipeline's one-shot pruned model (no fine-tuning), for the report."""
    return _onnx_top1(path, x, y) if path.is_file() else None


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

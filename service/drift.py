"""Device latency tables in the service: uploads from agents and nightly re-profiles, each
compared with what the table held before (lut.drift) and recorded as a TableUpload row."""
from __future__ import annotations

import json
import sqlite3

from latprune.lut.drift import compare, even_sample, exchange_cells
from latprune.lut.exchange import export_tables, import_tables
from latprune.service.db import Device, TableUpload, now, session_scope
from latprune.service.settings import Settings
from latprune.service.storage import Storage
from latprune.types import InputError, LayerSpec


def _existing_cells(path) -> dict:
    return exchange_cells(export_tables(path)) if path.is_file() else {}


def merge_upload(settings: Settings, device: str, data: dict) -> dict:
    """Merge an uploaded lut.exchange object into the device's table; report drift against the
    cells the table already had. Raises InputError on an invalid object."""
    from latprune.lut.exchange import validate_object

    problems = validate_object(data)
    if problems:
        raise InputError(f"invalid table: {problems[0]} ({len(problems)} problem(s) in all)")
    path = Storage(settings.data_path).lut_path(device)
    old = _existing_cells(path)
    new = exchange_cells(data)
    drift = compare(old, new, settings.drift_threshold)
    counts = import_tables(path, data)
    _record(settings, device, "upload", len(new), drift)
    return {"cells": len(new), **counts, "drift": drift, "flagged": drift["flagged"]}


def _record(settings: Settings, device: str, source: str, cells: int, drift: dict) -> None:
    with session_scope(settings.db_url) as s:
        s.add(TableUpload(device=device, source=source, cells=cells, drift=drift, flagged=drift["flagged"]))
        dev = s.get(Device, device)
        if dev is not None and source == "nightly":
            dev.last_seen_at = now()


def reprofile_device(settings: Settings, device: str, options: dict, progress) -> dict:
    """Re-measure (up to options['max_cells'], default 200, evenly spread, per timing method)
    the cells of this machine's fingerprints in the device's table, replace their values, and report the drift.
    Cells timed alone are re-timed alone; in-graph cells are re-timed inside pruned copies of
    the models this device last profiled or optimised (up to 3; cells of no such model are
    left as they are). Runs on the device itself (in-process worker or its agent), through the
    device's backend."""
    from latprune.profiler.backends import get_backend
    from latprune.profiler.fingerprint import fingerprint_id
    from latprune.service.jobs import device_backend_name

    path = Storage(settings.data_path).lut_path(device)
    threads = int(options.get("threads") or 1)
    max_cells = int(options.get("max_cells") or 200)
    with session_scope(settings.db_url) as s:
        backend = get_backend(device_backend_name(s.get(Device, device)), threads=threads,
                              precision=options.get("precision"))
    backend.check()
    existing = _existing_cells(path)
    fps = {timing: backend.fingerprint(timing=timing) for timing in ("isolated", "in-graph")}
    old = {timing: {k: v for k, v in existing.items() if k[0] == fingerprint_id(fp)} for timing, fp in fps.items()}
    if not any(old.values()):
        fp = fps["in-graph"]
        raise InputError(f"device {device} has no table cells for this machine's fingerprint "
                         f"({fp['cpu']}, {fp['runtime']}, {threads} thread(s)) to re-profile")
    new: dict = {}
    try:
        if old["isolated"]:
            new.update(_retime_isolated(path, fps["isolated"], even_sample(old["isolated"], max_cells), progress,
                                        backend))
        if old["in-graph"]:
            new.update(_retime_in_graph(settings, device, path, fps["in-graph"],
                                        even_sample(old["in-graph"], max_cells), backend, progress))
    except sqlite3.DatabaseError as exc:
        raise InputError(f"the device table could not be written: {exc}") from None
    if not new:
        raise InputError(f"device {device}: none of its table cells could be re-timed (in-graph cells are "
                         "re-timed through the models of its last succeeded profile/optimize jobs; none is left)")
    old = {k: v for part in old.values() for k, v in part.items()}
    drift = compare(old, new, settings.drift_threshold)
    _record(settings, device, "nightly", len(new), drift)
    return {"cells": len(new), "drift": drift, "flagged": drift["flagged"]}


def _retime_isolated(path, fp: dict, keys: list, progress, backend) -> dict:
    from latprune.lut.store import LatencyTable

    progress.stage(f"re-profiling {len(keys)} cells one layer at a time")
    table = LatencyTable(path, fp)
    new = {}
    try:
        for i, key in enumerate(keys):
            _, sig, c_in, c_out = key
            stats = backend.time_layer(LayerSpec(**json.loads(sig)), c_in, c_out)
            table.put(sig, c_in, c_out, stats.median_ms, stats.runs)
            new[key] = stats.median_ms
            progress.advance(i + 1, len(keys))
    finally:
        table.close()
    return new


def _device_models(settings: Settings, device: str, limit: int = 3) -> list:
    """Files of the models this device's last succeeded profile/optimize jobs used (newest first)."""
    from latprune.service.db import Job

    storage = Storage(settings.data_path)
    paths: list = []
    with session_scope(settings.db_url) as s:
        rows = (s.query(Job.model_id).filter(Job.device == device, Job.state == "succeeded",
                                             Job.kind.in_(("profile", "optimize")), Job.model_id.isnot(None))
                .order_by(Job.finished_at.desc()).limit(50).all())
    for (model_id,) in rows:
        p = storage.model_path(model_id)
        if p.is_file() and p not in paths:
            paths.append(p)
    return paths[:limit]


def _retime_in_graph(settings: Settings, device: str, path, fp: dict, keys: list, backend, progress) -> dict:
    from latprune.ingraph_profile import measured_cells, profile_in_graph
    from latprune.lut.store import LatencyTable
    from latprune.pipeline import prepare

    wanted = {(sig, ci, co) for _, sig, ci, co in keys}
    fp_id = keys[0][0]
    table = LatencyTable(path, fp)
    new = {}
    try:
        for model_path in _device_models(settings, device):
            if not wanted:
                break
            try:
                _, _, analysis = prepare(model_path, backend=backend)
                specs = {layer.spec.signature(): layer.spec for layer in analysis.problem.layers}
                # this model's cells in the table, on the base grid or a refined one
                cells = [(specs[sig], ci, co) for sig, ci, co in sorted(wanted) if sig in specs]
                if not cells:
                    continue
                progress.stage(f"re-profiling {len(cells)} cells inside pruned copies of a model")
                _, runs = profile_in_graph(table, analysis, cells, backend, progress=progress.advance, remeasure=True)
            except sqlite3.DatabaseError:
                raise
            except Exception as exc:  # one unusable model must not lose the night's run
                progress.info(f"skipped a model: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
                continue
            asked = {(c[0].signature(), c[1], c[2]) for c in cells}
            for sig, ci, co in measured_cells(analysis.problem, runs) & asked:  # only what was re-timed
                value = dict(table.cells(sig).get(ci, [])).get(co)
                if value is not None:
                    new[(fp_id, sig, ci, co)] = value
                    wanted.discard((sig, ci, co))
    finally:
        table.close()
    return new

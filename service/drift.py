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
    """Re-measure (up to options['max_cells'], default 200, evenly spread) the cells of this
    machine's fingerprint in the device's table, replace their values, and report the drift.
    Runs on the device itself (in-process worker or its agent)."""
    from latprune.lut.store import LatencyTable
    from latprune.profiler.fingerprint import cpu_fingerprint, fingerprint_id
    from latprune.profiler.layers import measure_layer

    path = Storage(settings.data_path).lut_path(device)
    threads = int(options.get("threads") or 1)
    fp = cpu_fingerprint(threads=threads)
    fp_id = fingerprint_id(fp)
    old = {k: v for k, v in _existing_cells(path).items() if k[0] == fp_id}
    if not old:
        raise InputError(f"device {device} has no table cells for this machine's fingerprint "
                         f"({fp['cpu']}, {fp['runtime']}, {threads} thread(s)) to re-profile")
    keys = even_sample(old, int(options.get("max_cells") or 200))
    progress.stage(f"re-profiling {len(keys)} of {len(old)} cells")
    table = LatencyTable(path, fp)
    new = {}
    try:
        for i, key in enumerate(keys):
            _, sig, c_in, c_out = key
            stats = measure_layer(LayerSpec(**json.loads(sig)), c_in, c_out, threads)
            table.put(sig, c_in, c_out, stats.median_ms, stats.runs)
            new[key] = stats.median_ms
            progress.advance(i + 1, len(keys))
    except sqlite3.DatabaseError as exc:
        raise InputError(f"the device table could not be written: {exc}") from None
    finally:
        table.close()
    drift = compare(old, new, settings.drift_threshold)
    _record(settings, device, "nightly", len(new), drift)
    return {"cells": len(new), "drift": drift, "flagged": drift["flagged"]}

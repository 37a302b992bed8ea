"""Export, import, merge and validate latency tables (many fingerprints per SQLite file).

JSON exchange format (version 3), one object:

    {"format": "latprune-lut", "version": 3,
     "tables": [{"fingerprint": {...device fingerprint...},
                 "cells": [{"signature": {...LayerSpec fields...}, "c_in": 64, "c_out": 128,
                            "ms": 0.412, "runs": 40, "measured_at": 1795000000.0}, ...],
                 "calibration": [{"family": "ab12...", "raw_ms": 3.1, "melements": 2.4,
                                  "measured_ms": 3.4, "measured_at": 1795000000.0}, ...],
                 "blocking": [{"kind": "conv", "axis": "in", "align": 4, "block": 8,
                               "penalty": 1.45, "direct_below": 8, "direct": 1.1,
                               "direct_fixed": 0.1}, ...]}]}

`ms` is the median latency of one layer in milliseconds, `runs` the number of timed runs
behind it. A calibration point is one end-to-end measurement of a model of the `family`:
its layer sum `raw_ms`, the millions of elements its non-layer operators write `melements`,
and the measured median `measured_ms`. Two kinds of family carry in-graph profiling data in
the same shape: `<family>/in-graph-overhead` (layer sum and end-to-end time of one profile
run) and `in-graph-reference/<model hash>` (raw_ms = measured_ms = the dense model's kernel
time that the in-graph cells are scaled to). Merging combines cells of the same fingerprint
(median weighted by runs, runs added) and keeps different fingerprints apart.

`blocking` (version 2, issue 15) holds the device's channel-blocking rules per layer kind
(`kind` one of lut.blocking.KINDS, `axis` "in" or "out"; see lut/blocking.py): widths that are
multiples of `align` run the fast kernel at the width rounded up to `block`, others a fallback
kernel `penalty` times slower. Version 3 adds `direct_below`, `direct` and `direct_fixed`
(optional, default 0, 1 and 0): input widths under `direct_below` run a direct kernel on the
plain layout whose cost is a line reaching `direct` times the fast cost at the block, a share
`direct_fixed` of it fixed. Version 1 files (no rules) and
version 2 files (no direct kernel) are still read; an imported rule replaces the file's rule
of the same fingerprint, kind and axis.
"""
from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

from latprune.types import InputError, LayerSpec
from latprune.lut.blocking import AXES, KINDS
from latprune.lut.store import SCHEMA, blocking_records, insert_blocking, migrate_blocking

FORMAT = "latprune-lut"
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)


def _connect(path: str | Path, create: bool = False) -> sqlite3.Connection:
    path = Path(path)
    if not create and not path.is_file():
        raise InputError(f"{path}: no such latency table")
    try:
        db = sqlite3.connect(str(path), timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)
        migrate_blocking(db)
    except sqlite3.DatabaseError as exc:
        raise InputError(f"{path}: not a latency table ({exc})") from None
    return db


def export_tables(db_path: str | Path) -> dict:
    """Every fingerprint's cells and calibration points as the JSON exchange object."""
    db = _connect(db_path)
    try:
        tables = []
        for fp_id, fp_json in db.execute("SELECT id, json FROM fingerprints ORDER BY id"):
            cells = [
                {"signature": json.loads(sig), "c_in": ci, "c_out": co, "ms": ms, "runs": runs, "measured_at": t}
                for sig, ci, co, ms, runs, t in db.execute(
                    "SELECT signature, c_in, c_out, ms, runs, measured_at FROM cells WHERE fingerprint=? "
                    "ORDER BY signature, c_in, c_out", (fp_id,))
            ]
            calib = [
                {"family": f, "raw_ms": r, "measured_ms": m, "measured_at": t, "melements": mel}
                for f, r, m, t, mel in db.execute(
                    "SELECT family, raw_ms, measured_ms, measured_at, melements FROM calibration WHERE fingerprint=?",
                    (fp_id,))
            ]
            blocking = blocking_records(db, fp_id)
            tables.append({"fingerprint": json.loads(fp_json), "cells": cells, "calibration": calib,
                           "blocking": blocking})
        return {"format": FORMAT, "version": VERSION, "tables": tables}
    finally:
        db.close()


def import_tables(db_path: str | Path, data: dict) -> dict:
    """Merge an exchange object into the SQLite file (created if missing). Returns counts."""
    from latprune.profiler.fingerprint import fingerprint_id

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"not a {FORMAT} JSON object (its \"format\" must be \"{FORMAT}\")")
    if data.get("version") not in READABLE_VERSIONS:
        raise InputError(f"unsupported {FORMAT} version {data.get('version')!r} "
                         f"(this tool reads {', '.join(map(str, READABLE_VERSIONS))})")
    problems = validate_object(data)
    if problems:
        raise InputError(f"invalid table: {problems[0]} ({len(problems)} problem(s) in all)")
    db = _connect(db_path, create=True)
    added = combined = calib = 0
    try:
        with db:
            for table in data["tables"]:
                fp = table["fingerprint"]
                fp_id = fingerprint_id(fp)
                db.execute("INSERT OR IGNORE INTO fingerprints VALUES (?, ?)", (fp_id, json.dumps(fp, sort_keys=True)))
                for cell in table["cells"]:
                    sig = LayerSpec(**cell["signature"]).signature()
                    row = db.execute("SELECT ms, runs, measured_at FROM cells WHERE fingerprint=? AND signature=? "
                                     "AND c_in=? AND c_out=?", (fp_id, sig, cell["c_in"], cell["c_out"])).fetchone()
                    ms, runs, t = float(cell["ms"]), int(cell["runs"]), float(cell.get("measured_at", 0.0))
                    if row is not None:
                        ms = (row[0] * row[1] + ms * runs) / max(row[1] + runs, 1)
                        runs, t = row[1] + runs, max(row[2], t)
                        combined += 1
                    else:
                        added += 1
                    db.execute("INSERT OR REPLACE INTO cells VALUES (?, ?, ?, ?, ?, ?, ?)",
                               (fp_id, sig, cell["c_in"], cell["c_out"], ms, runs, t))
                for c in table.get("calibration", []):
                    db.execute("INSERT INTO calibration (fingerprint, family, raw_ms, measured_ms, measured_at, "
                               "melements) VALUES (?, ?, ?, ?, ?, ?)",
                               (fp_id, c["family"], float(c["raw_ms"]), float(c["measured_ms"]),
                                float(c.get("measured_at", 0.0)), float(c.get("melements", 0.0))))
                    calib += 1
                for r in table.get("blocking", []):
                    insert_blocking(db, fp_id, r)
    finally:
        db.close()
    return {"cells_added": added, "cells_combined": combined, "calibration_points": calib}


def merge_files(dst: str | Path, sources: list[str | Path]) -> dict:
    """Merge several SQLite tables into `dst` (see import_tables for the rule)."""
    totals = {"cells_added": 0, "cells_combined": 0, "calibration_points": 0}
    for src in sources:
        for k, v in import_tables(dst, export_tables(src)).items():
            totals[k] += v
    return totals


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    """A finite JSON number (a huge int that overflows float is not)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def validate_object(data: dict) -> list[str]:
    """Problems in an exchange object: wrong structure or types, bad signatures, non-positive or
    non-finite latencies, widths below 1, duplicate cells, bad calibration points. Numbers must
    be JSON numbers (widths and runs integers), not strings."""
    if not isinstance(data, dict):
        return ["the table must be a JSON object"]
    if data.get("format") != FORMAT:
        return [f"format must be {FORMAT!r}"]
    if data.get("version") not in READABLE_VERSIONS:
        return [f"unsupported version {data.get('version')!r} (this tool reads "
                f"{', '.join(map(str, READABLE_VERSIONS))})"]
    tables = data.get("tables")
    if not isinstance(tables, list):
        return ["'tables' must be a list"]
    problems: list[str] = []
    for ti, table in enumerate(tables):
        if not isinstance(table, dict) or not isinstance(table.get("fingerprint"), dict):
            problems.append(f"table {ti}: not an object with a fingerprint object")
            continue
        cells, calib = table.get("cells"), table.get("calibration", [])
        if not isinstance(cells, list) or not isinstance(calib, list):
            problems.append(f"table {ti}: 'cells' and 'calibration' must be lists")
            continue
        seen = set()
        for ci, cell in enumerate(cells):
            where = f"table {ti} cell {ci}"
            if not isinstance(cell, dict) or not isinstance(cell.get("signature"), dict):
                problems.append(f"{where}: not an object with a signature object")
                continue
            try:
                sig = LayerSpec(**cell["signature"]).signature()
            except Exception as exc:
                problems.append(f"{where}: bad signature ({type(exc).__name__})")
                continue
            c_in, c_out, ms, runs = (cell.get(k) for k in ("c_in", "c_out", "ms", "runs"))
            if not (_is_int(c_in) and _is_int(c_out) and _is_int(runs) and _is_number(ms)):
                problems.append(f"{where}: c_in, c_out and runs must be integers and ms a number")
                continue
            if "measured_at" in cell and not _is_number(cell["measured_at"]):
                problems.append(f"{where}: measured_at must be a number")
            if c_in < 1 or c_out < 1 or c_in > 1 << 20 or c_out > 1 << 20:
                problems.append(f"{where}: widths must be at least 1 (and at most 2^20)")
            if not math.isfinite(ms) or ms <= 0:
                problems.append(f"{where}: latency {ms} ms is not a positive number")
            if runs < 1:
                problems.append(f"{where}: runs must be at least 1")
            key = (sig, c_in, c_out)
            if key in seen:
                problems.append(f"{where}: duplicate cell {c_in}x{c_out}")
            seen.add(key)
        blocking = table.get("blocking", [])
        if not isinstance(blocking, list):
            problems.append(f"table {ti}: 'blocking' must be a list")
            blocking = []
        for ri, rule in enumerate(blocking):
            if not (isinstance(rule, dict) and rule.get("kind") in KINDS and rule.get("axis") in AXES
                    and _is_int(rule.get("align")) and _is_int(rule.get("block"))
                    and 1 <= rule["align"] <= 4096 and 1 <= rule["block"] <= 4096
                    and _is_number(rule.get("penalty")) and rule["penalty"] > 0
                    and _is_int(rule.get("direct_below", 0)) and 0 <= rule.get("direct_below", 0) <= 4096
                    and _is_number(rule.get("direct", 1.0)) and rule.get("direct", 1.0) > 0
                    and _is_number(rule.get("direct_fixed", 0.0)) and 0 <= rule.get("direct_fixed", 0.0) < 1):
                problems.append(f"table {ti} blocking rule {ri}: needs kind (one of {', '.join(KINDS)}), "
                                f"axis (in or out), align and block (integers 1-4096) and penalty (> 0); "
                                f"direct_below (integer 0-4096), direct (> 0) and direct_fixed (0 to 1) "
                                f"where given")
        for pi, point in enumerate(calib):
            where = f"table {ti} calibration point {pi}"
            if not isinstance(point, dict) or not isinstance(point.get("family"), str):
                problems.append(f"{where}: not an object with a family string")
                continue
            values = [point.get("raw_ms"), point.get("measured_ms"),
                      point.get("measured_at", 0.0), point.get("melements", 0.0)]
            if not all(_is_number(v) and math.isfinite(v) for v in values) or point["measured_ms"] <= 0:
                problems.append(f"{where}: raw_ms, measured_ms (> 0), measured_at and melements must be numbers")
    return problems


def validate_file(db_path: str | Path) -> dict:
    """Errors (invalid cells) and warnings (latency falling as a width grows by over 20%,
    which suggests a noisy measurement) of a SQLite table. Cells of different regimes under
    the table's blocking rules are not compared: a fallback width may cost more than the
    fast one above it."""
    from latprune.lut.blocking import BlockingRules

    data = export_tables(db_path)
    errors = validate_object(data)
    warnings = []
    for table in data["tables"]:
        rules = BlockingRules.from_records(table.get("blocking", []))
        by_sig: dict[str, dict[tuple[int, int], float]] = {}
        for cell in table["cells"]:
            by_sig.setdefault(json.dumps(cell["signature"], sort_keys=True), {})[(cell["c_in"], cell["c_out"])] = cell["ms"]
        for sig, grid in by_sig.items():
            spec = LayerSpec(**json.loads(sig))
            for (ci, co), ms in grid.items():
                regime = rules.regime(spec, ci, co)
                for (ci2, co2), ms2 in grid.items():
                    if ci2 >= ci and co2 >= co and (ci2, co2) != (ci, co) and ms2 < 0.8 * ms \
                            and rules.regime(spec, ci2, co2) == regime:
                        warnings.append(f"{json.loads(sig)['op']} {ci}x{co}: {ms:.4f} ms but {ci2}x{co2}: {ms2:.4f} ms")
    return {"errors": errors, "warnings": warnings,
            "fingerprints": len(data["tables"]), "cells": sum(len(t["cells"]) for t in data["tables"])}


def summary(db_path: str | Path) -> list[dict]:
    """Per fingerprint: the device, the number of layer signatures, cells and calibration
    points, and the channel-blocking rules in words."""
    from latprune.lut.blocking import BlockingRules

    data = export_tables(db_path)
    out = []
    for table in data["tables"]:
        sigs = {json.dumps(c["signature"], sort_keys=True) for c in table["cells"]}
        rules = table.get("blocking", [])
        out.append({"fingerprint": table["fingerprint"], "signatures": len(sigs),
                    "cells": len(table["cells"]), "calibration_points": len(table["calibration"]),
                    "blocking": BlockingRules.from_records(rules).describe() if rules else "not probed"})
    return out

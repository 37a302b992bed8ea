"""The latency lookup table: one SQLite file, keyed by device fingerprint.

Schema (one row per measured cell; tables never mix fingerprints):
  cells(fingerprint, signature, c_in, c_out, ms, runs, measured_at)   -- layer latency, ms
  calibration(fingerprint, family, raw_ms, measured_ms, measured_at)  -- whole-model points
  fingerprints(id, json)
  blocking(fingerprint, kind, axis, align, block, penalty, measured_at, direct_below, direct,
           direct_fixed)                                              -- lut/blocking.py rules

A table without blocking rows (written before issue 15, or never probed) interpolates every
signature's cells as one surface, as before; with them, fast and fallback cells apart (lookup).

`signature` is LayerSpec.signature(); c_in/c_out are channel counts (features for Gemm).
Lookups interpolate between measured cells (see `lookup`). WAL mode lets several writers
(e.g. a profiler and the service) share one file.
"""
from __future__ import annotations

import bisect
import json
import sqlite3
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from latprune.lut.blocking import BlockingRules
from latprune.types import InputError, LayerSpec

SCHEMA = """
CREATE TABLE IF NOT EXISTS fingerprints (id TEXT PRIMARY KEY, json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    fingerprint TEXT NOT NULL, signature TEXT NOT NULL, c_in INTEGER NOT NULL,
    c_out INTEGER NOT NULL, ms REAL NOT NULL, runs INTEGER NOT NULL, measured_at REAL NOT NULL,
    PRIMARY KEY (fingerprint, signature, c_in, c_out));
CREATE TABLE IF NOT EXISTS calibration (
    fingerprint TEXT NOT NULL, family TEXT NOT NULL, raw_ms REAL NOT NULL,
    measured_ms REAL NOT NULL, measured_at REAL NOT NULL, melements REAL NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS blocking (
    fingerprint TEXT NOT NULL, kind TEXT NOT NULL, axis TEXT NOT NULL, align INTEGER NOT NULL,
    block INTEGER NOT NULL, penalty REAL NOT NULL, measured_at REAL NOT NULL,
    direct_below INTEGER NOT NULL DEFAULT 0, direct REAL NOT NULL DEFAULT 1,
    direct_fixed REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (fingerprint, kind, axis));
"""


BLOCKING_FIELDS = ("kind", "axis", "align", "block", "penalty", "direct_below", "direct", "direct_fixed")


def migrate_blocking(db: sqlite3.Connection) -> None:
    """Add the direct-kernel columns to a blocking table written before them (rules read as
    having no direct kernel, as they were probed)."""
    cols = [r[1] for r in db.execute("PRAGMA table_info(blocking)")]
    if "direct_below" not in cols:
        db.execute("ALTER TABLE blocking ADD COLUMN direct_below INTEGER NOT NULL DEFAULT 0")
    if "direct" not in cols:
        db.execute("ALTER TABLE blocking ADD COLUMN direct REAL NOT NULL DEFAULT 1")
    if "direct_fixed" not in cols:
        db.execute("ALTER TABLE blocking ADD COLUMN direct_fixed REAL NOT NULL DEFAULT 0")


def blocking_records(db: sqlite3.Connection, fp_id: str) -> list[dict]:
    """The fingerprint's blocking rules as records (BlockingRules.from_records)."""
    rows = db.execute(f"SELECT {', '.join(BLOCKING_FIELDS)} FROM blocking WHERE fingerprint=? ORDER BY kind, axis",
                      (fp_id,)).fetchall()
    return [dict(zip(BLOCKING_FIELDS, row)) for row in rows]


def insert_blocking(db: sqlite3.Connection, fp_id: str, record: dict) -> None:
    """Insert or replace one rule record (kind, axis, align, block, penalty[, direct_below,
    direct, direct_fixed]) of the fingerprint."""
    db.execute(f"INSERT OR REPLACE INTO blocking (fingerprint, measured_at, {', '.join(BLOCKING_FIELDS)}) "
               f"VALUES (?, ?, {', '.join('?' * len(BLOCKING_FIELDS))})",
               (fp_id, time.time(), record["kind"], record["axis"], int(record["align"]), int(record["block"]),
                float(record["penalty"]), int(record.get("direct_below", 0)), float(record.get("direct", 1.0)),
                float(record.get("direct_fixed", 0.0))))


@dataclass
class Calibration:
    """Whole-model latency ≈ scale·(Σ layer ms) + ms_per_melement·(overhead elements / 1e6)
    + offset_ms. Fitted per model family from end-to-end measurements."""

    scale: float = 1.0
    ms_per_melement: float = 0.0
    offset_ms: float = 0.0
    points: int = 0

    def predict(self, raw_ms: float, melements: float = 0.0) -> float:
        return self.scale * raw_ms + self.ms_per_melement * melements + self.offset_ms


@dataclass
class KernelCurve:
    """ms of one kernel of a class outside the layers (lut.predict.price_kernels) against its
    size: the median over the timed kernels in each bin of sizes (millions of elements),
    interpolated between bins (_interp: under the smallest bin the first segment's line, above
    the largest at least proportional)."""

    melements: tuple[float, ...]
    ms: tuple[float, ...]
    kernels: int = 0  # how many timed kernels the curve stands on

    BIN_RATIO = 1.5  # a bin holds sizes up to 1.5x its smallest

    @classmethod
    def from_kernels(cls, kernels: list[tuple[float, float, int]]) -> "KernelCurve":
        """From (millions of elements, ms of one kernel, how many kernels) observations."""
        import numpy as np

        kernels = sorted(kernels)
        points: list[tuple[float, float]] = []
        i = 0
        while i < len(kernels):
            j = i
            while j < len(kernels) and kernels[j][0] <= max(kernels[i][0], 1e-12) * cls.BIN_RATIO:
                j += 1
            sizes = np.repeat([k[0] for k in kernels[i:j]], [max(1, k[2]) for k in kernels[i:j]])
            times = np.repeat([k[1] for k in kernels[i:j]], [max(1, k[2]) for k in kernels[i:j]])
            points.append((float(np.median(sizes)), float(np.median(times))))
            i = j
        return cls(tuple(p[0] for p in points), tuple(p[1] for p in points),
                   int(sum(max(1, k[2]) for k in kernels)))

    def price(self, melements: float) -> float:
        """ms of one kernel of `melements` million elements."""
        if len(self.melements) == 1 and self.melements[0] <= 0 or melements <= 0:
            return self.ms[0]
        return _interp(list(self.melements), list(self.ms), melements)


class LatencyTable:
    """Layer latencies (ms) for one device fingerprint, stored in a SQLite file."""

    def __init__(self, path: str | Path, fingerprint: dict):
        from latprune.profiler.fingerprint import fingerprint_id

        self.path = Path(path)
        self.fingerprint = fingerprint
        self.fp_id = fingerprint_id(fingerprint)
        self._kernel_prices: dict[str, KernelCurve] | None = None
        try:
            self.db = sqlite3.connect(str(self.path), timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
            cols = [r[1] for r in self.db.execute("PRAGMA table_info(calibration)")]
            if "melements" not in cols:  # tables written before the overhead term existed
                self.db.execute("ALTER TABLE calibration ADD COLUMN melements REAL NOT NULL DEFAULT 0")
            migrate_blocking(self.db)
            self.db.execute("INSERT OR IGNORE INTO fingerprints VALUES (?, ?)",
                            (self.fp_id, json.dumps(fingerprint, sort_keys=True)))
            self.db.commit()
        except sqlite3.DatabaseError as exc:
            raise InputError(f"{self.path}: not a latency table ({exc})") from None
        self._grid_cache: dict[str, dict[int, list[tuple[int, float]]]] = {}
        self._class_cache: dict[str, dict[str, dict[int, list[tuple[int, float]]]]] = {}
        self.blocking = self._load_blocking()

    # ---- blocking rules (lut/blocking.py) ------------------------------------------------------
    def _load_blocking(self) -> BlockingRules:
        return BlockingRules.from_records(blocking_records(self.db, self.fp_id))

    def has_blocking(self) -> bool:
        """Whether the device's blocking rules were recorded (even 'no blocking')."""
        return bool(self.blocking.rules)

    def set_blocking(self, rules: BlockingRules) -> None:
        """Record the probe's rules for this fingerprint (replacing earlier ones)."""
        with self.db:
            self.db.execute("DELETE FROM blocking WHERE fingerprint=?", (self.fp_id,))
            for r in rules.as_records():
                insert_blocking(self.db, self.fp_id, r)
        self.blocking = self._load_blocking()
        self._class_cache.clear()

    def close(self) -> None:
        self.db.close()

    # ---- cells ---------------------------------------------------------------------------
    def has(self, signature: str, c_in: int, c_out: int) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM cells WHERE fingerprint=? AND signature=? AND c_in=? AND c_out=?",
            (self.fp_id, signature, c_in, c_out)).fetchone()
        return row is not None

    def put(self, signature: str, c_in: int, c_out: int, ms: float, runs: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO cells VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (self.fp_id, signature, c_in, c_out, ms, runs, time.time()))
        self.db.commit()  # one commit per cell: an interrupted profile loses nothing finished
        self._grid_cache.pop(signature, None)
        self._class_cache.pop(signature, None)

    def cells(self, signature: str) -> dict[int, list[tuple[int, float]]]:
        """c_in -> sorted [(c_out, ms)] for one signature."""
        if signature not in self._grid_cache:
            rows = self.db.execute(
                "SELECT c_in, c_out, ms FROM cells WHERE fingerprint=? AND signature=?",
                (self.fp_id, signature)).fetchall()
            grid: dict[int, list[tuple[int, float]]] = defaultdict(list)
            for ci, co, ms in rows:
                grid[ci].append((co, ms))
            for v in grid.values():
                v.sort()
            self._grid_cache[signature] = dict(grid)
        return self._grid_cache[signature]

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM cells WHERE fingerprint=?", (self.fp_id,)).fetchone()[0]

    def lookup(self, signature: str, c_in: int, c_out: int) -> float:
        """Latency (ms) at (c_in, c_out): lookup_detail's value."""
        return self.lookup_detail(signature, c_in, c_out)[0]

    def lookup_detail(self, signature: str, c_in: int, c_out: int) -> tuple[float, str]:
        """(latency ms, how it was found) at (c_in, c_out); how: "measured" (that cell),
        "interpolated" (inside the measured widths), "extrapolated" (outside them) or
        "modelled" (from the other regime's cells times the probed penalty).

        Without blocking rules every cell of the signature is one surface. With them (issue
        15), a fast cell (both widths aligned) comes from the fast cells at the widths the
        kernel pads to, a fallback cell from the fallback cells at its own widths; a regime
        with no cell of its own takes the other's value times (or over) the kernel kind's
        penalty; a direct cell (an input under the rule's direct_below) comes from the direct
        cells where it has two rows of them (or that row), else from the fast cells at the
        block along the probe's line (AxisRule.direct_cost; a stem's 3-channel cells, direct too, are no
        base to scale a pruned 8-channel input from).
        Within a regime: linear in c_out within each measured c_in row, then linear
        in c_in between the two bracketing rows (bilinear on a rectangular grid). Outside the
        measured range the nearest cell is scaled in proportion to the width. Zero width costs
        nothing (the layer is gone).
        """
        if c_in <= 0 or c_out <= 0:
            return 0.0, "measured"
        grid = self.cells(signature)
        if not grid:
            raise KeyError(signature)
        exact = next((ms for co, ms in grid.get(c_in, ()) if co == c_out), None)
        if exact is not None:
            return exact, "measured"
        spec = _spec(signature)
        if not self.blocking or spec is None:
            return _interp_grid(grid, c_in, c_out, spec is not None and spec.depthwise)
        classes = self._classes(signature, spec)
        regime = self._regime(signature, spec, c_in, c_out)
        if regime != "fallback":  # fast and direct kernels write blocked outputs (a direct input is its own width)
            c_in, c_out = self.blocking.padded(spec, c_in, c_out)
        rin, rout = self.blocking.axes(spec)
        if regime == "direct":
            own = classes["direct"]
            if c_in in own or len(own) > 1:  # its own rows, along their line outside them
                return _interp_grid(own, c_in, c_out, spec.depthwise)
            if classes["fast"]:  # the probe's line from the fast cost at the block
                ms, _ = _interp_grid(classes["fast"], rin.direct_below, c_out, spec.depthwise)
                return rin.direct_cost(c_in, ms), "modelled"
        if classes[regime]:
            return _interp_grid(classes[regime], c_in, c_out, spec.depthwise)
        if regime == "fast" and classes["fallback"]:  # the fast kernel is the penalty cheaper
            ms, _ = _interp_grid(classes["fallback"], c_in, c_out, spec.depthwise)
            return ms / max(max(rin.penalty, rout.penalty), 1e-6), "modelled"
        if classes["fast"]:  # a fallback cell: the fast cost at the padded widths times the penalty
            ms, _ = _interp_grid(classes["fast"], *self.blocking.padded(spec, c_in, c_out), spec.depthwise)
            return ms * self.blocking.penalty(spec, c_in, c_out), "modelled"
        # the only cells are of another regime with no rule between them: one surface
        ms, _ = _interp_grid(grid, c_in, c_out, spec.depthwise)
        return ms, "modelled"

    def _regime(self, signature: str, spec: LayerSpec, c_in: int, c_out: int) -> str:
        """The kernel (c_in, c_out) runs: "direct", "fast" or "fallback" (BlockingRules.regime);
        an axis every cell of the signature shares (a stem's 3 input channels) is left out: it
        never changes, and the runtime may treat a narrow fixed input its own way (ONNX Runtime
        runs a 3-channel input through its blocked conv, padding the output)."""
        only_in, only_out = self._classes(signature, spec)["fixed"]
        return self.blocking.regime(spec, c_in, c_out, c_in == only_in, c_out == only_out)

    def _classes(self, signature: str, spec: LayerSpec) -> dict:
        """The signature's cells split by regime: fast cells at their padded widths (a cell
        measured at the padded width itself wins over one padded to it), fallback cells as
        measured; and "fixed": the input and output width every cell shares (None where they
        differ, and for depthwise layers), which _fast leaves out. Built once per signature."""
        if signature not in self._class_cache:
            grid = self.cells(signature)
            rows = set(grid)
            cols = {co for row in grid.values() for co, _ in row}
            only_in = next(iter(rows)) if len(rows) == 1 and not spec.depthwise else None
            only_out = next(iter(cols)) if len(cols) == 1 and not spec.depthwise else None
            padded: dict[str, dict[tuple[int, int], tuple[bool, float]]] = {"fast": {}, "direct": {}}
            own: dict[str, dict[int, list[tuple[int, float]]]] = {k: defaultdict(list)
                                                                  for k in ("fast", "fallback", "direct")}
            for ci, row in grid.items():
                for co, ms in row:
                    regime = self.blocking.regime(spec, ci, co, ci == only_in, co == only_out)
                    if regime == "fallback":
                        own["fallback"][ci].append((co, ms))
                        continue
                    key = self.blocking.padded(spec, ci, co)  # a direct input is not padded
                    exact = key == (ci, co)
                    if key not in padded[regime] or (exact and not padded[regime][key][0]):
                        padded[regime][key] = (exact, ms)
            for regime in ("fast", "direct"):
                for (ci, co), (_, ms) in padded[regime].items():
                    own[regime][ci].append((co, ms))
            for g in own.values():
                for row in g.values():
                    row.sort()
            self._class_cache[signature] = {**{k: dict(v) for k, v in own.items()}, "fixed": (only_in, only_out)}
        return self._class_cache[signature]

    # ---- whole-model calibration ---------------------------------------------------------
    def add_calibration(self, family: str, raw_ms: float, measured_ms: float, melements: float = 0.0) -> None:
        self.db.execute("INSERT INTO calibration (fingerprint, family, raw_ms, measured_ms, measured_at, melements) "
                        "VALUES (?, ?, ?, ?, ?, ?)", (self.fp_id, family, raw_ms, measured_ms, time.time(), melements))
        self.db.commit()

    def add_overhead_point(self, family: str, raw_ms: float, measured_ms: float, melements: float = 0.0) -> None:
        """One in-graph profile run: the table's layer sum and the end-to-end time at the same
        machine speed (profiler.ingraph), kept as family + OVERHEAD_SUFFIX."""
        self.add_calibration(family + OVERHEAD_SUFFIX, raw_ms, measured_ms, melements)

    def overhead(self, family: str) -> tuple[float, float] | None:
        """(ms, ms per Melement) outside the layers, from the family's in-graph profile runs
        (fit_overhead), or None without any."""
        rows = self.db.execute(
            "SELECT raw_ms, melements, measured_ms FROM calibration WHERE fingerprint=? AND family=?",
            (self.fp_id, family + OVERHEAD_SUFFIX)).fetchall()
        return fit_overhead([r[0] for r in rows], [r[2] for r in rows], [r[1] for r in rows]) if rows else None

    def add_reorder_point(self, reorder_ms: float, melements: float, kind: str = "layers", count: int = 0) -> None:
        """One in-graph run: the layout reorders of `kind` (ms) and what predicts them:
        "layers", reorders done for fallback convs, against lut.predict.layout_boundaries
        (millions of elements); "overhead", reorders done for other operators, against
        lut.predict.blocked_overhead_elements; "graph", all reorders of the runtime's compiled
        graph, against their `count` and the elements they move (Backend.layout_reorders).
        The count is kept in the calibration row's raw_ms column."""
        self.add_calibration(REORDER_FAMILIES[kind], float(count), reorder_ms, melements)

    def reorder_cost(self, kind: str = "layers") -> float:
        """ms per million elements of the layout reorders of `kind` (add_reorder_point), from
        the in-graph runs (their reorder ms over their elements); 0 without any."""
        row = self.db.execute("SELECT SUM(measured_ms), SUM(melements) FROM calibration WHERE fingerprint=? "
                              "AND family=? AND melements > 0", (self.fp_id, REORDER_FAMILIES[kind])).fetchone()
        return float(row[0] / row[1]) if row and row[1] else 0.0

    def reorder_fit(self) -> tuple[float, float] | None:
        """(ms per reorder, ms per million elements) of the runtime's layout reorders, a
        non-negative least-squares fit over the in-graph runs' "graph" points (each reorder
        kernel costs a few microseconds however small: EfficientNet's 1x1 squeeze-excite
        tensors); None without points."""
        rows = self.db.execute("SELECT raw_ms, melements, measured_ms FROM calibration WHERE fingerprint=? "
                               "AND family=? AND raw_ms > 0", (self.fp_id, REORDER_FAMILIES["graph"])).fetchall()
        if not rows:
            return None
        import numpy as np

        counts, mel, ms = (np.array(col, dtype=float) for col in zip(*rows))
        return nonnegative_fit(counts, mel, ms)

    def add_kernel_points(self, kernels: list[tuple[str, float, float]]) -> None:
        """One in-graph run's kernels that no layer claims (ConfigTiming.kernels: class,
        millions of elements, ms), kept per (class, size) as calibration rows of family
        KERNEL_PREFIX + class (raw_ms: how many kernels of that size, measured_ms: their ms in
        all), so the exchange format carries them unchanged."""
        grouped: dict[tuple[str, float], list[float]] = defaultdict(list)
        for cls, mel, ms in kernels:
            grouped[(cls, round(mel, 6))].append(ms)
        now = time.time()
        self.db.executemany(
            "INSERT INTO calibration (fingerprint, family, raw_ms, measured_ms, measured_at, melements) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(self.fp_id, KERNEL_PREFIX + cls, float(len(v)), float(sum(v)), now, mel)
             for (cls, mel), v in grouped.items()])
        self.db.commit()
        self._kernel_prices = None

    def kernel_prices(self) -> dict[str, "KernelCurve"]:
        """{class: KernelCurve} of the kernels outside the layers (add_kernel_points): per
        class, the median ms of one kernel over every kernel of that class the in-graph runs
        timed, in bins of size (KernelCurve.BIN_RATIO apart), interpolated between them. A
        curve, not a line: a reorder of a 112x112 map (1-5 M elements, past the cache) cost
        ~190 µs per M elements on the AVX-512 EPYC, one of 0.3-1 M ~100, and a line through
        both overpriced EfficientNet-B0's mid-sized reorders by 15%. {} without points."""
        if self._kernel_prices is None:
            rows = self.db.execute("SELECT family, raw_ms, melements, measured_ms FROM calibration "
                                   "WHERE fingerprint=? AND family LIKE ? AND raw_ms > 0",
                                   (self.fp_id, KERNEL_PREFIX + "%")).fetchall()
            per_class: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
            for family, n, mel, ms in rows:
                per_class[family[len(KERNEL_PREFIX):]].append((mel, ms / n, int(round(n))))
            self._kernel_prices = {cls: KernelCurve.from_kernels(pts) for cls, pts in per_class.items()}
        return self._kernel_prices

    def add_remainder_point(self, family: str, kernel_ms: float, end_to_end_ms: float) -> None:
        """One in-graph run of `family`: its kernels' ms in all and its unprofiled end-to-end ms
        at the same machine speed (what no kernel holds: the session's own work, less the
        profiler's per-kernel cost), kept as family + REMAINDER_SUFFIX."""
        self.add_calibration(family + REMAINDER_SUFFIX, kernel_ms, end_to_end_ms)

    def remainder(self, family: str, kernel_ms: float | None = None) -> float | None:
        """ms of a run of `family` outside its kernels (end to end − kernel sum; may be
        negative), or None without runs: with `kernel_ms` (the run's kernel sum) and runs whose
        kernel sums span REMAINDER_MIN_SPAN (the uniform calibration models profiled in-graph,
        pipeline.profile_model), a line in the kernel sum (a small model's remainder is more
        negative: MobileNetV2 −0.12 ms at 0.5x, +0.01 ms dense, at one moment); else the
        median over its in-graph runs, or over every family's for a model the table has not
        profiled."""
        import numpy as np

        rows = self.db.execute("SELECT raw_ms, measured_ms - raw_ms FROM calibration WHERE fingerprint=? "
                               "AND family=?", (self.fp_id, family + REMAINDER_SUFFIX)).fetchall()
        if not rows:  # a model new to the table: the median over every model's runs
            rows = self.db.execute("SELECT raw_ms, measured_ms - raw_ms FROM calibration WHERE fingerprint=? "
                                   "AND family LIKE ?", (self.fp_id, "%" + REMAINDER_SUFFIX)).fetchall()
            kernel_ms = None
        if not rows:
            return None
        kernels, diff = (np.array(col, dtype=float) for col in zip(*rows))
        if kernel_ms is not None and len(rows) >= 3 and kernels.min() > 0 \
                and kernels.max() / kernels.min() >= REMAINDER_MIN_SPAN:
            slope, intercept = np.polyfit(kernels, diff, 1)
            return float(intercept + slope * kernel_ms)
        return float(np.median(diff))

    def add_graph_calibration(self, family: str, base_ms: float, measured_ms: float) -> None:
        """One end-to-end measurement of a model of `family` beside its prediction in the
        compiled graph's terms at the table's speed (pipeline.graph_base_ms), kept as family +
        GRAPH_CALIBRATION_SUFFIX."""
        self.add_calibration(family + GRAPH_CALIBRATION_SUFFIX, base_ms, measured_ms)

    def graph_speed(self, family: str) -> tuple[float, float, float] | None:
        """(scale, offset ms, floor) of measured ≈ max(scale · base + offset, floor · base) for
        predictions in the compiled graph's terms (lut.predict.whole_model_ms), fitted over the
        family's graph calibration points (the uniform calibration models measured as the
        product's check measures: warm bursts in a fresh process); None without any (the
        family calibration's scale then). The offset is fitted only where the points span
        GRAPH_OFFSET_MIN_SPAN in base and it is at most GRAPH_OFFSET_MAX_SHARE of the smallest
        model's time; else the scale alone, through the origin. The floor (the smallest
        model's measured / base) keeps a model smaller than any calibration model from
        following the line towards zero. Why an offset: a small model gains more, in ms, from the
        check's warm bursts than the profile's interleaved runs show (MobileNetV2's 0.5x
        model measured 0.86 of its base, the dense one 0.97), and Torch-Pruning's MobileNetV2s
        at 0.35-0.54 of dense read +6.8% with one scale, −1.0% with the offset (rescored)."""
        import numpy as np

        rows = self.db.execute("SELECT raw_ms, measured_ms FROM calibration WHERE fingerprint=? AND family=? "
                               "AND raw_ms > 0", (self.fp_id, family + GRAPH_CALIBRATION_SUFFIX)).fetchall()
        if not rows:
            return None
        base, measured = (np.array(col, dtype=float) for col in zip(*rows))
        smallest = int(np.argmin(base))
        floor = float(measured[smallest] / base[smallest])
        if len(rows) >= 3 and base.max() / base.min() >= GRAPH_OFFSET_MIN_SPAN:
            scale, offset = np.polyfit(base, measured, 1)
            if scale > 0.5 and abs(offset) <= GRAPH_OFFSET_MAX_SHARE * measured[smallest]:
                return float(scale), float(offset), min(floor, float(scale))
        scale = float(base @ measured / (base @ base))
        return scale, 0.0, scale

    def reference_phase(self, key: str) -> float | None:
        """The reference model's kernel time (ms) that in-graph cells profiled with reference
        `key` are scaled to (the first recorded), or None before the first in-graph profile."""
        row = self.db.execute(
            "SELECT measured_ms FROM calibration WHERE fingerprint=? AND family=? ORDER BY measured_at LIMIT 1",
            (self.fp_id, REFERENCE_PREFIX + key)).fetchone()
        return float(row[0]) if row else None

    def set_reference_phase(self, key: str, ms: float, replace: bool = False) -> None:
        """Record the scale of in-graph cells profiled beside reference `key` (a calibration point
        of family REFERENCE_PREFIX + key: the exchange format carries it unchanged). The first
        record stands (reference_phase) unless `replace` drops the earlier ones."""
        if replace:
            self.db.execute("DELETE FROM calibration WHERE fingerprint=? AND family=?",
                            (self.fp_id, REFERENCE_PREFIX + key))
        self.add_calibration(REFERENCE_PREFIX + key, ms, ms)

    def calibration(self, family: str) -> Calibration | None:
        """The family's fit (see fit_calibration), or None without measurements."""
        rows = self.db.execute(
            "SELECT raw_ms, melements, measured_ms FROM calibration WHERE fingerprint=? AND family=?",
            (self.fp_id, family)).fetchall()
        if any(r[1] > 0 for r in rows):  # points recorded before the overhead term: skip
            rows = [r for r in rows if r[1] > 0]
        if not rows:
            return None
        return fit_calibration([r[0] for r in rows], [r[2] for r in rows], [r[1] for r in rows],
                               self.overhead(family))


def nonnegative_fit(counts, mel, ms) -> tuple[float, float]:
    """(ms per item, ms per million elements): ms ≈ a·counts + b·mel by least squares with
    a, b ≥ 0 (non-negative least squares in 2-D: where the free fit makes one term negative,
    the other alone)."""
    import numpy as np

    (a, b), *_ = np.linalg.lstsq(np.column_stack([counts, mel]), ms, rcond=None)
    if a < 0 or b < 0:
        if b < 0 or not mel.any():
            return float(max(0.0, counts @ ms / (counts @ counts))), 0.0
        return 0.0, float(max(0.0, mel @ ms / (mel @ mel)))
    return float(a), float(b)


MIN_POINTS_3TERM = 5
OVERHEAD_SUFFIX = "/in-graph-overhead"
REMAINDER_SUFFIX = "/in-graph-remainder"
GRAPH_CALIBRATION_SUFFIX = "/graph-calibration"
GRAPH_OFFSET_MIN_SPAN = 1.5  # largest over smallest base of a family's graph calibration points
GRAPH_OFFSET_MAX_SHARE = 0.4  # of the smallest calibration model's measured ms (MobileNetV2: 0.22)
REMAINDER_MIN_SPAN = 1.5  # largest over smallest kernel sum of a family's runs for a line
KERNEL_PREFIX = "in-graph-kernel/"
REORDER_FAMILIES = {"layers": "in-graph-layout-reorders", "overhead": "in-graph-layout-reorders/overhead",
                    "graph": "in-graph-layout-reorders/graph"}
REFERENCE_PREFIX = "in-graph-reference/"


def fit_overhead(raw: list[float], measured: list[float], melements: list[float]) -> tuple[float, float]:
    """Time outside the layers, measured − layer sum ≈ a + b·Melements, from in-graph profile
    runs (both terms at the same machine speed): least squares with at least MIN_POINTS_3TERM
    points when b ≥ 0, else the median difference. `a` may be negative: ONNX Runtime's
    profiler adds a few µs to every kernel it times (MobileNetV2's 56 kernels summed to more
    than the unprofiled run), and that constant belongs here, not in the speed scale."""
    import numpy as np

    diff = np.asarray(measured, float) - np.asarray(raw, float)
    mel = np.asarray(melements, float)
    if len(diff) >= MIN_POINTS_3TERM and np.ptp(mel) > 0:
        (b, a), *_ = np.linalg.lstsq(np.column_stack([mel, np.ones(len(mel))]), diff, rcond=None)
        if b >= 0:
            return float(a), float(b)
    return float(np.median(diff)), 0.0


def fit_calibration(raw: list[float], measured: list[float], melements: list[float] | None = None,
                    overhead: tuple[float, float] | None = None) -> Calibration:
    """Least-squares fit of measured ≈ scale·raw + ms_per_melement·melements + offset.

    The three-term model is fitted only when it is over-determined (at least MIN_POINTS_3TERM
    points, not collinear) and comes out physical (scale ≥ 0.2, cost per element ≥ 0, offset
    ≥ 0): an exact fit through three uniform-width points extrapolated wildly to other widths
    (see bench/lut_fidelity.py). Otherwise scale·raw + offset, or scale·raw alone when the
    offset comes out negative (a noisy fit with a negative offset predicted latencies near zero
    for tiny widths and let an impossible budget pass as feasible); with one distinct point,
    the offset.

    With `overhead` (a, b) from in-graph profile runs (fit_overhead), the shape is known and
    only the machine's speed now is fitted: measured ≈ scale·(raw + a + b·Melements), scale
    by least squares through the origin. One parameter over the points averages their noise;
    two or three parameters through three noisy points did not (bench/lut_fidelity.py)."""
    import numpy as np

    raw_a, meas_a = np.asarray(raw, float), np.asarray(measured, float)
    mel_a = np.asarray(melements if melements is not None else [0.0] * len(raw), float)
    n = len(raw_a)
    if overhead is not None:
        a, b = overhead
        base = raw_a + a + b * mel_a
        scale = float(base @ meas_a / (base @ base))
        return Calibration(scale, scale * b, scale * a, n)
    if n >= MIN_POINTS_3TERM and np.ptp(mel_a) > 0:
        design = np.column_stack([raw_a, mel_a, np.ones(n)])
        if np.linalg.matrix_rank(design) == 3:
            (scale, per_mel, offset), *_ = np.linalg.lstsq(design, meas_a, rcond=None)
            if scale >= 0.2 and per_mel >= 0 and offset >= 0:
                return Calibration(float(scale), float(per_mel), float(offset), n)
    if len(set(np.round(raw_a, 6))) < 2:
        return Calibration(1.0, 0.0, float(np.mean(meas_a - raw_a)), n)
    scale, offset = np.polyfit(raw_a, meas_a, 1)
    if scale <= 0.2:
        return Calibration(1.0, 0.0, float(np.mean(meas_a - raw_a)), n)
    if offset < 0:  # time outside the layers cannot be negative: through the origin instead
        return Calibration(float(raw_a @ meas_a / (raw_a @ raw_a)), 0.0, 0.0, n)
    return Calibration(float(scale), 0.0, float(offset), n)


_SPECS: dict[str, LayerSpec] = {}


def _spec(signature: str) -> LayerSpec | None:
    """The LayerSpec a signature was made from; None for a key that is not one (no rules or
    depthwise handling apply to it)."""
    if signature not in _SPECS:
        try:
            _SPECS[signature] = LayerSpec(**json.loads(signature))
        except (TypeError, ValueError):
            _SPECS[signature] = None
    return _SPECS[signature]


def _interp_grid(grid: dict[int, list[tuple[int, float]]], c_in: int, c_out: int,
                 diagonal: bool = False) -> tuple[float, str]:
    """(ms, "interpolated" | "extrapolated") from a c_in -> [(c_out, ms)] grid (see lookup).
    `diagonal` (a depthwise layer: c_in = c_out): one curve along the cells (c, c), not rows
    scaled in proportion to c_out and then interpolated (which carried a narrow row's fixed
    cost, scaled up, into every width above it: a 455-wide depthwise read 1.9x its cost)."""
    if diagonal:
        points = sorted((ci, next((ms for co, ms in row if co == ci), row[0][1])) for ci, row in grid.items())
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        return _interp(xs, ys, c_in), "interpolated" if xs[0] <= c_in <= xs[-1] else "extrapolated"
    rows = sorted(grid)
    ms = _interp(rows, [_row_value(grid[r], c_out) for r in rows], c_in)
    inside = rows[0] <= c_in <= rows[-1]
    if inside:
        lo = max(r for r in rows if r <= c_in)
        hi = min(r for r in rows if r >= c_in)
        inside = all(grid[r][0][0] <= c_out <= grid[r][-1][0] for r in {lo, hi})
    return ms, "interpolated" if inside else "extrapolated"


def _row_value(row: list[tuple[int, float]], c_out: int) -> float:
    xs = [c for c, _ in row]
    ys = [m for _, m in row]
    return _interp(xs, ys, c_out)


def _interp(xs: list[int], ys: list[float], x: int) -> float:
    """Piecewise-linear interpolation. Outside: above the last point the last segment's line
    (at least proportional scaling); under the first, the first segment's line held between
    proportional scaling and the first point (a kernel's fixed cost does not shrink with the
    width: proportional scaling read EfficientNet-B0's pruned fallback 1x1 convs, cells
    under the narrowest measured one, 10% low); one point: proportional."""
    if len(xs) == 1:
        return ys[0] * x / xs[0]
    if x <= xs[0]:
        slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
        return min(ys[0], max(ys[0] + slope * (x - xs[0]), ys[0] * x / xs[0]))
    if x >= xs[-1]:
        if len(xs) >= 2 and x > xs[-1]:
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
            return max(ys[-1] + slope * (x - xs[-1]), ys[-1] * x / xs[-1])
        return ys[-1]
    i = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)

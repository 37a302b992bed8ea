"""Drift between two measurements of the same latency-table cells (nightly re-profiles,
uploads from device agents): how much the device's timings moved.

A cell key is (fingerprint id, signature, c_in, c_out); values are ms.
"""
from __future__ import annotations

import json
from typing import Iterable

import numpy as np

from latprune.types import LayerSpec

CellKey = tuple[str, str, int, int]


def exchange_cells(data: dict) -> dict[CellKey, float]:
    """{cell key: ms} of a lut.exchange object (signatures normalised as the store keys them)."""
    from latprune.profiler.fingerprint import fingerprint_id

    out: dict[CellKey, float] = {}
    for table in data.get("tables", []):
        fp = fingerprint_id(table["fingerprint"])
        for cell in table.get("cells", []):
            sig = LayerSpec(**cell["signature"]).signature()
            out[(fp, sig, int(cell["c_in"]), int(cell["c_out"]))] = float(cell["ms"])
    return out


def compare(old: dict[CellKey, float], new: dict[CellKey, float], threshold: float = 0.10,
            worst: int = 5) -> dict:
    """Relative change (new - old) / old over the cells both have.

    Returns {"compared", "new_cells", "median_change", "median_abs_change", "p95_abs_change",
    "worst": [{"op", "c_in", "c_out", "old_ms", "new_ms", "change"}], "flagged"}; flagged when
    the median absolute change exceeds `threshold` (a share, 0.10 = 10%)."""
    common = [k for k in new if k in old and old[k] > 0]
    out = {"compared": len(common), "new_cells": sum(1 for k in new if k not in old), "flagged": False,
           "threshold": threshold}
    if not common:
        return out
    change = np.array([(new[k] - old[k]) / old[k] for k in common])
    order = np.argsort(-np.abs(change))[:worst]
    out.update({
        "median_change": float(np.median(change)),
        "median_abs_change": float(np.median(np.abs(change))),
        "p95_abs_change": float(np.quantile(np.abs(change), 0.95)),
        "worst": [_describe(common[i], old, new, change[i]) for i in order],
    })
    out["flagged"] = out["median_abs_change"] > threshold
    return out


def _describe(key: CellKey, old: dict, new: dict, change: float) -> dict:
    spec = json.loads(key[1])
    return {"op": spec.get("op"), "signature": key[1], "c_in": key[2], "c_out": key[3],
            "old_ms": old[key], "new_ms": new[key], "change": float(change)}


def even_sample(keys: Iterable, n: int) -> list:
    """At most n of `keys`, evenly spread over their sorted order (deterministic)."""
    keys = sorted(keys)
    if len(keys) <= n:
        return keys
    idx = np.linspace(0, len(keys) - 1, n).round().astype(int)
    return [keys[i] for i in sorted(set(idx.tolist()))]

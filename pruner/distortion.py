"""Output-distortion curves measured by forward passes (seed 000, ICCV variant).

For every prunable group g and candidate width w, the group alone is cut to its first w
channels in `orders[g]` (real surgery, pruner.surgery) and the pruned model runs on the
calibration inputs in ONNX Runtime; D_g(w) is the mean squared error of its outputs (logits;
every fixed-shape output of a detector, joined: pruner.forward.compared_outputs) against the
dense model's, averaged over items and output units. D_b is the same for removing
block b alone. Results are cached in a JSON file keyed by the model, the inputs and the orders.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np

from latprune.types import Plan
from latprune.pruner.analysis import Analysis
from latprune.pruner.forward import Runner
from latprune.pruner.surgery import apply_plan


@dataclass
class DistortionCurves:
    """D_g(w) for every prunable group (at its candidate widths; 0 at the full width) and
    D_b for removing each block alone. Units: mean squared error of the model's outputs."""

    widths: dict[int, list[int]]
    values: dict[int, list[float]]
    blocks: dict[int, float] = field(default_factory=dict)
    samples: int = 0
    seconds: float = 0.0
    method: str = "forward"  # "forward" (measured) or "fisher" (Gauss–Newton estimate)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> "DistortionCurves":
        """Parse to_json's text; keys this version does not know are ignored (a cache written
        by another version still reads)."""
        raw = json.loads(text)
        for k in ("widths", "values", "blocks"):
            raw[k] = {int(g): v for g, v in raw[k].items()}
        return DistortionCurves(**{k: v for k, v in raw.items() if k in _FIELDS})


_FIELDS = {f.name for f in fields(DistortionCurves)}


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def cache_key(analysis: Analysis, x: np.ndarray, orders: dict[int, list[int]], blocks: bool) -> str:
    h = hashlib.sha256()
    h.update(analysis.model.SerializeToString(deterministic=True))
    h.update(np.ascontiguousarray(x).tobytes())
    h.update(json.dumps({str(k): v for k, v in sorted(orders.items())}).encode())
    h.update(json.dumps({g.id: g.candidate_widths for g in analysis.problem.groups}).encode())
    h.update(b"blocks" if blocks else b"")
    return h.hexdigest()[:24]


def measure_distortion(analysis: Analysis, x: np.ndarray, orders: dict[int, list[int]],
                       blocks: bool = True, threads: int = 0, groups: bool = True,
                       progress: Callable[[int, int], None] | None = None,
                       cache_dir: Path | None = None) -> DistortionCurves:
    """Measure D_g(w) for every prunable group and candidate width below the group size, and
    D_b for every block when `blocks` (groups=False: blocks only). One surgery and one pass
    over `x` per entry."""
    key = cache_key(analysis, x, orders if groups else {}, blocks)
    cache = Path(cache_dir) / f"distortion-{key}.json" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            return DistortionCurves.from_json(cache.read_text())
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # an unreadable cache file (truncated, foreign) is measured again and replaced
    t0 = time.perf_counter()
    prob = analysis.problem
    reference = Runner(analysis.model, threads=threads).logits(x)
    jobs: list[tuple[str, int, int, Plan]] = []
    for g in prob.groups:
        if not g.prunable or not groups:
            continue
        for w in g.candidate_widths:
            if w < g.size:
                jobs.append(("group", g.id, w, Plan(kept={g.id: sorted(orders[g.id][:w])})))
    if blocks:
        for b in prob.blocks:
            inner = {g.id: [] for g in prob.groups if g.prunable and g.inner_of_block == b.id}
            jobs.append(("block", b.id, 0, Plan(kept=inner, removed_blocks=[b.id])))
    values = {g.id: [0.0] * len(g.candidate_widths) for g in prob.groups if g.prunable}
    widths = {g.id: list(g.candidate_widths) for g in prob.groups if g.prunable}
    block_values: dict[int, float] = {}
    for done, (kind, ident, w, plan) in enumerate(jobs):
        pruned = apply_plan(analysis, plan, check=False)
        d = mse(Runner(pruned, threads=threads).logits(x), reference)
        if kind == "group":
            values[ident][widths[ident].index(w)] = d
        else:
            block_values[ident] = d
        if progress:
            progress(done + 1, len(jobs))
    curves = DistortionCurves(widths, values, block_values, len(x), time.perf_counter() - t0)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(curves.to_json())
        tmp.replace(cache)
    return curves


def joint_distortion(analysis: Analysis, x: np.ndarray, plan: Plan, reference: np.ndarray | None = None,
                     threads: int = 0) -> float:
    """Measured distortion of a whole plan (for the additivity check)."""
    if reference is None:
        reference = Runner(analysis.model, threads=threads).logits(x)
    return mse(Runner(apply_plan(analysis, plan, check=False), threads=threads).logits(x), reference)


def additivity_check(analysis: Analysis, x: np.ndarray, curves: DistortionCurves,
                     orders: dict[int, list[int]], configs: int = 30, seed: int = 0,
                     threads: int = 0, max_share: float = 0.5,
                     progress: Callable[[int, int], None] | None = None) -> dict:
    """Does the sum of single-group distortions predict the joint distortion? (The DP's premise.)
    Draws `configs` random plans that cut a random subset (up to `max_share`) of the prunable
    groups to random smaller candidate widths, measures each plan's joint distortion and returns
    {"pairs": [(Σ D_g, measured)], "pearson": r, "spearman": ρ, "median_ratio": measured/sum}."""
    rng = np.random.default_rng(seed)
    prob = analysis.problem
    groups = [g for g in prob.groups if g.prunable and len(g.candidate_widths) > 1]
    if not groups:
        raise ValueError("no prunable group has more than one candidate width")
    reference = Runner(analysis.model, threads=threads).logits(x)
    pairs = []
    for i in range(configs):
        k = int(rng.integers(2, max(3, int(len(groups) * max_share) + 1)))
        chosen = rng.choice(len(groups), size=min(k, len(groups)), replace=False)
        kept, predicted = {}, 0.0
        for idx in chosen:
            g = groups[int(idx)]
            j = int(rng.integers(0, len(g.candidate_widths) - 1))
            w = g.candidate_widths[j]
            kept[g.id] = sorted(orders[g.id][:w])
            predicted += curves.values[g.id][j]
        measured = joint_distortion(analysis, x, Plan(kept=kept), reference, threads)
        pairs.append((predicted, measured))
        if progress:
            progress(i + 1, configs)
    a = np.asarray(pairs)
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    return {"pairs": [tuple(map(float, p)) for p in pairs],
            "pearson": float(np.corrcoef(a[:, 0], a[:, 1])[0, 1]),
            "spearman": float(np.corrcoef(rank(a[:, 0]), rank(a[:, 1]))[0, 1]),
            "median_ratio": float(np.median(a[:, 1] / np.maximum(a[:, 0], 1e-12)))}

"""The channel multiple a backend runs fastest at, measured by a short probe on the device.

Runtimes block channels (ONNX Runtime's NCHWc convs use blocks of 16 channels with AVX-512,
8 with AVX2; GPUs tile by 32 or 64): a width off the block runs the cost of the next block or
worse. The probe times a 3x3 convolution (14x14 input, c_in = c_out = w) at every multiple
of 4 from 32 to 128 channels, in 3 interleaved rounds, and compares the cost per
multiply-add (t / w²) of the widths half a block off against the block's multiples: the step
is the largest block b of 64, 32, 16, 8 whose half-block widths cost at least
`THRESHOLD` more; 8 when none does (no blocking seen: 8 keeps the solve small). About 5 s on
a CPU; cached per device fingerprint in $LATPRUNE_HOME/probe.json.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

WIDTHS = tuple(range(32, 129, 4))
BLOCKS = (64, 32, 16, 8)
THRESHOLD = 1.08
DEFAULT_STEP = 8


def _cache_path() -> Path:
    home = Path(os.environ.get("LATPRUNE_HOME", Path.home() / ".cache" / "latprune"))
    return home / "probe.json"


def step_from_timings(ms: dict[int, float], blocks=BLOCKS, threshold: float = THRESHOLD) -> tuple[int, dict]:
    """(step, {block: cost ratio of half-block widths to multiples}) from conv timings per
    width (module doc)."""
    per_mac = {w: t / (w * w) for w, t in ms.items() if t > 0}
    ratios = {}
    for b in blocks:
        half = b // 2
        r = [per_mac[w] / ((per_mac[w - half] + per_mac[w + half]) / 2) for w in per_mac
             if w % b == half and w - half in per_mac and w + half in per_mac]
        if r:
            ratios[b] = float(np.median(r))
    for b in blocks:
        if ratios.get(b, 0.0) >= threshold:
            return b, ratios
    return DEFAULT_STEP, ratios


def probe_timings(backend, widths=WIDTHS, rounds: int = 3) -> dict[int, float]:
    """Median ms of the probe conv at each width, over `rounds` interleaved rounds."""
    from latprune.profiler.backends.base import timed_runs
    from latprune.profiler.layers import layer_model
    from latprune.types import LayerSpec

    spec = LayerSpec("Conv", [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], False, [14, 14], 1, activation="Relu")
    runners = {w: backend.load(layer_model(spec, w, w).SerializeToString()) for w in widths}
    feeds = {w: r.inputs(2) for w, r in runners.items()}
    samples: dict[int, list[float]] = {w: [] for w in widths}
    try:
        for _ in range(rounds):
            for w in widths:
                samples[w].append(float(np.median(timed_runs(runners[w], 2, 10, 0.02, inputs=feeds[w]))))
    finally:
        for r in runners.values():
            r.close()
    return {w: float(np.median(v)) for w, v in samples.items()}


def _cache_entry(backend) -> tuple[str, dict, dict]:
    """(device key, the whole probe cache, the device's fingerprint without timing)."""
    from latprune.profiler.fingerprint import fingerprint_id

    fp = {k: v for k, v in backend.fingerprint(timing="isolated").items() if k != "timing"}
    path = _cache_path()
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        cache = {}
    return fingerprint_id(fp), cache, fp


def _save_cache(cache: dict) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: probe again next time


def channel_step(backend) -> int:
    """The backend's preferred channel multiple (module doc), probed once per device."""
    key, cache, fp = _cache_entry(backend)
    if key in cache and isinstance(cache[key].get("step"), int):
        return cache[key]["step"]
    t0 = time.perf_counter()
    step, ratios = step_from_timings(probe_timings(backend))
    cache.setdefault(key, {}).update({"step": step, "ratios": {str(b): r for b, r in ratios.items()},
                                      "fingerprint": fp, "seconds": time.perf_counter() - t0})
    _save_cache(cache)
    return step


# ---- blocking rules per layer kind (issue 15; lut/blocking.py says what a rule is) -----------
# Each kind's probe layer at 14x14 (tokens: 196), one axis swept over PROBE_WIDTHS with the
# other at PROBE_OTHER channels, timed in-graph (the backend's kernel times, so the layout
# reorders a one-layer model needs around a blocked kernel do not count), in interleaved
# rounds beside the PROBE_OTHER-wide model.
PROBE_WIDTHS = tuple(range(48, 81))
PROBE_OTHER = 64
ALIGNS = (1, 2, 4, 8, 16, 32)
PAD_BLOCKS = (64, 32, 16, 8, 4, 2)
PLATEAU_TOL = 0.05  # median relative miss a rule may leave on the fast widths (timing noise)
PLATEAU_TOL_P90 = 0.10
# Runs per probe layer: 15-40 runs of 0.05 s let two probes on one machine disagree on a
# depthwise block (8 or 16) and on the direct 1x1 line by 20% (MobileNetV2's any-width error
# went from 1.3% to 10% between them); 40-80 runs of 0.15 s take ~25 s.
PROBE_SECONDS = 0.15
PROBE_RUNS = 40
BLOCKING_VERSION = 10  # bump when the probe changes what it measures: cached rules are redone


def probe_specs() -> dict[str, "LayerSpec"]:
    from latprune.types import LayerSpec

    def conv(k, hw, depthwise=False):
        return LayerSpec("Conv", [k, k], [1, 1], [k // 2] * 4, [1, 1], depthwise, [hw, hw], 1,
                         activation="Relu")

    grouped = LayerSpec("Conv", [3, 3], [1, 1], [1] * 4, [1, 1], False, [14, 14], 1, activation="Relu",
                        fixed_groups=PROBE_GROUPS)
    # spatial sizes that give each kind ~0.1-0.3 ms at 64 channels on a CPU: a 20 µs kernel's
    # timing noise let the fit take noise for blocks (a 1x1 conv at 14x14 read "padded to 2")
    return {"conv1x1": conv(1, 28), "conv": conv(3, 14), "depthwise": conv(3, 56, depthwise=True),
            "grouped": grouped, "gemm": LayerSpec("MatMul", [], [], [], [], False, [784], 1, has_bias=True)}


PROBE_GROUPS = 2  # the grouped probe's group count; its rule is in channels per group


def _line_residuals(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Residuals of the least-squares line y ≈ a + b·x (zeros with fewer than 3 points: a
    regime that short says nothing)."""
    if len(x) < 3 or np.ptp(x) == 0:
        return np.zeros(len(x)) if len(x) < 3 else y - y.mean()
    coef = np.polyfit(x, y, 1)
    return y - np.polyval(coef, x)


def _rule_fit(widths: np.ndarray, log_ms: np.ndarray, align: int, block: int) -> tuple[float, float]:
    """(RMS of log residuals, penalty) of the rule (align, block): the fast widths' log ms a
    line in the log of their padded width, the others' a line of their own."""
    fast = widths % align == 0
    padded = -(-widths // block) * block
    xf = np.log(padded[fast])
    res_fast = _line_residuals(xf, log_ms[fast])
    res_slow = _line_residuals(np.log(widths[~fast]), log_ms[~fast])
    rms = float(np.sqrt(np.mean(np.concatenate([res_fast, res_slow]) ** 2)))
    penalty = 1.0
    if (~fast).any() and fast.sum() >= 2 and np.ptp(xf) > 0:
        coef = np.polyfit(xf, log_ms[fast], 1)
        penalty = float(np.exp(np.median(log_ms[~fast] - np.polyval(coef, np.log(padded[~fast])))))
    return rms, penalty


# A rule with fallback widths (align > 1) must explain the timings this much better than the
# best rule without: two more parameters fit noise a little better by themselves.
ALIGN_GAIN = 0.6
PAD_GAIN = 0.7  # likewise a padding block over the smooth line (same parameters, but 6 blocks to pick from)
NOISE_RMS = 0.012  # log-residual RMS under which an axis counts as smooth (timing noise)


def axis_rule(ms: dict[int, float]):
    """The AxisRule (lut/blocking.py) that best explains ms per width along one axis.

    Every rule (align in ALIGNS, block in PAD_BLOCKS or 1) is fitted by least squares: the
    log ms of the aligned widths a line in the log of their padded width, the other widths'
    a line of their own; the rule with the smallest RMS residual wins: a padding block only
    if it cuts the smooth fit's RMS to PAD_GAIN or below, fallback widths (align > 1) only if
    they cut the best rule without them to ALIGN_GAIN or below. An axis whose
    smooth fit is already within timing noise (NOISE_RMS) is smooth. The penalty is the
    median fallback ms over the fast line at the padded width."""
    from latprune.lut.blocking import AxisRule

    items = sorted((w, t) for w, t in ms.items() if t > 0)
    widths = np.array([w for w, _ in items])
    log_ms = np.log([t for _, t in items])
    if len(widths) < 8:
        return AxisRule()
    smooth_rms, _ = _rule_fit(widths, log_ms, 1, 1)
    if smooth_rms <= NOISE_RMS:
        return AxisRule()
    fits = {(a, b): _rule_fit(widths, log_ms, a, b)
            for a in ALIGNS for b in [1] + [b for b in PAD_BLOCKS if b % a == 0 and b > a]}
    padded = min((k for k in fits if k[0] == 1 and k[1] > 1), key=lambda k: (fits[k][0], k[1]))
    plain = padded if fits[padded][0] <= PAD_GAIN * smooth_rms else (1, 1)
    aligned = min((k for k in fits if k[0] > 1), key=lambda k: (fits[k][0], k))
    best = aligned if fits[aligned][0] <= ALIGN_GAIN * fits[plain][0] else plain
    if best == (1, 1):
        return AxisRule()
    return AxisRule(best[0], best[1], fits[best][1] if best[0] > 1 else 1.0)


# Direct kernels: ONNX Runtime's NCHWc conv reads an input narrower than its block in plain
# layout (as a stem reads 3 channels): on AVX-512 (block 16) a 3x3 conv at 8 input channels
# costs 0.6x its 16-channel time, a 1x1 conv 1.3x (where the padding rule said 1.0x, and a
# model pruned to 8 channels was predicted slower than its 16-channel original while it ran
# 15% faster). The input axis of plain convs is also swept over DIRECT_WIDTHS ("in_low"); the
# widths under the runtime's block (runtime_block: the one most probed axes pad to) are a
# direct kernel when they lie on one line in the width, aligned or not (relative RMS under
# DIRECT_RMS: padded widths sit ~100% off such a line), growing with it (DIRECT_GROWTH from
# half the block to the block's last width), with no alignment gap (DIRECT_GAP): not padded,
# no fallback penalty.
DIRECT_WIDTHS = tuple(range(2, 33))
DIRECT_KINDS = ("conv", "conv1x1")
DIRECT_RMS = 0.2
DIRECT_GROWTH = 1.3
DIRECT_GAP = 0.2


def direct_rule(rule, ms: dict[int, float], block: int | None = None):
    """`rule` (an input axis' AxisRule) with direct_below/direct/direct_fixed set from `ms`
    (kernel ms per input width over DIRECT_WIDTHS) where the widths under `block` (default:
    the rule's own) run a direct kernel: they lie on one line (relative RMS under DIRECT_RMS),
    growing with the width (DIRECT_GROWTH from half the block to its last width), and the
    widths off the alignment in its upper half cost no more than the aligned ones beyond
    DIRECT_GAP (a blocked kernel's fallback widths cost 1.2-1.6x; a direct kernel has no
    alignment). Then: the line's value at the block over the fast time there and its
    intercept's share of that value; `rule` itself otherwise (no blocking, a block outside
    the sweep, too few widths)."""
    from dataclasses import replace

    block = block or rule.block
    if rule.align <= 1 or block <= 1 or block not in ms:
        return rule
    below = sorted((w, t) for w, t in ms.items() if w < block and t > 0)
    if len(below) < 4 or not any(w % rule.align for w, _ in below):
        return rule
    w = np.array([x for x, _ in below], float)
    t = np.array([y for _, y in below])
    coef = np.polyfit(w, t, 1)
    rel = t / np.polyval(coef, w) - 1
    rms = float(np.sqrt(np.mean(rel ** 2)))
    half = np.polyval(coef, max(block // 2, w.min()))
    if rms > DIRECT_RMS or coef[0] <= 0 or np.polyval(coef, block - 1) < DIRECT_GROWTH * half:
        return rule
    upper = w >= block // 2
    on, off = rel[upper & (w % rule.align == 0)], rel[upper & (w % rule.align != 0)]
    if len(on) and len(off) and np.median(off) - np.median(on) > DIRECT_GAP:
        return rule
    at_block = float(np.polyval(coef, block))
    fixed = float(np.clip(coef[1] / at_block, 0.0, 0.9))
    return replace(rule, direct_below=block, direct=at_block / ms[block], direct_fixed=fixed)


def runtime_block(rules: dict[str, dict]) -> int:
    """The padding block most of the probed axes agree on (0 if none pads).

    The direct kernel's threshold is the runtime's channel block (ONNX Runtime reads any plain
    conv input under `MlasNchwcGetBlockSize()` directly), one per runtime, but a single axis'
    padding fit can miss it: a 1x1 conv's input padding is a few percent at 48-80 channels,
    and one probe on an AVX-512 CPU fitted 8 there, where every other axis read 16, and priced
    8-15 input channels at the fast kernel while they run direct at 2-3x its 16-channel time."""
    from collections import Counter

    blocks = Counter(r.block for axes in rules.values() for r in axes.values() if r.block > 1)
    return max(blocks, key=lambda b: (blocks[b], b)) if blocks else 0


def blocking_timings(backend, widths=PROBE_WIDTHS, other: int = PROBE_OTHER,
                     progress=None) -> dict[str, dict[str, dict[int, float]]]:
    """{kind: {axis: {width: kernel ms}}}: each probe layer (probe_specs) with one axis swept
    over `widths` and the other at `other` channels (depthwise: one axis), its kernel times
    taken in-graph and in interleaved rounds (profiler.ingraph.profile_interleaved); plain
    convs' input axis also over DIRECT_WIDTHS ("in_low") and their output axis over
    DIRECT_WIDTHS too (a 1x1 conv's output padding, subtle at 48-80 channels, read "any
    width" in some probes; at 2-16 channels it is a plateau: EfficientNet-B0's projections
    pruned to 6-8 outputs read 0.4x their time without it), a grouped conv's over twice
    `widths` (its rule is per group: two blocks of 16 per group need widths past 64)."""
    from latprune.profiler.ingraph import profile_interleaved
    from latprune.profiler.layers import layer_model

    out: dict[str, dict[str, dict[int, float]]] = {}
    specs = probe_specs()
    for n, (kind, spec) in enumerate(specs.items()):
        axes = ("in",) if spec.depthwise else ("in", "out")
        groups = spec.fixed_groups if kind == "grouped" else 1
        sweep = range(widths[0], groups * widths[-1] + 1, groups) if groups > 1 else widths
        items = [{"axis": axis, "width": w} for axis in axes for w in sweep]
        if kind in DIRECT_KINDS:  # inputs under the block; outputs there too (padding shows as a plateau)
            items += [{"axis": axis, "width": w} for axis in ("in_low", "out") for w in DIRECT_WIDTHS]
        # widths in a seeded random order: profile_interleaved scales each batch of models by
        # its own reference time, and a batch of consecutive widths that the scaling misses
        # (a slow phase hits the small layers differently from the reference) is a step that a
        # fit reads as a block (the 1x1 conv's direct line jumped 1.5x between widths 7 and 8
        # at a batch boundary and failed the line test); mixed batches make it noise
        items = [items[i] for i in np.random.default_rng(n).permutation(len(items))]

        def build(item, spec=spec):
            axis, w = (item["axis"], item["width"]) if item is not None else ("in", other)
            c_in = w if axis in ("in", "in_low") else other
            model = layer_model(spec, c_in, w if axis == "out" else other)
            for i, node in enumerate(model.graph.node):
                node.name = f"probe_{i}"
            return model.SerializeToString()

        names = {f"probe_{i}": 0 for i in range(8)}
        for node in layer_model(spec, other, other).graph.node:
            names.update({t: 0 for t in node.output})
        timings = profile_interleaved(items, build, build(None), names, backend.threads, min_seconds=PROBE_SECONDS,
                                      min_runs=PROBE_RUNS, max_runs=2 * PROBE_RUNS, backend=backend)
        out[kind] = {item["axis"]: {} for item in items}
        for item, t in zip(items, timings):
            if t.layer_ms.get(0, 0) > 0:  # grouped: keyed by channels per group
                out[kind][item["axis"]][item["width"] // groups] = t.layer_ms[0]
        if progress:
            progress(n + 1, len(specs))
    return out


def rules_from_timings(timings: dict[str, dict[str, dict[int, float]]]):
    """BlockingRules from blocking_timings' output (axis_rule per kind and axis; a grouped
    conv's rule in channels per group, lut.blocking.BlockingRules.groups)."""
    from latprune.lut.blocking import BlockingRules

    rules = {kind: {axis: axis_rule(ms) for axis, ms in axes.items() if axis in ("in", "out")}
             for kind, axes in timings.items()}
    block = runtime_block(rules)
    for kind, axes in timings.items():
        if "in_low" in axes and "in" in rules[kind]:
            rules[kind]["in"] = direct_rule(rules[kind]["in"], axes["in_low"], block or None)
    if "depthwise" in rules:
        rules["depthwise"]["out"] = rules["depthwise"]["in"]
    if "conv" in rules and "grouped" not in rules:
        rules["grouped"] = dict(rules["conv"])
    return BlockingRules(rules)


def blocking_rules(backend, progress=None) -> tuple["BlockingRules", dict]:
    """(rules, what the probe found: {"seconds", "timings", "version"}) for `backend` on this
    device, probed once per device fingerprint (cached beside channel_step's result)."""
    from latprune.lut.blocking import BlockingRules

    key, cache, fp = _cache_entry(backend)
    entry = cache.get(key, {}).get("blocking")
    if isinstance(entry, dict) and entry.get("version") == BLOCKING_VERSION:
        try:
            return BlockingRules.from_records(entry["records"]), entry
        except (KeyError, TypeError, ValueError):
            pass
    t0 = time.perf_counter()
    timings = blocking_timings(backend, progress=progress)
    rules = rules_from_timings(timings)
    entry = {"version": BLOCKING_VERSION, "records": rules.as_records(), "seconds": time.perf_counter() - t0,
             "timings": {k: {a: {str(w): t for w, t in v.items()} for a, v in ax.items()} for k, ax in timings.items()}}
    cache.setdefault(key, {"fingerprint": fp})["blocking"] = entry
    _save_cache(cache)
    return rules, entry

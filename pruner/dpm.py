"""Decay Pruning Method (DPM): prune while training, smoothly and self-rectifying (needs torch).

A training-loop component (plain torch, no framework) for the Plans of latprune's solvers on a
module analysed by `pruner.torch_frontend.analyse_module`. SEEDS.md §4 (Yang et al., arXiv
2406.03879; no published code, formulas below are ours where the paper's are unverified).

Hook for your own training loop::

    from latprune.pruner.torch_frontend import analyse_module, export_pruned
    from latprune.pruner.dpm import DecayPruner

    graph = analyse_module(model, example_input)         # groups, blocks, module tensor map
    dpm = DecayPruner(graph, plan, decay_steps=500)      # plan: latprune.types.Plan
    for x, y in data:
        opt.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        dpm.before_step()        # reads gradients (self-rectifying), after backward
        opt.step()
        dpm.after_step()         # rescales the decaying channels, after the optimizer step
    final_plan = dpm.finish()    # every removed channel is exactly 0; the plan after swaps
    onnx_model = export_pruned(graph, final_plan)        # same outputs, fewer channels

`one_shot_mask(graph, plan)` is the baseline with the same hooks: the removed channels are
zeroed at once and re-zeroed after every step (equivalent to training the pruned network).
`decay_masks()` says which parameter entries are under decay, e.g. to exclude them from weight
decay (`latprune.finetune` does); optimizer weight decay on them is harmless (it only shrinks).

**Smooth pruning (norm-targeted decay).** A *unit* is one channel of a group that the plan
removes (or one removed residual block). Its tensors are every producer slice that makes the
channel non-zero (`TorchPruneGraph.param_slices`, ``decays=True``: the out-channel rows of every
conv/linear writing it, their biases, BatchNorm weight *and* bias, additive per-channel
constants), over all producers of the group (all the convs tied by residual adds), so the
channel is exactly 0 wherever it flows: after BN (β too), ReLU, residual sums and zero-padding
shortcuts. After each optimizer step, with n steps done since the unit started decaying over L
steps and x₀ its joint L2 norm then, the unit is rescaled (direction kept) so that

    ‖x‖ ≤ (L − n) / L · ‖x₀‖          (only shrunk; never scaled up)

and at n = L it is set to exactly 0 and kept there (re-zeroed after every later step). With every
producer at 0 the channel's output is 0, so removing it (pruner.surgery via `export_pruned`)
changes nothing; `finish()` checks this on the example inputs.

**Removed blocks.** A block the plan removes is one unit: the producers of its branch output
inside the branch (for a ResNet BasicBlock: conv2's weights and bn2's weight and bias, all
channels) decay the same way, so the branch adds exactly 0 to the skip path at the end and
removing the block changes nothing. Its inner groups are left alone (they vanish with it), and
the channel units of other groups exclude slices inside removed blocks (units never overlap).
Blocks are not self-rectified (a block has no peers to swap with at the same cost).

**Self-rectifying** (`rectify=True`). In `before_step` (gradients of the loss, before the
optimizer and before weight decay is added) every decaying channel c gets, per step:

- escape: ⟨g_c, x_c⟩ < 0 over its producer slices, i.e. the gradient step −lr·g would
  *increase* its norm (the loss wants the channel back). The escape rate is the share of such
  steps in the last `window` steps.
- length: ‖g_c‖ / median over the channels c' of its group of ‖g_c'‖ (same kind of slices),
  averaged over the window: how hard the loss pulls on c compared with its peers.

Every `interval` steps, while at most `rectify_until`·N steps are done, a channel with a full
window whose escape rate > `rate_threshold` and length > `length_threshold` is *released*: it
stops decaying and keeps its current (partly shrunk) weights, which training then regrows. To
keep the planned width, the group's next candidate starts decaying in its place: the kept
channel with the lowest importance (`scores`, default the group's importance in the Problem,
i.e. the L1 prior analyse_module fills), never a channel released before. The replacement
decays over the steps left until N, so every removal still completes at step N. Each swap is
recorded in `swaps`; `final_plan()` is the plan with the kept sets after the swaps (same widths).

Defaults (the paper's values are unverified; these are our choices):

- `decay_steps` N = 500: about 1.3 CIFAR-10 epochs at batch 128; long against SGD's step-to-
  step noise so the network can re-route, short enough to leave most of a few-epoch fine-tune
  for recovery at the final width. `latprune.finetune` defaults N to half of its total steps.
- `window` = 20, `rate_threshold` = 0.8: when the gradient's sign relative to x_c is a coin
  flip (a channel the loss does not care about), a rate above 0.8 (≥ 17 of 20) has probability
  0.13%; a wrongly chosen channel pushes back on nearly every step.
- `length_threshold` = 1.5: the pull must clearly exceed the group's typical gradient. In a
  check on the trained CIFAR ResNet-20 (1.3× latency plan, 46-step decay, 3,000 images, batch 64)
  the window-mean length of the 176 decaying channels had median 1.0, 90th percentile 1.17 and
  maximum 1.5, their escape rates median 0.55 and 90th percentile 0.73: both thresholds sit
  outside that bulk, so a swap needs a channel that is an outlier on both counts (that run made
  none). Caveat: with BN after the conv the loss is scale-invariant in the conv rows, whose
  gradient grows as 1/‖x‖ while the channel shrinks; `rectify_until` bounds that inflation.
- `interval` = 10, `rectify_until` = 0.5: decisions are taken on overlapping windows at most
  every 10 steps, and only in the first half of the decay, so a replacement still has at least
  N/2 steps to decay smoothly instead of being cut abruptly near the end. For short decays the
  window is capped at `rectify_until`·N/2 steps so that a decision can happen at all.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass

import numpy as np

from latprune.types import InputError, Plan

DEFAULT_DECAY_STEPS = 500
DEFAULT_RATE_THRESHOLD = 0.8
DEFAULT_LENGTH_THRESHOLD = 1.5
DEFAULT_WINDOW = 20
DEFAULT_INTERVAL = 10
DEFAULT_RECTIFY_UNTIL = 0.5


def _torch():
    from latprune.pruner.torch_frontend import _torch as require_torch

    return require_torch("DPM")


@dataclass
class Swap:
    """A self-rectifying swap: at `step` (optimizer steps done), channel `released` of `group`
    stopped decaying and `replacement` started. `escape_rate` and `length`: the window's values."""

    step: int
    group: int
    released: int
    replacement: int
    escape_rate: float
    length: float


@dataclass
class _Unit:
    start: int  # optimizer steps done when the decay started
    length: int  # steps from start to exactly zero
    norm0: float


class DecayPruner:
    """Decays the channels (and blocks) a Plan removes to zero while training (module doc)."""

    def __init__(self, graph, plan: Plan, decay_steps: int = DEFAULT_DECAY_STEPS,
                 rate_threshold: float = DEFAULT_RATE_THRESHOLD,
                 length_threshold: float = DEFAULT_LENGTH_THRESHOLD, rectify: bool = True,
                 interval: int = DEFAULT_INTERVAL, window: int = DEFAULT_WINDOW,
                 rectify_until: float = DEFAULT_RECTIFY_UNTIL,
                 scores: dict[int, list[float]] | None = None) -> None:
        from latprune.pruner.surgery import validate_plan

        torch = _torch()
        self._t = torch
        if decay_steps < 0:
            raise InputError(f"decay_steps must be at least 0, not {decay_steps}")
        if interval < 1 or window < 1:
            raise InputError("interval and window must be at least 1")
        validate_plan(graph.analysis, plan)
        self.graph = graph
        self.plan = plan
        self.decay_steps = int(decay_steps)
        self.rate_threshold = float(rate_threshold)
        self.length_threshold = float(length_threshold)
        self.rectify = bool(rectify) and decay_steps > 0
        self.interval = int(interval)
        # Decisions need a full window inside the rectifying period: cap the window there.
        self.window = min(int(window), max(1, int(rectify_until * decay_steps) // 2)) if decay_steps else int(window)
        self.rectify_until = float(rectify_until)
        self.step = 0
        self.swaps: list[Swap] = []
        self.tensors = graph.tensors()
        prob = graph.problem

        removed_blocks = sorted(set(plan.removed_blocks))
        removed_nodes = {n for b in removed_blocks for n in prob.blocks[b].branch_nodes}
        # Channel ids: every position of every prunable group not inside a removed block.
        self.groups = [g.id for g in prob.groups if g.prunable and g.inner_of_block not in removed_blocks]
        self.offset: dict[int, int] = {}
        n = 0
        for gid in self.groups:
            self.offset[gid] = n
            n += prob.groups[gid].size
        self.n_channels = n
        self.block_id = {b: n + k for k, b in enumerate(removed_blocks)}
        self.n_ids = n + len(removed_blocks)

        entries: dict[tuple[str, int], dict[int, int]] = {}  # (tensor, axis) -> {index: id}

        def add(name: str, axis: int, index: np.ndarray, ids: np.ndarray) -> None:
            if name not in self.tensors:
                raise InputError(f"module tensor {name} not found (did the module change?)")
            slot = entries.setdefault((name, axis), {})
            for i, u in zip(index.tolist(), ids.tolist()):
                slot.setdefault(int(i), int(u))  # shared slices: first owner

        for gid in self.groups:
            for s in graph.param_slices.get(gid, []):
                if s.role == "producer" and s.decays and s.node not in removed_nodes:
                    add(s.name, s.axis, s.index, self.offset[gid] + s.positions)
        for b in removed_blocks:
            sl = [s for s in graph.block_slices.get(b, []) if s.decays]
            if not sl:
                raise InputError(f"block {b}: no module parameter produces its branch output, so it "
                                 "cannot be decayed (see TorchPruneGraph.notes); use the one-shot path")
            for s in sl:
                add(s.name, s.axis, s.index, np.full(len(s.index), self.block_id[b], dtype=np.int64))
        self._entries = []
        for (name, axis), slot in entries.items():
            idx = torch.tensor(sorted(slot), dtype=torch.long)
            ids = torch.tensor([slot[i] for i in sorted(slot)], dtype=torch.long)
            self._entries.append((name, axis, idx, ids))

        self.kept: dict[int, set[int]] = {}
        self.released: dict[int, set[int]] = {gid: set() for gid in self.groups}
        self.scores: dict[int, np.ndarray] = {}
        for gid in self.groups:
            size = prob.groups[gid].size
            self.kept[gid] = set(plan.kept.get(gid, range(size)))
            src = (scores or {}).get(gid)
            if src is None:
                src = prob.groups[gid].importance or [0.0] * size
            if len(src) != size:
                raise InputError(f"scores for group {gid}: {len(src)} values for {size} channels")
            self.scores[gid] = np.asarray(src, dtype=float)
        norms = self._norms()
        self.active: dict[int, _Unit] = {}
        self.done: set[int] = set()
        self.unit_group: dict[int, tuple[int, int]] = {}  # channel id -> (group, position)
        for gid in self.groups:
            for pos in range(prob.groups[gid].size):
                self.unit_group[self.offset[gid] + pos] = (gid, pos)
            for pos in sorted(set(range(prob.groups[gid].size)) - self.kept[gid]):
                u = self.offset[gid] + pos
                self.active[u] = _Unit(0, self.decay_steps, float(norms[u]))
        for b, u in self.block_id.items():
            self.active[u] = _Unit(0, self.decay_steps, float(norms[u]))
        self._history: dict[int, deque] = {}
        self._masks = None
        if self.decay_steps == 0:  # one shot: zero now
            self.done.update(self.active)
            self.active.clear()
            self._rescale(self._factors(norms))

    # ---- vectorised access to the unit slices -----------------------------------------------
    def _select(self, name: str, axis: int, idx, source=None):
        t = self.tensors[name] if source is None else source
        return t.detach().index_select(axis, idx)

    @staticmethod
    def _per_index(x, axis: int):
        """Sum over every dim but `axis` -> one value per selected index."""
        x = x.movedim(axis, 0)
        return x.reshape(x.shape[0], -1).sum(dim=1)

    def _norms(self):
        """L2 norm per id (channels and blocks), float64 numpy."""
        torch = self._t
        sq = torch.zeros(self.n_ids, dtype=torch.float64)
        for name, axis, idx, ids in self._entries:
            sel = self._select(name, axis, idx).double()
            sq.index_add_(0, ids, self._per_index(sel * sel, axis))
        return sq.sqrt().numpy()

    def _factors(self, norms: np.ndarray) -> np.ndarray:
        f = np.ones(self.n_ids)
        for u in self.done:
            f[u] = 0.0
        for u, unit in self.active.items():
            k = self.step - unit.start
            target = unit.norm0 * max(0.0, (unit.length - k) / unit.length) if unit.length > 0 else 0.0
            if norms[u] > target:
                f[u] = target / norms[u] if target > 0 else 0.0
        return f

    def _rescale(self, factors: np.ndarray) -> None:
        torch = self._t
        fac = torch.from_numpy(factors)
        with torch.no_grad():
            for name, axis, idx, ids in self._entries:
                f = fac[ids]
                keep = f != 1.0
                if not bool(keep.any()):
                    continue
                sub_idx, f = idx[keep], f[keep]
                t = self.tensors[name]
                sel = t.detach().index_select(axis, sub_idx)
                shape = [1] * sel.dim()
                shape[axis] = -1
                new = torch.where(f.view(shape) == 0, torch.zeros((), dtype=sel.dtype),
                                  sel * f.to(sel.dtype).view(shape))
                t.index_copy_(axis, sub_idx, new)

    # ---- the hooks ----------------------------------------------------------------------------
    def before_step(self) -> None:
        """Call after loss.backward(), before optimizer.step(): self-rectifying statistics and
        swaps (no-op without rectify, or after the first `rectify_until`·N steps)."""
        if not self.rectify or self.step > self.rectify_until * self.decay_steps:
            return
        chan_units = [u for u in self.active if u < self.n_channels]
        if not chan_units:
            return
        torch = self._t
        dot = torch.zeros(self.n_ids, dtype=torch.float64)
        gsq = torch.zeros(self.n_ids, dtype=torch.float64)
        for name, axis, idx, ids in self._entries:
            t = self.tensors[name]
            if t.grad is None:
                continue
            w = self._select(name, axis, idx).double()
            g = t.grad.detach().index_select(axis, idx).double()
            dot.index_add_(0, ids, self._per_index(g * w, axis))
            gsq.index_add_(0, ids, self._per_index(g * g, axis))
        gnorm = gsq.sqrt().numpy()
        dot = dot.numpy()
        medians: dict[int, float] = {}
        for u in chan_units:
            gid, _ = self.unit_group[u]
            if gid not in medians:
                o, size = self.offset[gid], self.graph.problem.groups[gid].size
                medians[gid] = float(np.median(gnorm[o:o + size]))
            med = medians[gid]
            length = gnorm[u] / med if med > 0 else (np.inf if gnorm[u] > 0 else 0.0)
            self._history.setdefault(u, deque(maxlen=self.window)).append((dot[u] < 0, length))
        if self.step % self.interval:
            return
        for u in sorted(chan_units):
            hist = self._history.get(u)
            if u not in self.active or hist is None or len(hist) < self.window:
                continue
            rate = float(np.mean([e for e, _ in hist]))
            length = float(np.mean([min(x, 1e12) for _, x in hist]))
            if rate > self.rate_threshold and length > self.length_threshold:
                self._swap(u, rate, length)

    def _swap(self, u: int, rate: float, length: float) -> None:
        gid, pos = self.unit_group[u]
        cands = sorted(self.kept[gid] - self.released[gid])
        if not cands:
            return  # nothing left to take its place: keep decaying it
        scores = self.scores[gid]
        repl = min(cands, key=lambda c: (scores[c], c))
        del self.active[u]
        self._history.pop(u, None)
        self.released[gid].add(pos)
        self.kept[gid].add(pos)
        self.kept[gid].discard(repl)
        r = self.offset[gid] + repl
        norm = float(self._norms()[r])
        self.active[r] = _Unit(self.step, max(1, self.decay_steps - self.step), norm)
        self._masks = None
        self.swaps.append(Swap(self.step, gid, pos, repl, rate, length))

    def after_step(self) -> None:
        """Call right after optimizer.step(): advance the schedule and rescale every decaying
        unit to its target norm; finished units are (re)set to exactly zero."""
        self.step += 1
        if not self.active and not self.done:
            return
        norms = self._norms()
        for u, unit in list(self.active.items()):
            if self.step - unit.start >= unit.length:
                del self.active[u]
                self._history.pop(u, None)
                self.done.add(u)
        self._rescale(self._factors(norms))

    # ---- results ------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """Every unit has reached zero."""
        return not self.active

    def final_plan(self) -> Plan:
        """The plan with the kept channels after the swaps (widths unchanged)."""
        kept = {gid: list(idx) for gid, idx in self.plan.kept.items()}
        for gid in self.groups:
            if gid in self.plan.kept:
                kept[gid] = sorted(self.kept[gid])
        method = self.plan.method + ("+dpm" if self.decay_steps else "+oneshot") if self.plan.method else ""
        return dataclasses.replace(self.plan, kept=kept, method=method)

    def decay_masks(self) -> dict:
        """{module tensor name: bool tensor}: True where an entry belongs to a unit that is
        decaying or decayed (e.g. to exclude it from weight decay)."""
        if self._masks is None:
            torch = self._t
            under = torch.zeros(self.n_ids, dtype=torch.bool)
            for u in list(self.active) + list(self.done):
                under[u] = True
            masks = {}
            for name, axis, idx, ids in self._entries:
                sel = under[ids]
                if not bool(sel.any()):
                    continue
                t = self.tensors[name]
                m = masks.setdefault(name, torch.zeros(t.shape, dtype=torch.bool))
                m.index_fill_(axis, idx[sel], True)
            self._masks = masks
        return self._masks

    def status(self) -> dict:
        return {"step": self.step, "decay_steps": self.decay_steps, "decaying": len(self.active),
                "zero": len(self.done), "swaps": len(self.swaps)}

    def finish(self, force: bool = False, verify: bool = True) -> Plan:
        """End the decay: every unit must have reached zero (`force`: cut the rest now). Sets
        the removed channels to exactly 0 (again), checks it, and with `verify` checks that the
        pruned ONNX model (`export_pruned`) gives the module's outputs on the example inputs
        (1e-4 of their magnitude). Returns `final_plan()`."""
        if self.active:
            if not force:
                raise RuntimeError(f"the decay is not complete: {self.step} of {self.decay_steps} steps "
                                   f"done, {len(self.active)} units still decaying (finish(force=True) cuts them)")
            self.done.update(self.active)
            self.active.clear()
            self._masks = None
        self._rescale(self._factors(self._norms()))
        norms = self._norms()
        left = [u for u in self.done if norms[u] != 0.0]
        if left:
            raise RuntimeError(f"{len(left)} decayed units are not exactly zero")
        plan = self.final_plan()
        if verify:
            self._verify(plan)
        return plan

    def _verify(self, plan: Plan, rtol: float = 1e-4) -> None:
        import onnxruntime as ort

        from latprune.pruner.torch_frontend import export_pruned

        torch = self._t
        module = self.graph.module
        inputs = self.graph.example_inputs
        was = {m: m.training for m in module.modules()}
        module.eval()
        try:
            with torch.no_grad():
                expected = module(*inputs)
        finally:
            for m, mode in was.items():
                m.train(mode)
        expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
        model = export_pruned(self.graph, plan)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        got = sess.run(None, {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), inputs)})
        for g, e in zip(got, expected):
            e = e.detach().cpu().numpy()
            err = float(np.max(np.abs(g - e)))
            if not err <= rtol * float(np.max(np.abs(e))) + 1e-5:
                raise RuntimeError(f"the pruned model differs from the decayed module by {err:.3g}")


def one_shot_mask(graph, plan: Plan) -> DecayPruner:
    """The "prune, then fine-tune" baseline with DPM's hooks: the channels and blocks `plan`
    removes are zeroed now and re-zeroed after every optimizer step, which is the same as
    training the pruned network (no gradient reaches a zero channel's consumers; its BN output
    is 0). `finish()` returns the plan unchanged."""
    return DecayPruner(graph, plan, decay_steps=0, rectify=False)


__all__ = ["DecayPruner", "Swap", "one_shot_mask", "DEFAULT_DECAY_STEPS", "DEFAULT_RATE_THRESHOLD",
           "DEFAULT_LENGTH_THRESHOLD", "DEFAULT_WINDOW", "DEFAULT_INTERVAL", "DEFAULT_RECTIFY_UNTIL"]

"""Label-free recovery: a bounded number of distillation steps that train the pruned model's
weights to reproduce the dense model's outputs on the calibration inputs (issue 16).

What a user with calibration inputs but no labels (and a few minutes) can do after the
training-free repair (pruner.repair): the dense model is the teacher. Its outputs on every
calibration input are computed once with ONNX Runtime; the pruned model runs in torch
(pruner.onnx_torch.OnnxTorch: every float initializer a parameter) and Adam minimises, over
minibatches (learning rate falling from `lr` to 0 on a cosine), the mean squared error between
its outputs and the teacher's, each output divided by the teacher's variance (logit matching, which needs no knowledge of what the
outputs mean, so detectors and transformers qualify as well as classifiers).

A tenth of the calibration inputs (at least one batch, when there are enough) is held out:
the weights kept are those of the step with the lowest held-out loss, checked every
`eval_every` steps, so a long run never ends worse than it started (the repaired weights are
step 0). The recovered weights are written back into the pruned ONNX model's initializers;
the graph, and so the latency, is unchanged.

Needs torch (an optional dependency: `pip install latprune[bench]` or any torch).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from latprune.types import InputError

# Adam's initial rate: on CIFAR ResNet-56 at 0.5x (1024 inputs, 300 steps) 1e-4 gave +4.5
# points over lsq repair, 3e-4 +5.5, 1e-3 diverged (the held-out check kept step 0).
DEFAULT_LR = 3e-4
DEFAULT_STEPS = 300
# Inputs recovery reads from the calibration file (more than the distortion curves' 256: on
# ResNet-56 at 0.5x, 256 inputs gave +1.7 points and 1024 +4.7 at the same 300 steps).
RECOVER_SAMPLES = 1024
DEFAULT_BATCH = 64
HOLDOUT_SHARE = 0.1


@dataclass
class Recovery:
    """What recover() did: steps run, the held-out loss before and after (normalised MSE,
    1.0 = as far from the teacher as a constant output), the step kept and the seconds."""

    steps: int
    best_step: int
    holdout_loss_before: float
    holdout_loss_after: float
    seconds: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _teacher_outputs(dense: onnx.ModelProto, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
    """The dense model's outputs `names` (the pruned graph's outputs, which keep the dense
    model's names) over all of `x`, float32."""
    from latprune.pruner.forward import Runner

    out = Runner(dense, extra_outputs=names).run(x)
    missing = [n for n in names if n not in out]
    if missing:
        raise InputError(f"the dense model has no output {missing[0]!r} to distil from")
    return [np.asarray(out[n], dtype=np.float32) for n in names]


def holdout_split(n: int, batch: int = DEFAULT_BATCH,
                  seed: "int | np.random.Generator" = 0) -> tuple[np.ndarray, np.ndarray]:
    """(held-out, training) indices of recover()'s n calibration inputs: a tenth held out, at
    most one batch and at most half. Repair before recovery should not see the held-out ones:
    a held-out check on inputs the repair was fitted to favours the repaired weights (step 0)."""
    order = np.random.default_rng(seed).permutation(n)
    n_hold = max(1, min(int(round(HOLDOUT_SHARE * n)), batch, n // 2))
    return order[:n_hold], order[n_hold:]


def recover(dense: onnx.ModelProto, pruned: onnx.ModelProto, calib_x: np.ndarray, steps: int,
            lr: float = DEFAULT_LR, batch: int = DEFAULT_BATCH, eval_every: int = 25, seed: int = 0,
            progress: Callable[[int, int], None] | None = None) -> tuple[onnx.ModelProto, Recovery]:
    """The pruned model with its weights trained for `steps` minibatch steps to match the dense
    model's outputs on `calib_x` (one input: the array of calibration inputs, batch first);
    the best held-out step's weights. InputError without torch or with too few inputs."""
    try:
        import torch
    except ImportError:
        raise InputError("label-free recovery needs PyTorch: pip install torch") from None
    from latprune.pruner.onnx_torch import OnnxTorch

    t0 = time.perf_counter()
    x = np.asarray(calib_x, dtype=np.float32)
    if steps < 1:
        raise InputError("recovery needs at least one step")
    if len(x) < 2:
        raise InputError(f"recovery needs at least 2 calibration inputs, not {len(x)}")
    rng = np.random.default_rng(seed)  # the split is its first draw; minibatches follow
    hold, train = holdout_split(len(x), batch, rng)
    from latprune.pruner.forward import compared_outputs

    names = compared_outputs(pruned)  # the float outputs of fixed shape (distortion's outputs)
    teacher = _teacher_outputs(dense, x, names)
    scale = [float(t.var()) or 1.0 for t in teacher]
    torch.manual_seed(seed)
    student = OnnxTorch(pruned)
    picked = [student.outputs.index(n) for n in names]
    if not student.params:
        raise InputError("the pruned model has no float weights to recover")
    opt = torch.optim.Adam(list({id(p): p for p in student.params.values()}.values()), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)

    def loss_on(idx: np.ndarray, grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            outs, _ = student(torch.from_numpy(x[idx]))
            outs = [outs[k] for k in picked]
            return sum(torch.mean((o - torch.from_numpy(t[idx])) ** 2) / s
                       for o, t, s in zip(outs, teacher, scale)) / len(outs)

    def holdout() -> float:
        return float(sum(loss_on(hold[s:s + batch], False) * len(hold[s:s + batch])
                         for s in range(0, len(hold), batch)) / len(hold))

    def snapshot() -> dict[str, np.ndarray]:
        return {name: p.detach().numpy().copy() for name, p in student.params.items()}

    before = best_loss = holdout()
    best, best_step = snapshot(), 0
    for step in range(1, steps + 1):
        idx = train[rng.integers(0, len(train), size=min(batch, len(train)))]
        loss = loss_on(idx, True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            now = holdout()
            if now < best_loss:
                best_loss, best, best_step = now, snapshot(), step
        if progress:
            progress(step, steps)
    out = onnx.ModelProto()
    out.CopyFrom(pruned)
    for init in out.graph.initializer:
        if init.name in best:
            init.CopyFrom(numpy_helper.from_array(best[init.name].astype(numpy_helper.to_array(init).dtype),
                                                  init.name))
    return out, Recovery(steps, best_step, before, best_loss, time.perf_counter() - t0)

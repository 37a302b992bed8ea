"""The options of an optimisation, defined once.

`OptimizeSettings` holds what a user chooses (budget, backend, solver, objective, ...), with
each field's constraints and help text: the CLI takes its defaults and help from it, the HTTP
schema of a job (service.schemas.JobCreate) inherits it, and the job runner validates a job's
stored options with it. `OptimizeOptions` adds what the caller supplies (the table file, the
calibration source, labels for the report) and is what the pipeline runs on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from latprune.types import InputError

METHODS = ("milp", "dp", "minlp-oa", "minlp-scip", "halp", "threshold", "uniform", "brute")
OBJECTIVES = ("auto", "importance", "distortion")
IMPORTANCES = ("l1", "l2", "bn", "activation", "taylor")
DISTORTIONS = ("forward", "fisher")
REPAIRS = ("auto", "none", "bias", "lsq")
BUDGETS = ("budget_ms", "speedup", "flops_ratio", "params_ratio")


class OptimizeSettings(BaseModel):
    """What the user chooses for one optimisation (module docstring)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    budget_ms: float | None = Field(None, gt=0, le=1e6, description="latency budget in ms on the device")
    speedup: float | None = Field(None, gt=0, le=1000, description="budget = dense latency / SPEEDUP")
    flops_ratio: float | None = Field(None, gt=0, le=1, description="budget: this share (0-1] of the dense FLOPs")
    params_ratio: float | None = Field(None, gt=0, le=1,
                                       description="budget: this share (0-1] of the dense parameters")
    precision: str | None = Field(None, max_length=16, pattern=r"^[A-Za-z0-9]+$",
                                  description="inference precision: OpenVINO f32 | bf16 | f16 (default: the "
                                              "runtime's), TensorRT fp32 | fp16 | int8")
    threads: int = Field(1, ge=1, le=64, description="intra-op threads for every timing")
    method: Literal[METHODS] = Field(  # type: ignore[valid-type]
        "milp", description="milp (exact, HiGHS) | dp (distortion DP) | minlp-oa (Pyomo MindtPy) | minlp-scip "
                            "| halp | threshold | uniform | brute")
    objective: Literal[OBJECTIVES] = Field(  # type: ignore[valid-type]
        "auto", description="importance | distortion (auto: distortion with calibration inputs, else importance)")
    importance: Literal[IMPORTANCES] = Field(  # type: ignore[valid-type]
        "l1", description="channel ranking: l1 | l2 | bn | activation | taylor")
    distortion: Literal[DISTORTIONS] = Field(  # type: ignore[valid-type]
        "forward", description="distortion curves: forward (measured) | fisher (estimated)")
    repair: Literal[REPAIRS] = Field(  # type: ignore[valid-type]
        "auto", description="none | bias | lsq (auto: lsq with calibration inputs, else none)")
    recover_steps: int | None = Field(None, ge=0, le=100_000,
                                      description="label-free recovery after repair: this many steps of distillation "
                                                  "from the dense model's outputs on the calibration inputs (needs "
                                                  "--calib and PyTorch; 0: off; default: 600 when --calib is a file, "
                                                  "repair is on and PyTorch is installed, else off)")
    recover_seconds: float = Field(600.0, gt=0, le=86_400,
                                   description="time cap of label-free recovery, s: the steps are cut to what fits")
    calib_samples: int = Field(
        256, ge=1, le=100_000, description="calibration inputs for the distortion curves and importance; repair "
        "and recovery read up to 1024 of the file (repair: as many as its activations fit in 4 GiB)")
    step: int | None = Field(None, ge=1, le=1024, description="channel widths are multiples of STEP (default: "
                                                               "the backend's block, probed on the device)")
    max_candidates: int = Field(16, ge=1, le=256, description="candidate widths per channel group")
    time_limit_s: float = Field(60.0, gt=0, le=86_400, description="solver time limit, s")
    remove_blocks: Literal["auto", "yes", "no"] = Field(
        "auto", description="remove whole residual blocks: auto (distortion objective: priced and allowed; "
                            "importance: only when the budget needs it) | yes | no")
    rounds: int = Field(4, ge=1, le=50, description="re-solve rounds when the measurement misses")
    sequence_length: int | None = Field(None, ge=1, le=65536,
                                        description="size of the model's dynamic input axes other than the batch "
                                                    "(sequence length) for analysis, tables and timing "
                                                    "(default 128 when it has any); the pruned model keeps them dynamic")
    prune_streams: Literal["auto", "yes", "no"] = Field(
        "auto", description="prune channel groups that a LayerNorm normalises (the residual stream): auto (yes, "
                            "except in models with attention, whose every block reads the stream) | yes | no")
    timing: Literal["in-graph", "isolated"] = Field(
        "in-graph", description="how table cells are timed: in-graph (kernels inside pruned copies of the model, "
                                "the runtime's profiler) | isolated (one-layer models)")



class OptimizeOptions(OptimizeSettings):
    """OptimizeSettings plus what the caller supplies; what the pipeline runs on."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, arbitrary_types_allowed=True)

    # The target runtime (profiler/backends: ort-cpu, openvino, ort-cuda, ort-trt, trt); the
    # service sets it from the job's device.
    backend: str = "ort-cpu"
    lut_path: Path | None = None
    calib: str | None = None  # .npz path or "noise" (latprune.calibration)
    grid_points: int = 5
    measure_processes: int = 2  # fresh processes per end-to-end check (see profiler.compare)
    # Names the report shows instead of the model, table and calibration paths (the service
    # shows its ids, never its files). None: the paths.
    model_label: str | None = None
    lut_label: str | None = None
    calib_label: str | None = None

    def __init__(self, **values) -> None:
        """A value out of range (or of an unknown choice) is an InputError naming its CLI flag,
        so the CLI prints one line and a Python caller gets the pipeline's own error type."""
        try:
            super().__init__(**values)
        except ValidationError as exc:
            err = exc.errors()[0]
            flag = "--" + str(err["loc"][0]).replace("_", "-") if err.get("loc") else "an option"
            raise InputError(f"{flag}: {err['msg']} (got {err.get('input')!r})") from None

    @classmethod
    def from_flags(cls, **values) -> "OptimizeOptions":
        """Build from CLI values (InputError naming the flag of a bad one)."""
        return cls(**values)

    def replace(self, **changes) -> "OptimizeOptions":
        return self.model_copy(update=changes)

    def resolved_objective(self) -> str:
        return self.objective if self.objective != "auto" else ("distortion" if self.calib else "importance")

    def resolved_repair(self) -> str:
        return self.repair if self.repair != "auto" else ("lsq" if self.calib else "none")

    def resolved_recover_steps(self) -> int:
        """Recovery steps: as given, or by default DEFAULT_STEPS when the calibration inputs are a
        file (not the zero-data 'noise': distilling on noise teaches nothing) and torch imports."""
        if self.recover_steps is not None:
            return self.recover_steps
        import importlib.util

        from latprune.pruner.recover import DEFAULT_STEPS
        real = bool(self.calib) and self.calib != "noise" and self.resolved_repair() != "none"
        return DEFAULT_STEPS if real and importlib.util.find_spec("torch") is not None else 0


def settings_fields() -> tuple[str, ...]:
    """The names of the user's options (what a job stores and the job runner passes on)."""
    return tuple(OptimizeSettings.model_fields)


def help_text(name: str) -> str:
    return OptimizeSettings.model_fields[name].description or ""

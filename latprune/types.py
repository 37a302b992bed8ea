"""The plain data types that cross the pipeline's boundaries.

Problem (pruner -> solver), Plan (solver -> pruner), Report (pipeline -> user).
All are dataclasses that serialise to JSON with `to_json()` / `from_json()`, so that
each step can be run, cached and tested alone.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


class LatpruneError(Exception):
    """An error the user can act on; the CLI prints its message on one line and exits 2."""


class InputError(LatpruneError):
    """Bad input: a file that is not a usable model, a budget that cannot be met, ..."""


def _asdict(obj: Any) -> Any:
    return dataclasses.asdict(obj)


@dataclass
class ChannelGroup:
    """Channels that must keep the same indices in every tensor they appear in.

    `size` is the number of channels in the dense model; `prunable` is False when the
    channels touch a graph input/output or an operator the analysis does not understand.
    `candidate_widths` are the widths the solver may choose (ascending, the last is `size`).
    `importance` is one score per channel (index = channel position within the group),
    filled by solver.importance; `inner_of_block` names the removable block that holds
    every channel of this group, if any (removing the block removes the group).
    """

    id: int
    size: int
    prunable: bool
    candidate_widths: list[int] = field(default_factory=list)
    importance: list[float] = field(default_factory=list)
    inner_of_block: int | None = None
    members: list[str] = field(default_factory=list)  # human-readable "tensor[axis]" samples


@dataclass
class LayerSpec:
    """What decides a layer's latency apart from its channel counts.

    op: "Conv", "ConvTranspose", "Gemm" (a Gemm, or a MatMul of a 2-D input with a weight)
    or "MatMul" (a weight applied along the last axis of a (B, ..., C) input, e.g. tokens).
    kernel/stride/pads/dilation follow ONNX attribute order (pads: begins then ends).
    input_hw: spatial size of the input (a conv's H, W), or the sizes between the batch and the
    channel axis of a MatMul's input (its token count); empty for Gemm. `depthwise` means
    groups == c_in == c_out, so both widths move together. `activation` is the unary op
    that ONNX Runtime fuses into the layer (e.g. "Relu"), or "".
    `fixed_groups`: the `group` attribute of a grouped conv whose group count never changes;
    `group_channels`: input channels per group of a grouped conv whose groups are pruned
    whole (group count = c_in / group_channels).
    """

    op: str
    kernel: list[int]
    stride: list[int]
    pads: list[int]
    dilation: list[int]
    depthwise: bool
    input_hw: list[int]
    batch: int
    dtype: str = "float32"
    activation: str = ""
    has_bias: bool = True
    fixed_groups: int = 1  # `group` attribute of a grouped (not depthwise) conv
    group_channels: int = 0

    def signature(self) -> str:
        """Lookup-table key: identical for layers that share every latency-relevant attribute.
        Fields added after the first tables were written are left out at their defaults, so
        the signatures (and the tables keyed by them) of older layers do not change."""
        fields = _asdict(self)
        for name, default in _LATER_FIELDS.items():
            if fields.get(name) == default:
                fields.pop(name)
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))


# LayerSpec fields added after tables existed, with the default that leaves them out of the key.
_LATER_FIELDS = {"group_channels": 0}


@dataclass
class Space:
    """The channel axis of a layer's input or output, as a sum over channel groups.

    width = fixed + sum(mult * width(group) for group, mult in terms). `mult` is the number
    of features per channel (1 for conv channels; H*W for a Flatten into a Gemm).
    """

    fixed: int = 0
    terms: list[tuple[int, int]] = field(default_factory=list)  # (group id, mult)

    def key(self) -> str:
        return f"{self.fixed}|" + ",".join(f"{g}x{m}" for g, m in sorted(self.terms))

    def width(self, group_widths: dict[int, int]) -> int:
        return self.fixed + sum(m * group_widths[g] for g, m in self.terms)


@dataclass
class Layer:
    """One conv/gemm node: its spec, its input/output channel spaces and its block."""

    name: str
    spec: LayerSpec
    c_in: Space
    c_out: Space
    dense_c_in: int
    dense_c_out: int
    block: int | None = None  # removable block this layer lies in


@dataclass
class Block:
    """A residual branch that can be removed whole (the Add's output becomes `skip`)."""

    id: int
    add_node: str
    skip: str
    branch_nodes: list[str]
    importance: float = 0.0  # what the block writes into the channels outside it (see importance)


@dataclass
class Overhead:
    """Elements written by operators outside the conv/gemm layers (residual adds, unfused
    activations, pooling, pads, concats), as a Space: fixed + Σ mult·width(group), summed over
    the tensors of one block (`block`) or of the rest of the model (None). Memory-bound work
    that scales with channel widths; see lut.predict.overhead_elements."""

    block: int | None
    space: Space


@dataclass
class Problem:
    """Everything the solver needs: groups, layers (bilayer latency), blocks, overheads."""

    model_name: str
    groups: list[ChannelGroup]
    layers: list[Layer]
    blocks: list[Block]
    step: int = 8
    overheads: list[Overhead] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(_asdict(self), indent=1)

    @staticmethod
    def from_json(text: str) -> "Problem":
        raw = json.loads(text)
        groups = [ChannelGroup(**g) for g in raw["groups"]]
        layers = []
        for layer in raw["layers"]:
            layer = dict(layer)
            layer["spec"] = LayerSpec(**layer["spec"])
            for k in ("c_in", "c_out"):
                layer[k] = Space(layer[k]["fixed"], [tuple(t) for t in layer[k]["terms"]])
            layers.append(Layer(**layer))
        blocks = [Block(**b) for b in raw["blocks"]]
        overheads = [Overhead(o["block"], Space(o["space"]["fixed"], [tuple(t) for t in o["space"]["terms"]]))
                     for o in raw.get("overheads", [])]
        return Problem(raw["model_name"], groups, layers, blocks, raw.get("step", 8), overheads)

    def group(self, gid: int) -> ChannelGroup:
        return self.groups[gid]


@dataclass
class Plan:
    """The solver's answer: kept channel indices per group and removed blocks.

    `kept` maps group id -> sorted channel positions (within the group) to keep; a group
    absent from `kept` is kept whole. `widths` repeats len(kept[g]) for readability.
    """

    kept: dict[int, list[int]]
    removed_blocks: list[int] = field(default_factory=list)
    widths: dict[int, int] = field(default_factory=dict)
    method: str = ""
    objective: float = 0.0
    predicted_ms: float = 0.0
    solve_seconds: float = 0.0
    status: str = ""
    gap: float = 0.0

    def to_json(self) -> str:
        return json.dumps(_asdict(self), indent=1)

    @staticmethod
    def from_json(text: str) -> "Plan":
        raw = json.loads(text)
        raw["kept"] = {int(k): v for k, v in raw["kept"].items()}
        raw["widths"] = {int(k): v for k, v in raw.get("widths", {}).items()}
        return Plan(**raw)


@dataclass
class TimingStats:
    """End-to-end latency of one model in milliseconds."""

    median_ms: float
    p90_ms: float
    min_ms: float
    runs: int

    def as_dict(self) -> dict:
        return _asdict(self)

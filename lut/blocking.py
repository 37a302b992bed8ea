"""How a runtime blocks channels, per layer kind and axis: the rules a latency table predicts
off-grid widths with (issue 15).

Runtimes run a layer's channels in blocks. ONNX Runtime's NCHWc convolutions on this CPU, for
example, take any output width and pad it to a block of 8 (45 channels cost what 48 do), but
need an input width that is a multiple of 4: at 45 input channels the conv falls back to a
slower NCHW kernel (+25% for a 3x3 conv, 5x for a depthwise one) with layout reorders around
it. A bilinear surface through multiples of the step sees neither.

An `AxisRule` says, for one axis (input or output channels) of one layer kind:

  align    widths that are multiples of `align` run the fast (blocked) kernel; other widths
           run the fallback kernel (align 1: every width runs the fast kernel)
  block    the fast kernel costs what the next multiple of `block` costs (block 1: no padding)
  penalty  the median cost of a fallback width over the fast cost of its padded width (what a
           prediction uses when the table holds no fallback cell of a layer)
  direct_below, direct, direct_fixed
           (input axis of plain convs) widths under `direct_below` run a third, *direct*
           kernel that reads the plain layout as it is (ONNX Runtime's NCHWc conv reads an
           input narrower than its block without reordering it, as a stem reads 3 channels):
           no alignment, no padding, its own smooth surface. Its cost is a line in the width:
           `direct` times the fast cost at the block where the line reaches the block, of
           which the share `direct_fixed` does not shrink with the width (what a prediction
           uses when the table holds no direct cell). On AVX-512 (block 16) a 3x3 conv
           reading 8 channels costs 0.6x its 16-channel cost, a 1x1 conv 1.4-2x (between
           probes): neither is the padded width.

A layer's (c_in, c_out) is *direct* when its input axis is under the rule's direct_below,
else *fast* when both axes are aligned, else *fallback*. The table keeps the regimes apart:
a fast cell is predicted from fast cells at padded widths, a direct cell from direct cells, a
fallback cell from fallback cells (smooth: those kernels do not pad), and from another
regime (times the penalty, or along the direct line) only where the table has none of its
own (lut/store.py). The rules come from a short probe on the device (profiler/probe.py) and
are stored in the table beside its cells.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from latprune.types import LayerSpec

KINDS = ("conv1x1", "conv", "depthwise", "grouped", "gemm")
AXES = ("in", "out")


@dataclass(frozen=True)
class AxisRule:
    """See the module doc. penalty: fallback ms over fast ms at the padded width (≥ 0)."""

    align: int = 1
    block: int = 1
    penalty: float = 1.0
    direct_below: int = 0
    direct: float = 1.0
    direct_fixed: float = 0.0

    def direct_cost(self, width: int, fast_ms: float) -> float:
        """ms of the direct kernel at `width` given the fast kernel's ms at the block."""
        return fast_ms * self.direct * (self.direct_fixed + (1 - self.direct_fixed) * width / self.direct_below)

    def is_direct(self, width: int) -> bool:
        """Whether `width` runs the direct kernel (under direct_below; module doc)."""
        return 0 < width < self.direct_below

    def aligned(self, width: int) -> bool:
        """Whether `width` runs no fallback kernel (a direct width counts as aligned)."""
        return width % self.align == 0 or self.is_direct(width)

    def pad(self, width: int) -> int:
        """The width the fast kernel runs at: `width` rounded up to a multiple of `block` (a
        direct width is not padded)."""
        return width if self.is_direct(width) else -(-width // self.block) * self.block

    def as_dict(self) -> dict:
        return asdict(self)


SMOOTH = AxisRule()


def layer_kind(spec: LayerSpec) -> str | None:
    """The probed kind whose rules apply to a layer of `spec`; None where none applies
    (attention: its widths are head counts times the head size)."""
    if spec.op in ("Gemm", "MatMul"):
        return "gemm"
    if spec.op not in ("Conv", "ConvTranspose"):
        return None
    if spec.depthwise:
        return "depthwise"
    if spec.fixed_groups > 1 or spec.group_channels:
        return "grouped"
    if all(k == 1 for k in spec.kernel):
        return "conv1x1"
    return "conv"


class BlockingRules:
    """{kind: {"in": AxisRule, "out": AxisRule}} for one device fingerprint; a kind the probe
    did not cover is smooth (the table's old behaviour)."""

    def __init__(self, rules: dict[str, dict[str, AxisRule]] | None = None):
        self.rules = rules or {}

    def __bool__(self) -> bool:
        return any(r != SMOOTH for axes in self.rules.values() for r in axes.values())

    @staticmethod
    def groups(spec: LayerSpec, c_in: int) -> int:
        """The conv groups a grouped (not depthwise) layer runs at c_in input channels; 1
        otherwise. A grouped kind's rules apply to the channels of one group: ONNX Runtime
        blocks a grouped conv only when every group's input and output widths are multiples
        of its block (RegNetX pruned by Torch-Pruning to 13 channels per group runs plain)."""
        if spec.depthwise:
            return 1
        if spec.group_channels:
            return max(1, c_in // spec.group_channels)
        return max(1, spec.fixed_groups)

    def fast(self, spec: LayerSpec, c_in: int, c_out: int, fixed_in: bool = False,
             fixed_out: bool = False) -> bool:
        """Whether (c_in, c_out) runs the fast kernel; a `fixed` axis (one that never changes
        width) is left out."""
        rin, rout = self.axes(spec)
        g = self.groups(spec, c_in)
        return (fixed_in or rin.aligned(c_in // g if c_in % g == 0 else c_in)) and \
            (fixed_out or rout.aligned(c_out // g if c_out % g == 0 else c_out))

    def regime(self, spec: LayerSpec, c_in: int, c_out: int, fixed_in: bool = False,
               fixed_out: bool = False) -> str:
        """"direct", "fast" or "fallback" (module doc); a `fixed` axis is left out, as in fast."""
        rin, _ = self.axes(spec)
        if not fixed_in and not spec.depthwise and self.groups(spec, c_in) == 1 and rin.is_direct(c_in):
            return "direct"
        return "fast" if self.fast(spec, c_in, c_out, fixed_in, fixed_out) else "fallback"

    def axes(self, spec: LayerSpec) -> tuple[AxisRule, AxisRule]:
        kind = layer_kind(spec)
        axes = self.rules.get(kind, {}) if kind else {}
        if spec.depthwise:  # one width: the stricter of the two axes
            rule = axes.get("in", SMOOTH)
            return rule, rule
        return axes.get("in", SMOOTH), axes.get("out", SMOOTH)

    def padded(self, spec: LayerSpec, c_in: int, c_out: int) -> tuple[int, int]:
        rin, rout = self.axes(spec)
        g = self.groups(spec, c_in)
        if g > 1 and c_in % g == 0 and c_out % g == 0:
            return rin.pad(c_in // g) * g, rout.pad(c_out // g) * g
        return rin.pad(c_in), rout.pad(c_out)

    def penalty(self, spec: LayerSpec, c_in: int, c_out: int) -> float:
        """Fallback over fast cost of a cell (1 when it is fast): the larger of the axes' that
        are off their alignment."""
        rin, rout = self.axes(spec)
        g = self.groups(spec, c_in)
        units = (c_in // g, c_out // g) if c_in % g == 0 and c_out % g == 0 else (c_in, c_out)
        return max([r.penalty for r, w in zip((rin, rout), units) if not r.aligned(w)], default=1.0)

    def as_records(self) -> list[dict]:
        return [{"kind": kind, "axis": axis, **rule.as_dict()}
                for kind, axes in sorted(self.rules.items()) for axis, rule in sorted(axes.items())]

    @classmethod
    def from_records(cls, records: list[dict]) -> "BlockingRules":
        rules: dict[str, dict[str, AxisRule]] = {}
        for r in records:
            rules.setdefault(r["kind"], {})[r["axis"]] = AxisRule(
                int(r["align"]), int(r["block"]), float(r["penalty"]),
                int(r.get("direct_below", 0)), float(r.get("direct", 1.0)),
                float(r.get("direct_fixed", 0.0)))  # absent before version 3
        return cls(rules)

    def describe(self) -> str:
        parts = []
        for kind, axes in sorted(self.rules.items()):
            text = ", ".join(f"{axis}: " + ("any width" if r == SMOOTH else
                                            f"multiples of {r.align} fast" + (f", padded to {r.block}" if r.block > 1 else "")
                                            + (f", others x{r.penalty:.2f}" if r.align > 1 else "")
                                            + (f"; under {r.direct_below} direct, x{r.direct:.2f} at "
                                               f"{r.direct_below}, {100 * r.direct_fixed:.0f}% fixed"
                                               if r.direct_below else ""))
                             for axis, r in sorted(axes.items()))
            parts.append(f"{kind} ({text})")
        return "; ".join(parts) or "no blocking"

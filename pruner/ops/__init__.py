"""The operator-handler registry: one handler per ONNX op type (see base.py for what a handler
says). Analysis, surgery, layer specs, repair, channel statistics and the torch frontend all
ask `handler_for(node)`; none of them branches on op types.

Adding an operator: write a subclass of `OpHandler` with its `op_types`, `propagate` and,
when it has per-channel constants or attributes, `params` / `rewrite`; add it to `HANDLERS`
below (or call `register` from your own code); test it with a small graph built by
tests/onnx_builders.py (tests/test_op_handlers.py shows the pattern: analysis finds the
expected groups, a keep-everything plan changes no output, a random plan gives a valid model).
"""
from __future__ import annotations

import onnx

from latprune.pruner.ops.base import (AtomMap, GraphView, NotUnderstood, OpHandler, ParamAxis,
                                      PropagateContext, SurgeryContext, attr)
from latprune.pruner.ops.elementwise import Broadcast, Unary
from latprune.pruner.ops.layers import Conv, ConvTranspose, Gemm, MatMul
from latprune.pruner.ops.norm import BatchNorm, LayerNorm, OverAxis
from latprune.pruner.ops.pool import ArgReduce, Reduce, Resize, SpatialPool
from latprune.pruner.ops.shape import (Concat, Expand, Gather, Pad, Reshape, ShapeOf, Slice, Split,
                                       Transpose)

HANDLERS: dict[str, OpHandler] = {}


def register(handler_class: type[OpHandler]) -> type[OpHandler]:
    """Register one instance of `handler_class` for each of its op types (a later
    registration of the same op type replaces the earlier one)."""
    instance = handler_class()
    for op_type in handler_class.op_types:
        HANDLERS[op_type] = instance
    return handler_class


for _cls in (Unary, Broadcast, Conv, ConvTranspose, Gemm, MatMul, BatchNorm, LayerNorm, OverAxis,
             SpatialPool, Reduce, ArgReduce, Resize, ShapeOf, Transpose, Reshape, Concat, Split,
             Slice, Pad, Gather, Expand):
    register(_cls)


def handler_for(node: onnx.NodeProto) -> OpHandler | None:
    """The handler of `node`'s op type (standard ONNX domain only), or None."""
    if node.domain not in ("", "ai.onnx"):
        return None
    return HANDLERS.get(node.op_type)


__all__ = ["AtomMap", "GraphView", "HANDLERS", "NotUnderstood", "OpHandler", "ParamAxis",
           "PropagateContext", "SurgeryContext", "attr", "handler_for", "register"]

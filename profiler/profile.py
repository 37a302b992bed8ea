"""Fill a latency table with layer cells, measuring only what the store lacks."""
from __future__ import annotations

from typing import Callable, Iterable

from latprune.types import LayerSpec


def profile_cells(table, cells: Iterable[tuple[LayerSpec, int, int]], backend=1,
                  progress: Callable[[int, int], None] | None = None) -> int:
    """Measure each (spec, c_in, c_out) cell not yet in `table` with the layer timed alone on
    `backend` (an int: ONNX Runtime on this CPU with that many threads); each is committed as
    soon as it is measured, so an interrupted run resumes where it stopped. Returns cells
    measured."""
    from latprune.profiler.backends import as_backend

    backend = as_backend(backend)
    todo = [c for c in cells if not table.has(c[0].signature(), c[1], c[2])]
    for i, (spec, c_in, c_out) in enumerate(todo):
        stats = backend.time_layer(spec, c_in, c_out)
        table.put(spec.signature(), c_in, c_out, stats.median_ms, stats.runs)
        if progress:
            progress(i + 1, len(todo))
    return len(todo)

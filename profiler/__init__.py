"""profiler step of the latprune pipeline (see ARCHITECTURE.md)."""

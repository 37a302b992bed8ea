"""latprune: latency-budgeted pruning of neural networks."""
__version__ = "0.1.0"

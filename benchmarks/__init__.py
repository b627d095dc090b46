"""Measurements, run as modules from the repository root (``python -m benchmarks.speed ...``);
shared helpers in :mod:`benchmarks.common`. Results and commands are in docs/."""

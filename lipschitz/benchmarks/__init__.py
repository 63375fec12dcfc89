"""Benchmarks, run as ``lipschitz bench NAME`` (or ``python -m lipschitz.benchmarks.NAME``):
``projections`` (cost and accuracy of every constraint) and ``throughput`` (training steps per
second against the baseline). Results and the machines they ran on: docs/benchmarks.md."""

"""Benchmarks for fastgradstats: model-shaped gradient workloads, ops, timing, summary.

``python -m benchmarks`` prints the summary table and writes a results JSON;
``pytest benchmarks/ --benchmark-only`` runs the pytest-benchmark suite. Nothing here
touches CUDA at import time.
"""

"""Benchmarks: each script writes ``results/<name>.json`` (format in DESIGN.md); ``render`` updates BENCHMARKS.md."""

"""Benchmarks: each script writes ``results/<name>.json`` (command, commit, machine and date first: :func:`common.write_result`); ``render`` updates BENCHMARKS.md."""

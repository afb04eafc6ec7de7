"""Training jobs, Lightning modules, the CLI, recipes and benchmarks. Built on :mod:`recsys`."""

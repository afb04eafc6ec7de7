"""Serving layer: ONNX export (``export``), torch-free ONNX Runtime scorers (``runtime``), the request models
(``schemas``), the FastAPI app (``app``) and batch re-scoring (``rescore``).

Only ``serving/export.py`` imports torch; importing the others does not load it (tested).
"""

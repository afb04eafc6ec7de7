"""Serving layer: ONNX export, torch-free ONNX Runtime scorers, the FastAPI app, batch re-scoring.

Not built yet (issue 7). Only ``serving/export.py`` will import torch; the rest must not (tested).
"""

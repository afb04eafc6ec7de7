"""Torch-free parts of the scorers, run by the same code in training (torch) and in the serving runtime (numpy,
ONNX Runtime): prompt texts and their templates, the project's special words, the retriever prior of FIRST
windows, the code trie's tables and the fusion reranker's side features. Nothing in this package imports torch,
so that the serve image, which installs none, can import all of it.
"""

"""Generative recommendation over semantic IDs: code trie, constrained decoding, value-guided decoding."""

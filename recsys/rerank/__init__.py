"""LLM rerankers: prompt formats, output parsing, FIRST single-token scoring, sliding windows."""

"""LLM backbones: a Hugging Face causal LM, its tokenizer and the project's special tokens."""

from recsys.llm.backbone import Backbone, build_tiny, load_backbone

__all__ = ["Backbone", "build_tiny", "load_backbone"]

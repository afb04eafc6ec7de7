"""LLM backbones: a Hugging Face causal LM, its tokenizer and the project's special tokens."""

from recsys.llm.backbone import Backbone, apply_lora, build_tiny, load_backbone

__all__ = ["Backbone", "apply_lora", "build_tiny", "load_backbone"]

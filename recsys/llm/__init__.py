"""LLM backbones: a Hugging Face causal LM, its tokenizer and the project's special tokens.

:mod:`recsys.llm.backbone` holds the torch-backed backbone (``Backbone``, ``load_backbone``, ``build_tiny``,
``apply_lora``); the torch-free token names the serving runtime reads live in :mod:`recsys.portable.vocab`.
"""

"""LLM backbones: a Hugging Face causal LM, its tokenizer and the project's special tokens.

Imported lazily, so that torch-free code (the serving runtime) can use :mod:`recsys.llm.vocab`.
"""

__all__ = ["Backbone", "apply_lora", "build_tiny", "load_backbone"]


def __getattr__(name: str):
    if name in __all__:
        from recsys.llm import backbone

        return getattr(backbone, name)
    raise AttributeError(f"module 'recsys.llm' has no attribute {name!r}")

"""recsys: LLM-based generative recommendation and reranking.

The library layer. It imports torch, polars, numpy (and later transformers and faiss), never
lightning or fastapi: training loops live in ``pipelines/``, the HTTP layer in ``serving/``.

    >>> from recsys.data import load_dataset, prepare                     # doctest: +SKIP
    >>> ds = prepare(load_dataset("ml-1m"), out="artifacts/ml-1m")       # doctest: +SKIP
    >>> from recsys.models import SASRec, Popularity                      # doctest: +SKIP
    >>> from recsys.evaluation import evaluate_full_ranking               # doctest: +SKIP
"""

__version__ = "0.1.0"

"""Data contracts shared by every stage (dataclasses, numpy only).

- :class:`ScoredItem`, :class:`RankedList`: what a model recommends.
- :class:`CandidateList`: a retriever's list for one user at one moment, with the history it was retrieved
  for and the held-out item; what rerankers train and are evaluated on, RL prompts are drawn from and the
  fusion scorer reads (files: :mod:`recsys.data.candidates`).
- :class:`ExportManifest`, :class:`ExportedModel`: ``manifest.json`` of an export directory, written by
  ``recsys export`` and read by the serving runtime.

The RL rollout batch holds tensors, so it lives beside the RL objectives, not here.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields, replace

import numpy as np

from recsys.metrics import target_rank


@dataclass(frozen=True)
class ScoredItem:
    """One recommended item: its catalog id, dense index and the model's score."""

    item_id: str
    idx: int
    score: float


@dataclass(frozen=True)
class RankedList:
    """A ranked list of items for one user or history, best first, and the model that made it."""

    items: tuple[ScoredItem, ...]
    model: str

    @property
    def item_ids(self) -> list[str]:
        return [i.item_id for i in self.items]


@dataclass
class CandidateList:
    """A retriever's candidates for one user after ``history``, and the item the user took next.

    history (H,) int64: item idx, oldest first. candidates (N,) int64: item idx, best first. scores (N,)
    float32: the retriever's score of each. target: the held-out item's idx.

    Read-only by convention, not frozen: Lightning rebuilds the dataclasses it finds in a batch by setting
    their fields, which a frozen one refuses.
    """

    user_id: str
    uidx: int
    history: np.ndarray
    candidates: np.ndarray
    scores: np.ndarray
    target: int

    def top(self, n: int | None) -> CandidateList:
        """The same list cut to its first ``n`` candidates (all when ``n`` is None)."""
        return self if n is None else replace(self, candidates=self.candidates[:n], scores=self.scores[:n])

    @property
    def window(self) -> list[int]:
        """The candidates as a list of ints (what the rerankers' prompts take)."""
        return [int(c) for c in self.candidates]

    def target_rank(self) -> float:
        """0-based position of the target among the candidates, ``inf`` when absent
        (:func:`recsys.metrics.target_rank`)."""
        return target_rank(self.window, self.target)

    @property
    def has_target(self) -> bool:
        return bool((self.candidates == self.target).any())


@dataclass(frozen=True)
class ExportedModel:
    """One model of an export directory (``manifest.json``'s ``models.<name>``): its ONNX graph and what the
    runtime needs to feed it. Which fields a kind must have: :data:`EXPORT_REQUIRED`."""

    file: str
    """The ONNX graph (its weights may sit beside it as ``<file>.data``)."""
    sha256: str
    parity_max_abs: float | None = None
    """Largest |ONNX Runtime - eager model| output difference on the export's reference inputs."""
    ort_fusions: dict | None = None
    """ONNX Runtime graph fusions found in the optimised graph (op type -> count)."""
    int8: dict | None = None
    """The dynamically quantised copy: ``{"file", "sha256", "parity_max_abs", ...}``, when exported."""
    dataset_fingerprint: str | None = None
    # sasrec: the item table the user vector is scored against
    items: str | None = None
    items_sha256: str | None = None
    max_len: int | None = None
    hidden_size: int | None = None
    n_items: int | None = None
    # first / groupwise: the prompt it was trained on
    window: int | None = None
    prompt: str | None = None
    """``tiny`` (item tokens or letters) or ``text`` (item titles through the tokenizer)."""
    max_history: int | None = None
    domain: str | None = None
    titles_sha256: str | None = None
    identifiers: str = "letters"
    retriever_prior: float = 0.0
    group_size: int | None = None
    files: str = ""
    """Directory (relative) of the tokenizer, reranker.json and titles.json."""
    # generative
    tables: str | None = None
    tables_sha256: str | None = None
    depth: int | None = None
    layout: str = "token"
    backbone: str | None = None
    head: dict | None = None
    """``layout: item``: the code-head graph ``{"file", "sha256", "parity_max_abs", "int8"?}``."""
    # fusion: the side-feature tables (``tables``), the list length it reranks (``depth``) and its columns
    features: list | None = None
    """The feature columns the scorer reads, in order (:data:`recsys.portable.features.GROUPS`)."""

    def graph(self, int8: bool = False) -> str:
        """The graph file to load: the int8 copy when asked for (an error when it was not exported)."""
        if not int8:
            return self.file
        if not self.int8:
            raise ValueError(f"{self.file}: no int8 copy was exported (recsys export --quantize)")
        return self.int8["file"]


EXPORT_REQUIRED = {"sasrec": ("items", "max_len"), "first": ("window", "prompt", "max_history"),
                   "groupwise": ("window", "prompt", "max_history", "group_size"), "generative": ("tables", "depth"),
                   "fusion": ("tables", "depth", "features")}
"""The fields each kind of :class:`ExportedModel` must carry beyond its graph."""


@dataclass(frozen=True)
class ExportManifest:
    """``manifest.json`` of an export directory (written by ``recsys export``, read by the runtime)."""

    version: str
    """The served ``model_version``: the graphs' SHA-256 prefixes joined with ``+``."""
    models: dict[str, ExportedModel]
    files: dict[str, str]
    """Every file of the directory (relative path) -> SHA-256, checked before the runtime reports ready."""
    dataset: str = ""
    dataset_fingerprint: str | None = None
    opset: int | None = None
    created: str = ""
    parity_tolerance: float | None = None
    catalog_sha256: str | None = None
    format: int = 1

    @classmethod
    def from_dict(cls, raw: dict, source: str = "manifest.json") -> ExportManifest:
        """Validate and type a parsed manifest; an error names ``source`` and the field that is wrong."""
        def check(obj, typ, where):
            if not isinstance(obj, dict):
                raise TypeError(f"{source}: {where} must be an object, got {type(obj).__name__}")
            names = {f.name for f in fields(typ)}
            unknown = sorted(set(obj) - names)
            if unknown:
                raise ValueError(f"{source}: {where} has unknown field(s) {', '.join(unknown)}")
            missing = [f.name for f in fields(typ) if f.name not in obj
                       and f.default is MISSING and f.default_factory is MISSING]
            if missing:
                raise ValueError(f"{source}: {where} lacks {', '.join(missing)}")

        check(raw, cls, "the manifest")
        models = {}
        if not isinstance(raw["models"], dict):
            raise TypeError(f"{source}: models must be an object, got {type(raw['models']).__name__}")
        for name, entry in raw["models"].items():
            check(entry, ExportedModel, f"models.{name}")
            lacking = [f for f in EXPORT_REQUIRED.get(name, ()) if entry.get(f) is None]
            if lacking:
                raise ValueError(f"{source}: models.{name} lacks {', '.join(lacking)}")
            models[name] = ExportedModel(**entry)
        return cls(**{**raw, "models": models})

    def to_dict(self) -> dict:
        """The JSON form (a model's unset fields left out)."""
        top = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "models"}
        models = {name: {k: v for k, v in asdict(m).items() if v is not None}
                  for name, m in self.models.items()}
        return {**top, "models": models}

"""Export trained scorers to ONNX (the only serving module that imports torch).

    recsys export --sasrec runs/sasrec/model --reranker runs/listwise/model --data D --out artifacts/serve

Writes a serving directory that :mod:`serving.runtime` loads without torch:

- ``sasrec.onnx``: ``input_ids`` (B, T) int64, T <= max_len, left-padded with 0 -> ``user`` (B, d)
  float32. Dynamic batch and sequence axes: the runtime pads a batch to its longest history only
  (SASRec's output does not depend on the padding, tested), so short histories are cheap.
- ``items.npy``: (n_items + 1, d) item embeddings (row 0 = padding), the FAISS index's vectors.
- ``first.onnx`` (optional): the listwise reranker's FIRST scorer, ``input_ids``, ``attention_mask``,
  ``position_ids`` (B, T) int64 -> ``scores`` (B, window) float32, the identifier logits at the last
  prompt position. Dynamic batch and sequence axes. Its tokenizer (``tokenizer.json``) and
  ``reranker.json`` are copied next to it.
- ``generative.onnx`` (optional): the generative recommender's next-token step, ``input_ids``,
  ``attention_mask``, ``position_ids`` (B, T) int64 -> ``code_logits`` (B, D, K) float32, the logits of
  every level's semantic-ID tokens at the last position (the runtime reads the level it decodes).
  Dynamic batch and sequence axes. ``generative.npz`` holds the codes, the code-token map and the
  special tokens, everything :class:`serving.runtime.GenerativeRuntime` needs for trie-constrained beam
  search in numpy (one full forward pass per level: no KV cache in the exported graph). A model of the
  ``item`` layout exports two graphs: ``generative.onnx``, ``items``, ``attention_mask`` (B, T) int64
  (left-padded item indices, 0 = padding) -> ``state`` (B, H) float32, run once per history, and
  ``generative_head.onnx``, ``state`` (B, H) + ``prefix`` (B, D) int64 (the codes written so far,
  zero-padded) -> the same ``code_logits`` (level l reads ``prefix[:, :l]`` only), run per level on the
  beams; the manifest's ``layout`` tells the runtime which to use.
- ``fusion.onnx`` (optional): a fusion reranker's scorer, ``features`` (B, L, F) float32 -> ``scores`` (B, L),
  and ``fusion_tables.npz``, the side-feature tables the runtime computes its features from in numpy
  (:class:`recsys.portable.features.SideFeatures`, fitted on the training interactions as in training).
- ``catalog.parquet``: item idx, id and title; ``histories.parquet``: each user's whole sequence, its
  interaction times and the user's ``uidx``.
- ``manifest.json``: every file's SHA-256, the opset, the model versions and the parity checks.

ONNX Runtime fusions: the exported graphs are rewritten with onnxscript's ``optimize_for_ort``
(scaled dot-product attention -> ``com.microsoft.MultiHeadAttention``, residual + LayerNorm ->
``SkipLayerNormalization``, ...), contrib operators that the CPU and CUDA providers run as fused
kernels; the parity check below runs on the rewritten graph. ``fuse=False`` keeps the plain graph.

The prompt scorers and the token-layout generative step read the last position only, so their final
decoder layer is exported for that position alone (:func:`recsys.llm.last_query.last_query_only`: one
query over all keys, the MLP on one row); their parity reference is the unchanged full model.

Parity: each graph is run by ONNX Runtime on a fixed batch and compared with eager torch in fp32;
the tolerance is 1e-4 absolute, because both compute the same fp32 maths and differ only by the
order of floating-point reductions in fused kernels (observed differences ~1e-6). Optional int8
dynamic quantisation (``quantize=True``) writes ``*.int8.onnx`` and records the max score change.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from recsys.assets import sha256
from recsys.errors import RecsysError
from recsys.io import atomic_directory
from recsys.llm.last_query import last_query_only
from recsys.types import ExportManifest

OPSET = 18
TOLERANCE = 1e-4


class _UserEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model.user_embeddings(input_ids)


class _LastTokenScorer(torch.nn.Module):
    """Logits of the tokens ``ids`` at the last position of a left-padded prompt batch: (B, T) -> (B, len(ids)).
    FIRST reads the identifier tokens', the groupwise (GroupRank) score step the ten digits'."""

    def __init__(self, model, ids: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("ids", ids)

    def forward(self, input_ids, attention_mask, position_ids):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False, logits_to_keep=1).logits
        return logits[:, -1].index_select(-1, self.ids)


class _GenerativeStep(torch.nn.Module):
    """Logits of every level's code tokens at the last position: (B, T) -> (B, D, K)."""

    def __init__(self, model):
        super().__init__()
        self.lm = model.lm
        self.register_buffer("code_token", model.code_token.clone())

    def forward(self, input_ids, attention_mask, position_ids):
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False, logits_to_keep=1).logits[:, -1]                                      # (B, V)
        return logits[:, self.code_token]


class _ItemEncoder(torch.nn.Module):
    """Item layout, graph 1: ``(items (B, T), attention_mask (B, T)) -> state (B, H)``, the user state after
    each left-padded history of item indices (0 = padding). Run once per request."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, items, attention_mask):
        return self.model.encode(items, attention_mask)[:, -1]


class _ItemCodeHeads(torch.nn.Module):
    """Item layout, graph 2: ``(state (B, H), prefix (B, D)) -> code_logits (B, D, K)``, every level's code
    logits given the codes written so far (level l reads ``prefix[:, :l]`` only; the runtime zero-pads)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, state, prefix):
        m = self.model
        q = m.queries(state, prefix)                                                       # (B, D + 1, H)
        return torch.stack([m.code_logits(q[:, level], level, mask=False) for level in range(m.depth)], 1)


def _export(module, args: tuple, path: Path, names: list[str], output: str, dynamic: dict, fuse: bool = True) -> dict:
    """Export to ``path`` (weights in ``path.data``); returns the ORT fusions applied (name -> count)."""
    module.eval()                                              # a fresh wrapper module starts in training mode
    torch.onnx.export(module, args, str(path), input_names=names, output_names=[output], dynamic_shapes=dynamic,
                      dynamo=True, opset_version=OPSET, verbose=False)
    if not fuse:
        return {}
    import onnx
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.serde.deserialize_model(onnx.load(str(path)))          # weights in memory: the files are rewritten
    _, fusions = optimize_for_ort(model)
    for f in (path, path.with_name(path.name + ".data")):
        f.unlink(missing_ok=True)
    ir.save(model, str(path), external_data=path.name + ".data")
    return {k: v for k, v in fusions.items() if v}


def _parity(path: Path, feeds: dict[str, np.ndarray], reference: np.ndarray) -> float:
    import onnxruntime as ort

    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    diff = float(np.abs(got - reference).max())
    if diff > TOLERANCE:
        raise RecsysError(f"{path.name}: ONNX Runtime differs from torch by {diff:.2e} (> {TOLERANCE:.0e})")
    return diff


def _quantize(path: Path, feeds: dict[str, np.ndarray], reference: np.ndarray) -> dict:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    q = path.with_suffix(".int8.onnx")
    quantize_dynamic(str(path), str(q), weight_type=QuantType.QInt8)
    got = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    return {"file": q.name, "sha256": sha256(q), "max_abs_change": float(np.abs(got - reference).max())}


def export_sasrec(model_dir, out: Path, quantize: bool = False, fuse: bool = True) -> dict:
    from recsys.models.sasrec import SASRec

    model = SASRec.from_pretrained(model_dir).float().eval()
    T = model.config.max_len
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.n_items + 1, (4, T), generator=g)
    ids[0, :T - 3] = 0                                                    # a short history, heavily padded
    ids[1, :T // 2] = 0
    encoder = _UserEncoder(model)
    with torch.no_grad():
        reference = encoder(ids).numpy()
    path = out / "sasrec.onnx"
    dyn = {"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", min=2, max=T)}}
    fusions = _export(encoder, (ids,), path, ["input_ids"], "user", dyn, fuse)
    np.save(out / "items.npy", model.item_emb.weight.detach().float().numpy())
    entry = {"file": path.name, "sha256": sha256(path), "items": "items.npy", "items_sha256": sha256(out / "items.npy"),
             "max_len": T, "hidden_size": model.config.hidden_size, "n_items": model.n_items,
             "dataset_fingerprint": model.dataset_fingerprint, "ort_fusions": fusions,
             "parity_max_abs": _parity(path, {"input_ids": ids.numpy()}, reference)}
    if quantize:
        entry["int8"] = _quantize(path, {"input_ids": ids.numpy()}, reference)
    return entry


def _export_prompt_scorer(model_dir, out: Path, kind: str, filename: str, quantize: bool, fuse: bool) -> dict:
    """Export a reranker's last-position scorer (FIRST identifier logits or GroupRank digit logits)
    with dynamic batch and sequence axes; the tokenizer and reranker.json go beside it."""
    from recsys.llm.backbone import load_backbone
    from recsys.portable.vocab import DIGITS

    meta = json.loads((Path(model_dir) / "reranker.json").read_text())
    if meta.get("kind", "listwise") != kind:
        raise RecsysError(f"{model_dir}: a {meta.get('kind', 'listwise')!r} reranker, expected {kind!r}")
    bb = load_backbone(model_dir)
    bb.model.float().eval()
    if kind == "groupwise":
        ids_out = torch.tensor([bb.token_id(d) for d in DIGITS])
    elif meta.get("identifiers", "letters") == "items":       # every token's logit: the runtime picks the candidates'
        ids_out = torch.arange(bb.model.get_output_embeddings().weight.shape[0])
    else:
        ids_out = bb.identifier_ids(meta["window"])
    scorer = _LastTokenScorer(bb.model, ids_out)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(50, len(bb.tokenizer), (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :15] = 0                                                      # left padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        reference = scorer(ids, mask, pos).numpy()              # the full model: what the graph must reproduce
    last_query_only(bb.model)
    path = out / filename
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=2, max=4096)
    dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq}}
    fusions = _export(scorer, (ids, mask, pos), path, ["input_ids", "attention_mask", "position_ids"], "scores", dyn,
                      fuse)
    side = out if kind == "listwise" else out / "groupwise"
    bb.tokenizer.save_pretrained(side / "tokenizer")
    shutil.copy(Path(model_dir) / "reranker.json", side / "reranker.json")
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
    entry = {"file": path.name, "sha256": sha256(path), "window": meta["window"], "prompt": meta["prompt"],
             **({"domain": meta["domain"]} if meta.get("domain") else {}),
             "max_history": meta["max_history"], "dataset_fingerprint": meta["dataset_fingerprint"],
             "ort_fusions": fusions, "parity_max_abs": _parity(path, feeds, reference)}
    if kind == "listwise":
        entry |= {"identifiers": meta.get("identifiers", "letters"), "retriever_prior": meta.get("retriever_prior", 0.0)}
    if kind == "groupwise":
        entry |= {"group_size": meta["group_size"], "files": "groupwise/"}
    if quantize:
        entry["int8"] = _quantize(path, feeds, reference)
    return entry


def export_first(model_dir, out: Path, quantize: bool = False, fuse: bool = True) -> dict:
    """The listwise reranker's FIRST scorer: ``first.onnx`` (identifier logits at the last position; for
    item identifiers the logits of every token, from which the runtime reads the candidates')."""
    return _export_prompt_scorer(model_dir, out, "listwise", "first.onnx", quantize, fuse)


def export_groupwise(model_dir, out: Path, quantize: bool = False, fuse: bool = True) -> dict:
    """The groupwise reranker's score step: ``groupwise.onnx`` (digit logits at the last position); the
    runtime writes ``X :`` per candidate and reads the expected digit, as
    :meth:`recsys.rerank.groupwise.GroupwiseReranker.sample` does greedily."""
    return _export_prompt_scorer(model_dir, out, "groupwise", "groupwise.onnx", quantize, fuse)


def export_generative(model_dir, out: Path, quantize: bool = False, fuse: bool = True) -> dict:
    from recsys.generative.model import GenerativeRecommender, positions

    model = GenerativeRecommender.from_pretrained(model_dir).float().eval()
    g = np.random.default_rng(0)
    n = len(model.idx_codes) - 1
    histories = [g.integers(1, n + 1, size).tolist() for size in (1, 3, model.config.max_items)]
    path = out / "generative.onnx"
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=2, max=4096)
    head = None
    if model.config.layout == "item":
        step = _ItemEncoder(model)
        items, mask = model.item_batch(histories)
        args, names = (items, mask), ["items", "attention_mask"]
        dyn = {name: {0: batch, 1: seq} for name in names}
        output = "state"
        head = _ItemCodeHeads(model)
    else:
        step = _GenerativeStep(model)
        ids, mask = model.batch(histories, [[], [0], []])
        args, names = (ids, mask, positions(mask)), ["input_ids", "attention_mask", "position_ids"]
        dyn = {name: {0: batch, 1: seq} for name in names}
        output = "code_logits"
    with torch.no_grad():
        reference = step(*args).numpy()
    if head is None:
        last_query_only(model.lm)
    fusions = _export(step, args, path, names, output, dyn, fuse)
    tok = model.tokenizer
    np.savez(out / "generative.npz", codes=model.codes_np.astype(np.int64), item_idx=model.item_idx.numpy(),
             code_token=model.code_token.numpy(), special=np.array([tok.bos_token_id, tok.pad_token_id]),
             max_items=np.array(model.config.max_items))
    feeds = {name: a.numpy() for name, a in zip(names, args)}
    entry = {"file": path.name, "sha256": sha256(path), "tables": "generative.npz",
             "tables_sha256": sha256(out / "generative.npz"), "depth": model.depth, "layout": model.config.layout,
             "backbone": model.config.backbone, "ort_fusions": fusions,
             "parity_max_abs": _parity(path, feeds, reference)}
    if quantize:
        entry["int8"] = _quantize(path, feeds, reference)
    if head is not None:                        # the code heads, fed the encoder's reference states
        head_path = out / "generative_head.onnx"
        prefix = torch.zeros(len(histories), model.depth, dtype=torch.long)
        prefix[1] = torch.from_numpy(model.codes_np[0])
        head_args = (torch.from_numpy(reference), prefix)
        with torch.no_grad():
            head_reference = head(*head_args).numpy()
        _export(head, head_args, head_path, ["state", "prefix"], "code_logits",
                {"state": {0: batch}, "prefix": {0: batch}}, fuse=False)
        head_feeds = {"state": reference, "prefix": prefix.numpy()}
        entry["head"] = {"file": head_path.name, "sha256": sha256(head_path),
                         "parity_max_abs": _parity(head_path, head_feeds, head_reference)}
        if quantize:
            entry["head"]["int8"] = _quantize(head_path, head_feeds, head_reference)
    return entry


def export_fusion(model_dir, dataset, out: Path, text_vectors=None) -> dict:
    """Export a fusion reranker run (``RUN/model``): its scorer as ``fusion.onnx`` and its side-feature tables,
    fitted on ``dataset``'s training interactions as in training, as ``fusion_tables.npz``
    (:meth:`recsys.portable.features.SideFeatures.save`). ``text_vectors``: the item text embeddings of the ``text``
    group (refused without them). A scorer that also reads an LM's logits is refused: the runtime computes
    side features only."""
    from recsys.portable.features import SideFeatures
    from recsys.rerank.fusion import FusionRanker

    model_dir = Path(model_dir)
    meta_path = model_dir / "features.json"
    if not meta_path.exists():
        raise RecsysError(f"{model_dir}: not a fusion reranker run's model (no features.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("dataset_fingerprint") not in (None, dataset.fingerprint):
        raise RecsysError(f"{model_dir} was trained on another dataset than {dataset.directory}")
    if meta.get("lm"):
        raise RecsysError(f"{model_dir}: this fusion scorer reads an LM's logits ({meta['lm']}); only side-feature "
                          "fusion scorers can be served")
    model = FusionRanker.from_pretrained(model_dir).eval()
    side = SideFeatures.fit(dataset, meta["groups"], meta["ease_lambda"], text_vectors)
    if side.names != model.names:
        raise RecsysError(f"{model_dir}: the scorer reads {model.names}, its groups give {side.names}")
    side.save(out / "fusion_tables.npz")
    g = torch.Generator().manual_seed(0)
    features = torch.randn(3, meta["depth"], len(model.names), generator=g)
    with torch.no_grad():
        reference = model(features).numpy()                 # (B, L): the scorer standardises inside the graph
    path = out / "fusion.onnx"
    dyn = {"features": {0: torch.export.Dim("batch"), 1: torch.export.Dim("candidates", min=2, max=4096)}}
    _export(model, (features,), path, ["features"], "scores", dyn, fuse=False)
    return {"file": path.name, "sha256": sha256(path), "tables": "fusion_tables.npz",
            "tables_sha256": sha256(out / "fusion_tables.npz"), "depth": meta["depth"], "features": list(model.names),
            "dataset_fingerprint": meta.get("dataset_fingerprint"),
            "parity_max_abs": _parity(path, {"features": features.numpy()}, reference)}


def _write_histories(dataset, path: Path) -> None:
    """Every user's whole sequence (item idx, oldest first) and its times (Unix seconds): what ``user_id``
    requests rank from; ``uidx`` for the side features that know the user."""
    import polars as pl

    test = dataset.eval_examples("test")
    ids = dataset.users.sort("uidx")["user_id"].to_list()
    times = dataset.user_timestamps()
    histories = [np.concatenate([h, t]).astype(np.int32) for h, t in zip(test.histories, test.targets)]
    pl.DataFrame({"user_id": [ids[u] for u in test.users], "uidx": [int(u) for u in test.users],
                  "history": [h.tolist() for h in histories],
                  "times": [np.asarray(times[u][:len(h)], dtype=np.int64).tolist() for u, h in zip(test.users, histories)]},
                 schema={"user_id": pl.String, "uidx": pl.Int32, "history": pl.List(pl.Int32),
                         "times": pl.List(pl.Int64)}).write_parquet(path)


def export(dataset, sasrec_dir, out, reranker_dir=None, quantize: bool = False, fuse: bool = True,
           generative_dir=None, groupwise_dir=None, fusion_dir=None, text_vectors=None) -> Path:
    """Export SASRec (and a listwise reranker, a groupwise reranker, a generative recommender, a fusion
    reranker over SASRec's candidates) for ``dataset`` into the serving directory ``out``."""
    out = Path(out)
    with atomic_directory(out) as tmp:
        models = {"sasrec": export_sasrec(sasrec_dir, tmp, quantize, fuse)}
        if models["sasrec"]["dataset_fingerprint"] not in (None, dataset.fingerprint):
            raise RecsysError(f"{sasrec_dir} was trained on another dataset than {dataset.directory}")
        if reranker_dir:
            models["first"] = export_first(reranker_dir, tmp, quantize, fuse)
        if groupwise_dir:
            models["groupwise"] = export_groupwise(groupwise_dir, tmp, quantize, fuse)
        if generative_dir:
            models["generative"] = export_generative(generative_dir, tmp, quantize, fuse)
        if fusion_dir:
            models["fusion"] = export_fusion(fusion_dir, dataset, tmp, text_vectors)
        for name in ("first", "groupwise"):
            if name in models and models[name]["prompt"] == "text":        # the exact item texts it was trained on
                from recsys.portable.prompts import item_titles

                titles = tmp / models[name].get("files", "") / "titles.json"
                text = item_titles(dataset, models[name].get("domain"))
                titles.write_text(json.dumps({str(i): t for i, t in text.items()}))
                models[name]["titles_sha256"] = sha256(titles)
                models[name]["domain"] = text.domain
        dataset.catalog.select("idx", "item_id", "title").write_parquet(tmp / "catalog.parquet")
        _write_histories(dataset, tmp / "histories.parquet")
        manifest = ExportManifest.from_dict({
            "format": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "opset": OPSET,
            "dataset": dataset.name, "dataset_fingerprint": dataset.fingerprint,
            "version": "+".join(models[m]["sha256"][:12] for m in ("sasrec", "first", "groupwise", "generative", "fusion")
                                if m in models),
            "models": models, "catalog_sha256": sha256(tmp / "catalog.parquet"), "parity_tolerance": TOLERANCE,
            "files": {p.relative_to(tmp).as_posix(): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}})
        (tmp / "manifest.json").write_text(json.dumps(manifest.to_dict(), indent=2))
    return out

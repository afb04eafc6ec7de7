"""Batch re-scoring: the online scorers over a parquet file of requests, in resumable chunks.

    recsys rescore --serve-dir artifacts/serve --input requests.parquet --output out/

Input columns: ``request_id`` (string, unique), and either ``user_id`` or ``history`` (list of item
ids); optional ``candidates`` (list of item ids: rerank them) and ``k`` (default 10). Without
candidates the request is a recommendation (retrieval + reranker), as ``POST /v1/recommend``.

Output: ``part-00000.parquet``, ... (``request_id``, ``items``, ``scores``), one per chunk of
``chunk_size`` input rows, and ``rejects/part-00000.parquet`` (``request_id``, ``row``, ``reason``)
for rows that cannot be scored. Each part is written to a temporary name and renamed, then recorded
in ``manifest.json``; a killed job restarts at the first chunk without a part, so every input row
lands exactly once in the parts or the rejects. A different input (size or content hash) or chunk
size in an existing output directory is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl

from recsys.assets import sha256
from recsys.errors import RecsysError
from serving.runtime import Recommender, RecommendQuery

OUT_SCHEMA = {"request_id": pl.String, "items": pl.List(pl.String), "scores": pl.List(pl.Float32)}
REJECT_SCHEMA = {"request_id": pl.String, "row": pl.Int64, "reason": pl.String}


def process_batch(rec: Recommender, users: dict, df: pl.DataFrame, offset: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Score one batch of request rows; returns (results, rejects). ``offset`` = input row of ``df[0]``."""
    ok, rejects, queries, reranks = [], [], [], []
    cols = set(df.columns)
    for j, r in enumerate(df.iter_rows(named=True)):
        row, rid = offset + j, r.get("request_id")
        try:
            if rid is None:
                raise ValueError("request_id is missing")
            k = int(r.get("k") or 10)
            if not 1 <= k <= 1000:
                raise ValueError(f"k={k} outside 1..1000")
            if r.get("user_id") is not None:
                if r["user_id"] not in users:
                    raise ValueError(f"unknown user_id {r['user_id']!r}")
                history = list(users[r["user_id"]])
            elif r.get("history") is not None:
                history = [rec.item_idx[i] for i in r["history"] if i in rec.item_idx]
            else:
                raise ValueError("neither user_id nor history")
            if not history:
                raise ValueError("empty history (or only unknown item ids)")
            if "candidates" in cols and r.get("candidates") is not None:
                unknown = [c for c in r["candidates"] if c not in rec.item_idx]
                if unknown or not r["candidates"]:
                    raise ValueError(f"unknown candidate item ids {unknown[:5]}" if unknown else "no candidates")
                reranks.append((rid, history, [rec.item_idx[c] for c in r["candidates"]], k))
            else:
                queries.append((rid, RecommendQuery(history, k, candidates=max(50, k))))
        except (ValueError, TypeError) as e:
            rejects.append({"request_id": rid, "row": row, "reason": str(e)})
    if queries:
        for (rid, _), res in zip(queries, rec.recommend_batch([q for _, q in queries])):
            ok.append({"request_id": rid, "items": [rec.item_ids[i] for i in res["items"]], "scores": res["scores"]})
    if reranks:
        results = rec.rerank_batch([h for _, h, _, _ in reranks], [c for _, _, c, _ in reranks])
        for (rid, _, _, k), res in zip(reranks, results):
            ok.append({"request_id": rid, "items": [rec.item_ids[i] for i in res["items"][:k]],
                       "scores": res["scores"][:k]})
    return pl.DataFrame(ok, schema=OUT_SCHEMA), pl.DataFrame(rejects, schema=REJECT_SCHEMA)


def _write_atomic(df: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    df.write_parquet(tmp)
    os.replace(tmp, path)


def rescore(serve_dir, input_path, output, chunk_size: int = 10_000, batch_size: int = 64,
            progress: bool = True, stop_after: int | None = None) -> dict:
    """Run (or resume) a re-scoring job; returns the manifest. ``stop_after`` chunks: for tests."""
    from tqdm.auto import tqdm

    input_path, output = Path(input_path), Path(output)
    if not input_path.exists():
        raise RecsysError(f"{input_path}: no such input file")
    n_rows = pl.scan_parquet(input_path).select(pl.len()).collect().item()
    columns = pl.read_parquet_schema(input_path)
    if "request_id" not in columns or not ({"user_id", "history"} & set(columns)):
        raise RecsysError(f"{input_path}: needs a request_id column and a user_id or history column, "
                          f"has {list(columns)}")
    identity = {"input": str(input_path.resolve()), "input_sha256": sha256(input_path), "rows": n_rows,
                "chunk_size": chunk_size}
    manifest_path = output / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {**identity, "chunks": {}}
    if {k: manifest.get(k) for k in identity} != identity:
        raise RecsysError(f"{output}: holds a job for another input or chunk size; use another --output")
    output.mkdir(parents=True, exist_ok=True)
    rec = Recommender(serve_dir)
    users = {}
    if (Path(serve_dir) / "histories.parquet").exists():
        h = pl.read_parquet(Path(serve_dir) / "histories.parquet")
        users = dict(zip(h["user_id"].to_list(), h["history"].to_list()))
    n_chunks = -(-n_rows // chunk_size)
    todo = [c for c in range(n_chunks) if str(c) not in manifest["chunks"]]
    for done, c in enumerate(tqdm(todo, desc="rescore", unit="chunk", disable=not progress)):
        if stop_after is not None and done >= stop_after:
            break
        chunk = pl.scan_parquet(input_path).slice(c * chunk_size, chunk_size).collect()
        parts = [process_batch(rec, users, chunk.slice(b, batch_size), c * chunk_size + b)
                 for b in range(0, chunk.height, batch_size)]
        results = pl.concat([p[0] for p in parts])
        rejects = pl.concat([p[1] for p in parts])
        _write_atomic(results, output / f"part-{c:05d}.parquet")
        _write_atomic(rejects, output / "rejects" / f"part-{c:05d}.parquet")
        manifest["chunks"][str(c)] = {"rows": chunk.height, "scored": results.height, "rejected": rejects.height}
        _write_atomic_text(json.dumps(manifest, indent=2), manifest_path)
    manifest["complete"] = len(manifest["chunks"]) == n_chunks
    _write_atomic_text(json.dumps(manifest, indent=2), manifest_path)
    return manifest


def _write_atomic_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

"""Batch re-scoring: the online scorers over a file of requests, in resumable chunks.

    recsys rescore --serve-dir artifacts/serve --input requests.parquet --output out/
    recsys rescore ... --engine ray --workers 8        # the same chunks on Ray Data
    RAY_ADDRESS=head:6379 recsys rescore ... --engine ray   # ... on a running Ray cluster

The input is Parquet, JSON Lines, CSV or TSV (by extension). A text input is converted once into
``<output>/input-<sha>.parquet``; in CSV/TSV a list cell holds item ids separated by ``|``
(``history`` = ``"1|2|3"``) and ``k`` is read as a whole number where it is one (any other value is that
row's reject).

Input columns: ``request_id`` (string, unique), and either ``user_id`` or ``history`` (list of item
ids); optional ``candidates`` (list of distinct item ids: rerank them), ``k`` (default 10) and ``time``
(the request's Unix seconds, default now: the time the fusion reranker's features read). Without
candidates the request is a recommendation (retrieval + reranker), as ``POST /v1/recommend``. Each row is
validated by the API's request model with the API's limits (:class:`serving.schemas.RescoreRow`); a row
that fails, repeats an earlier ``request_id``, or that the scorer cannot take goes to the rejects with its
reason and never stops the job. Unknown columns and invalid options are refused before any work.

Output: ``part-00000.parquet``, ... (``request_id``, ``items``, ``scores``), one per chunk of
``chunk_size`` input rows, and ``rejects/part-00000.parquet`` (``request_id``, ``row``, ``reason``)
for rows that cannot be scored. Each part is written to a temporary name and renamed, then recorded
in ``manifest.json``; a killed job restarts at the first chunk without a part, so every input row
lands exactly once in the parts or the rejects. A different input (size or content hash) or chunk
size in an existing output directory is refused. :func:`audit` counts, for a finished output, the input
rows that have no answer and those with more than one.

On a Ray cluster of several machines the actors write the parts themselves and this process writes the
manifest, so the serving directory, the input and ``--output`` must be paths every node can read (and the
output one every node can write): a shared filesystem (NFS, a mounted bucket). A node that dies takes its
unfinished chunks with it; Ray Data restarts its actors elsewhere, and if the job itself stops, the rerun
scores exactly the chunks the manifest does not hold.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
from pydantic import ValidationError

from recsys.assets import sha256
from recsys.errors import RecsysError
from serving.runtime import Recommender, RecommendQuery
from serving.schemas import COLUMNS, RescoreRow, known_items, resolve_history

OUT_SCHEMA = {"request_id": pl.String, "items": pl.List(pl.String), "scores": pl.List(pl.Float32)}
REJECT_SCHEMA = {"request_id": pl.String, "row": pl.Int64, "reason": pl.String}


def parse_row(rec: Recommender, users: dict, raw: dict) -> tuple[str, list[int], list[int] | None, int, RescoreRow]:
    """(request_id, history idx, candidate idx or None, k, the validated row) of one input row, validated by the
    API's own request model (:class:`serving.schemas.RescoreRow`); a ValueError says what is wrong."""
    raw = {k: v for k, v in raw.items() if v is not None}
    if isinstance(raw.get("k"), str) and raw["k"].strip().isdigit():       # text inputs carry k as text
        raw["k"] = int(raw["k"])
    try:
        row = RescoreRow.model_validate(raw)
    except ValidationError as e:
        raise ValueError("; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from None
    history, _ = resolve_history(row.user_id, row.history, users, rec.item_idx)
    candidates = None
    if row.candidates is not None:
        candidates, unknown = known_items(row.candidates, rec.item_idx)
        if unknown:
            raise ValueError(f"unknown candidate item ids {unknown[:5]}")
    return row.request_id, history, candidates, row.k or 10, row


def _score_each(fn, jobs: list, rejects: list) -> list:
    """``fn(jobs)``; if that raises, each job alone, so that one row the scorer cannot take costs only that
    row (rejected with the error) and never the chunk. ``jobs``: (request_id, row, ...) tuples."""
    try:
        return list(zip(jobs, fn(jobs)))
    except Exception:                                              # noqa: BLE001 - isolate the row below
        done = []
        for job in jobs:
            try:
                done.append((job, fn([job])[0]))
            except Exception as e:                                 # noqa: BLE001 - the row's reason
                rejects.append({"request_id": job[0], "row": job[1], "reason": f"scoring failed: "
                                f"{type(e).__name__}: {e}"})
        return done


def process_batch(rec: Recommender, users: dict, df: pl.DataFrame, offset: int = 0,
                  batch_size: int = 64, duplicates: dict[int, int] | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Score request rows; returns (results, rejects). ``offset`` = input row of ``df[0]``; ``duplicates``
    maps an input row to the earlier row with the same ``request_id`` (rejected). No row, however malformed,
    stops the batch: it goes to the rejects with its reason. The scorers run on sub-batches of
    ``batch_size`` rows of similar history length (:meth:`Recommender.recommend_batch`)."""
    rejects, queries, reranks = [], [], []
    duplicates = duplicates or {}
    for j, raw in enumerate(df.iter_rows(named=True)):
        row = offset + j
        rid = raw.get("request_id")
        try:
            if row in duplicates:
                raise ValueError(f"duplicate request_id (first at row {duplicates[row]})")
            rid, history, candidates, k, parsed = parse_row(rec, users, raw)
        except Exception as e:                                     # noqa: BLE001 - every bad row is a reject
            reason = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            rejects.append({"request_id": rid if isinstance(rid, str) else None, "row": row, "reason": reason})
            continue
        if candidates is None:
            queries.append((rid, row, RecommendQuery(history, k, candidates=max(50, k), user_id=parsed.user_id,
                                                     time=parsed.time)))
        else:
            reranks.append((rid, row, RecommendQuery(history, k, user_id=parsed.user_id, time=parsed.time),
                            candidates, k))
    ok = [{"request_id": rid, "items": [rec.item_ids[i] for i in res["items"]], "scores": res["scores"]}
          for (rid, _, _), res in _score_each(lambda jobs: rec.recommend_batch([q for *_, q in jobs], batch_size),
                                              queries, rejects)]
    ok += [{"request_id": rid, "items": [rec.item_ids[i] for i in res["items"][:k]], "scores": res["scores"][:k]}
           for (rid, _, _, _, k), res in _score_each(
               lambda jobs: rec.rerank_batch([j[2] for j in jobs], [j[3] for j in jobs], batch_size=batch_size),
               reranks, rejects)]
    return pl.DataFrame(ok, schema=OUT_SCHEMA), pl.DataFrame(sorted(rejects, key=lambda r: r["row"]),
                                                             schema=REJECT_SCHEMA)


def score_chunk(rec: Recommender, users: dict, input_path: Path, output: Path, c: int, chunk_size: int,
                batch_size: int = 64, duplicates: dict[int, int] | None = None) -> dict:
    """Score input rows [c * chunk_size, (c + 1) * chunk_size) and write their part and rejects
    atomically; returns the chunk's manifest entry. The unit of work of every engine."""
    chunk = pl.scan_parquet(input_path).slice(c * chunk_size, chunk_size).collect()
    results, rejects = process_batch(rec, users, chunk, c * chunk_size, batch_size, duplicates)
    _write_atomic(results, Path(output) / f"part-{c:05d}.parquet")
    _write_atomic(rejects, Path(output) / "rejects" / f"part-{c:05d}.parquet")
    return {"rows": chunk.height, "scored": results.height, "rejected": rejects.height}


def _write_atomic(df: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    df.write_parquet(tmp)
    os.replace(tmp, path)


def rescore(serve_dir, input_path, output, chunk_size: int = 10_000, batch_size: int = 64,
            progress: bool = True, stop_after: int | None = None, engine: str = "local",
            workers: int = 2, address: str | None = None) -> dict:
    """Run (or resume) a re-scoring job; returns the manifest. ``stop_after`` chunks: for tests.

    ``engine="local"`` scores the chunks one after another in this process; ``engine="ray"`` runs the
    same :func:`score_chunk` on Ray Data, ``workers`` actors each holding one :class:`Recommender`, on
    the cluster at ``address`` (default: ``$RAY_ADDRESS``; neither: a local Ray instance of ``workers``
    CPUs; one this process already joined with ``ray.init`` is used as it is). Either way this process
    records each finished chunk in the manifest, so a killed job of either engine resumes with the other.
    """
    if engine not in ("local", "ray"):
        raise RecsysError(f"engine must be 'local' or 'ray', got {engine!r}")
    for name, value in (("chunk_size", chunk_size), ("batch_size", batch_size), ("workers", workers)):
        if not isinstance(value, int) or value < 1:
            raise RecsysError(f"{name} must be a whole number >= 1, got {value!r}")
    from tqdm.auto import tqdm

    input_path, output = Path(input_path), Path(output)
    if not input_path.exists():
        raise RecsysError(f"{input_path}: no such input file")
    source = input_path
    identity = {"input": str(source.resolve()), "input_sha256": sha256(source), "chunk_size": chunk_size}
    manifest_path = output / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {**identity, "chunks": {}}
    if {k: manifest.get(k) for k in identity} != identity:                 # checked before any work
        raise RecsysError(f"{output}: holds a job for another input or chunk size; use another --output")
    input_path = as_parquet(source, output, identity["input_sha256"])
    n_rows = pl.scan_parquet(input_path).select(pl.len()).collect().item()
    columns = pl.read_parquet_schema(input_path)
    if "request_id" not in columns or not ({"user_id", "history"} & set(columns)):
        raise RecsysError(f"{source}: needs a request_id column and a user_id or history column, "
                          f"has {list(columns)}")
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise RecsysError(f"{source}: unknown columns {unknown}; a request has {list(COLUMNS)}")
    manifest["rows"] = n_rows
    output.mkdir(parents=True, exist_ok=True)
    n_chunks = -(-n_rows // chunk_size)
    todo = [c for c in range(n_chunks) if str(c) not in manifest["chunks"]][:stop_after]
    args = (str(serve_dir), str(input_path), str(output), chunk_size, batch_size,
            duplicate_rows(input_path) if todo else {})
    finished = _ray_chunks(todo, args, workers, address) if engine == "ray" else _local_chunks(todo, args)
    for c, entry in tqdm(finished, total=len(todo), desc="rescore", unit="chunk", disable=not progress):
        manifest["chunks"][str(c)] = entry
        _write_atomic_text(json.dumps(manifest, indent=2), manifest_path)
    manifest["complete"] = len(manifest["chunks"]) == n_chunks
    _write_atomic_text(json.dumps(manifest, indent=2), manifest_path)
    return manifest


def audit(input_path, output) -> dict:
    """Every input row against a job's output: ``rows`` (input rows), ``answered`` (rows in the parts and the
    rejects), ``lost`` (input rows whose request has no answer or reject), ``duplicated`` (answers beyond the
    first per input row). A complete job of either engine has 0 and 0. Rows are told apart by their
    ``request_id``; a repeated id is one answer and one reject per repetition, so it counts as answered."""
    output = Path(output)
    source = Path(input_path)
    if source.suffix.lower() not in (".parquet", ".pq"):
        source = as_parquet(source, output, sha256(source))
    wanted = _request_keys(source, input_rows=True)
    got = [pl.read_parquet(f, columns=["request_id"])["request_id"] for f in sorted(output.glob("part-*.parquet"))]
    got += [_request_keys(f) for f in sorted(output.glob("rejects/part-*.parquet"))]
    answered = pl.concat(got) if got else pl.Series("request_id", [], pl.String)
    want, have = wanted.value_counts(), answered.value_counts()
    joined = (want.join(have, on="request_id", how="full", suffix="_out", coalesce=True).fill_null(0)
              .with_columns(pl.col("count", "count_out").cast(pl.Int64)))
    lost = int((joined["count"] - joined["count_out"]).clip(lower_bound=0).sum())
    duplicated = int((joined["count_out"] - joined["count"]).clip(lower_bound=0).sum())
    return {"rows": len(wanted), "answered": len(answered), "lost": lost, "duplicated": duplicated}


def _request_keys(path, input_rows: bool = False) -> pl.Series:
    """One key per row of the input or a rejects file: its ``request_id``, or for a null id (always a reject)
    its input row (the file's own row order with ``input_rows``, else its ``row`` column)."""
    df = pl.scan_parquet(path)
    df = df.with_row_index("row") if input_rows else df
    key = pl.coalesce(pl.col("request_id").cast(pl.String), pl.format("\0row {}", pl.col("row")))
    return df.select(key.alias("request_id")).collect()["request_id"]


LIST_SEPARATOR = "|"
"""Item ids in one CSV/TSV cell of ``history`` or ``candidates``."""


def as_parquet(input_path: Path, output: Path, digest: str) -> Path:
    """The input itself if it is Parquet; else its Parquet conversion in ``output`` (written once per input
    content, ``digest`` its SHA-256, atomically; ids as text, CSV/TSV list cells split on ``|``)."""
    from recsys.data.tables import read_table

    if input_path.suffix.lower() in (".parquet", ".pq"):
        return input_path
    converted = output / f"input-{digest[:12]}.parquet"
    if converted.exists():
        return converted
    try:
        df, _, fmt = read_table(input_path, ["request_id"], keep_all=True)
    except RecsysError as e:
        raise RecsysError(f"{e} (rescore reads .parquet, .jsonl, .csv or .tsv)") from None
    ids = [pl.col(c).cast(pl.String) for c in ("request_id", "user_id") if c in df.columns]
    lists = [(pl.col(c).cast(pl.String).str.split(LIST_SEPARATOR).list.eval(pl.element().str.strip_chars())
              if fmt in ("csv", "tsv") else pl.col(c).cast(pl.List(pl.String)))
             for c in ("history", "candidates") if c in df.columns]
    df = df.with_columns(*ids, *lists)
    output.mkdir(parents=True, exist_ok=True)
    _write_atomic(df, converted)
    return converted


class ChunkScorer:
    """Holds one :class:`Recommender` and the user histories; scores chunks by number."""

    def __init__(self, serve_dir: str, input_path: str, output: str, chunk_size: int, batch_size: int,
                 duplicates: dict[int, int]):
        self.rec = Recommender(serve_dir)
        self.users = self.rec.users.histories
        self.input_path, self.output, self.chunk_size, self.batch_size = Path(input_path), Path(output), chunk_size, batch_size
        self.duplicates = duplicates

    def __call__(self, c: int) -> dict:
        return score_chunk(self.rec, self.users, self.input_path, self.output, c, self.chunk_size, self.batch_size,
                           self.duplicates)


def duplicate_rows(input_path) -> dict[int, int]:
    """Input row -> the first row with the same ``request_id``, for every later occurrence of an id (those
    rows are rejected, so that each id has one answer)."""
    repeated = (pl.scan_parquet(input_path).select("request_id").with_row_index("row")
                .filter(pl.col("request_id").is_not_null() & pl.col("request_id").is_duplicated()).collect())
    first: dict[str, int] = {}
    out = {}
    for row, rid in repeated.iter_rows():
        if rid in first:
            out[row] = first[rid]
        else:
            first[rid] = row
    return out


def _local_chunks(todo: list[int], args: tuple):
    if not todo:
        return
    scorer = ChunkScorer(*args)
    for c in todo:
        yield c, scorer(c)


class _RayChunkScorer:
    """Ray Data's callable class: a batch of chunk numbers in, their manifest entries out."""

    def __init__(self, *args):
        self.scorer = ChunkScorer(*args)

    def __call__(self, batch: dict) -> dict:
        entries = [self.scorer(int(c)) for c in batch["chunk"]]
        return {"chunk": list(batch["chunk"]), "entry": [json.dumps(e) for e in entries]}


def _ray_chunks(todo: list[int], args: tuple, workers: int, address: str | None = None):
    try:
        import ray
    except ImportError as e:
        raise RecsysError("--engine ray needs Ray Data: pip install 'ray[data]'") from e
    if not todo:
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    ds = ray.data.from_items([{"chunk": c} for c in todo], override_num_blocks=len(todo))
    out = ds.map_batches(_RayChunkScorer, fn_constructor_args=args, batch_size=1, concurrency=workers, num_cpus=1)
    for row in out.iter_rows():                      # streamed as chunks finish: the manifest follows
        yield int(row["chunk"]), json.loads(row["entry"])


def _write_atomic_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

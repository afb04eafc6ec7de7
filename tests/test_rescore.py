"""Batch re-scoring: bad rows to rejects, and a killed job resumes with every row exactly once."""

import polars as pl
import pytest

from recsys.errors import RecsysError
from serving.rescore import audit, rescore


def requests(out, n: int = 50) -> pl.DataFrame:
    users = pl.read_parquet(out / "histories.parquet")["user_id"].to_list()
    items = pl.read_parquet(out / "catalog.parquet")["item_id"].to_list()
    rows = []
    for i in range(n):
        kind = i % 5
        rows.append({"request_id": f"r{i}",
                     "user_id": users[i % len(users)] if kind in (0, 1) else ("ghost" if kind == 4 else None),
                     "history": None if kind in (0, 1, 4) else ([items[i % 10], items[(i + 1) % 10]] if kind == 2
                                                                  else ["unknown-item"]),
                     "candidates": items[10:16] if kind == 1 else None, "k": 3})
    return pl.DataFrame(rows, schema={"request_id": pl.String, "user_id": pl.String, "history": pl.List(pl.String),
                                      "candidates": pl.List(pl.String), "k": pl.Int64})


def read_output(path):
    done = pl.concat([pl.read_parquet(p) for p in sorted(path.glob("part-*.parquet"))])
    rejects = pl.concat([pl.read_parquet(p) for p in sorted((path / "rejects").glob("part-*.parquet"))])
    return done, rejects


def test_rescore_kill_and_resume_is_row_exact(exported, tmp_path):
    out = exported[0]
    requests(out).write_parquet(tmp_path / "req.parquet")
    rescore(out, tmp_path / "req.parquet", tmp_path / "straight", chunk_size=7, progress=False)
    partial = rescore(out, tmp_path / "req.parquet", tmp_path / "resumed", chunk_size=7, progress=False, stop_after=3)
    assert not partial["complete"] and len(partial["chunks"]) == 3                    # "killed" after 3 chunks
    (tmp_path / "resumed" / ".part-00003.parquet.tmp").write_bytes(b"half-written garbage")   # a torn write
    final = rescore(out, tmp_path / "req.parquet", tmp_path / "resumed", chunk_size=7, progress=False)
    assert final["complete"]
    a, ra = read_output(tmp_path / "straight")
    b, rb = read_output(tmp_path / "resumed")
    assert a.equals(b) and ra.equals(rb)
    ids = a["request_id"].to_list() + ra["request_id"].to_list()
    assert sorted(ids) == sorted(f"r{i}" for i in range(50)) and len(ids) == len(set(ids))   # each row exactly once
    reasons = dict(zip(ra["request_id"], ra["reason"]))
    assert "unknown user_id 'ghost'" in reasons["r4"] and "empty history" in reasons["r3"]
    reranked = a.filter(pl.col("request_id") == "r1")["items"][0].to_list()
    assert set(reranked) <= set(pl.read_parquet(out / "catalog.parquet")["item_id"].to_list()[10:16])


def test_rescore_refuses_another_input_in_the_same_output(exported, tmp_path):
    out = exported[0]
    requests(out, 10).write_parquet(tmp_path / "a.parquet")
    requests(out, 12).write_parquet(tmp_path / "b.parquet")
    rescore(out, tmp_path / "a.parquet", tmp_path / "o", chunk_size=5, progress=False)
    with pytest.raises(RecsysError, match="another input"):
        rescore(out, tmp_path / "b.parquet", tmp_path / "o", chunk_size=5, progress=False)
    pl.DataFrame({"x": [1]}).write_parquet(tmp_path / "bad.parquet")
    with pytest.raises(RecsysError, match="request_id"):
        rescore(out, tmp_path / "bad.parquet", tmp_path / "o2", progress=False)


def test_ray_engine_matches_local_and_resumes_a_local_job(exported, tmp_path):
    """--engine ray on a local Ray instance (2 actors) writes the same parts as the local engine, and
    finishes a job the local engine started: every row once."""
    ray = pytest.importorskip("ray")
    out = exported[0]
    requests(out).write_parquet(tmp_path / "req.parquet")
    rescore(out, tmp_path / "req.parquet", tmp_path / "local", chunk_size=7, progress=False)
    rescore(out, tmp_path / "req.parquet", tmp_path / "mixed", chunk_size=7, progress=False, stop_after=2)
    try:
        final = rescore(out, tmp_path / "req.parquet", tmp_path / "mixed", chunk_size=7, progress=False,
                        engine="ray", workers=2)
    finally:
        ray.shutdown()
    assert final["complete"] and len(final["chunks"]) == 8
    a, ra = read_output(tmp_path / "local")
    b, rb = read_output(tmp_path / "mixed")
    assert a.equals(b) and ra.equals(rb)
    with pytest.raises(RecsysError, match="engine"):
        rescore(out, tmp_path / "req.parquet", tmp_path / "x", engine="spark", progress=False)


def test_bad_rows_are_rejected_with_their_reason_and_never_stop_the_job(exported, tmp_path, monkeypatch):
    """k = inf / NaN / 0 / 1000, a repeated request_id, repeated candidates, a null id and a row the scorer
    raises on: each goes to the rejects with its reason, every other row is scored, once; a rerun changes
    nothing."""
    from serving.runtime import Recommender

    out = exported[0]
    users = pl.read_parquet(out / "histories.parquet")["user_id"].to_list()
    items = pl.read_parquet(out / "catalog.parquet")["item_id"].to_list()
    ks = [3.0, float("inf"), float("nan"), 0.0, 1000.0, 2.0, 4.0, 5.0, 3.0, 3.0]
    ids = ["a", "b", "c", "d", "e", "a", None, "g", "h", "boom"]
    cands = [None] * 7 + [[items[3], items[4], items[3]], None, None]
    df = pl.DataFrame({"request_id": ids, "user_id": [users[i % len(users)] for i in range(10)], "k": ks,
                       "candidates": cands}, schema={"request_id": pl.String, "user_id": pl.String, "k": pl.Float64,
                                                     "candidates": pl.List(pl.String)})
    df.write_parquet(tmp_path / "req.parquet")
    boom_history = list(pl.read_parquet(out / "histories.parquet").filter(pl.col("user_id") == users[9 % len(users)])
                        ["history"][0])
    original = Recommender.recommend_batch

    def fragile(self, queries, batch_size=64):
        if any(list(q.history) == boom_history for q in queries):
            raise RuntimeError("scorer exploded")
        return original(self, queries, batch_size)

    monkeypatch.setattr(Recommender, "recommend_batch", fragile)
    m = rescore(out, tmp_path / "req.parquet", tmp_path / "o", chunk_size=4, progress=False)
    done, rejects = read_output(tmp_path / "o")
    assert m["complete"] and sorted(done["request_id"].to_list()) == ["a", "h"]
    reasons = dict(zip(rejects["row"].to_list(), rejects["reason"].to_list()))
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6, 7, 9]
    assert "finite number" in reasons[1] and "finite number" in reasons[2]
    assert "greater than or equal to 1" in reasons[3] and "less than or equal to 100" in reasons[4]
    assert reasons[5] == "duplicate request_id (first at row 0)" and "request_id" in reasons[6]
    assert "repeated" in reasons[7] and "scoring failed: RuntimeError: scorer exploded" in reasons[9]
    assert done.filter(pl.col("request_id") == "a")["items"][0].len() == 3
    rescore(out, tmp_path / "req.parquet", tmp_path / "o", chunk_size=4, progress=False)
    assert read_output(tmp_path / "o")[0].equals(done)
    # a repeated id is one answer plus one reject, a null id a reject keyed by its row: nothing lost or doubled
    assert audit(tmp_path / "req.parquet", tmp_path / "o") == {"rows": 10, "answered": 10, "lost": 0, "duplicated": 0}


def test_audit_counts_rows_without_an_answer_and_answers_given_twice(exported, tmp_path):
    out = exported[0]
    requests(out, 20).write_parquet(tmp_path / "req.parquet")
    rescore(out, tmp_path / "req.parquet", tmp_path / "o", chunk_size=7, progress=False)
    assert audit(tmp_path / "req.parquet", tmp_path / "o") == {"rows": 20, "answered": 20, "lost": 0, "duplicated": 0}
    part = tmp_path / "o" / "part-00000.parquet"
    answers = pl.read_parquet(part).height + pl.read_parquet(tmp_path / "o" / "rejects" / "part-00000.parquet").height
    part.rename(tmp_path / "o" / "part-00099.parquet")          # the same answers under a second name
    (tmp_path / "o" / "part-00098.parquet").write_bytes((tmp_path / "o" / "part-00099.parquet").read_bytes())
    (tmp_path / "o" / "rejects" / "part-00001.parquet").unlink()                    # a chunk's rejects gone
    lost = 7 - pl.read_parquet(tmp_path / "o" / "part-00001.parquet").height
    got = audit(tmp_path / "req.parquet", tmp_path / "o")
    assert got["lost"] == lost > 0 and got["duplicated"] == pl.read_parquet(part.with_name("part-00099.parquet")).height
    assert answers == 7 and got["answered"] == 20 - lost + got["duplicated"]


@pytest.mark.parametrize("option, value", [("chunk_size", 0), ("batch_size", -1), ("workers", 0)])
def test_invalid_options_and_unknown_columns_are_refused_before_any_work(exported, tmp_path, option, value):
    out = exported[0]
    requests(out, 5).write_parquet(tmp_path / "req.parquet")
    with pytest.raises(RecsysError, match=f"{option} must be a whole number >= 1"):
        rescore(out, tmp_path / "req.parquet", tmp_path / "o", progress=False, **{option: value})
    requests(out, 5).with_columns(top_k=pl.lit(3)).write_parquet(tmp_path / "extra.parquet")
    with pytest.raises(RecsysError, match=r"unknown columns \['top_k'\]"):
        rescore(out, tmp_path / "extra.parquet", tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()

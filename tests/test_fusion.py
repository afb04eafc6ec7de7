"""Side features and the fusion reranker: the maths by hand, the tables against brute force, training on a
signal it must find, the job and the strong-retriever pipeline end to end on the fixture."""

import shutil

import numpy as np
import polars as pl
import pytest

from recsys.data.candidates import candidate_lists
from recsys.errors import DataError, RecsysError
from recsys.portable.features import (
    GROUPS,
    RECENT_SECONDS,
    Request,
    SideFeatures,
    ease_weights,
    lookup,
    requests_from_candidates,
    succession_counts,
)
from recsys.rerank.fusion import FusionConfig, FusionRanker, ndcg10, train_fusion
from tests.conftest import FIXTURES


def test_ease_weights_match_the_hand_worked_example():
    B = ease_weights(np.array([[1, 1], [1, 0]], dtype=np.float32), lam=1.0)
    assert np.allclose(B, [[0, 1 / 3], [1 / 2, 0]], atol=1e-6)


def test_succession_counts_and_lookup_match_the_hand_worked_example():
    keys, weights = succession_counts([np.array([1, 2, 3])], n_items=3)
    assert keys.tolist() == [6, 7, 11] and np.allclose(weights, [1.0, 0.5, 1.0])
    assert np.allclose(lookup(keys, weights, np.array([7, 8, 11, 0])), [0.5, 0.0, 1.0, 0.0])
    keys, weights = succession_counts([np.array([1, 2]), np.array([1, 2, 1, 2])], n_items=3)
    assert lookup(keys, weights, np.array([1 * 4 + 2]))[0] == pytest.approx(1 + 1 + 1 + 1 / 3)   # 1->2 at steps 1, 1, 1, 3


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The tiny fixture with a user file (gender and age for every user but the last)."""
    from recsys.data import prepare, read_dataset

    root = tmp_path_factory.mktemp("fusion")
    src = root / "tiny"
    shutil.copytree(FIXTURES / "tiny", src)
    users = sorted(pl.read_csv(src / "tiny.inter", separator="\t")["user_id:token"].unique())
    (src / "tiny.user").write_text("user_id:token\tage:float\tgender:token\toccupation:float\n" + "".join(
        f"{u}\t{(18, 25, 35)[i % 3]}\t{'FM'[i % 2]}\t{i % 4}\n" for i, u in enumerate(users[:-1])))
    return prepare(read_dataset(src), root / "prepared")


def _request(ds, uidx: int, n: int = 8) -> Request:
    df = ds.interactions.filter(pl.col("uidx") == uidx).sort("pos")
    idx, times = df["idx"].to_numpy().astype(np.int64), df["timestamp"].to_numpy()
    cands = np.array([i for i in range(1, ds.n_items + 1) if i not in set(idx[:-1])][:n])
    return Request(uidx, idx[:-1], times[:-1], int(times[-1]), cands, np.linspace(3.0, 1.0, n))


def test_side_features_match_brute_force_on_the_fixture(prepared):
    ds = prepared
    rng = np.random.default_rng(0)
    side = SideFeatures.fit(ds, list(GROUPS), text_vectors=rng.standard_normal((ds.n_items, 4)))
    r = _request(ds, 3)
    f = side.transform(r)
    assert f.shape == (8, len(side.names)) and side.names[:3] == GROUPS["retriever"]
    col = {n: f[:, i] for i, n in enumerate(side.names)}
    assert np.allclose(col["retriever_gap"], r.scores - 3.0) and np.allclose(col["retriever_log_position"], np.log1p(np.arange(8)))
    assert np.allclose(np.exp(col["retriever_log_softmax"]).sum(), 1.0, atol=1e-5)
    train = ds.interactions.filter(pl.col("split") == "train")
    for j, c in enumerate(r.candidates):
        times = train.filter(pl.col("idx") == int(c))["timestamp"].to_numpy()
        recent = ((times >= r.time - RECENT_SECONDS) & (times < r.time)).sum()
        assert col["recent_30d"][j] == pytest.approx(np.log1p(recent))
        assert col["popularity"][j] == pytest.approx(np.log1p(len(times)))
    # transitions: brute force over the training sequences, from the last (weight 1) and second-to-last (1/2) item
    seqs = ds.train_sequences()
    for j, c in enumerate(r.candidates):
        w = 0.0
        for prev, pw in ((r.history[-1], 1.0), (r.history[-2], 0.5)):
            for s in seqs:
                for a in range(len(s)):
                    for step, sw in ((1, 1.0), (2, 0.5), (3, 1 / 3)):
                        if a + step < len(s) and s[a] == prev and s[a + step] == c:
                            w += pw * sw
        assert col["transitions"][j] == pytest.approx(np.log1p(w), rel=1e-5)
    ease = SideFeatures.fit(ds, ["ease"]).ease
    raw = ease[r.history].sum(0)[r.candidates]
    assert np.allclose(col["ease_history"], (raw - raw.mean()) / (raw.std() + 1e-6), atol=1e-4)
    assert np.all(col["hours_since_last"] == col["hours_since_last"][0])
    v = side.text[1:] / np.linalg.norm(side.text[1:], axis=1, keepdims=True)
    q = v[r.history[-10:] - 1].mean(0)
    assert np.allclose(col["text_cosine"], v[r.candidates - 1] @ q / np.linalg.norm(q), atol=1e-5)
    with pytest.raises(RecsysError, match="feature group 'text' needs item text vectors"):
        SideFeatures.fit(ds, ["text"])


def test_demographic_features_need_user_features_and_name_the_file(tmp_path):
    from recsys.data import prepare, read_dataset

    ds = prepare(read_dataset(FIXTURES / "tiny"), tmp_path / "p")
    with pytest.raises(DataError, match=r"user_features\.parquet: no user features \['gender', 'age'\]"):
        SideFeatures.fit(ds, ["retriever", "demographics"])
    with pytest.raises(RecsysError, match="unknown feature group"):
        SideFeatures.fit(ds, ["retriever", "weather"])


def test_requests_from_candidates_read_the_history_and_the_request_time(prepared):
    ds = prepared
    seq = ds.interactions.filter(pl.col("uidx") == 2).sort("pos")
    rows = pl.DataFrame({"user_id": ["u"], "uidx": [2], "history_length": [5], "candidates": [[1, 2, 3]],
                         "scores": [[0.3, 0.2, 0.1]], "target": [3]})
    (r,) = requests_from_candidates(ds, candidate_lists(ds.user_sequences(), rows), depth=2)
    assert r.history.tolist() == seq["idx"].to_list()[:5] and r.time == seq["timestamp"][5]
    assert r.candidates.tolist() == [1, 2] and r.scores.tolist() == pytest.approx([0.3, 0.2])


def test_ndcg10_matches_the_hand_worked_example_and_breaks_ties_by_position():
    assert ndcg10(np.array([[0.1, 0.9, 0.5]]), np.array([2])) == pytest.approx(1 / np.log2(3))
    assert ndcg10(np.array([[1.0, 1.0]]), np.array([1])) == pytest.approx(1 / np.log2(3))
    assert ndcg10(np.array([[1.0, 2.0]]), np.array([-1])) == 0.0


def test_fusion_learns_a_signal_the_retriever_order_lacks_and_round_trips(tmp_path):
    """Column 1 marks the target with noise, column 0 is noise: the trained scorer must rank by column 1."""
    rng = np.random.default_rng(0)
    N, L = 600, 10
    targets = rng.integers(0, L, N)
    x = rng.standard_normal((N, L, 2)).astype(np.float32)
    x[np.arange(N), targets, 1] += 3.0
    targets[:30] = -1                                          # lists without their target are dropped
    model, summary = train_fusion(x, targets, ["noise", "signal"], FusionConfig(hidden=8, epochs=15))
    assert summary["holdout_ndcg@10"] > 0.75 > summary["holdout_retriever_ndcg@10"] + 0.3
    assert summary["fit_lists"] < N - summary["holdout_lists"]
    model.save_pretrained(tmp_path / "m")
    again = FusionRanker.from_pretrained(tmp_path / "m")
    assert np.allclose(model.score(x[:5]), again.score(x[:5])) and again.names == ["noise", "signal"]
    with pytest.raises(RecsysError, match=r"features must be \(N, L, 2\)"):
        train_fusion(x[..., :1], targets, ["noise", "signal"])


def test_feature_groups_come_from_yaml_lists_or_comma_separated_overrides(tmp_path):
    from pipelines.config import load_config
    from pipelines.fusion import FusionTrainConfig

    recipe = tmp_path / "r.yaml"
    recipe.write_text("features: [retriever, ease]\nscorer:\n  hidden: 0\n")
    config = load_config(FusionTrainConfig, recipe, {"scorer.seed": "3"})
    assert config.features == ("retriever", "ease") and config.scorer.hidden == 0 and config.scorer.seed == 3
    assert load_config(FusionTrainConfig, None, {"features": "retriever, recency"}).features == ("retriever", "recency")
    with pytest.raises(RecsysError, match=r"features: unknown group\(s\) \['weather'\]"):
        load_config(FusionTrainConfig, None, {"features": "retriever,weather"})


def test_strong_pipeline_end_to_end_on_the_fixture_then_every_stage_is_up_to_date(prepared, tmp_path):
    """Retriever, candidates, features, every fusion row, the item-token LM and its rows, the end-to-end row;
    a rerun redoes nothing."""
    from pipelines.benchmarks.rerankers_strong import run
    from recsys.llm.backbone import build_tiny

    source = prepared.directory.parent / "tiny"
    lm = build_tiny(n_items=prepared.n_items, hidden_size=32, num_layers=1, seed=3)
    lm.model.save_pretrained(tmp_path / "lm")
    lm.tokenizer.save_pretrained(tmp_path / "lm")
    kwargs = {"dataset": str(source), "sasrec_overrides": {"max_epochs": 2, "model.hidden_size": 16, "model.max_len": 20},
              "lm_overrides": {"max_epochs": 1, "window": 10, "max_history": 10, "val_users": 10, "batch_size": 8,
                               "examples_per_epoch": None, "tiny_hidden_size": 32, "max_minutes": None},
              "lm_seeds": (0,), "depth": 10,
              "groups": tuple(g for g in GROUPS if g != "text"),
              "hybrid_overrides": {"backbone": str(tmp_path / "lm"), "keep_layers": 1, "text_layers": 1, "window": 10,
                                   "max_history": 10, "examples_per_epoch": 16, "batch_size": 4, "val_users": 10,
                                   "max_epochs": 1, "max_minutes": None}}
    lines = []
    result = run(tmp_path / "art", log=lines.append, **kwargs)
    names = [r["name"] for r in result["rows"]]
    assert names[:2] == ["retriever-order", "popularity"] and names[-1] == "end-to-end"
    assert {"fusion-mlp", "fusion-linear", "fusion-retriever-only", "fusion-mlp-without-ease", "fusion-retriever+recency",
            "listwise-tiny-items", "fusion-mlp+lm", "fusion-retriever+lm", "hybrid-smollm2",
            "hybrid-smollm2-scratch", "fusion-retriever+smollm2", "fusion-mlp+smollm2-scratch"} <= set(names)
    for r in result["rows"][1:]:
        low, high = r["paired"]["ndcg@10"]
        assert low <= r["paired"]["mean_diff"] <= high
        assert 0.0 <= r["metrics"]["ndcg@10"] <= r["metrics"]["hr@10"] <= 1.0
    assert sum(1 for r in result["rows"] if r["name"] == "fusion-mlp") == 2
    compared = {(c["row"], c["against"]) for c in result["comparisons"]}
    assert ("fusion-mlp-without-ease-seed0", "fusion-mlp-seed0") in compared
    assert ("fusion-mlp+lm-seed0", "fusion-mlp-seed0") in compared
    assert ("fusion-retriever+smollm2-seed0", "fusion-retriever+smollm2-scratch-seed0") in compared
    assert ("hybrid-smollm2-seed1", "hybrid-smollm2-scratch-seed1") in compared
    averaged = [c for c in result["comparisons"] if c.get("seeds") == [0, 1]]
    assert {c["row"] for c in averaged} == {"hybrid-smollm2", "fusion-retriever+smollm2", "fusion-mlp+smollm2"}
    assert sum(1 for r in result["rows"] if r["name"] == "hybrid-smollm2-scratch") == 2
    for probe in ("smollm2-text", "smollm2-titles"):            # the one-seed probes: seed 0 only, with controls
        assert [r["seed"] for r in result["rows"] if r["name"] == f"hybrid-{probe}-scratch"] == [0]
        assert (f"fusion-retriever+{probe}-seed0", f"fusion-retriever+{probe}-scratch-seed0") in compared
    lines.clear()
    run(tmp_path / "art", log=lines.append, **kwargs)
    ran = [line for line in lines if line.endswith("running ...")]
    assert not ran, ran
    # a hybrid trained again (another setting) retrains the fusion rows that read its logits, and only those
    lines.clear()
    kwargs["hybrid_overrides"] |= {"projector_lr": 3e-3}
    run(tmp_path / "art", log=lines.append, hybrid=("pretrained",), **{k: v for k, v in kwargs.items()})
    ran = {line.split("]")[0][1:] for line in lines if line.endswith("running ...")}
    assert {"hybrid-smollm2-seed0", "fusion-retriever+smollm2-seed0", "fusion-mlp+smollm2-seed0"} <= ran
    assert not {"fusion-mlp-seed0", "fusion-retriever+lm-seed0", "listwise-tiny-items-seed0"} & ran, ran


def test_batched_features_equal_each_request_computed_alone(prepared):
    """``transform_many`` (one numpy call per feature for the whole batch) gives :meth:`transform` of each
    request (the reference): histories of 1, 2, 3 and many items (shorter than the 10 and 50 the text, genre
    and year features read), an anonymous user, request times before, inside and after the data, no
    interaction times."""
    rng = np.random.default_rng(1)
    side = SideFeatures.fit(prepared, list(GROUPS), text_vectors=rng.standard_normal((prepared.n_items, 4)))
    base = [_request(prepared, u) for u in range(prepared.n_users)]
    requests = list(base)
    for cut, uidx, shift in ((1, 0, 0), (2, -1, 10 ** 9), (3, 1, -10 ** 9)):
        r = base[uidx if uidx >= 0 else 1]
        requests.append(Request(uidx, r.history[:cut], r.history_times[:cut], r.time + shift, r.candidates, r.scores))
    r = base[2]
    requests.append(Request(2, r.history, r.history_times[:0], r.time, r.candidates[::-1], r.scores[::-1] * 3))
    want = np.stack([side.transform(r) for r in requests])
    got = side.transform_many(requests)
    assert got.shape == want.shape == (len(requests), 8, len(side.names)) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert side.transform_many([]).shape == (0, 0, len(side.names))
    with pytest.raises(RecsysError, match="user 0: side features need a non-empty history"):
        side.transform_many([Request(0, r.history[:0], r.history_times[:0], r.time, r.candidates, r.scores)])


def test_side_feature_tables_round_trip_and_name_what_is_missing(prepared, tmp_path):
    """Saved and loaded tables give the fitted features; an anonymous request (uidx -1) reads no demographic
    lift; a file without a table its groups need is refused naming the table."""
    vectors = np.random.default_rng(0).standard_normal((prepared.n_items, 4))
    side = SideFeatures.fit(prepared, list(GROUPS), text_vectors=vectors)
    side.save(tmp_path / "tables.npz")
    loaded = SideFeatures.load(tmp_path / "tables.npz")
    assert loaded.names == side.names
    for uidx in range(3):
        r = _request(prepared, uidx)
        assert np.array_equal(loaded.transform(r), side.transform(r))
    r = _request(prepared, 0)
    anonymous = loaded.transform(Request(-1, r.history, r.history_times, r.time, r.candidates, r.scores))
    lift = side.names.index("demographic_lift")
    assert np.all(anonymous[:, lift] == 0) and np.any(side.transform(r)[:, lift] != 0)
    with np.load(tmp_path / "tables.npz") as z:
        np.savez(tmp_path / "partial.npz", **{k: z[k] for k in z.files if k != "ease"})
    with pytest.raises(RecsysError, match=r"partial\.npz: side-feature tables lack \['ease'\]"):
        SideFeatures.load(tmp_path / "partial.npz")


def _fusion_run(ds, out, depth: int = 8, **meta):
    """A random fusion scorer over every side-feature group the fixture has (its ``model`` directory)."""
    import json

    import torch

    from recsys.portable.features import supported_groups

    groups = supported_groups(ds)
    names = SideFeatures(groups, ds.n_items).names
    torch.manual_seed(0)
    model = FusionRanker(names, np.zeros(len(names)), np.ones(len(names)), hidden=8)
    model.save_pretrained(out)
    (out / "features.json").write_text(json.dumps({"groups": groups, "ease_lambda": 300.0, "lm": None,
                                                   "depth": depth, "dataset_fingerprint": ds.fingerprint} | meta))
    return model, groups


def test_a_fusion_reranker_is_exported_and_served_as_the_library_scores_it(prepared, tmp_path):
    """``recsys export --fusion``: /v1/recommend's retrieved lists are reranked by the exported scorer over
    features the runtime computes from the exported tables, in the order the library's scorer gives on the
    library's features (the user's demographic group, interaction times and the request's time included),
    and so are the same candidates given in another order with the user and time (``rerank_batch``, a
    rescore row); the tail past ``depth`` keeps the retrieval order; it serves where torch cannot be imported."""
    import torch

    from recsys.models.sasrec import SASRec, SASRecConfig
    from serving.export import export
    from serving.rescore import process_batch
    from serving.runtime import Recommender, RecommendQuery
    from tests.test_serving_export import torch_free

    torch.manual_seed(0)
    SASRec(SASRecConfig(n_items=prepared.n_items, max_len=12, hidden_size=16, num_layers=1),
           prepared.fingerprint).save_pretrained(tmp_path / "sas")
    model, groups = _fusion_run(prepared, tmp_path / "fusion", depth=8)
    out = export(prepared, tmp_path / "sas", tmp_path / "serve", fusion_dir=tmp_path / "fusion")
    rec = Recommender(out)
    assert rec.reranks == "fusion" and rec.reranker is None
    side = SideFeatures.fit(prepared, groups)
    ids, times = prepared.users.sort("uidx")["user_id"].to_list(), prepared.user_timestamps()
    ex = prepared.eval_examples("test")
    for uidx, history in list(zip(ex.users, ex.histories))[:5]:
        h = [int(x) for x in history]
        query = RecommendQuery(h, k=12, candidates=12, user_id=ids[uidx], time=int(times[uidx][len(h)]))
        items, scores = rec.retrieve([query])[0]
        want_request = Request(int(uidx), np.asarray(h), times[uidx][:len(h)], int(times[uidx][len(h)]),
                               np.asarray(items[:8]), np.asarray(scores[:8]))
        want = model.score(side.transform(want_request)[None])[0]
        got = rec.recommend_batch([query])[0]
        assert got["reranked"] and got["items"] == [items[j] for j in np.argsort(-want, kind="stable")] + items[8:]
        assert np.allclose(got["scores"][:8], np.sort(want)[::-1], atol=1e-5)
        # the same candidates given (a rescore row with user_id, candidates and time): the same order
        shuffled = [items[j] for j in np.random.default_rng(int(uidx)).permutation(len(items))]
        assert rec.rerank_batch([query], [shuffled], k=12)[0]["items"] == got["items"]
        row = {"request_id": f"r{uidx}", "user_id": ids[uidx], "candidates": [rec.item_ids[i] for i in shuffled],
               "k": 12, "time": query.time}
        results, rejects = process_batch(rec, {ids[uidx]: h}, pl.DataFrame([row]))
        assert rejects.is_empty() and results["items"][0].to_list() == [rec.item_ids[i] for i in got["items"]]
    anonymous = rec.recommend_batch([RecommendQuery([1, 2, 3], k=5, candidates=10)])[0]
    assert anonymous["reranked"] and len(anonymous["items"]) == 5
    # given candidates: put in SASRec's order with its scores, then reranked as retrieval's would be
    items, scores = rec.retrieve([RecommendQuery([1, 2, 3], candidates=10)])[0]
    shuffled = [items[j] for j in np.random.default_rng(0).permutation(10)]
    assert rec.retrieval_order([RecommendQuery([1, 2, 3])], [shuffled])[0][0] == items
    want = rec.fusion.rerank([RecommendQuery([1, 2, 3])], [(items, scores)])[0]
    assert rec.rerank_batch([RecommendQuery([1, 2, 3])], [shuffled], k=10)[0]["items"] == want[0]
    _check_the_api_reranks_with_fusion(out, ids[ex.users[0]], int(times[ex.users[0]][len(ex.histories[0])]))
    served = torch_free(f"""
import json
from serving.runtime import Recommender, RecommendQuery
rec = Recommender({str(out)!r})
print(json.dumps(rec.recommend_batch([RecommendQuery([1, 2, 3], k=5, candidates=10)])[0]))""")
    assert served["items"] == anonymous["items"]


def _check_the_api_reranks_with_fusion(out, user_id: str, when: int) -> None:
    """Over HTTP: the models route names the fusion reranker; /v1/recommend takes the request's ``time`` (a
    different time may change the order, never the retrieved set) and refuses a millisecond timestamp;
    /v1/rerank takes ``time`` too, answering as the library's ``rerank_batch`` at that time."""
    import httpx

    from serving.app import ServeSettings, create_app
    from serving.runtime import Recommender, RecommendQuery
    from tests.test_serving_api import Server

    with Server(create_app(out, ServeSettings(api_key=None))) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        server.wait_ready(client)
        assert client.get("/v1/models").json()["reranker"] == "fusion"
        body = {"user_id": user_id, "k": 12, "candidates": 12}
        then = client.post("/v1/recommend", json=body | {"time": when}).json()
        later = client.post("/v1/recommend", json=body | {"time": when + 400 * 86400}).json()
        assert then["reranked"] and later["reranked"] and {i["item_id"] for i in then["items"]} == \
            {i["item_id"] for i in later["items"]}
        r = client.post("/v1/recommend", json=body | {"time": 1_733_000_000_000})       # milliseconds
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "time"]
        given = [i["item_id"] for i in then["items"]][::-1]
        r = client.post("/v1/rerank", json={"history": given[:2], "candidates": given[2:]})
        assert r.status_code == 200 and sorted(i["item_id"] for i in r.json()["items"]) == sorted(given[2:])
        r = client.post("/v1/rerank", json={"history": given[:2], "candidates": given[2:], "time": when})
        rec = Recommender(out)
        want = rec.rerank_batch([RecommendQuery([rec.item_idx[i] for i in given[:2]], time=when)],
                                [[rec.item_idx[i] for i in given[2:]]])[0]["items"]
        assert [i["item_id"] for i in r.json()["items"]] == [rec.item_ids[i] for i in want]
        r = client.post("/v1/rerank", json={"history": given[:2], "candidates": given[2:], "time": 1_733_000_000_000})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "time"]


def test_a_fusion_scorer_that_reads_lm_logits_is_not_exported(prepared, tmp_path):
    import torch

    from recsys.models.sasrec import SASRec, SASRecConfig
    from serving.export import export

    SASRec(SASRecConfig(n_items=prepared.n_items, max_len=12, hidden_size=16, num_layers=1),
           prepared.fingerprint).save_pretrained(tmp_path / "sas")
    torch.manual_seed(0)
    _fusion_run(prepared, tmp_path / "fusion", lm="runs/listwise/model")
    with pytest.raises(RecsysError, match=r"reads an LM's logits \(runs/listwise/model\)"):
        export(prepared, tmp_path / "sas", tmp_path / "serve", fusion_dir=tmp_path / "fusion")

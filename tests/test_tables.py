"""Your own data: column-mapped CSV / TSV / Parquet / JSON Lines files, timestamps in any unit, and the
errors a user sees when a file does not match what they said."""

from __future__ import annotations

import datetime as dt
import json

import polars as pl
import pytest

from recsys.data import ColumnMap, PreparedDataset, load_dataset, prepare, read_columns
from recsys.data.tables import parse_timestamps
from recsys.errors import DataError

T0 = 1_700_000_000
ORDERS = pl.DataFrame({
    "customer": ["c1"] * 4 + ["c2"] * 4 + ["c3"] * 3,
    "sku": ["a", "b", "c", "d", "b", "c", "a", "e", "a", "b", "x"],
    "ts": [T0 + 60 * i for i in range(11)],
    "stars": ["5", "4", "1", "5", "3", "5", "4", "2", "5", "5", "4"],
    "channel": ["web"] * 11,
})
PRODUCTS = pl.DataFrame({"sku": ["a", "b", "c", "d", "e", "z"], "name": ["Kettle", "Teapot", "", "Mug", "Tray", "Nope"],
                         "brand": ["Acme", "Acme", "Bolt", "Bolt", "Acme", "Acme"],
                         "category": ["Kitchen|Tea", "Tea", "Kitchen", "", "Kitchen", "Tea"]})
MAP = ColumnMap(user_col="customer", item_col="sku", time_col="ts", rating_col="stars", items="products.csv",
                item_id_col="sku", title_col="name", text_cols=("brand",), category_col="category")


def quiet(_message: str) -> None:
    pass


def _write(df: pl.DataFrame, path, fmt: str):
    {"csv": lambda: df.write_csv(path), "tsv": lambda: df.write_csv(path, separator="\t"),
     "parquet": lambda: df.write_parquet(path), "jsonl": lambda: df.write_ndjson(path)}[fmt]()
    return path


def _map(tmp_path, **changes) -> ColumnMap:
    items = _write(PRODUCTS, tmp_path / "products.csv", "csv")
    return ColumnMap(**{**MAP.__dict__, "items": str(items), **changes})


def test_a_csv_with_its_own_column_names_and_an_items_file_becomes_a_dataset(tmp_path):
    orders = _write(ORDERS, tmp_path / "orders.csv", "csv")
    lines = []
    raw = read_columns(orders, _map(tmp_path), log=lines.append)
    assert raw.name == "orders" and raw.interactions.columns == ["user_id", "item_id", "timestamp", "rating"]
    assert raw.interactions["timestamp"].to_list() == ORDERS["ts"].to_list()
    assert raw.interactions["rating"].to_list()[:3] == [5.0, 4.0, 1.0]
    cat = {r["item_id"]: r for r in raw.catalog.iter_rows(named=True)}
    assert set(cat) == {"a", "b", "c", "d", "e", "x"}                 # interacted items only ("z" is not)
    assert cat["a"]["title"] == "Kettle" and cat["a"]["genres"] == ["Kitchen", "Tea"]
    assert cat["a"]["text"] == "Kettle | Kitchen, Tea | Acme"
    assert cat["c"]["title"] == "c" and cat["x"]["title"] == "x" and cat["x"]["genres"] == []   # titled by id
    assert "11 interactions (csv), 3 users, 6 items" in lines[0] and "Unix seconds" in lines[0]
    assert "5 items described" in lines[0] and "1 titled by their id" in lines[0]
    ds = prepare(raw, tmp_path / "prepared")
    assert ds.n_items == 6 and ds.manifest["source"] == f"columns:{orders}"


@pytest.mark.parametrize("fmt", ["tsv", "parquet", "jsonl"])
def test_every_format_and_a_directory_of_parts_read_the_same_interactions(tmp_path, fmt):
    expected = read_columns(_write(ORDERS, tmp_path / "orders.csv", "csv"), _map(tmp_path), log=quiet)
    one = read_columns(_write(ORDERS, tmp_path / f"orders.{fmt}", fmt), _map(tmp_path), log=quiet)
    parts = tmp_path / f"parts-{fmt}"
    parts.mkdir()
    _write(ORDERS.head(5), parts / f"part-0000.{fmt}", fmt)
    _write(ORDERS.tail(6), parts / f"part-0001.{fmt}", fmt)
    (parts / "_SUCCESS").write_text("")                                # Spark's marker is skipped
    split = read_columns(parts, _map(tmp_path), log=quiet)
    for got in (one, split):
        assert got.interactions.equals(expected.interactions) and got.catalog.equals(expected.catalog)


def test_unix_units_and_iso_text_give_the_same_seconds():
    seconds = [T0, T0 + 90]
    times = {
        "Unix seconds": pl.Series(seconds),
        "Unix milliseconds": pl.Series([s * 1000 + 999 for s in seconds]),    # the fraction is floored
        "Unix microseconds": pl.Series([s * 10**6 for s in seconds]),
        "Unix nanoseconds": pl.Series([s * 10**9 for s in seconds]),
        "ISO-8601": pl.Series([dt.datetime.fromtimestamp(s, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ") for s in seconds]),
    }
    for unit, values in times.items():
        got, said = parse_timestamps(values, "f.csv", "ts", str)
        assert got.to_list() == seconds and said.startswith(unit), (unit, said)
    # An offset is honoured; no offset reads as UTC.
    got, _ = parse_timestamps(pl.Series(["2024-05-01T02:00:00+02:00", "2024-05-01 00:00:00", "2024-05-01"]),
                              "f.csv", "ts", str)
    assert got.to_list() == [1714521600] * 3


@pytest.mark.parametrize("values, match", [
    (["1700000000", "yesterday"], r"f.csv: column 'ts' 1 has 'yesterday' among numeric timestamps"),
    (["2024-05-01", "May 2nd"], r"f.csv: column 'ts' 1 has 'May 2nd'; expected Unix time or an ISO-8601"),
    (["2024-05-01", " "], r"f.csv: column 'ts' 1 is empty"),
])
def test_bad_timestamps_name_the_file_line_and_value(values, match):
    with pytest.raises(DataError, match=match):
        parse_timestamps(pl.Series(values), "f.csv", "ts", str)


def test_bad_files_are_named_with_what_was_expected(tmp_path):
    orders = _write(ORDERS, tmp_path / "orders.csv", "csv")
    with pytest.raises(DataError, match=r"orders.csv: missing column\(s\) \['user'\]; it has \['customer', "):
        read_columns(orders, _map(tmp_path, user_col="user"))
    bad = ORDERS.with_columns(pl.when(pl.int_range(11) == 6).then(pl.lit("soon")).otherwise(pl.col("ts").cast(pl.String))
                              .alias("ts"))
    with pytest.raises(DataError, match=r"bad.csv: column 'ts' line 8 has 'soon'"):      # header + 7th row
        read_columns(_write(bad, tmp_path / "bad.csv", "csv"), _map(tmp_path))
    parts = tmp_path / "parts"
    parts.mkdir()
    _write(ORDERS.head(5).with_columns(pl.col("ts").cast(pl.String)), parts / "p0.jsonl", "jsonl")
    _write(bad.tail(6), parts / "p1.jsonl", "jsonl")
    with pytest.raises(DataError, match=r"parts: column 'ts' p1.jsonl line 2 has 'soon'"):
        read_columns(parts, _map(tmp_path))
    stranger = _write(PRODUCTS.with_columns(pl.col("sku") + "-0"), tmp_path / "stranger.csv", "csv")
    with pytest.raises(DataError, match=r"stranger.csv: none of its 6 item ids matches .*'a-0' vs 'a'"):
        read_columns(orders, _map(tmp_path, items=str(stranger)))
    twice = _write(pl.concat([PRODUCTS, PRODUCTS.tail(1)]), tmp_path / "twice.csv", "csv")
    with pytest.raises(DataError, match=r"twice.csv: item id 'z' appears more than once \(first repeat at line 8\)"):
        read_columns(orders, _map(tmp_path, items=str(twice)))
    repeated = _write(pl.concat([ORDERS, ORDERS.slice(2, 1)]), tmp_path / "repeated.csv", "csv")
    with pytest.raises(DataError, match=r"repeated.csv: duplicate interaction at line 13 .*--drop-duplicates"):
        read_columns(repeated, _map(tmp_path))
    (tmp_path / "orders.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"orders.xlsx: cannot tell the format .* or pass --format"):
        read_columns(tmp_path / "orders.xlsx", _map(tmp_path))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"broken.parquet: not a readable parquet file"):
        read_columns(tmp_path / "broken.parquet", _map(tmp_path))
    with pytest.raises(DataError, match="min_rating needs rating_col"):
        ColumnMap(min_rating=4)
    with pytest.raises(DataError, match=r"no interaction has stars >= 6"):
        read_columns(orders, _map(tmp_path, min_rating=6.0))


def test_min_rating_keeps_the_liked_interactions_and_errors_still_name_the_input_line(tmp_path):
    orders = _write(ORDERS, tmp_path / "orders.csv", "csv")
    raw = read_columns(orders, _map(tmp_path, min_rating=4.0))
    assert raw.interactions.height == 8 and raw.interactions["rating"].min() == 4.0
    repeated = _write(pl.concat([ORDERS, ORDERS.slice(0, 1)]), tmp_path / "repeated.csv", "csv")
    with pytest.raises(DataError, match=r"duplicate interaction at line 13"):
        read_columns(repeated, _map(tmp_path, min_rating=4.0))


def test_user_features_from_a_users_file(tmp_path):
    orders = _write(ORDERS, tmp_path / "orders.csv", "csv")
    users = _write(pl.DataFrame({"cid": ["c1", "c2", "c9"], "tier": ["gold", "silver", "gold"], "age": [31, 45, 20]}),
                   tmp_path / "users.parquet", "parquet")
    raw = read_columns(orders, _map(tmp_path, users=str(users), user_id_col="cid"))
    assert raw.user_features.columns == ["user_id", "tier", "age"]
    only = read_columns(orders, _map(tmp_path, users=str(users), user_id_col="cid", feature_cols=("tier",)))
    assert only.user_features.columns == ["user_id", "tier"]
    ds = prepare(only, tmp_path / "prepared")
    assert ds.manifest["user_features"]["columns"] == ["tier"] and ds.manifest["user_features"]["users_without"] == 1


def test_load_dataset_takes_a_file_or_a_directory_of_parts_and_says_what_it_expected(tmp_path):
    df = ORDERS.rename({"customer": "user_id", "sku": "item_id", "ts": "timestamp"})
    raw = load_dataset(_write(df, tmp_path / "events.jsonl", "jsonl"), log=quiet)
    assert raw.catalog["title"].to_list() == raw.catalog["item_id"].to_list()       # no items file: ids
    parts = tmp_path / "events"
    parts.mkdir()
    _write(df, parts / "part-0.parquet", "parquet")
    assert load_dataset(parts, log=quiet).interactions.equals(raw.interactions)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"unknown dataset layout.*or part files of one table \(.csv"):
        load_dataset(empty)


def test_the_cli_prepares_a_mapped_csv_and_a_failed_prepare_writes_nothing(tmp_path, capsys):
    from pipelines.cli import main

    orders = _write(ORDERS, tmp_path / "orders.csv", "csv")
    _write(PRODUCTS, tmp_path / "products.csv", "csv")
    args = ["data", "prepare", str(orders), "--user-col", "customer", "--item-col", "sku", "--time-col", "ts",
            "--items", str(tmp_path / "products.csv"), "--item-id-col", "sku", "--title-col", "name",
            "--text-cols", "brand", "--category-col", "category"]
    assert main(args + ["--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert "11 interactions (csv)" in out.err
    assert summary["users"] == 3 and summary["items"] == 6
    ds = PreparedDataset.load(tmp_path / "out")
    assert "Kettle | Kitchen, Tea | Acme" in ds.catalog["text"].to_list()
    assert main(args[:-2] + ["--category-col", "kind", "--out", str(tmp_path / "failed")]) == 1
    assert "products.csv: missing column(s) ['kind']" in capsys.readouterr().err
    assert not (tmp_path / "failed").exists()


def test_own_data_is_neutral_unless_its_domain_is_given(tmp_path):
    from recsys.portable.prompts import item_titles

    orders = _write(ORDERS, tmp_path / "orders.csv", "csv")
    neutral = prepare(read_columns(orders, _map(tmp_path), log=quiet), tmp_path / "neutral")
    shop = prepare(read_columns(orders, _map(tmp_path, domain="products"), log=quiet), tmp_path / "shop")
    assert (neutral.domain, shop.domain) == ("items", "products") and item_titles(shop).domain == "products"
    assert neutral.fingerprint == shop.fingerprint                 # the words of prompts, not the data


def test_recbole_files_read_through_the_column_map_prepare_the_same_dataset(tmp_path):
    """The MovieLens reader and the column-mapped path agree byte for byte on the fixture (RecBole files):
    same fingerprint, same catalogue (titles, years, genres, text)."""
    from recsys.data import read_dataset
    from tests.conftest import FIXTURES

    source = FIXTURES / "tiny"
    columns = ColumnMap(user_col="user_id:token", item_col="item_id:token", time_col="timestamp:float",
                        rating_col="rating:float", items=str(source / "tiny.item"), item_id_col="item_id:token",
                        title_col="movie_title:token", year_col="release_year:float", category_col="genre:token",
                        category_sep=" ", format="tsv", domain="movies")
    mapped = prepare(read_columns(source / "tiny.inter", columns, log=quiet), tmp_path / "mapped")
    reader = prepare(read_dataset(source), tmp_path / "reader")
    assert mapped.fingerprint == reader.fingerprint and mapped.catalog.equals(reader.catalog)
    assert mapped.domain == reader.domain == "movies"


def test_repeated_item_rows_can_keep_the_first_and_user_features_can_be_renamed(tmp_path):
    orders = _write(ORDERS, tmp_path / "orders.csv", "csv")
    twice = _write(pl.concat([PRODUCTS, PRODUCTS.head(1).with_columns(pl.lit("Other").alias("name"))]),
                   tmp_path / "twice.csv", "csv")
    raw = read_columns(orders, _map(tmp_path, items=str(twice)), on_duplicates="drop", log=quiet)
    assert raw.catalog.filter(pl.col("item_id") == "a")["title"].to_list() == ["Kettle"]
    users = _write(pl.DataFrame({"cid": ["c1"], "sex": ["F"], "years": ["31"]}), tmp_path / "u.csv", "csv")
    raw = read_columns(orders, _map(tmp_path, users=str(users), user_id_col="cid",
                                    feature_cols=("sex=gender", "years=age")), log=quiet)
    assert raw.user_features.columns == ["user_id", "gender", "age"]

"""The prepared dataset: split interactions with dense indices, written as parquet plus a manifest.

Layout of ``<out>/``::

    catalog.parquet        item_id, idx (1..n_items; 0 = padding), title, year, genres, text
    users.parquet          user_id, uidx (0..n_users-1)
    interactions.parquet   user_id, item_id, timestamp, rating, uidx, idx, pos, split
    user_features.parquet  optional: uidx, user_id and the source's user columns (ML-1M: age, gender,
                           occupation, zip_code) as text; side information, not part of the fingerprint
    manifest.json          config, source, counts, SHA-256 of each file, fingerprint

Every later artifact (a trained model, an index, candidates) records the ``fingerprint`` and refuses
to run against a dataset with a different one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recsys.assets import sha256
from recsys.data.readers import RawDataset
from recsys.data.split import kcore, leave_one_out, order_interactions, temporal_split
from recsys.errors import DataError
from recsys.io import atomic_directory

FORMAT_VERSION = 1
FILES = ("catalog.parquet", "users.parquet", "interactions.parquet")
USER_FEATURES = "user_features.parquet"
"""Optional: ``uidx``, ``user_id`` and the source's user columns as text (null where a user has none); not
part of the fingerprint, so datasets with and without it index users and items alike."""
REQUIRED_COLUMNS = {
    "catalog.parquet": {"item_id": pl.String, "idx": pl.Int32, "title": pl.String},
    "users.parquet": {"user_id": pl.String, "uidx": pl.Int32},
    "interactions.parquet": {"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64, "uidx": pl.Int32,
                             "idx": pl.Int32, "pos": pl.Int32, "split": pl.String},
}
"""The columns every stage reads, with their types: checked when a prepared dataset is loaded."""


@dataclass(frozen=True)
class PrepareConfig:
    """How a raw dataset becomes a prepared one."""

    split: str = "loo"
    """``loo`` (leave-one-out by time, the SASRec protocol) or ``temporal`` (global time cuts)."""
    min_user_interactions: int = 0
    """k-core: drop users with fewer interactions (0 = off). ML-1M users all have >= 20."""
    min_item_interactions: int = 0
    """k-core: drop items with fewer interactions (0 = off)."""
    tie_break: str = "file"
    """Order of same-timestamp interactions: ``file`` (stable, as published) or ``hash`` (seeded)."""
    seed: int = 0
    """Seed of the ``hash`` tie-break."""
    valid_fraction: float = 0.1
    """``temporal`` split only: share of interactions (by time) in valid."""
    test_fraction: float = 0.1
    """``temporal`` split only: share of interactions (by time) in test."""

    def __post_init__(self):
        if self.split not in ("loo", "temporal"):
            raise DataError(f"split must be 'loo' or 'temporal', got {self.split!r}")
        if self.tie_break not in ("file", "hash"):
            raise DataError(f"tie_break must be 'file' or 'hash', got {self.tie_break!r}")


@dataclass(frozen=True)
class EvalExamples:
    """What a model sees and must find for one split.

    ``users``: (Q,) uidx. ``histories[q]``: item idx in time order (everything before the target).
    ``targets[q]``: the held-out item idx (one for leave-one-out, possibly several for temporal).
    """

    users: np.ndarray
    histories: list[np.ndarray]
    targets: list[np.ndarray]


class PreparedDataset:
    """A prepared dataset in memory. Load with :meth:`load`, create with :func:`prepare`."""

    def __init__(self, directory: Path, catalog: pl.DataFrame, users: pl.DataFrame,
                 interactions: pl.DataFrame, manifest: dict):
        self.directory, self.catalog, self.users = directory, catalog, users
        self.interactions, self.manifest = interactions, manifest
        self._sorted: pl.DataFrame | None = None
        self._groups: dict[str, list[np.ndarray]] | None = None
        self._sequences: tuple[list[np.ndarray], list[np.ndarray]] | None = None

    @classmethod
    def load(cls, directory: str | Path) -> PreparedDataset:
        directory = Path(directory)
        manifest_path = directory / "manifest.json"
        if not manifest_path.exists():
            raise DataError(f"{directory}: not a prepared dataset (no manifest.json); run `recsys data prepare` first")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{manifest_path}: format_version {manifest.get('format_version')}, "
                            f"this recsys reads {FORMAT_VERSION}; prepare the dataset again")
        frames = {}
        for f in FILES:
            path = directory / f
            if not path.exists():
                raise DataError(f"{path}: missing; prepare the dataset again")
            if sha256(path) != manifest.get("files", {}).get(f):
                raise DataError(f"{path}: SHA-256 differs from {manifest_path.name}: the file changed after "
                                "`recsys data prepare`; prepare the dataset again")
            try:
                frames[f] = pl.read_parquet(path)
            except Exception as e:                                  # noqa: BLE001 - name the file, whatever broke
                raise DataError(f"{path}: unreadable parquet ({type(e).__name__}: {e})") from None
            for column, dtype in REQUIRED_COLUMNS[f].items():
                if frames[f].schema.get(column) != dtype:
                    raise DataError(f"{path}: column {column!r} is {frames[f].schema.get(column)}, expected {dtype}")
        return cls(directory, frames["catalog.parquet"], frames["users.parquet"], frames["interactions.parquet"],
                   manifest)

    def user_features(self, columns: list[str] | None = None) -> pl.DataFrame:
        """(n_users, 1 + len(columns)): ``uidx`` and the requested user feature columns (all by default), in
        uidx order, checked against the manifest's hash. A column the dataset lacks is a DataError naming it
        and the file that would hold it."""
        entry = self.manifest.get("user_features")
        available = entry["columns"] if entry else []
        missing = [c for c in (columns or []) if c not in available]
        if entry is None or missing:
            raise DataError(f"{self.directory / USER_FEATURES}: no user feature{'s' if len(missing) != 1 else ''} "
                            f"{missing or ''} in this dataset (it has {available or 'none'}); the source needs a "
                            "user file (<name>.user, users.dat or u.user) with those columns")
        path = self.directory / entry["file"]
        if not path.exists() or sha256(path) != entry["sha256"]:
            raise DataError(f"{path}: missing or changed after `recsys data prepare`; prepare the dataset again")
        return pl.read_parquet(path).select("uidx", *(columns or available))

    @property
    def name(self) -> str:
        return self.manifest["dataset"]

    @property
    def domain(self) -> str:
        """What the items are, for the words of text prompts (``movies``, ``products``, ``items``, ...: the
        ``domains`` of ``recsys/portable/templates.yaml``): as prepared, else ``movies`` for MovieLens sources."""
        source = self.manifest.get("source", "")
        return self.manifest.get("domain") or ("movies" if source.startswith(("recbole:", "grouplens:")) else "items")

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def n_items(self) -> int:
        """Number of real items; the embedding table of a sequence model has ``n_items + 1`` rows."""
        return self.catalog.height

    @property
    def n_users(self) -> int:
        return self.users.height

    def _by_user(self) -> pl.DataFrame:
        """The interactions sorted by user, then position in time (sorted once)."""
        if self._sorted is None:
            self._sorted = self.interactions.sort(["uidx", "pos"])
        return self._sorted

    def _split_groups(self) -> dict[str, list[np.ndarray]]:
        """Per user (uidx order), the item idx of each split in time order."""
        if self._groups is None:
            df = self._by_user()
            uidx, idx = df["uidx"].to_numpy(), df["idx"].to_numpy().astype(np.int64)
            split = df["split"].to_numpy()
            self._groups = {}
            for name in ("train", "valid", "test"):
                mask = split == name
                counts = np.bincount(uidx[mask], minlength=self.n_users)
                self._groups[name] = np.split(idx[mask], np.cumsum(counts)[:-1])
        return self._groups

    def user_sequences(self) -> list[np.ndarray]:
        """(n_users,) list of each user's whole sequence of item idx (train, valid, test) in time order: a
        candidate list's history is its first ``history_length`` items, whatever the split."""
        return self._chronological()[0]

    def user_timestamps(self) -> list[np.ndarray]:
        """(n_users,) list of the Unix seconds of each item of :meth:`user_sequences`."""
        return self._chronological()[1]

    def _chronological(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if self._sequences is None:
            df = self._by_user()
            cuts = np.cumsum(np.bincount(df["uidx"].to_numpy(), minlength=self.n_users))[:-1]
            self._sequences = (np.split(df["idx"].to_numpy().astype(np.int64), cuts),
                               np.split(df["timestamp"].to_numpy(), cuts))
        return self._sequences

    def train_sequences(self) -> list[np.ndarray]:
        """(n_users,) list of each user's training items in time order."""
        return self._split_groups()["train"]

    def eval_examples(self, split: str) -> EvalExamples:
        """Histories and targets for ``valid`` (history = train) or ``test`` (history = train + valid)."""
        if split not in ("valid", "test"):
            raise DataError(f"split must be 'valid' or 'test', got {split!r}")
        g = self._split_groups()
        users, histories, targets = [], [], []
        for u in range(self.n_users):
            target = g[split][u]
            if len(target) == 0:
                continue
            history = g["train"][u] if split == "valid" else np.concatenate([g["train"][u], g["valid"][u]])
            users.append(u), histories.append(history), targets.append(target)
        return EvalExamples(np.asarray(users, dtype=np.int64), histories, targets)

    def item_popularity(self, split: str = "train") -> np.ndarray:
        """(n_items + 1,) interaction counts per item idx in ``split`` (index 0 = padding = 0)."""
        idx = self.interactions.filter(pl.col("split") == split)["idx"].to_numpy()
        return np.bincount(idx, minlength=self.n_items + 1).astype(np.int64)

    def user_index(self, user_ids: list[str]) -> np.ndarray:
        """Map user ids to uidx; raise naming the unknown ids."""
        table = dict(zip(self.users["user_id"].to_list(), self.users["uidx"].to_list()))
        unknown = [u for u in user_ids if u not in table]
        if unknown:
            raise DataError(f"unknown user id(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''} "
                            f"({len(unknown)} of {len(user_ids)}) not in dataset {self.name}")
        return np.asarray([table[u] for u in user_ids], dtype=np.int64)

    def item_ids(self, idx: np.ndarray) -> list[str]:
        """Item ids of dense indices (1-based)."""
        ids = self.catalog.sort("idx")["item_id"].to_list()
        return [ids[i - 1] for i in np.asarray(idx).ravel().tolist()]


def prepare(raw: RawDataset, out: str | Path, config: PrepareConfig = PrepareConfig(), *,
            source_record: dict | None = None) -> PreparedDataset:
    """Filter, split and index ``raw``; write it to ``out`` atomically; return it loaded."""
    out = Path(out)
    df = raw.interactions
    n_raw = df.height
    df = kcore(df, config.min_user_interactions, config.min_item_interactions)
    n_kcore = df.height
    missing = df.join(raw.catalog, on="item_id", how="anti")
    if missing.height:
        raise DataError(f"{raw.source}: item_id {missing['item_id'][0]!r} (and {missing['item_id'].n_unique() - 1} "
                        "others) appear in interactions but not in the item catalog")
    df = order_interactions(df, config.tie_break, config.seed)
    dropped_users = 0
    if config.split == "loo":
        df, dropped_users = leave_one_out(df)
    else:
        df = temporal_split(df, config.valid_fraction, config.test_fraction)

    item_ids = df["item_id"].unique().sort()
    catalog = raw.catalog.join(pl.DataFrame({"item_id": item_ids, "idx": pl.int_range(1, len(item_ids) + 1, eager=True,
                                                                                        dtype=pl.Int32)}),
                               on="item_id", how="inner").sort("idx")
    catalog = catalog.select("item_id", "idx", "title", "year", "genres", "text")
    user_ids = df["user_id"].unique().sort()
    users = pl.DataFrame({"user_id": user_ids, "uidx": pl.int_range(len(user_ids), eager=True, dtype=pl.Int32)})
    df = df.join(users, on="user_id").join(catalog.select("item_id", "idx"), on="item_id")
    df = df.sort(["uidx", "pos"]).select("user_id", "item_id", "timestamp", "rating", "uidx", "idx", "pos", "split")

    with atomic_directory(out) as staging:
        catalog.write_parquet(staging / "catalog.parquet")
        users.write_parquet(staging / "users.parquet")
        df.write_parquet(staging / "interactions.parquet")
        hashes = {f: sha256(staging / f) for f in FILES}
        split_counts = dict(df.group_by("split").len().iter_rows())
        manifest = {
            "format_version": FORMAT_VERSION,
            "dataset": raw.name,
            "source": raw.source,
            "domain": raw.domain,
            "source_files": (source_record or {}).get("files"),
            "config": dataclasses.asdict(config),
            "counts": {"users": users.height, "items": catalog.height, "interactions": df.height,
                       "raw_interactions": n_raw, "dropped_by_kcore": n_raw - n_kcore,
                       "dropped_users_short": dropped_users, "dropped_interactions_short": n_kcore - df.height,
                       **{f"{s}_interactions": int(split_counts.get(s, 0)) for s in ("train", "valid", "test")}},
            "files": hashes,
            "fingerprint": hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16],
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        if raw.user_features is not None:            # side information: beside the fingerprinted files
            features = users.join(raw.user_features, on="user_id", how="left").sort("uidx")
            features.write_parquet(staging / USER_FEATURES)
            manifest["user_features"] = {"file": USER_FEATURES, "sha256": sha256(staging / USER_FEATURES),
                                         "columns": [c for c in features.columns if c not in ("user_id", "uidx")],
                                         "users_without": int(features.select(pl.exclude("user_id", "uidx"))
                                                              .null_count().max_horizontal().item())}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return PreparedDataset.load(out)

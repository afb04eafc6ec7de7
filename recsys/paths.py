"""Where the project keeps fetched datasets and models: ``$RECSYS_HOME`` (default ``~/.cache/recsys``)."""

import os
from pathlib import Path


def recsys_home() -> Path:
    """The cache directory; created on first use."""
    home = Path(os.environ.get("RECSYS_HOME", Path.home() / ".cache" / "recsys")).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home

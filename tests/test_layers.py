"""Layer boundaries: the library never imports lightning or fastapi."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(package: str) -> dict[str, set[str]]:
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_library_does_not_import_training_or_http_frameworks():
    forbidden = {"lightning", "pytorch_lightning", "fastapi", "uvicorn", "starlette", "pipelines", "serving"}
    leaks = {f: sorted(m & forbidden) for f, m in imported_modules("recsys").items() if m & forbidden}
    assert not leaks, leaks

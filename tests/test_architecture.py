"""The import rules docs/architecture.md states, checked on the package's source."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "transferline"
# What params validation, --help, download and split load: TensorFlow stays out of them.
LIGHT = {
    "audit", "audit_report", "backbones", "checks", "cli", "dataset", "errors", "figures",
    "files", "labels_csv", "layouts", "logs",
    "params", "params_doc", "params_files", "reproduce", "sources", "stagekit", "tracking",
    "tracking_identity",
    "tracking_models", "tracking_queries",
}  # fmt: skip


def imports(module: Path) -> list[tuple[str, bool]]:
    """Each imported top-level package, and whether the import is at module level."""
    tree = ast.parse(module.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        found += [(n.split(".")[0], node in tree.body) for n in names]
    return found


def importers(package: str) -> dict[str, bool]:
    """Modules importing `package`: name -> whether any such import is at module level."""
    out: dict[str, bool] = {}
    for module in PACKAGE.glob("*.py"):
        for name, top in imports(module):
            if name == package:
                out[module.stem] = out.get(module.stem, False) or top
    return out


def test_only_the_tracking_modules_import_mlflow():
    assert importers("mlflow")
    assert all(name.startswith("tracking") for name in importers("mlflow"))


def test_only_the_download_code_imports_kaggle_and_only_when_it_downloads():
    assert importers("kaggle") == {"sources": False}


def test_tensorflow_is_imported_late_by_the_modules_that_validate_split_and_download():
    early = {
        name
        for package in ("tensorflow", "keras")
        for name, top in importers(package).items()
        if top and name in LIGHT
    }
    assert {m.stem for m in PACKAGE.glob("*.py")} >= LIGHT
    assert early == set()


def test_only_the_audit_imports_cleanlab_and_only_when_it_audits():
    assert importers("cleanlab") == {"audit": False}

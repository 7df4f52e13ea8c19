"""dvc.yaml's code deps are each stage script's import closure within the package, so an edit
to code that computes a stage's outputs re-runs that stage (and `dvc status` never calls a
stale result up to date).

The rule (also at the top of dvc.yaml): a stage depends on its script and on every package
module the script imports, directly or through other modules, at module level or inside a
function. Modules that cannot change a stage's DVC outputs are not deps and their own imports
are not followed: logging, error types, the stage harness, params loading, file helpers, the
command line and MLflow tracking (NOT_OUTPUTS).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from conftest import REPO

PACKAGE = REPO / "src" / "transferline"
NOT_OUTPUTS = {"logs", "errors", "stagekit", "params", "params_files", "files", "cli"} | {
    "reproduce",
    "tracking",
    "tracking_identity",
    "tracking_models",
    "tracking_queries",
}


def imported_modules(path: Path) -> set[str]:
    """Package modules `path` imports anywhere in it (`from transferline import x`,
    `from transferline.x import y`, `import transferline.x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "transferline":
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transferline."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {
                a.name.split(".")[1] for a in node.names if a.name.startswith("transferline.")
            }
    return {m for m in found if (PACKAGE / f"{m}.py").is_file()}


def closure(script: Path) -> set[str]:
    todo, seen = list(imported_modules(script)), set()
    while todo:
        module = todo.pop()
        if module in seen or module in NOT_OUTPUTS:
            continue
        seen.add(module)
        todo += imported_modules(PACKAGE / f"{module}.py")
    return seen


def stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(stages()))
def test_each_stage_depends_on_the_code_that_computes_its_outputs(stage):
    spec = stages()[stage]
    script = REPO / spec["cmd"].split()[-1]
    wanted = {f"src/transferline/{m}.py" for m in closure(script)} | {
        script.relative_to(REPO).as_posix()
    }
    declared = {d for d in spec["deps"] if d.endswith(".py")}
    assert wanted - declared == set(), f"{stage}: missing code deps"
    assert declared - wanted == set(), f"{stage}: code deps its script does not import"


def test_the_closure_follows_function_level_imports_and_stops_at_the_harness(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(
        "from transferline import stagekit\n"
        "def run():\n"
        "    from transferline.heads import train_from_features\n"
    )
    found = closure(script)
    assert {"heads", "feature_files"} <= found  # heads imports it inside a function
    assert "features" not in found  # extraction's code: not train_head's business
    assert not found & NOT_OUTPUTS

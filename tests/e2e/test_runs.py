"""MLflow runs under the real `dvc repro`: one run per set of inputs, and the way back from a
run to its inputs and its metrics computed again, on a clone with only git and a DVC remote."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_pipeline import GIT_ID, TINY, copy_repo, mlflow_runs, ran, set_params, sh

from conftest import make_class_folders

pytestmark = pytest.mark.e2e
DVC = [sys.executable, "-m", "dvc"]
CLI = [sys.executable, "-m", "transferline.cli"]
IDENT = {
    f"GIT_{who}_{what}": value
    for who in ("AUTHOR", "COMMITTER")
    for what, value in (("NAME", "e2e"), ("EMAIL", "e2e@example.invalid"))
}


def test_new_images_in_a_folder_source_make_a_new_run_and_the_first_keeps_its_metrics(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    source = make_class_folders(tmp_path / "photos" / "pets", per_class=8)
    tiny = {**TINY, "data.dataset": str(source.parent), "split.max_per_class": None}
    set_params(repo / "params.yaml", {**tiny, "split.val": 0.25, "split.test": 0.25})
    set_params(repo / "params.yaml", {"finetune.enabled": False})
    sh([*DVC, "repro"], repo)
    client, (first,) = mlflow_runs(repo, "e2e")
    assert first.data.metrics["split.train_images"] == 8

    # The user adds images to the folder; the params stay as they were.
    make_class_folders(source, per_class=12)
    sh([*DVC, "repro", "-f", "download"], repo)
    assert ran(sh([*DVC, "repro"], repo)) == {
        "split", "extract", "train_head", "trunk", "finetune", "audit", "evaluate"
    }  # fmt: skip
    client, runs = mlflow_runs(repo, "e2e")
    assert len(runs) == 2
    (second,) = [r for r in runs if r.info.run_id != first.info.run_id]
    again = client.get_run(first.info.run_id)
    assert again.data.metrics == first.data.metrics  # the first result is as it was logged
    assert second.data.metrics["split.train_images"] == 12
    assert second.data.tags["transferline.differs_from"] == f"{first.info.run_id} (data)"
    assert second.data.tags["data.raw_md5"] != first.data.tags["data.raw_md5"]
    assert second.data.params == first.data.params

    # Nothing changed: DVC runs nothing and MLflow gets nothing new.
    assert ran(sh([*DVC, "repro"], repo)) == set()
    _, runs = mlflow_runs(repo, "e2e")
    assert len(runs) == 2
    history = client.get_metric_history(second.info.run_id, "test.head.accuracy")
    assert len(history) == 1


def test_a_run_is_reproduced_on_a_clone_with_only_git_and_the_dvc_remote(tmp_path):
    """The recipe from an MLflow run ID: on a teammate's clone (the git remote and the DVC
    remote, nothing else), fetch the experiment, check out its data and recompute."""
    repo = copy_repo(tmp_path / "repo")
    origin = tmp_path / "origin.git"
    sh(["git", "init", "-q", "--bare", str(origin)], tmp_path)
    sh([*DVC, "remote", "add", "-d", "shared", str(tmp_path / "dvc-remote")], repo)
    sh(["git", *GIT_ID, "commit", "-qam", "a DVC remote"], repo)
    sh(["git", "remote", "add", "origin", str(origin)], repo)
    sh(["git", "push", "-q", "origin", "HEAD:main"], repo)
    overrides = [f"-S{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in TINY.items()]
    sh([*DVC, "exp", "run", "-n", "tiny", *overrides], repo, extra=IDENT)
    sh([*DVC, "exp", "push", "origin", "tiny"], repo, extra=IDENT)  # git ref + DVC cache
    _, (run,) = mlflow_runs(repo, "e2e")
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}  # the team's server

    mate = tmp_path / "mate"
    sh(["git", "clone", "-q", "-b", "main", str(origin), str(mate)], tmp_path)
    reproduce = [*CLI, "reproduce", run.info.run_id]
    out = sh(reproduce, mate, check=False, extra=store)
    assert "`dvc exp pull origin tiny`" in out and "Traceback" not in out
    sh([*DVC, "exp", "pull", "--no-cache", "origin", "tiny"], mate, extra=IDENT)
    out = sh(reproduce, mate, extra=store)
    assert "DVC experiment 'tiny'" in out and "dvc repro --force --downstream split" in out

    # The DVC remote unreachable: one paragraph, and no folder or worktree left behind.
    sh([*DVC, "remote", "modify", "--local", "shared", "url", str(tmp_path / "gone")], mate)
    failed = sh([*reproduce, "--run", str(tmp_path / "again")], mate, check=False, extra=store)
    assert "the run's data (data/raw, DVC hash" in failed and "Traceback" not in failed
    assert not (tmp_path / "again").exists()
    assert len(sh(["git", "worktree", "list"], mate).splitlines()) == 1
    (mate / ".dvc" / "config.local").unlink()

    before = sh(["git", "status", "--porcelain"], mate)
    out = sh([*reproduce, "--run", str(tmp_path / "again")], mate, extra=store)
    assert "all 12 test metrics recomputed as the run has them" in out
    assert sh(["git", "status", "--porcelain"], mate) == before  # the clone is as it was
    ev = json.loads((tmp_path / "again" / "metrics" / "evaluate.json").read_text())
    assert ev["finetune"]["accuracy"] == pytest.approx(run.data.metrics["test.finetune.accuracy"])
    # Its own MLflow run went to a store in the folder, not into the team's.
    _, runs = mlflow_runs(repo, "e2e")
    assert len(runs) == 1 and Path(tmp_path / "again" / "mlflow.db").is_file()

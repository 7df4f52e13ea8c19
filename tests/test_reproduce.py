"""From a run's tags to the revision that reproduces it, and each way that can fail."""

import subprocess
from pathlib import Path

import pytest

from transferline import reproduce

STORE = "sqlite:///mlflow.db"


def git(repo: Path, *args: str) -> str:
    ident = ["-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    return subprocess.run(
        ["git", *ident, *args], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path) -> Path:
    git(tmp_path, "init", "-q")
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "first")
    return tmp_path


def a_run(**tags: str) -> dict:
    return {
        "run_id": "r1",
        "experiment": "quickstart",
        "status": "FINISHED",
        "deleted": False,
        "tags": {"transferline.params_hash": "p1", "data.raw_md5": "d1.dir", **tags},
        "params": {},
        "metrics": {"test.head.accuracy": 0.9, "split.train_images": 10.0},
    }


def test_a_run_of_dvc_repro_on_a_commit_is_reproduced_from_that_commit(repo):
    commit = git(repo, "rev-parse", "HEAD")
    recipe = reproduce.plan(a_run(**{"git.commit": commit}), "r1", repo, STORE)
    assert recipe.rev == commit and recipe.warnings == []
    assert recipe.metrics == {"test.head.accuracy": 0.9}  # the test figures are compared
    text = reproduce.describe(recipe, "../again")
    assert f"git worktree add --detach ../again {commit}" in text
    assert "dvc pull download" in text and "dvc repro --force --downstream split" in text
    dirty = reproduce.plan(a_run(**{"git.commit": commit, "git.dirty": "true"}), "r1", repo, STORE)
    assert "uncommitted changes" in dirty.warnings[0]


def test_a_run_of_dvc_exp_run_is_reproduced_from_its_experiments_commit(repo):
    baseline = git(repo, "rev-parse", "HEAD")
    (repo / "params.yaml").write_text("seed: 2\n")
    git(repo, "commit", "-qam", "the experiment")
    exp_commit = git(repo, "rev-parse", "HEAD")
    ref = f"refs/exps/{baseline[:2]}/{baseline[2:]}/wise-owl"
    git(repo, "update-ref", ref, exp_commit)
    git(repo, "reset", "-q", "--hard", baseline)
    tags = {"git.commit": baseline, "dvc.exp_name": "wise-owl", "dvc.exp_ref": ref}
    recipe = reproduce.plan(a_run(**tags), "r1", repo, STORE)
    assert recipe.rev == exp_commit and "wise-owl" in recipe.source


@pytest.mark.parametrize(
    ("run", "expected"),
    [
        (None, "no run 'r1' in the MLflow store sqlite:///mlflow.db. Check the ID"),
        ({**a_run(), "deleted": True}, "is deleted. Restore it first (`mlflow runs restore"),
        (
            {**a_run(), "tags": {"git.commit": "abc"}},
            "was not logged by transferline's stages",
        ),
        (
            a_run(**{"git.commit": "f" * 40, "mlflow.source.git.repoURL": "git@host:team/x"}),
            f"the run's commit {'f' * 40} is not in this clone",
        ),
        (
            a_run(**{"git.commit": "f" * 40, "dvc.exp_name": "wise-owl"}),
            "`dvc exp pull origin wise-owl`",
        ),
    ],
    ids=["unknown", "deleted", "not-ours", "other-repository", "experiment-not-pulled"],
)
def test_what_cannot_be_reproduced_here_is_one_paragraph_saying_what_to_get(repo, run, expected):
    with pytest.raises(reproduce.ReproduceError) as err:
        reproduce.plan(run, "r1", repo, STORE)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_folder_that_exists_is_refused_and_nothing_is_checked_out(repo, tmp_path):
    commit = git(repo, "rev-parse", "HEAD")
    recipe = reproduce.plan(a_run(**{"git.commit": commit}), "r1", repo, STORE)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    with pytest.raises(reproduce.ReproduceError, match="taken exists and is not an empty"):
        reproduce.recompute(recipe, repo, taken, {})
    assert (taken / "mine.txt").read_text() == "keep"
    assert len(git(repo, "worktree", "list").splitlines()) == 1


def test_recomputed_metrics_are_matched_to_the_runs():
    rows = reproduce.compare(
        {"test.head.accuracy": 0.9, "test.finetune.accuracy": 0.95},
        {"head": {"accuracy": 0.9, "val_accuracy": 0.8}},
    )
    assert rows == [("test.finetune.accuracy", 0.95, None), ("test.head.accuracy", 0.9, 0.9)]

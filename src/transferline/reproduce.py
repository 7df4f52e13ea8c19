"""From an MLflow run back to its inputs, and its metrics computed again.

A run's tags name what produced it (tracking_identity.py): the DVC experiment's ref or the
commit, the params hash and the data's DVC hash. `plan` checks that this clone holds them and
lists the commands; `recompute` runs them in a new git worktree, so the workspace is never
touched, with the data from the DVC cache or remote, and compares the recomputed test metrics
with the run's.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transferline.errors import ReproduceError
from transferline.tracking_identity import HASH_TAG

log = logging.getLogger(__name__)

# Every stage after download, forced: the data come from DVC (cache or remote), not the source.
REPRO = ["dvc", "repro", "--force", "--downstream", "split"]
TOLERANCE = 1e-6  # the metrics files round to 6 decimals


@dataclass(frozen=True)
class Recipe:
    """What reproduces one run: the revision to check out and the commands after it."""

    run_id: str
    rev: str  # the experiment's commit or the run's commit
    source: str  # how the revision was found, for the printout
    metrics: dict[str, float]  # the run's test metrics (`test.head.accuracy`, ...)
    params_hash: str
    data_md5: str
    warnings: list[str] = field(default_factory=list)

    def commands(self, folder: str) -> list[list[str]]:
        return [
            ["git", "worktree", "add", "--detach", folder, self.rev],
            ["cd", folder],
            ["dvc", "pull", "download"],
            REPRO,
        ]


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False
    )


def _exp_rev(repo: Path, tags: dict[str, str]) -> str:
    """The commit of the run's DVC experiment in this clone; the error says how to fetch it."""
    name, ref = tags["dvc.exp_name"], tags.get("dvc.exp_ref", "")
    refs = _git(repo, "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps/")
    found = dict(line.split() for line in refs.stdout.splitlines() if line.strip())
    if ref in found:
        return found[ref]
    by_name = [sha for r, sha in found.items() if r.rsplit("/", 1)[-1] == name]
    if len(by_name) == 1 and not ref:
        return by_name[0]
    raise ReproduceError(
        f"the run's DVC experiment {name!r} ({ref or 'ref not recorded'}) is not in this clone "
        f"({repo}). Fetch it from the git remote it was pushed to: `dvc exp pull origin {name}` "
        f"(whoever ran it pushes it with `dvc exp push origin {name}`), then run this again."
    )


def plan(run: dict | None, run_id: str, repo: Path, store: str) -> Recipe:
    """The recipe of `run` (tracking_queries.run_record's dict; None: no such run in `store`), after
    checking that `repo` holds its revision. Raises ReproduceError naming what is missing.

    Args:
        run: the run as `tracking_queries.run_record` gives it.
        run_id: the ID asked for.
        repo: this clone.
        store: the tracking store, for messages.
    """
    if run is None:
        raise ReproduceError(
            f"no run {run_id!r} in the MLflow store {store}. Check the ID (`transferline "
            "compare` lists runs with their IDs), or point MLFLOW_TRACKING_URI at the store it "
            "was logged to, then run this again."
        )
    tags = run["tags"]
    if run["deleted"]:
        raise ReproduceError(
            f"run {run_id} in {store} is deleted. Restore it first (`mlflow runs restore "
            f"--run-id {run_id}` with MLFLOW_TRACKING_URI set to that store)."
        )
    if HASH_TAG not in tags:
        raise ReproduceError(
            f"run {run_id} (experiment {run['experiment']!r} in {store}) was not logged by "
            "transferline's stages: it has no `transferline.params_hash` tag, so nothing says "
            "which code, params and data made it."
        )
    commit = tags.get("git.commit", "none")
    warnings = []
    if tags.get("dvc.exp_name"):
        rev, source = _exp_rev(repo, tags), f"DVC experiment {tags['dvc.exp_name']!r}"
    elif _git(repo, "cat-file", "-e", f"{commit}^{{commit}}").returncode == 0:
        rev, source = commit, f"commit {commit[:10]}"
        if tags.get("git.dirty") == "true":
            warnings.append(
                "the run's working tree had uncommitted changes (tag git.dirty): the commit "
                "may not hold the code or params that made it"
            )
    else:
        origin = tags.get("mlflow.source.git.repoURL", "an unrecorded repository")
        raise ReproduceError(
            f"the run's commit {commit} is not in this clone ({repo}): it was logged from "
            f"{origin}. Clone that repository, or `git fetch` the branch that holds the "
            "commit, then run this again."
        )
    metrics = {k: v for k, v in run["metrics"].items() if k.startswith("test.")}
    if not metrics:
        warnings.append("the run has no test metrics (its evaluate stage did not log)")
    return Recipe(
        run_id, rev, source, metrics, tags[HASH_TAG], tags.get("data.raw_md5", ""), warnings
    )


def describe(recipe: Recipe, folder: str) -> str:
    """The recipe as a user would type it."""
    lines = [f"Run {recipe.run_id}: {recipe.source} ({recipe.rev[:10]})."]
    lines += [f"warning: {w}" for w in recipe.warnings]
    lines.append("To compute its metrics again, in a new folder (your workspace stays as it is):")
    lines += [f"  {shlex.join(c)}" for c in recipe.commands(folder)]
    lines.append(
        "then compare metrics/evaluate.json with the run's test.* metrics; "
        f"`transferline reproduce {recipe.run_id} --run {folder}` does all of this."
    )
    return "\n".join(lines)


def _dvc(
    folder: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=folder, capture_output=True, text=True,
        check=False, env=env,
    )  # fmt: skip


def _last_error(proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1]


def checkout(recipe: Recipe, repo: Path, folder: Path) -> None:
    """A worktree of the run's revision at `folder`, sharing this clone's DVC cache and local
    DVC config (remote credentials), with the run's data checked out."""
    added = _git(repo, "worktree", "add", "--detach", str(folder), recipe.rev)
    if added.returncode != 0:
        raise ReproduceError(
            f"git could not check out {recipe.rev} into {folder}: {_last_error(added)}"
        )
    local = repo / ".dvc" / "config.local"
    if local.is_file():
        shutil.copy2(local, folder / ".dvc" / "config.local")
    _dvc(folder, "cache", "dir", "--local", str((repo / ".dvc" / "cache").resolve()))
    if _dvc(folder, "checkout", "download").returncode == 0:
        return
    pulled = _dvc(folder, "pull", "download")
    if pulled.returncode != 0:
        raise ReproduceError(
            f"the run's data (data/raw, DVC hash {recipe.data_md5 or 'unrecorded'}) is not in "
            f"this clone's DVC cache, and the DVC remote did not give it ({_last_error(pulled)}). "
            "Check the remote (`dvc remote list`; a teammate's runs need their `dvc push` or "
            "`dvc exp push`), set its credentials in .dvc/config.local, then run this again."
        )


def compare(run_metrics: dict[str, float], evaluate: dict) -> list[tuple[str, float, float | None]]:
    """(metric, the run's value, the recomputed one) for each of the run's test metrics."""
    from transferline.params import flatten  # noqa: PLC0415

    recomputed = {f"test.{k}": v for k, v in flatten(evaluate).items()}
    return [(k, v, recomputed.get(k)) for k, v in sorted(run_metrics.items())]


def recompute(recipe: Recipe, repo: Path, folder: Path, env: dict[str, str]) -> list[tuple]:
    """Check out the run's revision and data into `folder`, run the pipeline there (its MLflow
    run goes to a store in `folder`), and compare. A failure removes the worktree again.

    Args:
        recipe: `plan`'s.
        repo: this clone.
        folder: the new worktree.
        env: the environment for DVC (no DVC_EXP_* variables).

    Returns:
        (metric, the run's value, the recomputed value or None) per test metric.
    """
    from transferline.files import read_json, require_new_dir  # noqa: PLC0415
    from transferline.params_files import load_params  # noqa: PLC0415

    try:  # before the `try` below, which removes the folder on failure
        require_new_dir(folder, "a reproduction goes into a new one")
    except FileExistsError as exc:
        raise ReproduceError(str(exc)) from None
    try:
        checkout(recipe, repo, folder)
        found = load_params(folder / "params.yaml").digest()
        if found != recipe.params_hash:
            raise ReproduceError(
                f"the params at {recipe.rev[:10]} (hash {found}) are not the run's "
                f"({recipe.params_hash}): they were edited and not committed when it ran, so "
                "no commit holds them. Its params are listed in the MLflow run."
            )
        log.info("reproduce: %s in %s", shlex.join(REPRO), folder)
        store = {"MLFLOW_TRACKING_URI": f"sqlite:///{(folder / 'mlflow.db').resolve()}"}
        cmd = [sys.executable, "-m", *REPRO]  # the dvc of this environment
        ran = subprocess.run(cmd, cwd=folder, env={**env, **store}, check=False)
        if ran.returncode != 0:
            raise ReproduceError(
                f"`{shlex.join(REPRO)}` failed in {folder} (exit {ran.returncode}; its output "
                "is above)."
            )
    except BaseException:
        _git(repo, "worktree", "remove", "--force", str(folder))
        raise
    return compare(recipe.metrics, read_json(folder / "metrics" / "evaluate.json"))

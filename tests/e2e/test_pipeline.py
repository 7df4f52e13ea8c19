"""The real `dvc repro` (and the README's quickstart) in a temporary copy of the repository."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import COLORS, add_broken_files, make_class_folders, save_turned, snapshot

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e

TINY = {
    "data.dataset": "digits",
    "split.max_per_class": 10,
    "split.val": 0.2,
    "split.test": 0.2,
    "model.backbone": "vgg16",
    "model.weights": "none",
    "model.image_size": 32,
    "extract.batch_size": 32,
    "finetune.epochs": 1,
    "finetune.unfreeze_layers": 1,
    "finetune.batch_size": 16,
    "finetune.augment.flip": False,
    "mlflow.experiment": "e2e",
}
GIT_ID = ["-c", "user.name=e2e", "-c", "user.email=e2e@example.invalid"]


def env(home: Path | None = None) -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    e.pop("MLFLOW_TRACKING_URI", None)
    e.pop("DVC_EXP_NAME", None)
    if home is not None:  # a machine where git has no identity
        e.update(HOME=str(home), GIT_CONFIG_NOSYSTEM="1", XDG_CONFIG_HOME=str(home / ".config"))
        for k in (
            "GIT_AUTHOR_NAME",
            "GIT_AUTHOR_EMAIL",
            "GIT_COMMITTER_NAME",
            "GIT_COMMITTER_EMAIL",
        ):
            e.pop(k, None)
    return e


def sh(
    cmd: list[str],
    cwd: Path,
    home: Path | None = None,
    check: bool = True,
    extra: dict[str, str] | None = None,
) -> str:
    e = {**env(home), **(extra or {})}
    out = subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=900)
    text = out.stdout + out.stderr
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{text[-6000:]}")
    return text


def set_params(params: Path, overrides: dict) -> None:
    raw = yaml.safe_load(params.read_text())
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    params.write_text(yaml.safe_dump(raw, sort_keys=False))


def copy_repo(dest: Path) -> Path:
    """The repository as a fresh clone would have it: tracked files only, so no output of a
    run in the developer's workspace (metrics/*.json, dvc.lock) comes along."""
    files = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for rel in files:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    sh(["git", "init", "-q"], dest)
    sh(["git", *GIT_ID, "add", "-A"], dest)
    sh(["git", *GIT_ID, "commit", "-qm", "copy"], dest)
    return dest


KEPT = (
    "data/features/train_features.npy",
    "data/splits/test.csv",
    "models/head/head.joblib",
    "models/finetuned.keras",
    "models/classifier/model.keras",
)


@contextlib.contextmanager
def mlflow_server(folder: Path, admin_password: str | None = None):
    """`mlflow server` on a free loopback port with a sqlite store and a local artifact folder;
    with `admin_password`, MLflow's basic-auth app (user `admin`) guards it."""
    folder.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination", str(folder / "artifacts"), "--workers", "1",
    ]  # fmt: skip
    server_env = env()
    if admin_password is not None:
        cmd += ["--app-name", "basic-auth"]
        (folder / "auth.ini").write_text(
            "[mlflow]\ndefault_permission = READ\nadmin_username = admin\n"
            f"database_uri = sqlite:///{folder / 'auth.db'}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        server_env.update(
            MLFLOW_AUTH_CONFIG_PATH=str(folder / "auth.ini"),
            MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
            MLFLOW_FLASK_SERVER_SECRET_KEY="e2e-" + admin_password,
        )
    log = (folder / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=server_env)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    "mlflow server did not start:\n" + (folder / "server.log").read_text()[-3000:]
                )
            time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def count_numbers(tree) -> int:
    if isinstance(tree, dict):
        return sum(count_numbers(v) for v in tree.values())
    return int(isinstance(tree, int | float) and not isinstance(tree, bool))


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([a-z_]+)'", output))


def readme_exp_show() -> list[str]:
    """The README's `dvc exp show --only-changed` that keeps the headline columns."""
    text = (REPO / "README.md").read_text()
    start = text.index("dvc exp show --only-changed")
    return shlex.split(text[start : text.index("\n", start)])


def mlflow_runs(repo: Path, experiment: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


def logged_model_files(client, run) -> set[str]:
    """Files of the MLflow LoggedModel the run names `model` (the newest, as runs:/ID/model)."""
    (model,) = client.search_logged_models(
        [run.info.experiment_id],
        filter_string=f"name = 'model' AND source_run_id = '{run.info.run_id}'",
        max_results=1,
    )
    assert model.model_id in {o.model_id for o in run.outputs.model_outputs}
    return {a.path for a in client.list_logged_model_artifacts(model.model_id)}


def test_dvc_repro_end_to_end(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    set_params(repo / "params.yaml", TINY)
    dvc = [sys.executable, "-m", "dvc"]

    first = sh([*dvc, "repro"], repo)
    assert ran(first) == {
        "download", "split", "extract", "train_head", "trunk", "finetune", "audit", "evaluate"
    }  # fmt: skip
    # Augmentation on (rotation, zoom): fine-tuning trains on the images, and says why.
    assert json.loads((repo / "data/trunk/meta.json").read_text())["cached"] is False
    # Every cached output was already git-ignored: DVC had no .gitignore to extend.
    assert ".gitignore" not in sh(["git", "status", "--porcelain"], repo)

    # Every output is there and has the right shape.
    assert len(list((repo / "data/raw").rglob("*.png"))) == 1797
    classes = json.loads((repo / "data/splits/classes.json").read_text())
    assert classes == [str(i) for i in range(10)]
    split = json.loads((repo / "metrics/split.json").read_text())
    assert split == {
        "train_images": 60,
        "val_images": 20,
        "test_images": 20,
        "rejected": 0,
        "duplicates": 0,
    }
    counts = (repo / "data/splits/counts.csv").read_text().splitlines()
    assert counts[0] == "class,train,val,test" and counts[1] == "0,6,2,2"
    for s, n in {"train": 60, "val": 20, "test": 20}.items():
        assert np.load(repo / f"data/features/{s}_features.npy").shape == (n, 512)
        assert np.load(repo / f"data/features/{s}_labels.npy").shape == (n,)
    meta = json.loads((repo / "data/features/meta.json").read_text())
    assert meta["backbone"] == "vgg16" and meta["image_size"] == 32 and meta["weights"] == "none"
    assert (repo / "models/head/head.joblib").is_file()
    assert zipfile.is_zipfile(repo / "models/finetuned.keras")
    extract = json.loads((repo / "metrics/extract.json").read_text())
    assert extract["images_per_second"] > 0 and extract["seconds"] > 0
    ev = json.loads((repo / "metrics/evaluate.json").read_text())
    assert set(ev) == {"head", "finetune"}
    headline = {"accuracy", "macro_f1", "balanced_accuracy", "log_loss", "roc_auc"}
    for m in ev.values():  # headline scalars only: the per-class figures are plain outputs
        assert set(m) == headline | {"top5_accuracy", "val_accuracy"}
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["balanced_accuracy"] <= 1.0
        assert m["log_loss"] > 0.0
    per_class = json.loads((repo / "plots/evaluate/per_class.json").read_text())
    assert [r["class"] for r in per_class["finetune"]] == classes
    assert {"precision", "recall", "f1", "support", "roc_auc"} <= set(per_class["head"][0])
    assert ev["head"]["accuracy"] >= 0.5  # 20 test digits, random VGG16 features: far above 0.1
    for f in (
        "head_predictions.csv",
        "finetune_predictions.csv",
        "head_confusion.png",
        "finetune_roc.csv",
        "finetune_roc.png",
        "head_misclassified.png",
        "finetune_report.csv",
    ):
        assert (repo / "plots/evaluate" / f).is_file()
    assert 0.5 <= ev["head"]["roc_auc"] <= 1.0
    assert json.loads((repo / "models/classifier/classes.json").read_text())["source"] == (
        "finetune"
    )
    assert zipfile.is_zipfile(repo / "models/classifier/model.keras")
    # `dvc plots show` renders every declared plot (ROC, confusion, curves, images).
    sh([*dvc, "plots", "show", "-o", str(tmp_path / "plots_html")], repo)
    html = (tmp_path / "plots_html/index.html").read_text()
    assert "fine-tuned" in html and "head_misclassified.png" in html
    finetune = json.loads((repo / "metrics/finetune.json").read_text())
    head = json.loads((repo / "metrics/train_head.json").read_text())
    assert finetune["val_accuracy_before"] == pytest.approx(head["val_accuracy"], abs=0.051)
    assert finetune["train_images_per_epoch"] == split["train_images"]
    assert ev["head"]["val_accuracy"] == head["val_accuracy"]
    assert ev["finetune"]["val_accuracy"] == finetune["val_accuracy"]
    # DVC tracks the headline figures: a couple of dozen numbers, so `dvc exp show` is legible.
    dvc_metrics = json.loads(sh([*dvc, "metrics", "show", "--json"], repo))
    # 5 split totals, 7 per model (10 classes: top-5), the audit's 6 counts
    assert count_numbers(dvc_metrics) == 25
    # The audit: its CSVs (contracts), grids and counts, in the run too.
    audit = json.loads((repo / "metrics/audit.json").read_text())
    assert audit["images_audited"] == 100
    header = (repo / "data/audit/label_issues.csv").read_text().splitlines()[0]
    assert header == "path,split,given,suggested,score"
    assert (repo / "plots/audit/label_issues.png").is_file()

    # The MLflow run holds params, every stage's metrics, curves and figures.
    client, runs = mlflow_runs(repo, "e2e")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["model.backbone"] == "vgg16"
    assert run.data.metrics["test.head.accuracy"] == pytest.approx(ev["head"]["accuracy"])
    assert run.data.metrics["test.finetune.accuracy"] == pytest.approx(ev["finetune"]["accuracy"])
    assert (
        "extract.images_per_second" in run.data.metrics and "head.val_accuracy" in run.data.metrics
    )
    # The headline figures as scalars (system metrics included), the detail as tables.
    assert len(run.data.metrics) <= 54 and not any("per_class" in k for k in run.data.metrics)
    assert run.data.metrics["audit.images_audited"] == 100
    tables = {a.path for a in client.list_artifacts(run.info.run_id, "tables")}
    assert tables == {
        "tables/head_per_class.json",
        "tables/finetune_per_class.json",
        "tables/split_counts.json",
    }
    assert run.data.tags["git.commit"] and run.data.tags["data.raw_md5"].endswith(".dir")
    # params.yaml is edited and not committed: under `dvc repro` the commit alone does not
    # hold what ran (under `dvc exp run` the experiment's commit does).
    assert run.data.tags["git.dirty"] == "true"
    # MLflow's own source tags, as the UI's Source and Version columns read them.
    assert run.data.tags["mlflow.source.name"] == "stages/evaluate.py"
    assert run.data.tags["mlflow.source.git.commit"] == run.data.tags["git.commit"]
    # The split manifests are its datasets (logged by split and again by evaluate: once each).
    datasets = [
        (i.dataset.name, [t.value for t in i.tags if t.key == "mlflow.data.context"])
        for i in run.inputs.dataset_inputs
    ]
    assert sorted(datasets) == [
        ("digits/test", ["test"]),
        ("digits/train", ["training"]),
        ("digits/val", ["validation"]),
    ]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots/evaluate")}
    assert "plots/evaluate/head_confusion.png" in artifacts
    audit_logged = {a.path for a in client.list_artifacts(run.info.run_id, "audit")}
    assert "audit/label_issues.csv" in audit_logged  # the audit's CSVs and grids too
    grids = {a.path for a in client.list_artifacts(run.info.run_id, "plots/audit")}
    assert "plots/audit/label_issues.png" in grids
    assert "MLmodel" in logged_model_files(client, run)
    assert run.data.tags["device"] == "CPU" and run.data.tags["model.source"] == "finetune"

    # The README's `dvc exp show --only-changed`: the headline columns and the params that
    # differ (here the workspace's from the commit's); the first row is the workspace.
    shown = sh([*dvc, *readme_exp_show()[1:], "--csv"], repo)
    header, row = list(csv.reader(shown.splitlines()))[:2]
    # (Experiment, rev and typ are DVC's own; --only-changed drops a column alike in all rows)
    shown_row = dict(zip(header, row, strict=True))
    columns = [c for c in header if c not in ("Experiment", "rev", "typ")]
    assert columns[:6] == [
        "finetune.accuracy",
        "finetune.macro_f1",
        "finetune.val_accuracy",
        "head.accuracy",
        "head.macro_f1",
        "head.val_accuracy",
    ]
    assert set(columns[6:]) <= set(TINY) and "data.dataset" in columns
    assert shown_row["rev"] == "workspace"
    assert float(shown_row["finetune.accuracy"]) == pytest.approx(
        ev["finetune"]["accuracy"], abs=1e-5
    )
    assert float(shown_row["head.accuracy"]) == pytest.approx(ev["head"]["accuracy"], abs=1e-5)

    # Nothing left to do: status clean, a second repro runs nothing.
    assert "Data and pipelines are up to date" in sh([*dvc, "status"], repo)
    assert ran(sh([*dvc, "repro"], repo)) == set()
    # A changed file under weights/ (where model.weights files must be) is a changed input of
    # every stage that builds a base.
    (repo / "weights" / "new.weights.h5").write_bytes(b"\0")
    status = sh([*dvc, "status", "--json"], repo)
    assert set(json.loads(status[status.index("{") :])) == {
        "extract", "trunk", "finetune", "evaluate"
    }  # fmt: skip
    (repo / "weights" / "new.weights.h5").unlink()
    # So is a list under data/exclude/ (where data.exclude_file must be) of the split's.
    (repo / "data" / "exclude" / "issues.csv").write_text("path\n")
    status = sh([*dvc, "status", "--json"], repo)
    assert "split" in json.loads(status[status.index("{") :])
    (repo / "data" / "exclude" / "issues.csv").unlink()
    # A change to how the split is made that leaves the manifests as they were re-runs the
    # split alone: extract reads images through images.py and depends on it, not dataset.py.
    layouts = repo / "src/transferline/dataset.py"
    layouts.write_text(layouts.read_text() + "\n# a change that moves no image\n")
    assert ran(sh([*dvc, "repro"], repo)) == {"split"}

    # Reproducible: after a forced re-run `dvc metrics diff` against the committed run shows
    # no change at all, and the models predict the same.
    sh(["git", *GIT_ID, "add", "-A"], repo)
    sh(["git", *GIT_ID, "commit", "-qm", "first run"], repo)
    shown = json.loads(sh([*dvc, "metrics", "show", "--json"], repo))
    assert "metrics/evaluate.json" in json.dumps(shown)
    assert "metrics/extract.json" not in json.dumps(shown)  # timings are not DVC metrics
    predictions = (repo / "plots/evaluate/finetune_predictions.csv").read_text()
    assert ran(sh([*dvc, "repro", "-f"], repo)) == {
        "download", "split", "extract", "train_head", "trunk", "finetune", "audit", "evaluate"
    }  # fmt: skip
    assert json.loads(sh([*dvc, "metrics", "diff", "--json"], repo)) == {}
    assert (repo / "plots/evaluate/finetune_predictions.csv").read_text() == predictions

    # A DVC remote (a local folder here; S3/GCS work the same) round-trips data and models.
    sh([*dvc, "remote", "add", "-d", "shared", str(tmp_path / "dvc-remote")], repo)
    sh([*dvc, "push"], repo)
    before = {p: (repo / p).read_bytes() for p in KEPT}
    for folder in ("data", "models"):
        shutil.rmtree(repo / folder)
    sh(["git", "checkout", "--", "data", "models"], repo)  # a fresh clone: git's files only
    sh([*dvc, "pull"], repo)
    assert {p: (repo / p).read_bytes() for p in KEPT} == before
    assert "Data and pipelines are up to date" in sh([*dvc, "status"], repo)
    # The model registry: a version tag, and `dvc artifacts get` fetches that version's
    # classifier from the remote into any folder, without the pipeline.
    sh(["git", *GIT_ID, "commit", "-qam", "a DVC remote"], repo)
    sh(["git", *GIT_ID, "tag", "-a", "classifier@v1.0.0", "-m", "classifier v1.0.0"], repo)
    got = tmp_path / "registry" / "classifier"
    sh([*dvc, "artifacts", "get", str(repo), "classifier", "-o", str(got)], tmp_path)
    assert (got / "model.keras").read_bytes() == before["models/classifier/model.keras"]
    assert json.loads((got / "classes.json").read_text())["classes"] == classes

    # A real MLflow tracking server: the same pipeline logs to it over HTTP.
    with mlflow_server(tmp_path / "server") as uri:
        again = sh(
            [*dvc, "repro", "-f", "--single-item", "evaluate"],
            repo,
            extra={"MLFLOW_TRACKING_URI": uri},
        )
        assert ran(again) == {"evaluate"}  # evaluate alone logs the whole parameter set
        import mlflow

        remote = mlflow.MlflowClient(tracking_uri=uri)
        (found,) = remote.search_runs([remote.get_experiment_by_name("e2e").experiment_id])
        assert found.data.metrics["test.head.accuracy"] == pytest.approx(ev["head"]["accuracy"])
        assert found.data.params["model.backbone"] == "vgg16"
        assert "MLmodel" in logged_model_files(remote, found)
        assert (tmp_path / "server/artifacts").is_dir()  # artifacts went through the server

    # Augmentation off: the trunk is cached, and a new learning rate reuses the cache.
    set_params(
        repo / "params.yaml", {"finetune.augment.rotation": 0.0, "finetune.augment.zoom": 0.0}
    )
    assert ran(sh([*dvc, "repro"], repo)) == {"trunk", "finetune", "evaluate"}
    tuned = json.loads((repo / "metrics/finetune.json").read_text())
    assert tuned["trunk_cached"] is True and tuned["train_images_per_second"] > 0
    assert json.loads((repo / "data/trunk/meta.json").read_text())["boundary"] == ["block5_conv2"]
    set_params(repo / "params.yaml", {"finetune.learning_rate": 1e-4})
    status = sh([*dvc, "status", "--json"], repo)
    assert set(json.loads(status[status.index("{") :])) == {"finetune", "evaluate"}

    # Fine-tuning off: only what reads finetune.* re-runs; evaluate reports the head only.
    set_params(repo / "params.yaml", {"finetune.enabled": False})
    assert ran(sh([*dvc, "repro"], repo)) == {"train_head", "trunk", "finetune", "evaluate"}
    assert set(json.loads((repo / "metrics/evaluate.json").read_text())) == {"head"}

    # A head-only change with fine-tuning off re-runs train_head and evaluate, nothing else.
    set_params(repo / "params.yaml", {"head.logreg.C": 0.5})
    assert ran(sh([*dvc, "repro"], repo)) == {"train_head", "evaluate"}
    assert "Data and pipelines are up to date" in sh([*dvc, "status"], repo)
    # One run per set of inputs: the first; the code change (dataset.py) and the forced
    # re-run after it; augmentation off; fine-tuning off; C 0.5. The first run's figures are
    # as it logged them.
    _, runs = mlflow_runs(repo, "e2e")
    assert len(runs) == 5
    by_id = {r.info.run_id: r for r in runs}
    assert by_id[run.info.run_id].data.metrics == run.data.metrics
    (after_code,) = [
        r for r in runs if r.data.tags.get("transferline.differs_from", "").endswith("(code)")
    ]
    assert after_code.data.tags["transferline.differs_from"] == f"{run.info.run_id} (code)"
    assert after_code.data.tags["git.dirty"] == "false"  # committed before the forced re-run
    assert after_code.data.metrics["test.head.accuracy"] == run.data.metrics["test.head.accuracy"]


def test_readme_quickstart_without_git_identity(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    home = tmp_path / "home"
    home.mkdir()
    quick = [
        sys.executable,
        "-m",
        "transferline.cli",
        "quickstart",
        "--name",
        "tiny",
        "-S",
        "split.max_per_class=10",
        "-S",
        "split.val=0.2",
        "-S",
        "split.test=0.2",
        "-S",
        "finetune.epochs=1",
        "-S",
        "finetune.enabled=false",
    ]
    out = sh(quick, repo, home=home)
    assert "Ran experiment(s): tiny" in out
    # It ends with the `dvc exp show` that compares experiments: the quickstart's own
    # overrides left out with the rest, those the user set (-S) kept.
    shown = shlex.split(out[out.index("Compare the experiments") :].splitlines()[1])
    assert shown[:4] == ["dvc", "exp", "show", "--only-changed"]
    assert r"mlflow\.experiment$" in shown[5] and "finetune\\.epochs$" not in shown[5]
    names = sh([sys.executable, "-m", "dvc", "exp", "list", "--name-only"], repo, home=home)
    assert "tiny" in names.split()
    ev = json.loads((repo / "metrics/evaluate.json").read_text())
    assert set(ev) == {"head"}
    _, runs = mlflow_runs(repo, "quickstart")
    assert len(runs) == 1 and runs[0].data.tags["dvc.exp_name"] == "tiny"

    # Experiments DVC runs in temporary copies (--temp, --queue) log to this repository's store.
    ident = {
        f"GIT_{who}_{what}": value
        for who in ("AUTHOR", "COMMITTER")
        for what, value in (("NAME", "e2e"), ("EMAIL", "e2e@example.invalid"))
    }
    dvc = [sys.executable, "-m", "dvc"]
    temp = sh(
        [*dvc, "exp", "run", "--temp", "-n", "temp1", "-S", "head.logreg.C=0.5"],
        repo,
        home,
        extra=ident,
    )
    # The copy has no dvc.lock (uncommitted here), so DVC's run-cache restores every stage
    # whose inputs did not change: extraction above all, the expensive one.
    assert ran(temp) == {"train_head", "evaluate"}
    assert "Stage 'extract' is cached - skipping run" in temp
    sh(
        [*dvc, "exp", "run", "--queue", "-n", "queued1", "-S", "head.logreg.C=2"],
        repo,
        home,
        extra=ident,
    )
    sh([*dvc, "queue", "start"], repo, home, extra=ident)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = sh([*dvc, "queue", "status"], repo, home, extra=ident)
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert "Success" in status, status
    queued = sh([*dvc, "queue", "logs", "queued1"], repo, home, extra=ident)
    assert ran(queued) == {"train_head", "evaluate"}  # the queue's copy restores the rest
    assert "Stage 'extract' is cached - skipping run" in queued
    sh([*dvc, "queue", "stop", "--kill"], repo, home, extra=ident, check=False)
    shown = json.loads(sh([*dvc, "exp", "show", "--json"], repo, home, extra=ident))
    assert {"temp1", "queued1"} <= set(re.findall(r'"name": "([^"]+)"', json.dumps(shown)))
    _, runs = mlflow_runs(repo, "quickstart")
    by_name = {r.data.tags["dvc.exp_name"]: r for r in runs}
    assert set(by_name) == {"tiny", "temp1", "queued1"}
    assert by_name["temp1"].data.params["head.logreg.C"] == "0.5"
    assert by_name["queued1"].data.params["head.logreg.C"] == "2.0"
    assert all("test.head.accuracy" in r.data.metrics for r in runs)
    assert not list((repo / ".dvc").rglob("mlflow.db"))


def test_broken_files_are_rejected_and_nothing_is_lost(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    clean = make_class_folders(tmp_path / "clean" / "pets", per_class=12)
    upright = np.full((16, 24, 3), COLORS["cat"], np.uint8)
    upright[:, :4] = 255  # a phone photo: stored sideways, with the EXIF tag to turn it
    save_turned(clean / "cat" / "phone.jpg", upright, 6, fmt="JPEG")
    messy = tmp_path / "messy" / "pets"
    shutil.copytree(clean, messy)
    expected = add_broken_files(messy / "cat")
    before = snapshot(messy.parent)
    tiny = {
        **TINY,
        "split.max_per_class": None,
        "split.val": 0.25,
        "split.test": 0.25,
        "finetune.enabled": False,
        "mlflow.experiment": "broken",
    }
    set_params(repo / "params.yaml", {**tiny, "data.dataset": str(messy.parent)})
    dvc = [sys.executable, "-m", "dvc"]
    sh([*dvc, "repro"], repo)
    with (repo / "data/splits/rejected.csv").open() as f:
        rejected = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(f)}
    assert set(rejected) == set(expected)
    assert snapshot(messy.parent) == before  # the user's folder is untouched
    split = json.loads((repo / "metrics/split.json").read_text())
    assert split["rejected"] == len(expected) and split["duplicates"] == 0
    with (repo / "data/splits/orientation.csv").open() as f:
        assert list(csv.DictReader(f)) == [{"path": "pets/cat/phone.jpg", "orientation": "6"}]
    assert json.loads((repo / "data/splits/summary.json").read_text())["exif_turned"] == 1
    manifests = {s: (repo / f"data/splits/{s}.csv").read_text() for s in ("train", "val", "test")}
    messy_eval = json.loads((repo / "metrics/evaluate.json").read_text())

    # The same images without the broken files give the same split and the same accuracy.
    set_params(repo / "params.yaml", {"data.dataset": str(clean.parent)})
    sh([*dvc, "repro"], repo)
    assert {s: (repo / f"data/splits/{s}.csv").read_text() for s in manifests} == manifests
    assert json.loads((repo / "metrics/evaluate.json").read_text()) == messy_eval

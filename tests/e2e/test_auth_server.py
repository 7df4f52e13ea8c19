"""The stages against an MLflow tracking server that asks for credentials (docs/teams.md)."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest
from mlflow.server import get_app_client
from test_pipeline import TINY, copy_repo, env, mlflow_server, set_params, sh

pytestmark = pytest.mark.e2e
PASSWORD = "e2e-Admin-Passw0rd"


def stage(repo, name: str, extra: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"stages/{name}.py"],
        cwd=repo,
        env={**env(), **extra},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_stages_log_to_a_server_with_authentication(tmp_path, monkeypatch):
    repo = copy_repo(tmp_path / "repo")
    set_params(repo / "params.yaml", TINY)
    sh([sys.executable, "stages/download.py"], repo)  # download logs nothing
    with mlflow_server(tmp_path / "server", admin_password=PASSWORD) as uri:
        login = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": "admin"}

        # Wrong credentials: one paragraph, before the stage's work (no splits written).
        wrong = stage(repo, "split", {**login, "MLFLOW_TRACKING_PASSWORD": "not-it"})
        assert wrong.returncode == 2
        assert "Traceback" not in wrong.stderr
        (message,) = [line for line in wrong.stderr.splitlines() if "ERROR" in line]
        assert "refused the credentials" in message and "MLFLOW_TRACKING_PASSWORD" in message
        assert PASSWORD not in wrong.stderr + wrong.stdout
        assert not (repo / "data" / "splits").exists()

        # The right ones: the run lands on the server.
        right = stage(repo, "split", {**login, "MLFLOW_TRACKING_PASSWORD": PASSWORD})
        assert right.returncode == 0, right.stderr[-3000:]
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
        client = mlflow.MlflowClient(tracking_uri=uri)
        (run,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
        assert run.data.metrics["split.train_images"] == 60  # 10 per class, 10 classes, 60%
        assert run.data.params["data.dataset"] == "digits"

        # A teammate whose account may read the experiment but not write to it.
        admin = get_app_client("basic-auth", tracking_uri=uri)
        admin.create_user("alice", "Alice-Passw0rd1")
        alice = {**login, "MLFLOW_TRACKING_USERNAME": "alice"}
        alice["MLFLOW_TRACKING_PASSWORD"] = "Alice-Passw0rd1"
        denied = stage(repo, "split", alice)
        assert denied.returncode == 2
        assert "Traceback" not in denied.stderr
        (message,) = [line for line in denied.stderr.splitlines() if "ERROR" in line]
        assert "accepted the account 'alice'" in message and "EDIT" in message
        assert "mlflow.experiment" in message

        # The admin grants her EDIT on the experiment, as docs/teams.md says: her run lands.
        experiment = client.get_experiment_by_name("e2e").experiment_id
        admin.grant_user_permission("alice", "experiment", experiment, "EDIT")
        granted = stage(repo, "split", alice)
        assert granted.returncode == 0, granted.stderr[-3000:]
        (again,) = client.search_runs([experiment])  # the same inputs: the same run
        assert again.info.run_id == run.info.run_id
        history = client.get_metric_history(run.info.run_id, "split.train_images")
        assert len(history) == 2  # logged by admin, then by alice

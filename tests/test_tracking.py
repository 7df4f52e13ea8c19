from pathlib import Path

import pytest

from transferline import tracking

mlflow = pytest.importorskip("mlflow")


def test_repo_root_seen_from_a_dvc_temp_experiment(tmp_path):
    inner = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    inner.mkdir(parents=True)
    assert tracking.repo_root(inner) == (tmp_path / "repo").resolve()
    assert tracking.repo_root(tmp_path) == tmp_path.resolve()


def test_default_uri_is_sqlite_at_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_one_run_per_parameter_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "my-exp")
    a = tracking.open_run("exp", "hash-a", {"model.backbone": "vgg16"}, "first")
    a.log_metrics({"accuracy": 0.5, "flag": True}, prefix="head.")
    a.log_history([{"epoch": 0, "loss": 1.0}, {"epoch": 1, "loss": 0.5}], prefix="h.")
    tracking.close_run(a)
    again = tracking.open_run("exp", "hash-a", {"model.backbone": "vgg16"}, "first")
    tracking.close_run(again)
    other = tracking.open_run("exp", "hash-b", {"model.backbone": "vgg19"}, "second")
    tracking.close_run(other)
    assert again.run_id == a.run_id != other.run_id
    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri(tmp_path))
    run = client.get_run(a.run_id)
    assert run.data.params == {"model.backbone": "vgg16"}
    assert run.data.metrics["head.accuracy"] == 0.5 and "head.flag" not in run.data.metrics
    assert [m.value for m in client.get_metric_history(a.run_id, "h.loss")] == [1.0, 0.5]
    assert run.data.tags["dvc.exp_name"] == "my-exp"
    assert run.data.tags[tracking.HASH_TAG] == "hash-a"
    assert "version.tensorflow" in run.data.tags and "git.commit" in run.data.tags
    assert run.info.status == "FINISHED"
    exp = client.get_experiment_by_name("exp")
    assert exp.artifact_location == (Path(tmp_path).resolve() / "mlartifacts").as_uri()

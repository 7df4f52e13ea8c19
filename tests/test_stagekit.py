import os
import time
from pathlib import Path

import mlflow
import pytest

from transferline import stagekit, tracking
from transferline.params_files import load_params

from conftest import REPO, refused_uri


@pytest.fixture
def params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return load_params(REPO / "params.yaml")


def runs(experiment: str):
    client = mlflow.MlflowClient(tracking.tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id])


def test_a_failing_stage_leaves_its_run_failed_and_its_own_error(params):
    with pytest.raises(ValueError, match="the stage's bug"), stagekit.mlflow_run(params):
        raise ValueError("the stage's bug")
    (run,) = runs(params.mlflow.experiment)
    assert run.info.status == "FAILED"


def test_a_request_the_store_rejects_is_one_paragraph(params):
    from mlflow.exceptions import MlflowException

    with pytest.raises(tracking.TrackingError, match="rejected a request"):  # noqa: SIM117
        with stagekit.mlflow_run(params):
            raise MlflowException("INVALID_PARAMETER_VALUE: bad key")
    (run,) = runs(params.mlflow.experiment)
    assert run.info.status == "FAILED"
    with stagekit.mlflow_run(params) as again:  # the same parameter set: the same run, closed
        assert again.run_id == run.info.run_id
    assert runs(params.mlflow.experiment)[0].info.status == "FINISHED"


def test_abandoning_a_run_on_a_store_that_is_gone_returns_at_once():
    run = tracking.Run(mlflow.MlflowClient(refused_uri()), "0" * 32)
    start = time.perf_counter()
    tracking.abandon_run(run)  # raises nothing: the stage's own error is the one to report
    assert time.perf_counter() - start < 30


def test_a_replaced_weights_file_makes_a_new_run_and_the_first_keeps_its_metrics(params, tmp_path):
    # The params hold only the file's path: its md5 (as DVC records it in the file's .dvc
    # file) is one of the run's inputs, so a replaced file cannot log into the earlier run.
    weights = tmp_path / "weights" / "base.weights.h5"
    weights.parent.mkdir()
    weights.write_bytes(b"abc")
    params = params.model_copy(
        update={"model": params.model.model_copy(update={"weights": "weights/base.weights.h5"})}
    )
    with stagekit.mlflow_run(params) as first:
        first.log_metrics({"accuracy": 0.5}, prefix="test.head.")
    weights.write_bytes(b"replaced")  # same path, same params
    with stagekit.mlflow_run(params) as second:
        second.log_metrics({"accuracy": 0.9}, prefix="test.head.")
    assert second.run_id != first.run_id
    by_id = {r.info.run_id: r for r in runs(params.mlflow.experiment)}
    assert by_id[first.run_id].data.tags["model.weights_md5"] == "900150983cd24fb0d6963f7d28e17f72"
    assert by_id[first.run_id].data.metrics["test.head.accuracy"] == 0.5
    assert by_id[second.run_id].data.tags["model.weights_md5"] == "91bb248359043fe98416e259c9bdf10d"
    assert by_id[second.run_id].data.tags[tracking.DIFFERS_TAG] == f"{first.run_id} (weights)"


def test_imagenet_and_random_weights_are_named_for_what_they_are(params):
    with stagekit.mlflow_run(params):
        pass
    assert runs(params.mlflow.experiment)[0].data.tags["model.weights_md5"] == "imagenet"


def test_a_stage_samples_the_machine_into_its_run_and_a_failed_one_is_marked(params, monkeypatch):
    """MLflow's system metrics (the UI's System metrics tab), sampled while the stage works,
    steps going on from one stage to the next; a stage that fails leaves the run FAILED."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    argv = ["--params", str(REPO / "params.yaml")]

    def work(p):
        time.sleep(1.5)

    assert stagekit.main("extract", work, argv) == 0
    (run,) = runs(params.mlflow.experiment)
    client = mlflow.MlflowClient(tracking.tracking_uri())
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 2 and all(0 <= m.value <= 100 * 64 for m in cpu)
    assert "system/system_memory_usage_megabytes" in run.data.metrics
    assert stagekit.main("finetune", work, argv) == 0
    steps = [m.step for m in client.get_metric_history(run.info.run_id, cpu[0].key)]
    assert steps == list(range(len(steps))) and len(steps) > len(cpu)  # the second goes on

    def broken(p):
        time.sleep(0.5)
        raise tracking.TrackingError("the stage's known error")

    assert stagekit.main("evaluate", broken, argv) == 2
    assert runs(params.mlflow.experiment)[0].info.status == "FAILED"


def test_an_input_another_stage_writes_missing_is_one_paragraph(params, capfd):
    """A stage script run by hand before the stage that writes its input (`dvc repro` would
    run that one first): the file, the stage that writes it, and the command."""
    argv = ["--params", str(REPO / "params.yaml")]

    def reads_features(p):
        (Path.cwd() / stagekit.FEATURES / "meta.json").read_text()

    assert stagekit.main("train_head", reads_features, argv) == 2
    assert (
        capfd.readouterr()
        .err.strip()
        .endswith(
            "ERROR in stage 'train_head': data/features/meta.json is missing: the extract stage "
            "writes it. Run `dvc repro train_head`, which runs extract and whatever else it needs "
            "first (or `dvc pull` for the outputs a teammate pushed)."
        )
    )

    def a_bug(p):
        Path("/nonexistent/elsewhere.txt").read_text()

    with pytest.raises(FileNotFoundError):  # any other missing file is a bug: its traceback
        stagekit.main("train_head", a_bug, argv)


def test_features_of_another_model_are_refused_before_a_head_is_trained_on_them(params):
    """A stage run by hand after a model.* change, without extract: not a head of one model
    logged under another's params (or a shape error deep in finetune)."""
    import json

    from transferline.errors import StageError

    meta = {"backbone": "vgg16", "weights": "none", "image_size": 32, "pooling": "avg"}
    stagekit.FEATURES.mkdir(parents=True)
    (stagekit.FEATURES / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StageError) as info:
        stagekit.check_features(params)  # the committed params: vgg16, imagenet, 224 px
    assert str(info.value) == (
        "data/features holds another model's features (weights 'none' there, 'imagenet' in "
        "params; image_size 32 there, 224 in params): they are older than these params. Run "
        "`dvc repro`, which extracts them again."
    )
    meta.update(weights="imagenet", image_size=224)
    (stagekit.FEATURES / "meta.json").write_text(json.dumps(meta))
    stagekit.check_features(params)  # the same model: nothing to say


@pytest.mark.parametrize(("given", "seen"), [(None, "true"), ("false", "false")])
def test_a_stage_lets_tensorflow_take_gpu_memory_as_needed_unless_told_otherwise(
    given, seen, monkeypatch
):
    """Two processes on one GPU (`dvc queue start -j 2`) need TensorFlow to take memory as it
    goes; a user's own TF_FORCE_GPU_ALLOW_GROWTH wins."""
    if given is None:
        monkeypatch.delenv(stagekit.GPU_GROWTH, raising=False)
    else:
        monkeypatch.setenv(stagekit.GPU_GROWTH, given)
    found = []
    argv = ["--params", str(REPO / "params.yaml")]
    assert (
        stagekit.main(
            "download",
            lambda p: found.append(os.environ.get(stagekit.GPU_GROWTH)),
            argv,
            tracked=False,
        )
        == 0
    )
    assert found == [seen]


def test_the_dense_head_logs_each_epoch_as_it_ends_and_a_killed_run_keeps_them(params):
    """Live curves: each epoch's figures are in the MLflow store when the epoch ends, and a
    stage stopped mid-training (Ctrl-C, SIGTERM) leaves the epochs so far in a FAILED run."""
    import numpy as np

    from transferline import heads
    from transferline.params import DenseParams

    x = np.random.default_rng(0).normal(size=(40, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    client = mlflow.MlflowClient(tracking.tracking_uri())
    in_store = []
    with pytest.raises(KeyboardInterrupt), stagekit.mlflow_run(params) as run:
        logger = run.epoch_logger("head.history.")

        def on_epoch(epoch, logs):
            logger(epoch, logs)
            history = client.get_metric_history(run.run_id, "head.history.val_loss")
            in_store.append([m.step for m in history])
            if epoch == 2:
                raise KeyboardInterrupt  # as Ctrl-C, or SIGTERM through the stage harness

        dense = DenseParams(units=4, dropout=0.0, learning_rate=0.01, epochs=10, batch_size=8)
        heads.train_dense((x, y), (x, y), 2, dense, on_epoch=on_epoch)
    assert in_store == [[0], [0, 1], [0, 1, 2]]
    (done,) = runs(params.mlflow.experiment)
    assert done.info.status == "FAILED"
    assert {"head.history.loss", "head.history.accuracy", "head.history.val_accuracy"} <= set(
        done.data.metrics
    )


def test_sigterm_ends_a_stage_as_ctrl_c_does(params):
    import signal

    argv = ["--params", str(REPO / "params.yaml")]

    def work(p):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # not reached: the handler ends the stage

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        stagekit.main("finetune", work, argv)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous  # the process's own handler is back
    (run,) = runs(params.mlflow.experiment)
    assert run.info.status == "FAILED"

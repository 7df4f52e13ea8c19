import functools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from transferline import tracking, tracking_identity, tracking_models, tracking_queries

mlflow = pytest.importorskip("mlflow")


def test_default_uri_is_sqlite_at_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def git_in(repo: Path, *args: str) -> str:
    """Run git in `repo` with a stand-in identity; its output."""
    ident = ["-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    return subprocess.run(
        ["git", *ident, *args], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_context_tags_name_commit_dirty_flag_experiment_and_versions(tmp_path, monkeypatch):
    from importlib import metadata

    git = functools.partial(git_in, tmp_path)

    monkeypatch.chdir(tmp_path)
    git("init", "-q")
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "split.py").write_text("print('split')\n")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "split.json").write_text("{}\n")
    git("add", ".")
    git("commit", "-qm", "first")
    baseline = git("rev-parse", "HEAD")
    monkeypatch.setenv("DVC_EXP_NAME", "wise-owl")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", baseline)
    # What `dvc exp run -S` and the stages change is not a dirty tree: DVC records it.
    (tmp_path / "params.yaml").write_text("seed: 2\n")
    (tmp_path / "metrics" / "split.json").write_text('{"rejected": 0}\n')
    tags = tracking_identity.context_tags()
    assert tags["git.commit"] == baseline and tags["git.dirty"] == "false"
    assert tags["dvc.exp_name"] == "wise-owl" and tags["dvc.exp_baseline"] == baseline
    assert tags["dvc.exp_ref"] == f"refs/exps/{baseline[:2]}/{baseline[2:]}/wise-owl"
    assert tags["version.python"] == ".".join(map(str, sys.version_info[:3]))
    for pkg in ("tensorflow", "keras", "dvc", "mlflow"):
        assert tags[f"version.{pkg}"] == metadata.version(pkg)
    # A code change is, under `dvc exp run` too.
    (tmp_path / "stages" / "split.py").write_text("print('changed')\n")
    assert tracking_identity.context_tags()["git.dirty"] == "true"
    git("checkout", "stages/split.py")
    # Outside an experiment, an edited params.yaml is not in the commit: dirty.
    monkeypatch.delenv("DVC_EXP_NAME")
    tags = tracking_identity.context_tags()
    assert tags["git.dirty"] == "true" and "dvc.exp_name" not in tags


def test_runs_carry_mlflows_own_source_tags(tmp_path, monkeypatch):
    git = functools.partial(git_in, tmp_path)

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    git("init", "-q", "-b", "main")
    git("remote", "add", "origin", "https://someone:s3cret@git.example.com/team/pets.git")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "evaluate.py").write_text(
        "from transferline import tracking\n"
        "run = tracking.open_run('exp', tracking.RunInputs.here('hash-s'), {'seed': 1}, 's')\n"
        "tracking.close_run(run)\n"
        "print(run.run_id)\n"
    )
    (tmp_path / ".gitignore").write_text("mlflow.db\nmlartifacts/\n")
    git("add", ".")
    git("commit", "-qm", "first")
    # In a process of its own, as DVC runs a stage: MLflow caches the git context per process.
    out = subprocess.run(
        [sys.executable, "stages/evaluate.py"], cwd=tmp_path, capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    run_id = out.stdout.split()[-1]
    tags = mlflow.MlflowClient(tracking.tracking_uri(tmp_path)).get_run(run_id).data.tags
    assert tags["mlflow.source.name"] == "stages/evaluate.py"
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"]
    assert tags["mlflow.source.git.commit"] == git("rev-parse", "HEAD") == tags["git.commit"]
    assert tags["mlflow.source.git.branch"] == "main"
    assert tags["mlflow.source.git.repoURL"] == "https://git.example.com/team/pets.git"


def test_one_run_per_parameter_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "my-exp")
    a = tracking.open_run(
        "exp", tracking.RunInputs.here("hash-a"), {"model.backbone": "vgg16"}, "first"
    )
    a.log_metrics({"accuracy": 0.5, "flag": True}, prefix="head.")
    a.log_history([{"epoch": 0, "loss": 1.0}, {"epoch": 1, "loss": 0.5}], prefix="h.")
    tracking.close_run(a)
    again = tracking.open_run(
        "exp", tracking.RunInputs.here("hash-a"), {"model.backbone": "vgg16"}, "first"
    )
    tracking.close_run(again)
    other = tracking.open_run(
        "exp", tracking.RunInputs.here("hash-b"), {"model.backbone": "vgg19"}, "second"
    )
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


def test_class_names_mlflow_refuses_are_logged_with_underscores(tmp_path, monkeypatch):
    # PlantVillage's class folders: MLflow refuses '(' and ',' in metric and param names.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = {"data.label_map.Corn_(maize)___healthy": "corn", "model.backbone": "vgg16"}
    run = tracking.open_run("exp", tracking.RunInputs.here("hash-p"), params, "plants")
    run.log_metrics(
        {
            "per_class.Corn_(maize)___healthy.f1": 0.9,
            "per_class.Pepper,_bell___healthy.f1": 0.8,
            "per_class.Pepper__bell___healthy.f1": 0.7,  # what the comma's '_' would give
            "per_class.a/b:c.f1": 0.6,
        },
        prefix="test.",
    )
    tracking.close_run(run)
    data = (
        mlflow.MlflowClient(tracking_uri=tracking.tracking_uri(tmp_path)).get_run(run.run_id).data
    )
    assert data.params == {
        "data.label_map.Corn__maize____healthy": "corn",
        "model.backbone": "vgg16",
    }
    metrics = {k.removeprefix("test.per_class."): v for k, v in data.metrics.items()}
    assert metrics.pop("Corn__maize____healthy.f1") == 0.9
    assert metrics.pop("Pepper__bell___healthy.f1") == 0.7  # a valid name is kept as it is
    assert metrics.pop("a_b_c.f1") == 0.6
    # the renamed one that would overwrite it gets a hash of its own name
    ((comma, value),) = metrics.items()
    assert comma.startswith("Pepper__bell___healthy.f1_") and value == 0.8


def test_split_manifests_are_the_runs_mlflow_datasets(tmp_path, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "train.csv").write_text("path,label\na/1.png,a\nb/2.png,b\nb/3.png,b\n")
    (tmp_path / "test.csv").write_text("path,label\na/4.png,a\n")
    manifests = {"train": tmp_path / "train.csv", "test": tmp_path / "test.csv"}
    run = tracking.open_run("exp", tracking.RunInputs.here("hash-d"), {"seed": 1}, "d")
    run.log_datasets("pets", manifests, "0123abcd.dir")
    run.log_datasets("pets", manifests, "0123abcd.dir")  # evaluate logs them again: no change
    client = mlflow.MlflowClient(tracking.tracking_uri(tmp_path))
    inputs = client.get_run(run.run_id).inputs.dataset_inputs
    got = {
        (i.dataset.name, {t.key: t.value for t in i.tags}["mlflow.data.context"]): i.dataset
        for i in inputs
    }
    assert set(got) == {("pets/train", "training"), ("pets/test", "test")}
    train = got["pets/train", "training"]
    assert json.loads(train.profile) == {"num_rows": 3, "num_classes": 2}
    assert json.loads(train.source) == {"uri": (tmp_path / "train.csv").as_posix()}
    assert [c["name"] for c in json.loads(train.schema)["mlflow_colspec"]] == ["path", "label"]
    # The same manifest over changed raw data (another DVC hash) is another dataset version.
    run.log_datasets("pets", {"train": manifests["train"]}, "4567cdef.dir")
    tracking.close_run(run)
    digests = {
        i.dataset.digest
        for i in client.get_run(run.run_id).inputs.dataset_inputs
        if i.dataset.name == "pets/train"
    }
    assert len(digests) == 2 and train.digest in digests


def test_logged_classifier_round_trips_through_pyfunc(tmp_path, monkeypatch):
    import keras
    import numpy as np

    from transferline import backbones, export, finetune, heads
    from transferline.models import build_feature_extractor

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ext = build_feature_extractor(backbones.get("mobilenet_v2"), "none", 32, "avg", seed=0)
    model = finetune.assemble(ext, heads.build_dense_head(1280, 3, 0, 0.0))
    clf = export.export_classifier(model, 32)
    run = tracking.open_run(
        "exp", tracking.RunInputs.here("hash-m"), {"model.backbone": "mobilenet_v2"}, "m"
    )
    run.log_metrics({"accuracy": 0.75}, prefix="test.head.")
    run.log_metrics({"loss": 0.5}, prefix="head.")
    uri = tracking_models.log_classifier(run, clf, ["a", "b", "c"], 32, register_as="pets")
    tracking.close_run(run)

    # A LoggedModel of the run, as mlflow.keras.log_model makes one: the UI's Models column.
    from mlflow.entities import LoggedModelStatus

    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri(tmp_path))
    outputs = client.get_run(run.run_id).outputs.model_outputs
    assert [f"models:/{o.model_id}" for o in outputs] == [uri]
    logged = client.get_logged_model(outputs[0].model_id)
    assert logged.name == "model" and logged.status == LoggedModelStatus.READY
    assert logged.source_run_id == run.run_id
    assert logged.params == {"model.backbone": "mobilenet_v2"}
    assert logged.tags["mlflow.source.name"] == sys.argv[0]  # the UI's "Logged from"
    assert {m.key: m.value for m in logged.metrics} == {"test.head.accuracy": 0.75}
    history = client.get_metric_history(run.run_id, "test.head.accuracy")
    assert [m.value for m in history] == [0.75]
    by_run = tracking_models.load_pyfunc(f"runs:/{run.run_id}/model")
    assert by_run.metadata.model_id == logged.model_id
    assert by_run.metadata.saved_input_example_info["type"] == "ndarray"

    # Evaluated again in the same run (same params): a second model, and the run's name for
    # it means the newest, with the newest metrics.
    # Before it, an evaluate killed mid-upload left a PENDING model: it is deleted first. One
    # that a live process (another evaluate of the same params) is still uploading is kept.
    run = tracking.open_run(
        "exp", tracking.RunInputs.here("hash-m"), {"model.backbone": "mobilenet_v2"}, "m"
    )
    exp_id = logged.experiment_id
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    here = socket.gethostname()
    killed, uploading = (
        client.create_logged_model(
            exp_id,
            name="model",
            source_run_id=run.run_id,
            tags={tracking_models.WRITER_TAG: writer},
        )
        for writer in (f"{here}:{gone.pid}", f"{here}:{os.getpid()}")
    )
    run.log_metrics({"accuracy": 0.5}, prefix="test.head.")
    newer = tracking_models.log_classifier(run, clf, ["a", "b", "c"], 32)
    tracking.close_run(run)
    assert newer != uri
    assert (
        f"models:/{tracking_models.load_pyfunc(f'runs:/{run.run_id}/model').metadata.model_id}"
        == newer
    )
    newest = client.get_logged_model(newer.removeprefix("models:/"))
    assert {m.key: m.value for m in newest.metrics} == {"test.head.accuracy": 0.5}

    def listed():
        return {m.model_id: m.status for m in client.search_logged_models([exp_id])}

    assert killed.model_id not in listed()
    assert listed()[uploading.model_id] == LoggedModelStatus.PENDING
    client.delete_logged_model(uploading.model_id)
    assert set(listed().values()) == {LoggedModelStatus.READY}

    # An upload that fails leaves no model behind: runs:/ still means the last whole one.
    def broken_save(*args, **kwargs):
        raise OSError("No space left on device")

    before = listed()
    run = tracking.open_run(
        "exp", tracking.RunInputs.here("hash-m"), {"model.backbone": "mobilenet_v2"}, "m"
    )
    with monkeypatch.context() as patched, pytest.raises(OSError, match="No space"):
        patched.setattr(mlflow.keras, "save_model", broken_save)
        tracking_models.log_classifier(run, clf, ["a", "b", "c"], 32)
    tracking.close_run(run, failed=True)
    assert listed() == before
    outputs = client.get_run(run.run_id).outputs.model_outputs
    assert {f"models:/{o.model_id}" for o in outputs} == {uri, newer}
    assert (
        f"models:/{tracking_models.load_pyfunc(f'runs:/{run.run_id}/model').metadata.model_id}"
        == newer
    )

    pyfunc = tracking_models.load_pyfunc(uri)
    assert pyfunc.metadata.metadata == {"classes": ["a", "b", "c"], "image_size": 32}
    raw = np.random.default_rng(0).integers(0, 256, (2, 45, 60, 3)).astype("float32")
    probs = pyfunc.predict(raw)  # raw RGB of another size: resized and preprocessed inside
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    resized = np.asarray(keras_resize(raw, 32))
    np.testing.assert_allclose(probs, model.predict(resized, verbose=0), atol=1e-5)
    # `mlflow models serve`: the REST endpoint's own parsing of a JSON body, checked against
    # the signature (any height and width), gives the same probabilities.
    from mlflow.pyfunc import scoring_server

    body = json.dumps({"inputs": raw.tolist()})
    schema = pyfunc.metadata.get_input_schema()
    served = scoring_server.invocations(body, "application/json", pyfunc, schema)
    assert served.status == 200, served.response
    np.testing.assert_allclose(json.loads(served.response)["predictions"], probs, atol=1e-5)
    loaded = export.load_classifier(uri)  # what `transferline predict runs:/...` uses
    assert loaded.classes == ["a", "b", "c"] and loaded.image_size == 32
    assert isinstance(loaded.model, keras.Model)  # run as a local one: folded, batch by batch
    np.testing.assert_allclose(loaded.predict(raw), probs, atol=1e-5)
    registered = export.load_classifier("models:/pets/1")
    np.testing.assert_allclose(registered.predict(raw), probs, atol=1e-6)


def test_a_pending_model_from_another_host_is_abandoned_only_after_a_day():
    day_ms = tracking_models.ABANDONED_AFTER_S * 1000
    for writer in ("other-host:123", "", "no-pid"):
        assert not tracking_models._upload_abandoned(writer, day_ms - 1)
        assert tracking_models._upload_abandoned(writer, day_ms + 1)
    # A live writer on this host is never abandoned, however old its model.
    assert not tracking_models._upload_abandoned(
        f"{socket.gethostname()}:{os.getpid()}", 10 * day_ms
    )


def keras_resize(x, size):
    import keras

    return keras.layers.Resizing(size, size)(x)


def test_latest_runs_best_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for h, acc, ft in (("a", 0.7, None), ("b", 0.6, 0.9), ("c", 0.8, None), ("d", 0.99, None)):
        run = tracking.open_run(
            "cmp", tracking.RunInputs.here(h), {"model.backbone": h, "head.type": "logreg"}, h
        )
        run.log_metrics({"head.accuracy": acc, **({"finetune.accuracy": ft} if ft else {})},
                        prefix="test.")  # fmt: skip
        tracking.close_run(run, failed=h == "d")
    rows = tracking_queries.latest_runs("cmp")
    # 0.9 (fine-tuned), 0.8, 0.7; then the failed run, whatever its accuracy
    assert [r["backbone"] for r in rows] == ["b", "c", "a", "d"]
    assert rows[-1]["status"] == "FAILED"
    assert rows[0]["test.head.accuracy"] == 0.6 and rows[1]["test.finetune.accuracy"] is None
    assert tracking_queries.latest_runs("no-such-experiment") == []


def test_unreachable_server_is_one_clear_error_at_once(monkeypatch):
    from conftest import refused_uri

    uri = refused_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.perf_counter()
    with pytest.raises(tracking.TrackingError) as err:
        tracking.check_store()
    assert time.perf_counter() - start < 30  # not MLflow's minutes of retries
    message = str(err.value)
    assert "Connection refused" in message and "MLFLOW_TRACKING_URI" in message
    assert uri.replace("user:secret@", "") in message and "secret" not in message


def test_store_errors_name_the_fix():
    from mlflow.exceptions import MlflowException

    def raised_through(exc: Exception, uri: str = "https://mlflow.example.com") -> Exception:
        try:
            with tracking.store_errors(uri):
                raise exc
        except Exception as seen:
            return seen
        raise AssertionError("nothing raised")

    unauthorized = raised_through(MlflowException("request failed with error code 401 != 200"))
    assert isinstance(unauthorized, tracking.TrackingError)
    assert "MLFLOW_TRACKING_USERNAME" in str(unauthorized)
    assert "https://mlflow.example.com" in str(unauthorized)
    not_mlflow = raised_through(MlflowException("request failed with error code 404 != 200"))
    assert "not as an MLflow tracking server" in str(not_mlflow)
    other = raised_through(MlflowException("INVALID_PARAMETER_VALUE: bad metric key"))
    assert "rejected a request (INVALID_PARAMETER_VALUE" in str(other)
    assert "Start the server" not in str(other)
    from sqlalchemy.exc import OperationalError

    locked = OperationalError("INSERT INTO runs", {}, Exception("database is locked"))
    database = raised_through(locked, "sqlite:////data/mlflow.db")
    assert isinstance(database, tracking.TrackingError)
    assert "sqlite:////data/mlflow.db cannot be opened or written" in str(database)
    assert "database is locked" in str(database)
    bug = ValueError("a bug")
    assert raised_through(bug) is bug  # not the store's: passed on as it is


def test_stage_stops_before_its_work_when_the_store_is_down(tmp_path):
    from conftest import REPO, refused_uri

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    code = (
        "import runpy, sys\n"
        "sys.argv = ['extract.py']\n"
        "try:\n"
        f"    runpy.run_path({str(REPO / 'stages' / 'extract.py')!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print('rc', e.code, 'tf', 'tensorflow' in sys.modules)\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": refused_uri()}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert "rc 2 tf False" in out.stdout  # stopped before TensorFlow, so before any work
    assert "ERROR in stage 'extract': MLflow tracking store" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "data").exists()


def test_stages_starting_together_share_a_new_sqlite_store(tmp_path):
    """`dvc queue start -j N` starts N stages at once on a store no run has made yet: MLflow
    creates an empty database's tables unguarded, so all but one used to fail with "table
    experiments already exists"."""
    go = tmp_path / "go"
    code = (
        "import sys, time\nfrom pathlib import Path\nimport mlflow\n"
        "from transferline import tracking\n"
        "Path(sys.argv[2]).touch()\n"
        "while not Path(sys.argv[1]).exists():\n    time.sleep(0.005)\n"
        "print(tracking.check_store())\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(go), str(tmp_path / f"ready{i}")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready*"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)  # until every process has imported mlflow and waits
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    failed = [err[-600:] for p, (_, err) in zip(procs, results, strict=True) if p.returncode]
    assert not failed, failed[0]
    assert all(out.strip() == env["MLFLOW_TRACKING_URI"] for out, _ in results)


def test_a_run_stands_for_its_inputs_params_data_code_and_machine(tmp_path, monkeypatch):
    """Same inputs: one run. Other data, code or machine under the same params: a new run,
    tagged with what changed, and the earlier run's metrics stay as they were."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    lock = tmp_path / "dvc.lock"
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "split.py").write_text("print('split')\n")
    client = mlflow.MlflowClient(tracking.tracking_uri(tmp_path))

    def pipeline(data_md5: str, accuracy: float) -> str:
        lock.write_text(
            "schema: '2.0'\nstages:\n  download:\n    outs:\n    - path: data/raw\n"
            f"      md5: {data_md5}\n"
        )
        for stage in ("split", "evaluate"):  # two stages of one pipeline run: one run
            run = tracking.open_run("exp", tracking.RunInputs.here("p1"), {"seed": 1}, stage)
            if stage == "evaluate":
                run.log_metrics({"accuracy": accuracy}, prefix="test.head.")
            tracking.close_run(run)
        return run.run_id

    first = pipeline("aaa.dir", 0.5)
    assert pipeline("aaa.dir", 0.5) == first  # the same inputs again: the same run
    data = pipeline("bbb.dir", 0.7)  # new images under the same params
    (tmp_path / "stages" / "split.py").write_text("print('changed')\n")
    code = pipeline("bbb.dir", 0.8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # as on a machine with another device
    elsewhere = pipeline("bbb.dir", 0.8)
    assert len({first, data, code, elsewhere}) == 4
    runs = {
        r.info.run_id: r
        for r in client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    }
    assert len(runs) == 4
    assert runs[first].data.metrics["test.head.accuracy"] == 0.5  # never replaced
    assert [m.value for m in client.get_metric_history(first, "test.head.accuracy")] == [0.5, 0.5]
    assert runs[data].data.tags[tracking.DIFFERS_TAG] == f"{first} (data)"
    assert runs[data].data.tags["data.raw_md5"] == "bbb.dir"
    assert runs[code].data.tags[tracking.DIFFERS_TAG] == f"{data} (code)"
    # The same inputs on another machine: a run of its own, linked to the first computation.
    assert runs[elsewhere].data.tags[tracking.SAME_INPUTS_TAG] == code
    assert (
        runs[elsewhere].data.tags[tracking.INPUTS_TAG] == runs[code].data.tags[tracking.INPUTS_TAG]
    )
    assert runs[elsewhere].data.tags["machine"].endswith("(CUDA_VISIBLE_DEVICES=)")
    assert len({r.data.tags[tracking.HASH_TAG] for r in runs.values()}) == 1

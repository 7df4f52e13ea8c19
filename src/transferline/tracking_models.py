"""The exported classifier as an MLflow LoggedModel of a run, and MLflow models loaded back as
pyfunc models (tracking.py's successor for models; only the tracking modules import mlflow)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from transferline.tracking import (
    Run,
    _one_line,
    check_store,
    source_tags,
    tracking_uri,
)

log = logging.getLogger(__name__)

WRITER_TAG = "transferline.writer"  # on a logged model: host:pid of the process uploading it
# A PENDING model whose writer cannot be checked (another host) is taken as abandoned after
# this long: a day, far longer than uploading even the largest base (~1.4 GB) should take.
ABANDONED_AFTER_S = 24 * 3600


def log_classifier(
    run: Run,
    model: Any,
    classes: list[str],
    image_size: int,
    register_as: str | None = None,
) -> str:
    """Log the exported classifier as an MLflow LoggedModel of this run; returns its URI.

    It is what `mlflow.keras.log_model(name="model")` makes: a Keras-flavour model with the
    run's params, linked to the run as an output (the UI's Models column, `runs:/ID/model`),
    with the run's test metrics attached. The signature takes float32 RGB batches of any
    height and width (0..255) and returns one probability per class; the class names are in
    the model's metadata. With `register_as`, also a version of that registered model.

    Args:
        run: the run to log into.
        model: the exported Keras classifier.
        classes: the class names.
        image_size: the input example's size.
        register_as: a registered model's name, or None.
    """
    import mlflow  # noqa: PLC0415
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus  # noqa: PLC0415

    client = run.client
    source = client.get_run(run.run_id)
    _delete_unfinished_models(client, source.info.experiment_id, run.run_id)
    logged = client.create_logged_model(
        source.info.experiment_id,
        name="model",
        source_run_id=run.run_id,
        params=dict(source.data.params),
        model_type="image-classifier",
        tags={**source_tags(), WRITER_TAG: f"{socket.gethostname()}:{os.getpid()}"},
    )
    try:
        _attach_test_metrics(client, source, logged.model_id)
        _upload(client, run.run_id, logged, model, classes, image_size)
        client.log_outputs(run.run_id, [LoggedModelOutput(logged.model_id, step=0)])
    except BaseException:
        # Half-uploaded: out of sight, so runs:/ID/model keeps meaning the last whole model.
        with contextlib.suppress(Exception):
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            client.delete_logged_model(logged.model_id)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    uri = f"models:/{logged.model_id}"
    if register_as:
        mlflow.set_tracking_uri(client.tracking_uri)
        version = mlflow.register_model(uri, register_as)
        log.info("MLflow: registered %s version %s", register_as, version.version)
    log.info("MLflow: model logged as %s (also runs:/%s/model)", uri, run.run_id)
    return uri


def _attach_test_metrics(client: Any, source: Any, model_id: str) -> None:
    """The run's test metrics, their current values re-logged as they are (so not duplicated
    in the run), linked to the model."""
    from mlflow.entities import Metric  # noqa: PLC0415

    run_id = source.info.run_id
    latest = [
        max(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        for key in source.data.metrics
        if key.startswith("test.")
    ]
    tested = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id) for m in latest]
    if tested:
        client.log_batch(run_id, metrics=tested)


def _upload(
    client: Any, run_id: str, logged: Any, model: Any, classes: list[str], image_size: int
) -> None:
    """Save the Keras model as MLflow's keras flavour (signature, input example, pinned
    requirements, class names) and upload it as the logged model's artifacts.

    Not `mlflow.keras.log_model`: with an input example, save_model writes it before it
    creates the model folder and fails (mlflow/mlflow#16183), so the folder is made first and
    the steps of `Model.log` are taken with the client API. Requirements are given, not
    inferred (inferring re-loads the model in a subprocess).
    """
    import tempfile  # noqa: PLC0415

    import mlflow  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from mlflow.models import Model, ModelSignature  # noqa: PLC0415
    from mlflow.types.schema import Schema, TensorSpec  # noqa: PLC0415

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), (-1, -1, -1, 3))]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, len(classes)))]),
    )
    example = np.random.default_rng(0).integers(0, 256, (1, image_size, image_size, 3))
    requirements = [f"{pkg}=={metadata.version(pkg)}" for pkg in ("keras", "tensorflow", "numpy")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        mlflow.keras.save_model(
            model,
            str(folder),
            mlflow_model=Model(
                artifact_path=logged.artifact_location,
                model_uuid=logged.model_id,
                run_id=run_id,
                model_id=logged.model_id,
            ),
            signature=signature,
            input_example=example.astype("float32"),
            pip_requirements=requirements,
            metadata={"classes": classes, "image_size": image_size},
        )
        client.log_model_artifacts(logged.model_id, str(folder))


def _delete_unfinished_models(client: Any, experiment_id: str, run_id: str) -> None:
    """Delete this run's PENDING models that no upload will finish: left by an evaluate killed
    mid-upload (MLflow resolves runs:/ID/model to the run's newest model whatever its state).
    One still being uploaded, by another evaluate of the same params, is left alone."""
    from mlflow.entities import LoggedModelStatus  # noqa: PLC0415

    now_ms = time.time() * 1000
    for model in client.search_logged_models([experiment_id], filter_string="name = 'model'"):
        if model.source_run_id != run_id or model.status != LoggedModelStatus.PENDING:
            continue
        if _upload_abandoned(model.tags.get(WRITER_TAG, ""), now_ms - model.creation_timestamp):
            log.warning("MLflow: deleting unfinished model %s of this run", model.model_id)
            client.delete_logged_model(model.model_id)


def _upload_abandoned(writer: str, age_ms: float) -> bool:
    """Whether a PENDING model's upload is over: its writer process (host:pid) on this host
    has exited; one on another host (or untagged) is judged by age alone."""
    host, _, pid = writer.rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and os.name == "posix":
        try:  # signal 0 only checks (on Windows os.kill would terminate it, hence POSIX only)
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False
    return age_ms > ABANDONED_AFTER_S * 1000


def load_pyfunc(uri: str):
    """An MLflow model (runs:/..., models:/name/version, a path) as a pyfunc model, from the
    same store the pipeline logs to."""
    import mlflow  # noqa: PLC0415
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    # A store that is down fails at once (TrackingError), not after MLflow's retries.
    in_store = uri.startswith(("runs:/", "models:/"))
    mlflow.set_tracking_uri(check_store() if in_store else tracking_uri())
    try:
        return mlflow.pyfunc.load_model(uri)
    except MlflowException as exc:
        named = []
        with contextlib.suppress(Exception):  # only a hint: the error below stands without it
            named = _runs_named(uri)
        if named:
            raise ValueError(
                f"{uri}: {uri.split('/')[1]!r} is a run's name, and runs:/ takes its ID: "
                + " or ".join(f"runs:/{i}/{uri.split('/', 2)[2]}" for i in named)
                + " (`transferline compare` lists both)."
            ) from exc
        raise ValueError(
            f"{uri}: MLflow cannot load it ({_one_line(exc)}). Check the run ID or the model's "
            "name and version (`transferline compare` lists the runs; `mlflow ui` shows both)."
        ) from exc


def _runs_named(uri: str, limit: int = 5) -> list[str]:
    """IDs of the runs whose name is the ID part of runs:/NAME/..., where a name was given
    for an ID (the UI and `transferline compare` show both); [] for any other URI."""
    from mlflow import MlflowClient  # noqa: PLC0415

    parts = uri.split("/", 2)
    if parts[0] != "runs:" or len(parts) < 3 or not parts[1] or "'" in parts[1]:
        return []
    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments(max_results=1000)]
    found = client.search_runs(
        ids, filter_string=f"attributes.run_name = '{parts[1]}'", max_results=limit
    )
    return [r.info.run_id for r in found]

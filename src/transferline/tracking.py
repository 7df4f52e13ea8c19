"""MLflow tracking: one run per set of inputs. The only module that imports mlflow.

A run stands for what produced its numbers: the resolved params, the data (DVC's hash of
data/raw), the weights file, the code, and the machine that computed them (`RunInputs`). Each
stage finds the run of its inputs (by the tag `transferline.run_key`) or creates it, so the
stages of one `dvc repro` / `dvc exp run` land in one run and no run's metrics are replaced by
numbers computed from other inputs; evaluate logs the complete picture.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import logging
import numbers as numbers_abc
import os
import platform
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from transferline.errors import TrackingError
from transferline.files import repo_root

log = logging.getLogger(__name__)

HASH_TAG = "transferline.params_hash"
INPUTS_TAG = "transferline.inputs"  # params + data + weights + code: runs of the same inputs
KEY_TAG = "transferline.run_key"  # the inputs and the machine: the run's identity
SAME_INPUTS_TAG = "transferline.same_inputs_as"  # first run of these inputs, another machine
DIFFERS_TAG = "transferline.differs_from"  # latest run of these params, and what changed
WRITER_TAG = "transferline.writer"  # on a logged model: host:pid of the process uploading it
# A PENDING model whose writer cannot be checked (another host) is taken as abandoned after
# this long: a day, far longer than uploading even the largest base (~1.4 GB) should take.
ABANDONED_AFTER_S = 24 * 3600
GIT_REPO_URL_TAG = "mlflow.source.git.repoURL"
EPOCH_FIGURES = ("loss", "accuracy", "val_loss", "val_accuracy")  # a training curve's figures
SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}
_PACKAGES = ("tensorflow", "keras", "dvc", "mlflow", "scikit-learn", "transferline")
# MLflow refuses a metric or param name holding any other character, and class names become
# param names (`data.label_map.CLASS`, e.g. `Corn_(maize)___healthy`). Also not ':' (refused on
# Windows) or '/' ('a//b' is refused as a path that is not unique).
_NOT_IN_A_NAME = re.compile(r"[^\w.\- ]")


def mlflow_names(keys: Iterable[str]) -> dict[str, str]:
    """Each key -> a name MLflow accepts: other characters become '_'. A renamed key that
    would share its name with another key gets a short hash of itself, so no value
    overwrites another's."""
    keys = list(dict.fromkeys(keys))
    names = {k: _NOT_IN_A_NAME.sub("_", k) for k in keys}
    renamed = [k for k in keys if names[k] != k]
    taken = collections.Counter(names.values())
    for k in renamed:
        if taken[names[k]] > 1:
            names[k] += "_" + hashlib.blake2b(k.encode(), digest_size=3).hexdigest()
    if renamed and not _RENAMED_REPORTED:  # once per process: stages log several batches
        _RENAMED_REPORTED.append(renamed[0])
        log.info(
            "MLflow names hold only letters, digits, '_', '-', '.' and spaces; the others "
            "are logged as '_' (e.g. %r as %r)",
            renamed[0],
            names[renamed[0]],
        )
    return names


_RENAMED_REPORTED: list[str] = []


def tracking_uri(root: Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root(root) / 'mlflow.db'}"


def describe_store_error(uri: str, exc: BaseException) -> str:
    """One paragraph: which store, what went wrong (the innermost reason, not MLflow's whole
    chain), and what to do about it."""
    text = _one_line(exc, limit=None)
    errno = re.search(r"\[Errno -?\d+\] [^\"')]+", text)
    reason = errno.group(0) if errno else _one_line(exc)
    store = f"MLflow tracking store {_without_credentials(uri)}"
    remote = uri.startswith(("http://", "https://"))
    unusable = (
        f"{store} cannot be opened or written ({reason}). Check the path and its "
        "permissions, or set MLFLOW_TRACKING_URI, then run it again."
    )
    if errno or re.search(r"Max retries exceeded|timed out|Connection(Error| aborted)", text):
        if remote:
            return (
                f"{store} cannot be reached ({reason}). Start the server (`mlflow server --host "
                "0.0.0.0 --port 5000`), point MLFLOW_TRACKING_URI at a running one, or unset it "
                "to log to sqlite:///mlflow.db at the repository root, then run it again."
            )
        return unusable
    if re.search(r"\b(401|403)\b|Unauthorized|Forbidden|PERMISSION_DENIED", text):
        return (
            f"{store} refused the credentials ({reason}). Set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for it, then run it again."
        )
    if remote and re.search(r"\b404\b", text):
        return (
            f"{store} answers, but not as an MLflow tracking server ({reason}). Check the "
            "host, port and path in MLFLOW_TRACKING_URI, then run it again."
        )
    if not remote and re.search(r"OperationalError|unable to open|read-only|locked", text):
        return unusable
    return f"{store} rejected a request ({reason}). The store's own log may say more."


def _one_line(exc: BaseException, limit: int | None = 300) -> str:
    """The exception's message on one line, cut at `limit` characters."""
    text = " ".join(str(exc).split())
    return text[:limit] + "..." if limit is not None and len(text) > limit else text


def check_store(root: Path | None = None, timeout_s: int = 10) -> str:
    """Reach the tracking store once, without MLflow's retries; return its URI.

    Stages call this before their work: MLflow retries a refused connection with back-off
    for about four minutes, so an unreachable server would otherwise stop a stage only after
    its work was done, and with a traceback.
    """
    from mlflow import MlflowClient  # noqa: PLC0415

    uri = tracking_uri(root)
    with store_errors(uri), _no_retries(timeout_s), _first_open(uri):
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    return uri


# Making a new store's tables and migrating them takes seconds; a lock held that long means
# another process is stuck, not slow.
STORE_LOCK_TIMEOUT_S = 300


@contextlib.contextmanager
def _first_open(uri: str) -> Iterator[None]:
    """Hold a lock beside a SQLite store while this process opens it.

    MLflow creates and migrates an empty database's tables without a lock, so stages that
    start together on a new store (`dvc queue start -j 2`) race, and all but one fail with
    "table experiments already exists" or "duplicate column name". MLflow keeps one store
    object per URI per process, so opening it once here, under the lock, is enough.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock, Timeout  # noqa: PLC0415

    db = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    lock = FileLock(db.with_name(db.name + ".lock"), timeout=STORE_LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout as exc:
        raise TrackingError(
            f"MLflow tracking store {uri} stayed locked for {STORE_LOCK_TIMEOUT_S} s by another "
            f"process opening it (the lock is {lock.lock_file}). Stop the stuck stage or "
            "`mlflow` command, then run it again."
        ) from exc
    except OSError:  # no folder to lock in, or not writable: MLflow names the problem
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _no_retries(timeout_s: int = 10) -> contextlib.AbstractContextManager:
    """MLflow's HTTP requests made inside it are tried once, with this timeout (MLflow reads
    both settings from the environment at each request)."""
    from unittest import mock  # noqa: PLC0415

    once = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    return mock.patch.dict(os.environ, once)


@contextlib.contextmanager
def store_errors(uri: str) -> Iterator[None]:
    """MLflow's errors (HTTP, database) as a TrackingError that names the store and the fix."""
    import requests  # noqa: PLC0415
    from mlflow.exceptions import MlflowException  # noqa: PLC0415
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415

    try:
        yield
    except (MlflowException, requests.RequestException, SQLAlchemyError) as exc:
        raise TrackingError(describe_store_error(uri, exc)) from exc


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=20, check=False
        )
    except OSError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


# Files that DVC itself writes in a run: a change there is not a change of the code. Under
# `dvc exp run` params.yaml holds DVC's own overrides too (the experiment's commit records them).
DVC_WRITES = ("dvc.lock", "metrics/", "plots/", "models/", "data/")


def git_dirty(under_experiment: bool) -> bool:
    """Whether tracked files differ from HEAD, apart from what DVC writes in a run (and
    params.yaml's overrides under `dvc exp run`)."""
    ours = DVC_WRITES + (("params.yaml",) if under_experiment else ())

    def written_by_dvc(path: str) -> bool:
        return any(path == o or (o.endswith("/") and path.startswith(o)) for o in ours)

    changed = _git("diff", "--name-only", "HEAD").splitlines()
    return any(not written_by_dvc(path) for path in changed)


def context_tags() -> dict[str, str]:
    """What reproduces the run: the commit and a dirty flag, the DVC experiment (name, ref
    and baseline) under `dvc exp run`, Python and package versions."""
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    tags = {"git.commit": _git("rev-parse", "HEAD") or "none"}
    tags["git.dirty"] = str(git_dirty(under_experiment=bool(exp_name))).lower()
    if exp_name:
        tags["dvc.exp_name"] = exp_name
        baseline = os.environ.get("DVC_EXP_BASELINE_REV", "")
        if baseline:
            tags["dvc.exp_baseline"] = baseline
            # The ref DVC keeps the experiment's commit under (`dvc exp push/pull` move it).
            tags["dvc.exp_ref"] = f"refs/exps/{baseline[:2]}/{baseline[2:]}/{exp_name}"
    tags["version.python"] = platform.python_version()
    for pkg in _PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            tags[f"version.{pkg}"] = metadata.version(pkg)
    return tags


def source_tags() -> dict[str, str]:
    """MLflow's own context tags, resolved as `mlflow.start_run` and `log_model` resolve them:
    user, source script and type, git commit, branch and remote, and any installed
    RunContextProvider plugin's. The client API sets none of them; the UI's User, Source and
    Version columns and a model's "Logged from" read them. A remote's user name and password
    are left out of its URL, as recent MLflow releases do, whatever the installed one does."""
    from mlflow.tracking.context.registry import resolve_tags  # noqa: PLC0415

    tags = dict(resolve_tags())
    if GIT_REPO_URL_TAG in tags:
        tags[GIT_REPO_URL_TAG] = _without_credentials(tags[GIT_REPO_URL_TAG])
    return tags


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if not parts.scheme or "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def dvc_lock_hash(stage: str, path: str, lock: Path = Path("dvc.lock")) -> str | None:
    try:
        data = yaml.safe_load(lock.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    for out in data.get("stages", {}).get(stage, {}).get("outs", []):
        if out.get("path") == path:
            return out.get("md5")
    return None


CODE_FILES = ("stages/*.py", "dvc.yaml")  # with every module of the imported package


def code_digest(root: Path | None = None) -> str:
    """Hash of the code that computes a run: the package's modules, the stage scripts and
    dvc.yaml under `root` (default: the current directory, where DVC runs a stage: the
    workspace, or the copy `dvc exp run --temp/--queue` runs in). The modules are those under
    `root`/src/transferline, the files DVC tracks as the stages' deps; the imported package's
    where there is no such folder."""
    base = (root or Path.cwd()).resolve()
    package = base / "src" / "transferline"
    if not package.is_dir():
        package = Path(__file__).resolve().parent
    files = [(f"transferline/{f.name}", f) for f in sorted(package.glob("*.py"))]
    for pattern in CODE_FILES:
        files += [(f.relative_to(base).as_posix(), f) for f in sorted(base.glob(pattern))]
    digest = hashlib.sha256()
    for name, path in files:
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def machine_name() -> str:
    """The machine that computes a run: its host name, and CUDA_VISIBLE_DEVICES when set (it
    changes the device, and with it the numbers)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = "" if visible is None else f" (CUDA_VISIBLE_DEVICES={visible})"
    return socket.gethostname() + shown


@dataclasses.dataclass(frozen=True)
class RunInputs:
    """What produces a run's numbers; two sets of stages share a run only if all agree.

    Args:
        params: digest of the resolved params (`Params.digest()`).
        data: DVC's hash of data/raw from dvc.lock ("none" before the download stage ran).
        weights: md5 of a `model.weights` file, or the setting itself (`imagenet`, `none`).
        code: `code_digest()`.
        machine: `machine_name()`.
    """

    params: str
    data: str
    weights: str
    code: str
    machine: str

    @classmethod
    def here(cls, params_hash: str, weights: str = "none") -> RunInputs:
        """The inputs of a stage run in the current directory: `weights` is `model.weights`
        (a file's md5 is taken)."""
        is_file = weights not in ("imagenet", "none")
        return cls(
            params=params_hash,
            data=dvc_lock_hash("download", "data/raw") or "none",
            weights=_md5_cached(*_file_version(Path(weights))) if is_file else weights,
            code=code_digest(),
            machine=machine_name(),
        )

    def digest(self) -> str:
        """The inputs without the machine: equal for a recomputation elsewhere."""
        blob = "\0".join((self.params, self.data, self.weights, self.code))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def key(self) -> str:
        blob = f"{self.digest()}\0{self.machine}"
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def tags(self) -> dict[str, str]:
        return {
            HASH_TAG: self.params,
            INPUTS_TAG: self.digest(),
            KEY_TAG: self.key(),
            "data.raw_md5": self.data,
            "model.weights_md5": self.weights,
            "code.digest": self.code,
            "machine": self.machine,
        }


# What a changed input is called in DIFFERS_TAG and the log, by the tag that holds it.
_INPUT_NAMES = {
    "data.raw_md5": "data",
    "model.weights_md5": "weights",
    "code.digest": "code",
    "machine": "machine",
}


def _file_version(path: Path) -> tuple[Path, int, int]:
    stat = path.stat()
    return path.resolve(), stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=8)
def _md5_cached(path: Path, mtime_ns: int, size: int) -> str:
    # A weights file can be large, and each stage asks for its hash; a file replaced since
    # (another modification time or size) is hashed again.
    from transferline.files import md5_of  # noqa: PLC0415

    return md5_of(path)


class Run:
    """A handle on the MLflow run of one set of inputs."""

    def __init__(self, client: Any, run_id: str):
        self.client, self.run_id = client, run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0, prefix: str = "") -> None:
        from mlflow.entities import Metric  # noqa: PLC0415

        now = int(time.time() * 1000)
        numbers = {
            f"{prefix}{k}": float(v)
            for k, v in metrics.items()
            if isinstance(v, numbers_abc.Real) and not isinstance(v, bool)
        }
        names = mlflow_names(numbers)
        batch = [Metric(names[k], v, now, step) for k, v in numbers.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def log_history(self, history: Iterable[Mapping[str, float]], prefix: str) -> None:
        """Per-epoch curves as MLflow steps. Curves the run already has (logged live by
        `epoch_logger`, or by an earlier stage) are not logged twice."""
        have = set(self.client.get_run(self.run_id).data.metrics)
        for row in history:
            self.log_metrics(
                {k: v for k, v in row.items() if k != "epoch" and f"{prefix}{k}" not in have},
                step=int(row["epoch"]),
                prefix=prefix,
            )

    def epoch_logger(self, prefix: str) -> Callable[[int, Mapping[str, float]], None]:
        """A function of (epoch, logs) that logs the epoch's figures as step `epoch` at once,
        for a training loop to call as each epoch ends: the UI shows the curves while a long
        run goes on, and a run that is killed keeps the epochs it finished."""

        def log_epoch(epoch: int, logs: Mapping[str, float] | None) -> None:
            self.log_metrics(
                {k: v for k, v in (logs or {}).items() if k in EPOCH_FIGURES},
                step=epoch,
                prefix=prefix,
            )

        return log_epoch

    def log_table(self, rows: list[Mapping[str, Any]], artifact_file: str) -> None:
        """Rows as an MLflow table (a JSON artifact the UI shows as a table). Logged once per
        run: its inputs give the same table, and MLflow appends to an existing one."""
        folder = artifact_file.rpartition("/")[0] or None
        if any(a.path == artifact_file for a in self.client.list_artifacts(self.run_id, folder)):
            return
        columns = list(dict.fromkeys(k for row in rows for k in row))
        table = {c: [row.get(c) for row in rows] for c in columns}
        self.client.log_table(self.run_id, table, artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_datasets(self, name: str, manifests: Mapping[str, Path], data_hash: str | None) -> None:
        """The split manifests (path,label) as MLflow datasets of this run, with MLflow's
        context tag (training, validation, test): the UI's Dataset column and filter. The
        digest covers the manifest and, where dvc.lock has it, the raw data's DVC hash, so it
        changes when the files change under the same names. Logging the same one again (as
        evaluate does after split) adds nothing."""
        import csv  # noqa: PLC0415
        import io  # noqa: PLC0415
        import json  # noqa: PLC0415

        from mlflow.entities import Dataset, DatasetInput, InputTag  # noqa: PLC0415
        from mlflow.types import ColSpec, Schema  # noqa: PLC0415

        schema = Schema([ColSpec("string", "path"), ColSpec("string", "label")])
        inputs = []
        for split, path in manifests.items():
            data = Path(path).read_bytes()
            rows = list(csv.DictReader(io.StringIO(data.decode(), newline="")))
            digest = hashlib.md5(data + (data_hash or "").encode(), usedforsecurity=False)
            dataset = Dataset(
                name=f"{name}/{split}",
                digest=digest.hexdigest()[:8],
                source_type="local",
                source=json.dumps({"uri": Path(path).as_posix()}),
                schema=json.dumps({"mlflow_colspec": schema.to_dict()}),
                profile=json.dumps(
                    {"num_rows": len(rows), "num_classes": len({r["label"] for r in rows})}
                ),
            )
            context = InputTag("mlflow.data.context", SPLIT_CONTEXTS.get(split, split))
            inputs.append(DatasetInput(dataset, [context]))
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag  # noqa: PLC0415

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def _experiment_id(client: Any, name: str, root: Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    kwargs = {}
    if tracking_uri(root).startswith("sqlite:"):
        # Keep artifacts at the repo root, not in whatever folder the stage ran in.
        kwargs["artifact_location"] = (repo_root(root) / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, **kwargs)
    except Exception:  # created concurrently by another stage process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def open_run(
    experiment: str,
    inputs: RunInputs,
    flat_params: Mapping[str, Any],
    run_name: str,
    root: Path | None = None,
) -> Run:
    """The run of these inputs, found by its key or created; params and tags logged.

    A new run is tagged with what differs from the latest run of the same params
    (`transferline.differs_from`) and, when the same inputs were computed on another machine,
    with that run (`transferline.same_inputs_as`).
    """
    from mlflow import MlflowClient  # noqa: PLC0415
    from mlflow.entities import Param  # noqa: PLC0415

    uri = tracking_uri(root)
    client = MlflowClient(tracking_uri=uri)
    exp_id = _experiment_id(client, experiment, root or Path.cwd())
    found = _latest_run(client, exp_id, KEY_TAG, inputs.key())
    if found:
        run_id = found.info.run_id
        if found.info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        tags = {}
    else:
        tags = {"mlflow.runName": run_name, **_lineage(client, exp_id, inputs)}
        run_id = client.create_run(exp_id, tags=tags, run_name=run_name).info.run_id
        names = mlflow_names(flat_params)
        params = [Param(names[k], str(v)) for k, v in flat_params.items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])
        log.info("MLflow: new run %s (%s) in %s", run_name, run_id, _without_credentials(uri))
    run = Run(client, run_id)
    run.set_tags({**source_tags(), **context_tags(), **inputs.tags()})
    return run


def _latest_run(client: Any, exp_id: str, tag: str, value: str) -> Any:
    found = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{tag}` = '{value}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return found[0] if found else None


def _lineage(client: Any, exp_id: str, inputs: RunInputs) -> dict[str, str]:
    """Tags linking a new run to earlier ones: the same inputs computed on another machine,
    or the latest run of the same params with what changed since (data, weights, code,
    machine)."""
    same = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{INPUTS_TAG}` = '{inputs.digest()}'",
        max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    if same:
        log.info(
            "MLflow: these inputs were computed before on %s (run %s); a new run for this machine",
            same[0].data.tags.get("machine", "?"),
            same[0].info.run_id,
        )
        return {SAME_INPUTS_TAG: same[0].info.run_id}
    earlier = _latest_run(client, exp_id, HASH_TAG, inputs.params)
    if earlier is None:
        return {}
    new = inputs.tags()
    changed = [name for tag, name in _INPUT_NAMES.items() if earlier.data.tags.get(tag) != new[tag]]
    log.info(
        "MLflow: a new run for the same params: %s changed since run %s, whose metrics stay",
        ", ".join(changed) or "inputs",
        earlier.info.run_id,
    )
    return {DIFFERS_TAG: f"{earlier.info.run_id} ({', '.join(changed) or 'inputs'})"}


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
    the model's metadata. Requirements are given, not inferred (inferring re-loads the model
    in a subprocess). Not `log_model` itself: with an input example, mlflow.keras.save_model
    writes it before it creates the model folder and fails (mlflow/mlflow#16183, still open
    in 3.17), so here the folder is made first and the steps of `Model.log` are taken with
    the public client API. The model is linked to the run once it is whole; a failed upload's
    model is deleted at once, a killed one's (still PENDING) at the run's next log, so that
    `runs:/ID/model` goes back to the last whole model.
    """
    import tempfile  # noqa: PLC0415

    import mlflow  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric  # noqa: PLC0415
    from mlflow.models import Model, ModelSignature  # noqa: PLC0415
    from mlflow.types.schema import Schema, TensorSpec  # noqa: PLC0415

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
    model_id = logged.model_id
    try:
        latest = [  # the current value of each, re-logged as it is (so not duplicated)
            max(client.get_metric_history(run.run_id, key), key=lambda m: (m.step, m.timestamp))
            for key in source.data.metrics
            if key.startswith("test.")
        ]
        tested = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id) for m in latest]
        if tested:
            client.log_batch(run.run_id, metrics=tested)
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype("float32"), (-1, -1, -1, 3))]),
            outputs=Schema([TensorSpec(np.dtype("float32"), (-1, len(classes)))]),
        )
        example = np.random.default_rng(0).integers(0, 256, (1, image_size, image_size, 3))
        requirements = [
            f"{pkg}=={metadata.version(pkg)}" for pkg in ("keras", "tensorflow", "numpy")
        ]
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "model"
            folder.mkdir()
            mlflow.keras.save_model(
                model,
                str(folder),
                mlflow_model=Model(
                    artifact_path=logged.artifact_location,
                    model_uuid=model_id,
                    run_id=run.run_id,
                    model_id=model_id,
                ),
                signature=signature,
                input_example=example.astype("float32"),
                pip_requirements=requirements,
                metadata={"classes": classes, "image_size": image_size},
            )
            client.log_model_artifacts(model_id, str(folder))
        client.log_outputs(run.run_id, [LoggedModelOutput(model_id, step=0)])
    except BaseException:
        # Half-uploaded: out of sight, so runs:/ID/model keeps meaning the last whole model.
        with contextlib.suppress(Exception):
            client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
            client.delete_logged_model(model_id)
        raise
    client.finalize_logged_model(model_id, LoggedModelStatus.READY)
    uri = f"models:/{model_id}"
    if register_as:
        mlflow.set_tracking_uri(client.tracking_uri)
        version = mlflow.register_model(uri, register_as)
        log.info("MLflow: registered %s version %s", register_as, version.version)
    log.info("MLflow: model logged as %s (also runs:/%s/model)", uri, run.run_id)
    return uri


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


def run_record(run_id: str, root: Path | None = None) -> dict[str, Any] | None:
    """A run as plain data (`run_id`, `experiment`, `status`, `deleted`, `tags`, `params`,
    `metrics`), or None when the store has no run of that ID."""
    from mlflow import MlflowClient  # noqa: PLC0415
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    uri = check_store(root)
    client = MlflowClient(tracking_uri=uri)
    with store_errors(uri):
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        experiment = client.get_experiment(run.info.experiment_id)
    return {
        "run_id": run.info.run_id,
        "experiment": experiment.name,
        "status": run.info.status,
        "deleted": run.info.lifecycle_stage == "deleted",
        "tags": dict(run.data.tags),
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
    }


def experiments_with_runs(root: Path | None = None, limit: int = 20) -> list[str]:
    """Names of the store's experiments that hold at least one run (at most `limit`), so an
    error about an empty experiment can say which ones to pick from."""
    from mlflow import MlflowClient  # noqa: PLC0415

    client = MlflowClient(tracking_uri=tracking_uri(root))
    names = []
    for exp in client.search_experiments(max_results=1000):
        if len(names) == limit:
            break
        if client.search_runs([exp.experiment_id], max_results=1):
            names.append(exp.name)
    return sorted(names)


COMPARE_METRICS = ("test.head.accuracy", "test.finetune.accuracy", "test.finetune.macro_f1")


def latest_runs(experiment: str, limit: int = 20, root: Path | None = None) -> list[dict]:
    """The newest runs of `experiment`, finished ones first, each group best test accuracy
    first (fine-tuned, else head)."""
    from mlflow import MlflowClient  # noqa: PLC0415

    client = MlflowClient(tracking_uri=tracking_uri(root))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs(
        [exp.experiment_id], max_results=limit, order_by=["attributes.start_time DESC"]
    )
    rows = []
    for r in runs:
        m, p, t = r.data.metrics, r.data.params, r.data.tags
        best = m.get("test.finetune.accuracy", m.get("test.head.accuracy"))
        rows.append(
            {
                "run_id": r.info.run_id,
                "run": r.info.run_name or "",
                "dvc_exp": t.get("dvc.exp_name", ""),
                "backbone": p.get("model.backbone", ""),
                "size": p.get("model.image_size", ""),
                "head": p.get("head.type", ""),
                "finetune": p.get("finetune.enabled", ""),
                **{k: m.get(k) for k in COMPARE_METRICS},
                "inputs": t.get(INPUTS_TAG, "")[:6],
                "best": best,
                "status": r.info.status,
            }
        )
    # Finished runs first: a run whose last stage failed may hold metrics and a model from
    # before the failure, not of its params as they stand.
    rows.sort(key=lambda r: (r["status"] != "FINISHED", 1.0 if r["best"] is None else -r["best"]))
    return rows


SYSTEM_METRICS_INTERVAL_S = 10.0  # MLflow's default; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL wins


@contextlib.contextmanager
def system_metrics(run: Run) -> Iterator[None]:
    """MLflow's own system-metrics sampler (what `start_run(log_system_metrics=True)` starts),
    on this run while the block runs. Its steps go on from the last stage's, so a run's
    charts show its stages one after another."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # noqa: PLC0415

    monitor = SystemMetricsMonitor(
        run.run_id,
        sampling_interval=SYSTEM_METRICS_INTERVAL_S,
        resume_logging=True,
        tracking_uri=run.client.tracking_uri,
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def close_run(run: Run, failed: bool = False) -> None:
    run.client.set_terminated(run.run_id, status="FAILED" if failed else "FINISHED")


def abandon_run(run: Run) -> None:
    """Mark the run FAILED if the store answers at once; never raises, so the stage's own
    error is the one reported."""
    with contextlib.suppress(Exception), _no_retries():
        close_run(run, failed=True)

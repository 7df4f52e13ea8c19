"""What every stage script shares: arguments, logging, params, clean errors, timing, paths."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from transferline import logs
from transferline.errors import StageError, TransferlineError
from transferline.files import DataDirs
from transferline.params import Params
from transferline.params_files import load_params

log = logging.getLogger("transferline")

RAW = Path("data/raw")
SPLITS = Path("data/splits")
FEATURES = Path("data/features")
AUDIT = Path("data/audit")
TRUNK = Path("data/trunk")
HEAD = Path("models/head")
FINETUNE_INIT = Path("models/finetune_init")
FINETUNED = Path("models/finetuned.keras")
CLASSIFIER = Path("models/classifier")
METRICS = Path("metrics")
PLOTS = Path("plots")
DATA = DataDirs(RAW, SPLITS, FEATURES, TRUNK)


# each stage's outputs that other stages read -> the stage that writes them
PRODUCERS = {
    RAW: "download",
    SPLITS: "split",
    FEATURES: "extract",
    HEAD: "train_head",
    FINETUNE_INIT: "train_head",
    FINETUNED: "finetune",
    AUDIT: "audit",
    TRUNK: "trunk",
}


GPU_GROWTH = "TF_FORCE_GPU_ALLOW_GROWTH"


def share_gpus() -> None:
    """Let TensorFlow take GPU memory as it needs it instead of nearly all of every GPU at
    start, so two stages or queued experiments (`dvc queue start -j 2`), or a notebook, can
    share a GPU. TensorFlow reads the variable when it first uses a GPU; a value the user set
    (`false`: reserve it all up front, against fragmentation) is kept."""
    os.environ.setdefault(GPU_GROWTH, "true")


def _arguments(stage: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"stages/{stage}.py", description=f"DVC stage '{stage}' of transferline."
    )
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: %(default)s)"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logs, TensorFlow's C++ log too"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return parser.parse_args(argv)


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """`kill`, a scheduler's stop or `dvc queue kill` end the block as Ctrl-C does: the stage's
    MLflow run is marked FAILED with the epochs it logged, its temporary outputs removed."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(
    stage: str,
    body: Callable[[Params], None],
    argv: list[str] | None = None,
    tracked: bool = True,
) -> int:
    """Run one stage: arguments, logging, params, (with `tracked`) a quick check that the MLflow
    store answers, then the body; known errors end it with one paragraph and exit code 2.

    Args:
        stage: the stage's name.
        body: the stage's work, given the params.
        argv: the arguments (default: the command line's).
        tracked: whether the stage logs to MLflow.

    Returns:
        The exit code: 0, or 2 after a known error.
    """
    args = _arguments(stage, argv)
    logs.setup(args.verbose, args.quiet)
    share_gpus()
    start = time.perf_counter()
    log.info("stage %s: start", stage)
    try:
        params = load_params(args.params)
        if tracked:
            from transferline import tracking  # noqa: PLC0415

            tracking.check_store()
        monitor = monitored(params) if tracked else contextlib.nullcontext()
        with _sigterm_as_exit(), logs.native_log_filtered(enabled=not args.verbose), monitor:
            body(params)
    except TransferlineError as exc:
        print(f"ERROR in stage '{stage}': {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:  # an input another stage writes (a script run by hand)
        missing = Path(exc.filename or "")
        if missing.is_absolute() and missing.is_relative_to(Path.cwd()):
            missing = missing.relative_to(Path.cwd())
        producer = next((s for out, s in PRODUCERS.items() if missing.is_relative_to(out)), None)
        if producer is None:
            raise
        print(
            f"ERROR in stage '{stage}': {missing} is missing: the {producer} stage writes it. "
            f"Run `dvc repro {stage}`, which runs {producer} and whatever else it needs first "
            f"(or `dvc pull` for the outputs a teammate pushed).",
            file=sys.stderr,
        )
        return 2
    log.info("stage %s: done in %.1f s", stage, time.perf_counter() - start)
    return 0


def check_features(params: Params) -> None:
    """The cached features come from this parameter set's model.*: a stage run by hand (or
    `dvc repro -s`) after a change there, without extract, would otherwise train or report a
    head of one model under another's params."""
    from transferline.files import read_json  # noqa: PLC0415

    meta = read_json(FEATURES / "meta.json")
    m = params.model
    wanted = {
        "backbone": m.backbone,
        "weights": m.weights,
        "image_size": m.size,
        "pooling": m.pooling,
    }
    differ = [
        f"{k} {meta.get(k)!r} there, {v!r} in params" for k, v in wanted.items() if meta.get(k) != v
    ]
    if differ:
        raise StageError(
            f"{FEATURES} holds another model's features ({'; '.join(differ)}): they are older "
            f"than these params. Run `dvc repro`, which extracts them again."
        )


def _open_run(params: Params):
    from transferline import tracking  # noqa: PLC0415

    inputs = tracking.RunInputs.here(params.digest(), params.model.weights)
    name = f"{params.model.backbone}-{params.head.type}-{inputs.digest()[:6]}"
    return tracking.open_run(params.mlflow.experiment, inputs, params.flat(), name)


@contextlib.contextmanager
def monitored(params: Params) -> Iterator[None]:
    """The machine's use while the stage works (CPU, memory, disk, network; GPUs with
    nvidia-ml-py) sampled into this parameter set's MLflow run: the UI's System metrics tab.
    A stage that fails marks the run FAILED. Not on a multi-machine cluster (TF_CONFIG), whose
    other machines do not log."""
    from transferline import tracking  # noqa: PLC0415

    if os.environ.get("TF_CONFIG", "").strip():
        yield
        return
    uri = tracking.tracking_uri()
    with tracking.store_errors(uri):
        run = _open_run(params)
    try:
        with tracking.system_metrics(run):
            yield
    except BaseException:
        tracking.abandon_run(run)
        raise


@contextlib.contextmanager
def mlflow_run(params: Params) -> Iterator:
    """The MLflow run of this stage's inputs (params, data, weights file, code, machine),
    closed as failed if the stage fails; the store's errors become one clean paragraph."""
    from transferline import tracking  # noqa: PLC0415

    uri = tracking.tracking_uri()
    with tracking.store_errors(uri):
        run = _open_run(params)
    try:
        with tracking.store_errors(uri):
            yield run
    except BaseException:
        tracking.abandon_run(run)
        raise
    with tracking.store_errors(uri):
        tracking.close_run(run)


# metrics file stem -> MLflow namespace
NAMESPACES = {
    "split": "split.",
    "extract": "extract.",
    "train_head": "head.",
    "finetune": "finetune.",
    "evaluate": "test.",
    "audit": "audit.",
}
# What each metrics file gives MLflow as scalars, so the headline figures are not lost in a
# list (None: all of its numbers). The whole file is the run's artifact `metrics/NAME.json`.
SCALARS: dict[str, tuple[str, ...] | None] = {
    "split": None,  # images per split, rejected, duplicates
    "extract": ("images_per_second", "seconds"),
    "train_head": ("val_accuracy", "val_loss", "C"),  # C: the one C_grid chose
    "finetune": ("val_accuracy", "val_loss", "best_epoch", "train_images_per_second"),
    # evaluate.json's val_accuracy is train_head's and finetune's, logged as theirs
    "evaluate": None,
    "audit": None,  # headline counts only
}
HISTORIES = {"head_history.csv": "head.history.", "finetune_history.csv": "finetune.history."}


def headline(stem: str, metrics: dict) -> dict[str, float]:
    """The figures of metrics file `stem` that MLflow gets as scalars (flattened keys)."""
    from transferline.params import flatten  # noqa: PLC0415

    flat = flatten(metrics)
    keep = SCALARS[stem]
    if keep is not None:
        return {k: v for k, v in flat.items() if k in keep}
    return {k: v for k, v in flat.items() if not k.endswith("val_accuracy")}


def log_stage_metrics(run, stem: str, metrics: dict) -> None:
    """A stage's headline figures into the run, under the stage's namespace."""
    run.log_metrics(headline(stem, metrics), prefix=NAMESPACES[stem])


def add_val_accuracy(metrics: dict) -> None:
    """Each model's validation accuracy (train_head's and finetune's) beside its test metrics
    in evaluate's, so `dvc exp show` has every headline figure of a model together."""
    from transferline.files import read_json  # noqa: PLC0415

    for name, stem in (("head", "train_head"), ("finetune", "finetune")):
        if name in metrics:
            metrics[name]["val_accuracy"] = read_json(METRICS / f"{stem}.json")["val_accuracy"]


def log_everything(run) -> None:
    """The headline figures of every metrics/*.json, per-epoch curves, per-class tables and
    figures into the run, so it is whole even when DVC restored earlier stages from its
    cache."""
    import csv  # noqa: PLC0415

    from transferline.files import read_json  # noqa: PLC0415

    for stem in NAMESPACES:
        path = METRICS / f"{stem}.json"
        if path.exists():
            log_stage_metrics(run, stem, read_json(path))
            run.log_artifact(path, "metrics")
    for name, prefix in HISTORIES.items():
        path = PLOTS / name
        if path.exists():
            with path.open(newline="") as f:
                rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
            run.log_history(rows, prefix=prefix)
            run.log_artifact(path, "plots")
    log_tables(run)
    log_folders(run, (*AUDIT_FOLDERS, (PLOTS / "evaluate", "plots/evaluate")))
    for path in (Path("params.yaml"), Path("dvc.lock")):
        run.log_artifact(path)


# The audit's CSVs and grids, and the run's artifact folder for each.
AUDIT_FOLDERS = ((AUDIT, "audit"), (PLOTS / "audit", "plots/audit"))


def log_folders(run, folders) -> None:
    """Every file of each (folder, artifact path) pair whose folder exists, into the run."""
    for folder, artifact_path in folders:
        for path in sorted(folder.glob("*")) if folder.is_dir() else []:
            run.log_artifact(path, artifact_path)


def log_tables(run) -> None:
    """Per-class test figures of each model and the split's per-class counts as MLflow
    tables (`tables/NAME.json`)."""
    import csv  # noqa: PLC0415

    from transferline.evaluation import PER_CLASS_FILE  # noqa: PLC0415
    from transferline.files import read_json  # noqa: PLC0415

    per_class = PLOTS / "evaluate" / PER_CLASS_FILE
    for name, rows in (read_json(per_class) if per_class.exists() else {}).items():
        run.log_table(rows, f"tables/{name}_per_class.json")
    counts = SPLITS / "counts.csv"
    if counts.exists():
        with counts.open(newline="") as f:
            rows = [
                {k: v if k == "class" else int(v) for k, v in r.items()} for r in csv.DictReader(f)
            ]
        run.log_table(rows, "tables/split_counts.json")


def log_datasets(run, dataset: str) -> None:
    """The split manifests as the run's MLflow datasets, named after `data.dataset`."""
    from transferline import sources, tracking_identity  # noqa: PLC0415

    manifests = {s: SPLITS / f"{s}.csv" for s in ("train", "val", "test")}
    run.log_datasets(
        sources.dataset_name(dataset),
        {s: path for s, path in manifests.items() if path.exists()},
        tracking_identity.dvc_lock_hash("download", "data/raw"),
    )

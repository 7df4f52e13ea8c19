"""Reading runs back from the MLflow store: one run as plain data, the newest runs of an
experiment for `transferline compare`, the experiments that hold runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transferline.tracking import check_store, store_errors, tracking_uri
from transferline.tracking_identity import INPUTS_TAG


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

"""Auditing the data set on its cached features: label issues, near-duplicates and outliers.

Every image of every split gets class probabilities from a logistic regression that never saw
it (K-fold cross-validation over train + val + test), and cleanlab's Datalab finds, from those
and the features, the images whose label looks wrong, the pairs of images that are nearly the
same (across splits: leakage) and the images unlike the rest. Pure: arrays in, findings out.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from transferline.params import AuditParams

log = logging.getLogger(__name__)

KNN = 10  # cleanlab's neighbours per image (fewer in a data set of fewer images)


@dataclass(frozen=True)
class AuditData:
    """The images audited: features (n, dim), integer labels, split and path of each."""

    features: np.ndarray
    labels: np.ndarray
    splits: list[str]
    paths: list[str]
    classes: list[str]


@dataclass
class Findings:
    """What the audit found, each list most suspect first (rows as the CSVs hold them)."""

    label_issues: list[dict[str, Any]] = field(default_factory=list)
    near_duplicates: list[dict[str, Any]] = field(default_factory=list)
    outliers: list[dict[str, Any]] = field(default_factory=list)
    audited: int = 0

    def metrics(self) -> dict[str, int]:
        """The headline counts (metrics/audit.json)."""
        cross = [p for p in self.near_duplicates if p["split_a"] != p["split_b"]]
        return {
            "images_audited": self.audited,
            "label_issues": len(self.label_issues),
            "label_issues_test": sum(r["split"] == "test" for r in self.label_issues),
            "near_duplicate_pairs": len(self.near_duplicates),
            "cross_split_pairs": len(cross),
            "outliers": len(self.outliers),
        }


def usable_folds(labels: np.ndarray, wanted: int) -> int:
    """`audit.folds`, or fewer when a class has fewer images: stratified folds need at least
    one image of each class per fold."""
    smallest = min(Counter(labels.tolist()).values())
    folds = max(2, min(wanted, smallest))
    if folds < wanted:
        log.warning(
            "audit.folds = %d, but the smallest class has %d images: cross-validating with "
            "%d folds",
            wanted,
            smallest,
            folds,
        )
    return folds


def out_of_sample_probs(
    x: np.ndarray, y: np.ndarray, n_classes: int, params: AuditParams, seed: int
) -> np.ndarray:
    """Class probabilities (n, n_classes) of each image from a StandardScaler +
    LogisticRegression fitted on the other folds only.

    Args:
        x, y: the features and integer labels of every image audited.
        n_classes: the number of classes (columns), including any absent from `y`.
        params: the `audit` section (folds, C).
        seed: shuffles the folds.
    """
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415
    from sklearn.model_selection import StratifiedKFold  # noqa: PLC0415
    from sklearn.pipeline import make_pipeline  # noqa: PLC0415
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

    folds = StratifiedKFold(usable_folds(y, params.folds), shuffle=True, random_state=seed)
    probs = np.zeros((len(y), n_classes), np.float64)
    for train, held_out in folds.split(x, y):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=params.C, max_iter=1000))
        model.fit(x[train], y[train])
        probs[np.ix_(held_out, model.classes_)] = model.predict_proba(x[held_out])
    return probs


def audit(data: AuditData, params: AuditParams, seed: int) -> Findings:
    """Label issues, near-duplicate pairs and outliers of the images in `data`.

    Args:
        data: the features (any float type), labels, splits, paths and class names.
        params: the `audit` section (folds, C, cleanlab's thresholds).
        seed: the cross-validation's folds.

    Returns:
        The findings, most suspect first in each list.
    """
    x = np.ascontiguousarray(data.features, dtype=np.float32)  # float16 features too
    y = np.asarray(data.labels, dtype=np.int64)
    probs = out_of_sample_probs(x, y, len(data.classes), params, seed)
    lab = _datalab(x, y, probs, params)
    return Findings(
        label_issues=_label_rows(lab, data),
        near_duplicates=_pair_rows(lab, data, x),
        outliers=_outlier_rows(lab, data),
        audited=len(y),
    )


def _datalab(x: np.ndarray, y: np.ndarray, probs: np.ndarray, params: AuditParams) -> Any:
    # Datalab stores its data in Hugging Face datasets, which imports TensorFlow (seconds)
    # unless told not to; the audit needs no deep-learning framework.
    for framework in ("USE_TF", "USE_TORCH", "USE_JAX"):
        os.environ.setdefault(framework, "0")
    logging.getLogger("datasets").setLevel(logging.WARNING)  # its INFO lines say just that
    from cleanlab import Datalab  # noqa: PLC0415

    k = max(1, min(KNN, len(y) - 1))  # a few dozen images: fewer neighbours than cleanlab's 10
    outlier: dict[str, Any] = {"k": k}
    if params.outlier_threshold is not None:
        outlier["threshold"] = params.outlier_threshold
    # n_jobs=1: cleanlab otherwise forks a multiprocessing.Pool from this process, whose
    # other threads (MLflow's system-metrics sampler) can hold a lock the child then waits on
    # forever (a stage hung so in CI); cleanlab says the result is the same for any n_jobs.
    label_kwargs = {"find_label_issues_kwargs": {"filter_by": params.label_filter, "n_jobs": 1}}
    lab = Datalab({"label": y}, label_name="label", verbosity=0)
    lab.find_issues(
        features=x,
        pred_probs=probs,
        issue_types={
            "label": {"k": k, "clean_learning_kwargs": label_kwargs},
            "near_duplicate": {"k": k, "threshold": params.near_duplicate_threshold},
            "outlier": outlier,
        },
    )
    return lab


def _label_rows(lab: Any, data: AuditData) -> list[dict[str, Any]]:
    issues = lab.get_issues("label")
    flagged = np.flatnonzero(issues["is_label_issue"].to_numpy())
    scores = issues["label_score"].to_numpy()
    suggested = issues["predicted_label"].to_numpy()
    order = flagged[np.argsort(scores[flagged], kind="stable")]  # lowest quality first
    rows = [
        {
            "path": data.paths[i],
            "split": data.splits[i],
            "given": data.classes[int(data.labels[i])],
            "suggested": data.classes[int(suggested[i])],
            "score": round(float(scores[i]), 6),
        }
        for i in order
    ]
    _warn_whole_classes(rows, data)
    return rows


def _warn_whole_classes(rows: list[dict[str, Any]], data: AuditData) -> None:
    """A class whose every image is flagged is more likely a wrong folder or a class the
    features cannot tell apart than a class of mislabelled images: say so."""
    flagged = Counter(r["given"] for r in rows)
    sizes = Counter(data.classes[int(i)] for i in data.labels)
    for name, n in flagged.items():
        if n == sizes[name]:
            log.warning(
                "audit: every image of class %r (%d) is flagged as a label issue: check that "
                "its folder or labels are the right ones, or whether the features can tell it "
                "from %r at all",
                name,
                n,
                Counter(r["suggested"] for r in rows if r["given"] == name).most_common(1)[0][0],
            )


def _pair_rows(lab: Any, data: AuditData, x: np.ndarray) -> list[dict[str, Any]]:
    sets = lab.get_issues("near_duplicate")["near_duplicate_sets"]
    pairs = {(min(i, int(j)), max(i, int(j))) for i, found in enumerate(sets) for j in found}
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    rows = [
        {
            "path_a": data.paths[i],
            "split_a": data.splits[i],
            "path_b": data.paths[j],
            "split_b": data.splits[j],
            "similarity": round(float(unit[i] @ unit[j]), 6),  # cosine, 1: the same features
        }
        for i, j in pairs
    ]
    return sorted(rows, key=lambda r: (-r["similarity"], r["path_a"], r["path_b"]))


def _outlier_rows(lab: Any, data: AuditData) -> list[dict[str, Any]]:
    issues = lab.get_issues("outlier")
    flagged = np.flatnonzero(issues["is_outlier_issue"].to_numpy())
    scores = issues["outlier_score"].to_numpy()
    order = flagged[np.argsort(scores[flagged], kind="stable")]  # most unusual first
    return [
        {"path": data.paths[i], "split": data.splits[i], "score": round(float(scores[i]), 6)}
        for i in order
    ]

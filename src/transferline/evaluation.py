"""Test-set metrics and figures, pure functions of labels and probabilities."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from transferline.errors import StageError
from transferline.files import atomic_path


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: list[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support (keys are a contract)."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support  # noqa: PLC0415

    labels = list(range(len(classes)))
    y_pred = probs.argmax(axis=1)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 6),
        "macro_f1": round(
            float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)), 6
        ),
        "n": len(y_true),
        "per_class": {
            c: {
                "precision": round(float(p[i]), 6),
                "recall": round(float(r[i]), 6),
                "f1": round(float(f[i]), 6),
                "support": int(s[i]),
            }
            for i, c in enumerate(classes)
        },
    }


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    from sklearn.metrics import confusion_matrix  # noqa: PLC0415

    return confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))


def write_predictions_csv(
    path: Path, y_true: np.ndarray, probs: np.ndarray, classes: list[str]
) -> None:
    """One row per test image (actual, predicted): the input of DVC's confusion template."""
    import csv  # noqa: PLC0415

    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["actual", "predicted", "confidence"])
        for t, row in zip(y_true, probs, strict=True):
            w.writerow([classes[int(t)], classes[int(row.argmax())], f"{float(row.max()):.6f}"])


def confusion_png(path: Path, cm: np.ndarray, classes: list[str], title: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j,
                i,
                int(cm[i, j]),
                ha="center",
                va="center",
                color="white" if cm[i, j] > cm.max() / 2 else "black",
            )
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def evaluate_models(
    raw: Path,
    splits_dir: Path,
    features_dir: Path,
    head_dir: Path,
    finetuned: Path,
    plots_dir: Path,
    *,
    image_size: int,
    batch_size: int,
) -> dict[str, Any]:
    """Test metrics of the head (on cached features) and, unless skipped, the fine-tuned model
    (on the test images); predictions CSVs and confusion PNGs into `plots_dir`."""
    from transferline import heads  # noqa: PLC0415
    from transferline.features import load_split  # noqa: PLC0415
    from transferline.files import is_skip_marker, read_json  # noqa: PLC0415

    classes = read_json(features_dir / "meta.json")["classes"]
    x_test, y_test = load_split(features_dir, "test")
    results = {"head": heads.predict_proba(head_dir, x_test)}
    if not is_skip_marker(finetuned):
        import keras  # noqa: PLC0415

        from transferline import dataset, models  # noqa: F401, PLC0415  (registers Preprocess)

        model = keras.saving.load_model(finetuned)
        paths, y_images = dataset.split_arrays(raw, splits_dir, "test", classes)
        if not np.array_equal(y_images, y_test):
            raise StageError(
                f"{splits_dir / 'test.csv'} and {features_dir / 'test_labels.npy'} disagree: "
                "the features are older than the split. Run `dvc repro` (not a single stage)."
            )
        images = dataset.make_image_dataset(paths, None, image_size, batch_size)
        results["finetune"] = model.predict(images, verbose=0)
    metrics = {}
    for name, probs in results.items():
        metrics[name] = classification_metrics(y_test, probs, classes)
        write_predictions_csv(plots_dir / f"{name}_predictions.csv", y_test, probs, classes)
        cm = confusion(y_test, probs.argmax(1), len(classes))
        title = f"{name}: test accuracy {metrics[name]['accuracy']:.3f}"
        confusion_png(plots_dir / f"{name}_confusion.png", cm, classes, title)
    return metrics

"""Test-set metrics and figures, pure functions of labels and probabilities."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferline.errors import StageError
from transferline.figures import image_grid_png, pyplot
from transferline.files import atomic_path

if TYPE_CHECKING:
    from transferline.files import DataDirs

PER_CLASS_FILE = "per_class.json"  # in plots/evaluate: {model: [one row per class]}
TOP_K = 5  # top-5 accuracy, as many-class benchmarks (ImageNet, Stanford Dogs) report it


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: list[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support (keys are a contract);
    with more than TOP_K classes also `top5_accuracy`, the share of images whose class is
    among the model's five likeliest.

    Also `balanced_accuracy`, the mean recall of the classes the test set holds (what accuracy
    hides on imbalanced data: always guessing a 90% class scores 0.9 accuracy, and 1/k here),
    and `log_loss`, the mean cross-entropy of the probabilities (how far to trust them, as the
    head's C_grid does on val).
    """
    from sklearn.metrics import (  # noqa: PLC0415
        accuracy_score,
        f1_score,
        log_loss,
        precision_recall_fscore_support,
        top_k_accuracy_score,
    )

    labels = list(range(len(classes)))
    y_pred = probs.argmax(axis=1)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    top: dict[str, float] = {}
    if len(classes) > TOP_K:
        top_k = top_k_accuracy_score(y_true, probs, k=TOP_K, labels=labels)
        top[f"top{TOP_K}_accuracy"] = round(float(top_k), 6)
    return {
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 6),
        **top,
        "balanced_accuracy": round(float(r[s > 0].mean()), 6),  # the test split is never empty
        "log_loss": round(float(log_loss(y_true, probs, labels=labels)), 6),
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


def roc_table(
    y_true: np.ndarray, probs: np.ndarray, classes: list[str], points: int = 101
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """One-vs-rest ROC curves on a common false-positive-rate grid, and each class's AUC.

    Columns: `fpr`, `tpr` (the macro average, which DVC plots per model and revision) and
    `tpr_<class>`. A class absent from the test set has no curve (its column is left out).

    Args:
        y_true, probs: labels and class probabilities.
        classes: the class names.
        points: the false-positive-rate grid's size.

    Returns:
        The table's rows and each class's AUC.
    """
    from sklearn.metrics import roc_auc_score, roc_curve  # noqa: PLC0415

    grid = np.linspace(0.0, 1.0, points)
    columns: dict[str, np.ndarray] = {}
    auc: dict[str, float] = {}
    for i, c in enumerate(classes):
        positive = y_true == i
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, i])
        columns[f"tpr_{c}"] = np.interp(grid, fpr, tpr)
        auc[c] = round(float(roc_auc_score(positive, probs[:, i])), 6)
    macro = np.mean(list(columns.values()), axis=0) if columns else np.full_like(grid, np.nan)
    rows = [
        {
            "fpr": round(float(x), 4),
            "tpr": round(float(macro[j]), 6),
            **{k: round(float(v[j]), 6) for k, v in columns.items()},
        }
        for j, x in enumerate(grid)
    ]
    return rows, auc


def worst_misclassified(
    y_true: np.ndarray, probs: np.ndarray, k: int = 16
) -> list[tuple[int, int, float]]:
    """(index, predicted, confidence) of the k wrong predictions made with most confidence."""
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != y_true)
    conf = probs[wrong, pred[wrong]]
    order = wrong[np.argsort(-conf, kind="stable")][:k]
    return [(int(i), int(pred[i]), float(probs[i, pred[i]])) for i in order]


MAX_LEGEND = 10  # classes named in the ROC figure's legend; beyond, the macro average
MAX_CELL_TEXT = 30  # classes whose confusion-matrix cells show their counts


def roc_png(path: Path, rows: list[dict[str, float]], auc: dict[str, float], title: str) -> None:
    """The ROC curves of `rows` (`roc_table`) as a PNG at `path`.

    Args:
        path: the PNG to write.
        rows, auc: `roc_table`'s output.
        title: the figure's title.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    fpr = [r["fpr"] for r in rows]
    many = len(auc) > MAX_LEGEND  # a legend of every class would cover the plot
    for c, a in auc.items():
        tpr = [r[f"tpr_{c}"] for r in rows]
        if many:
            ax.plot(fpr, tpr, color="0.75", linewidth=0.5)
        else:
            ax.plot(fpr, tpr, label=f"{c} (AUC {a:.3f})")
    if many:
        mean_auc = float(np.mean(list(auc.values())))
        label = f"macro average, {len(auc)} classes (AUC {mean_auc:.3f})"
        ax.plot(fpr, [r["tpr"] for r in rows], color="C0", linewidth=2, label=label)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    if auc:
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    from sklearn.metrics import confusion_matrix  # noqa: PLC0415

    return confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))


def write_predictions_csv(
    path: Path, y_true: np.ndarray, probs: np.ndarray, classes: list[str]
) -> None:
    """One row per test image (actual, predicted): the input of DVC's confusion template.

    Args:
        path: the CSV to write.
        y_true, probs: labels and class probabilities.
        classes: the class names.
    """
    import csv  # noqa: PLC0415

    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["actual", "predicted", "confidence"])
        for t, row in zip(y_true, probs, strict=True):
            w.writerow([classes[int(t)], classes[int(row.argmax())], f"{float(row.max()):.6f}"])


def confusion_png(path: Path, cm: np.ndarray, classes: list[str], title: str) -> None:
    """The confusion matrix as a heat map, counts in the cells up to MAX_CELL_TEXT classes.

    The figure stops growing at 24 inches and the class names shrink (a figure grown with the
    class count would take minutes and gigabytes for hundreds of classes); `dvc plots` draws
    the counts from the predictions CSV at any size.

    Args:
        path: the PNG to write.
        cm: the confusion matrix.
        classes: the class names.
        title: the figure's title.
    """
    plt = pyplot()
    n = len(classes)
    size = min(24.0, max(4.0, 0.5 * n + 2))
    font = min(10.0, max(2.0, 400 / max(n, 1)))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45 if n <= 40 else 90, ha="right", fontsize=font)
    ax.set_yticks(range(n), classes, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    if n <= MAX_CELL_TEXT:
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


def class_names(features_dir: Path) -> list[str]:
    from transferline.files import read_json  # noqa: PLC0415

    return read_json(Path(features_dir) / "meta.json")["classes"]


@dataclass(frozen=True)
class EvaluatedImages:
    """The test split as evaluate feeds it: image paths, labels, EXIF turns, pixel size."""

    paths: list[str]
    labels: np.ndarray
    orientations: np.ndarray | None
    image_size: int


def write_figures(
    plots_dir: Path, name: str, probs: np.ndarray, test: EvaluatedImages, classes: list[str]
) -> dict[str, float]:
    """Predictions CSV, confusion matrix, ROC curves and the worst misclassified images of one
    model into `plots_dir`; returns the one-vs-rest ROC AUC of each class in the test set.

    Args:
        plots_dir: where the files go.
        name: the model (`head`, `finetune`).
        probs: its class probabilities on the test images.
        test: the test images.
        classes: the class names.
    """
    from transferline import images  # noqa: PLC0415
    from transferline.files import write_csv  # noqa: PLC0415

    y_test, paths, orientations = test.labels, test.paths, test.orientations
    write_predictions_csv(plots_dir / f"{name}_predictions.csv", y_test, probs, classes)
    accuracy = float((probs.argmax(1) == y_test).mean())
    title = f"{name}: test accuracy {accuracy:.3f}"
    cm = confusion(y_test, probs.argmax(1), len(classes))
    confusion_png(plots_dir / f"{name}_confusion.png", cm, classes, title)
    rows, auc = roc_table(y_test, probs, classes)
    write_csv(plots_dir / f"{name}_roc.csv", rows)
    roc_png(plots_dir / f"{name}_roc.png", rows, auc, f"{name}: ROC, one vs rest")
    worst = worst_misclassified(y_test, probs)
    pictures = []
    if worst:
        picked = [i for i, _, _ in worst]
        turns = None if orientations is None else [orientations[i] for i in picked]
        ds = images.make_image_dataset(
            [paths[i] for i in picked], None, test.image_size, 16, orientations=turns
        )
        pictures = list(np.concatenate(list(ds)))
    captions = [
        f"{Path(paths[i]).name[:22]}\n{classes[int(y_test[i])]} -> {classes[p]} ({c:.2f})"
        for i, p, c in worst
    ]
    image_grid_png(
        plots_dir / f"{name}_misclassified.png",
        pictures,
        captions,
        f"{name}: most confident mistakes (true -> predicted)",
    )
    return auc


def split_report(report: dict[str, Any], auc: dict[str, float]) -> tuple[dict, list[dict]]:
    """A model's `classification_metrics` and per-class AUCs as its headline scalars (with the
    macro AUC as `roc_auc`) and one row per class (`class`, precision, recall, f1, support,
    roc_auc: empty for a class absent from the test set).

    The headline scalars are what DVC tracks as metrics; the rows are plain outputs and an
    MLflow table, so `dvc exp show` does not grow a column per class.
    """
    headline = {k: v for k, v in report.items() if k not in ("per_class", "n")}
    # Macro one-vs-rest AUC over the classes present in the test set (None if < 2).
    headline["roc_auc"] = round(float(np.mean(list(auc.values()))), 6) if auc else None
    rows = [{"class": c, **v, "roc_auc": auc.get(c, "")} for c, v in report["per_class"].items()]
    return headline, rows


def evaluate_models(
    data: DataDirs,
    head_dir: Path,
    finetuned: Path,
    plots_dir: Path,
    image_size: int,
    batch_size: int,
) -> tuple[dict[str, Any], Any]:
    """Test metrics of the head (on cached features) and, unless skipped, the fine-tuned model
    (on the test images); per-model figures and tables into `plots_dir`.

    Args:
        data: the raw images, the split manifests and the cached features.
        head_dir, finetuned: train_head's head and finetune's model (or its skip marker).
        plots_dir: where predictions, per-class reports and figures go.
        image_size, batch_size: how the test images are fed to the fine-tuned model.

    Returns:
        The headline metrics of each model (`{"head": {...}, "finetune": {...}}`) and the
        fine-tuned Keras model (None when fine-tuning was skipped); each model's per-class
        figures go to `{name}_report.csv` and, for both, `per_class.json` in `plots_dir`.
    """
    from transferline import heads, images  # noqa: PLC0415
    from transferline.feature_files import load_split, read_meta  # noqa: PLC0415
    from transferline.files import is_skip_marker, write_csv, write_json  # noqa: PLC0415

    classes = read_meta(data.features)["classes"]
    x_test, y_test = load_split(data.features, "test")
    paths, y_images, turns = images.split_arrays(data.raw, data.splits, "test", classes)
    if not np.array_equal(y_images, y_test):
        raise StageError(
            f"{data.splits / 'test.csv'} and {data.features / 'test_labels.npy'} disagree: "
            "the features are older than the split. Run `dvc repro` (not a single stage)."
        )
    test = EvaluatedImages(paths, y_test, turns, image_size)
    results = {"head": heads.predict_proba(head_dir, x_test)}
    model = None
    if not is_skip_marker(finetuned):
        model, results["finetune"] = _finetuned_probabilities(finetuned, test, batch_size)
    metrics: dict[str, Any] = {}
    per_class: dict[str, list[dict]] = {}
    for name, probs in results.items():
        auc = write_figures(plots_dir, name, probs, test, classes)
        report = classification_metrics(y_test, probs, classes)
        metrics[name], per_class[name] = split_report(report, auc)
        write_csv(plots_dir / f"{name}_report.csv", per_class[name])
    write_json(plots_dir / PER_CLASS_FILE, per_class)
    return metrics, model


def _finetuned_probabilities(path: Path, test: EvaluatedImages, batch_size: int) -> tuple[Any, Any]:
    """The fine-tuned model saved at `path`, and its probabilities on the test images."""
    import keras  # noqa: PLC0415

    from transferline import images, models, runtime  # noqa: PLC0415  (models: Preprocess)

    model = keras.saving.load_model(path)
    batches = images.make_image_dataset(
        test.paths, None, test.image_size, batch_size, orientations=test.orientations
    )
    # Run forward with BatchNormalization folded, as extract does; export the model itself.
    with runtime.memory_for_batches("extract.batch_size", batch_size):
        return model, models.fold_nested_base(model).predict(batches, verbose=0)

import csv

import numpy as np

from transferline import evaluation


def test_metrics_on_known_predictions(tmp_path):
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.eye(3)[[0, 1, 1, 1, 2, 0]]
    m = evaluation.classification_metrics(y, probs, ["a", "b", "c"])
    assert m["accuracy"] == round(4 / 6, 6)
    assert m["per_class"]["b"] == {
        "precision": round(2 / 3, 6),
        "recall": 1.0,
        "f1": 0.8,
        "support": 2,
    }
    assert m["macro_f1"] == round(np.mean([0.5, 0.8, round(2 / 3, 6)]), 6)
    cm = evaluation.confusion(y, probs.argmax(1), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    evaluation.write_predictions_csv(tmp_path / "p.csv", y, probs, ["a", "b", "c"])
    with (tmp_path / "p.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[1] == {"actual": "a", "predicted": "b", "confidence": "1.000000"}
    evaluation.confusion_png(tmp_path / "cm.png", cm, ["a", "b", "c"], "t")
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
    assert "top5_accuracy" not in m  # 3 classes: always 1


def test_balanced_accuracy_and_log_loss_on_imbalanced_data():
    """Always guessing the 9-in-10 class: accuracy 0.9, balanced accuracy 0.5 (the recall of
    each class, averaged); log loss is the mean -log of each true class's probability."""
    y = np.array([0] * 9 + [1])
    probs = np.tile([0.8, 0.2], (10, 1))
    m = evaluation.classification_metrics(y, probs, ["common", "rare"])
    assert m["accuracy"] == 0.9 and m["balanced_accuracy"] == 0.5
    assert m["log_loss"] == round(-(9 * np.log(0.8) + np.log(0.2)) / 10, 6)
    # A class the test set lacks counts in neither; log loss still knows every class.
    probs3 = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.4, 0.1]])
    m = evaluation.classification_metrics(np.array([0, 1, 1]), probs3, ["a", "b", "c"])
    assert m["balanced_accuracy"] == 0.75  # recall a 1, b 1/2; c has no test image
    assert m["log_loss"] == round(-(np.log(0.7) + np.log(0.6) + np.log(0.4)) / 3, 6)


def test_top5_accuracy_with_many_classes():
    """Class 0 ranked 1st, 5th and 6th: top-1 right once, top-5 twice."""
    classes = [f"c{i}" for i in range(8)]
    ranks = np.arange(8, 0, -1, dtype=float)  # class 0 likeliest, then 1, 2, ...
    probs = np.stack([ranks, np.roll(ranks, 5), np.roll(ranks, 3)])
    probs /= probs.sum(1, keepdims=True)
    m = evaluation.classification_metrics(np.zeros(3, int), probs, classes)
    assert m["accuracy"] == round(1 / 3, 6) and m["top5_accuracy"] == round(2 / 3, 6)


def png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:4] == b"\x89PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_figures_stay_bounded_with_many_classes(tmp_path):
    # CUB-200: the confusion figure grew with the class count (10,200 px square, 3.6 GB).
    for n, side in ((3, 400), (20, 1200), (200, 2400)):
        cm = np.arange(n * n).reshape(n, n) % 7
        evaluation.confusion_png(tmp_path / "cm.png", cm, [f"c{i}" for i in range(n)], "t")
        assert png_size(tmp_path / "cm.png") == (side, side)
    y = np.arange(12).repeat(2)
    probs = np.random.default_rng(0).dirichlet(np.ones(12), len(y))
    rows, auc = evaluation.roc_table(y, probs, [f"c{i}" for i in range(12)])
    evaluation.roc_png(tmp_path / "roc.png", rows, auc, "t")  # the macro average's legend
    assert png_size(tmp_path / "roc.png") == (500, 500)


def test_roc_table_and_auc_on_known_scores():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    rows, auc = evaluation.roc_table(y, probs, ["a", "b"], points=11)
    assert auc == {"a": 0.75, "b": 0.75}  # 3 of 4 positive/negative pairs ranked right
    assert rows[0]["fpr"] == 0.0 and rows[-1]["fpr"] == 1.0 and len(rows) == 11
    assert rows[-1]["tpr_a"] == 1.0 and rows[-1]["tpr"] == 1.0
    assert all(r["tpr"] == (r["tpr_a"] + r["tpr_b"]) / 2 for r in rows)
    # A class missing from the test set has no curve and no AUC.
    rows, auc = evaluation.roc_table(np.array([0, 1]), np.eye(3)[[0, 1]], ["a", "b", "c"])
    assert set(auc) == {"a", "b"} and "tpr_c" not in rows[0]


def test_worst_misclassified_are_the_most_confident_mistakes(tmp_path):
    y = np.array([0, 1, 1, 0, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.95, 0.05], [0.2, 0.8], [0.1, 0.9]])
    assert evaluation.worst_misclassified(y, probs) == [(2, 0, 0.95), (3, 1, 0.8), (1, 0, 0.6)]
    assert evaluation.worst_misclassified(y, probs, k=1) == [(2, 0, 0.95)]
    assert evaluation.worst_misclassified(np.array([0]), np.array([[1.0, 0.0]])) == []
    imgs = [np.full((8, 8, 3), 100.0)]
    evaluation.image_grid_png(tmp_path / "w.png", imgs, ["a\na -> b (0.9)"], "t")
    evaluation.image_grid_png(tmp_path / "none.png", [], [], "t")
    assert (tmp_path / "w.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "none.png").read_bytes()[:4] == b"\x89PNG"

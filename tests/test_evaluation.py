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

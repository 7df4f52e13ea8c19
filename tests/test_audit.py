"""The audit on features you generate: planted label errors and near-duplicates are found, a
clean set gets few flags, and small or awkward data sets have a documented fallback."""

from __future__ import annotations

import logging
import sys

import numpy as np

from transferline import audit
from transferline.params import AuditParams

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import audit_quality

PARAMS = AuditParams()


def clusters(per_class: int, n_classes: int = 4, dim: int = 32, seed: int = 0) -> audit.AuditData:
    """Well-separated Gaussian classes, split 60/20/20 in order within each class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 4
    labels = np.repeat(np.arange(n_classes), per_class)
    x = centres[labels] + rng.normal(size=(len(labels), dim))
    cut = [per_class * 6 // 10, per_class * 8 // 10]
    splits = [
        ("train", "val", "test")[int(np.searchsorted(cut, i % per_class, "right"))]
        for i in range(len(labels))
    ]
    paths = [f"c{c}/{i:04d}.png" for i, c in enumerate(labels)]
    return audit.AuditData(x, labels, splits, paths, [f"c{c}" for c in range(n_classes)])


def test_planted_label_flips_are_ranked_first_and_flagged():
    data = clusters(per_class=60)
    rng = np.random.default_rng(1)
    flipped = rng.choice(len(data.labels), 12, replace=False)  # 5%
    labels = data.labels.copy()
    labels[flipped] = (labels[flipped] + 1) % 4
    found = audit.audit(
        audit.AuditData(data.features, labels, data.splits, data.paths, data.classes), PARAMS, 0
    )
    planted = {data.paths[i] for i in flipped}
    top = [r["path"] for r in found.label_issues[: len(planted)]]
    assert len(set(top) & planted) >= 0.9 * len(planted)  # precision at k
    flagged = {r["path"] for r in found.label_issues}
    assert len(flagged & planted) >= 0.9 * len(planted)  # recall
    assert len(flagged - planted) <= 3
    row = next(r for r in found.label_issues if r["path"] == data.paths[flipped[0]])
    assert row["given"] == data.classes[labels[flipped[0]]]
    assert row["suggested"] == data.classes[data.labels[flipped[0]]]


def test_planted_copies_are_paired_and_cross_split_pairs_are_counted_apart():
    data = clusters(per_class=50)
    rng = np.random.default_rng(2)
    originals = rng.choice(len(data.labels), 10, replace=False)
    copies = data.features[originals] + rng.normal(scale=0.01, size=(10, data.features.shape[1]))
    both = audit.AuditData(
        np.vstack([data.features, copies]),
        np.concatenate([data.labels, data.labels[originals]]),
        data.splits + ["test"] * 10,
        data.paths + [f"copy/{i}.jpg" for i in range(10)],
        data.classes,
    )
    found = audit.audit(both, PARAMS, 0)
    pairs = {frozenset((p["path_a"], p["path_b"])) for p in found.near_duplicates}
    planted = {frozenset((data.paths[o], f"copy/{i}.jpg")) for i, o in enumerate(originals)}
    assert len(pairs & planted) >= 9 and len(pairs - planted) <= 2
    assert all(p["similarity"] > 0.99 for p in found.near_duplicates[:9])
    cross = sum(data.splits[o] != "test" for o in originals)
    assert found.metrics()["cross_split_pairs"] == sum(
        p["split_a"] != p["split_b"] for p in found.near_duplicates
    )
    assert found.metrics()["cross_split_pairs"] >= cross - 1


def test_a_clean_set_gets_few_flags():
    found = audit.audit(clusters(per_class=60), PARAMS, 0)
    counts = found.metrics()
    assert counts["images_audited"] == 240
    assert counts["label_issues"] <= 3 and counts["near_duplicate_pairs"] == 0


def test_a_class_with_fewer_images_than_folds_gets_fewer_folds(caplog):
    data = clusters(per_class=30, n_classes=3)
    keep = np.concatenate([np.flatnonzero(data.labels != 2), np.flatnonzero(data.labels == 2)[:3]])
    small = audit.AuditData(
        data.features[keep], data.labels[keep], [data.splits[i] for i in keep],
        [data.paths[i] for i in keep], data.classes,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="transferline.audit"):
        found = audit.audit(small, PARAMS, 0)
    assert "smallest class has 3 images: cross-validating with 3 folds" in caplog.text
    assert found.metrics()["images_audited"] == 63


def test_two_classes_a_few_dozen_images_and_float16_features():
    data = clusters(per_class=12, n_classes=2)
    found32 = audit.audit(data, PARAMS, 0)
    half = audit.AuditData(
        data.features.astype(np.float16), data.labels, data.splits, data.paths, data.classes
    )
    found16 = audit.audit(half, PARAMS, 0)
    assert found16.metrics()["images_audited"] == 24
    assert found16.metrics()["label_issues"] == found32.metrics()["label_issues"]


def test_a_class_whose_every_image_is_flagged_is_named_in_a_warning(caplog):
    data = clusters(per_class=40, n_classes=3)
    x = data.features.copy()
    moved = np.flatnonzero(data.labels == 2)[:6]  # a tiny class "c3" inside c0's cluster
    noise = np.random.default_rng(3).normal(size=(6, x.shape[1]))
    x[moved] = data.features[data.labels == 0].mean(0) + noise  # drawn as c0's images are
    labels = data.labels.copy()
    labels[moved] = 3
    odd = audit.AuditData(x, labels, data.splits, data.paths, [*data.classes, "c3"])
    # cleanlab's default filter trusts a class's own low confidence; this one flags every
    # image whose likeliest class is another
    strict = PARAMS.model_copy(update={"label_filter": "predicted_neq_given"})
    with caplog.at_level(logging.WARNING, logger="transferline.audit"):
        found = audit.audit(odd, strict, 0)
    assert [r["suggested"] for r in found.label_issues if r["given"] == "c3"] == ["c0"] * 6
    assert "every image of class 'c3' (6) is flagged" in caplog.text
    assert "tell it from 'c0'" in caplog.text


def test_on_real_features_the_audit_matches_plain_cleanlab_and_finds_the_copies(tmp_path):
    raw = tmp_path / "raw"
    planted = audit_quality.planted_digits(raw, per_class=40, flip=0.05, copies=15, seed=0)
    data = audit_quality.features_of(raw, tmp_path, seed=0)
    found = audit.audit(data, PARAMS, 0)
    base = audit_quality.baseline_ranking(data, PARAMS, 0)
    result = audit_quality.scores(data, found, planted, base)
    assert result["planted_errors"] == 20 and result["planted_pairs"] == 15
    assert result["audit_precision_at_k"] >= result["baseline_precision_at_k"]
    assert result["audit_precision_at_k"] >= 0.75
    assert result["flagged_recall"] >= 0.85
    assert result["pair_recall"] >= 0.9
    assert result["pairs_found"] <= 15 + 3  # few pairs besides the planted ones


def test_the_audit_forks_no_process_pool(monkeypatch):
    """A pool forked from a stage whose other threads hold locks can hang forever (a CI run
    did): cleanlab must run in this process."""
    import multiprocessing

    def no_pool(*args, **kwargs):
        raise AssertionError("cleanlab forked a multiprocessing.Pool")

    monkeypatch.setattr(multiprocessing, "Pool", no_pool)
    assert audit.audit(clusters(per_class=30), PARAMS, 0).metrics()["images_audited"] == 120

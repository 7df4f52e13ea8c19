"""The audit's edges: features and manifests in; CSVs, grids, metrics, the MLflow run and the
terminal summary out; the audit stage with `audit.enabled` on and off."""

from __future__ import annotations

import csv
import importlib.util
import json

import mlflow
import numpy as np
import pytest
from PIL import Image

from transferline import audit_report, cli, stagekit, tracking
from transferline.audit import Findings
from transferline.errors import StageError
from transferline.params_files import load_params

from conftest import REPO


def stage_module():
    spec = importlib.util.spec_from_file_location("audit_stage", REPO / "stages" / "audit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """Three classes of 20 images in data/raw, split, with features a copy of one image in
    test, and the params of that model."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rng = np.random.default_rng(0)
    classes = ["ant", "bee", "cat"]
    rows = {"train": [], "val": [], "test": []}
    feats = {"train": [], "val": [], "test": []}
    for c, name in enumerate(classes):
        centre = rng.normal(size=16) * 5
        for i in range(20):
            path = f"set/{name}/{i:02d}.png"
            (stagekit.RAW / path).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12, 10), (40 * c, 8 * i, 90)).save(stagekit.RAW / path)
            split = "train" if i < 12 else "val" if i < 16 else "test"
            rows[split].append((path, name, c))
            feats[split].append(centre + rng.normal(size=16))
    feats["test"][3] = feats["train"][0] + 1e-4  # ant/19: a copy of ant/00, across splits
    stagekit.SPLITS.mkdir(parents=True)
    stagekit.FEATURES.mkdir(parents=True)
    for split, items in rows.items():
        with (stagekit.SPLITS / f"{split}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            w.writerows((p, n) for p, n, _ in items)
        np.save(stagekit.FEATURES / f"{split}_features.npy", np.array(feats[split], np.float16))
        np.save(stagekit.FEATURES / f"{split}_labels.npy", np.array([c for *_, c in items]))
    meta = {"classes": classes, "backbone": "vgg16", "weights": "none", "image_size": 32}
    (stagekit.FEATURES / "meta.json").write_text(json.dumps({**meta, "pooling": "avg"}))
    params = load_params(REPO / "params.yaml")
    model = params.model.model_copy(update={"weights": "none", "image_size": 32})
    return params.model_copy(update={"model": model})


def test_features_and_manifests_load_in_split_order(workspace):
    data = audit_report.load_audit_data(stagekit.DATA)
    assert data.features.shape == (60, 16) and data.features.dtype == np.float16
    assert data.splits[:36] == ["train"] * 36 and data.splits[-12:] == ["test"] * 12
    assert data.paths[0] == "set/ant/00.png" and data.classes == ["ant", "bee", "cat"]


def test_manifests_newer_than_the_features_are_one_paragraph(workspace):
    with (stagekit.SPLITS / "test.csv").open("a") as f:
        f.write("set/cat/99.png,cat\n")
    with pytest.raises(StageError, match="the features are older than the split"):
        audit_report.load_audit_data(stagekit.DATA)


def test_the_stage_writes_the_contracts_grids_metrics_and_the_run(workspace):
    stage_module().run(workspace)
    found = audit_report.read_findings(stagekit.AUDIT)
    for name, columns in audit_report.COLUMNS.items():
        with (stagekit.AUDIT / name).open(newline="") as f:
            assert next(csv.reader(f)) == columns
    pair = found["near_duplicates.csv"][0]
    assert {pair["path_a"], pair["path_b"]} == {"set/ant/00.png", "set/ant/19.png"}
    assert {pair["split_a"], pair["split_b"]} == {"train", "test"}
    metrics = json.loads((stagekit.METRICS / "audit.json").read_text())
    assert metrics["images_audited"] == 60 and metrics["cross_split_pairs"] >= 1
    assert set(metrics) == {
        "images_audited", "label_issues", "label_issues_test", "near_duplicate_pairs",
        "cross_split_pairs", "outliers",
    }  # fmt: skip
    pngs = {p.name for p in (stagekit.PLOTS / "audit").glob("*.png")}
    assert pngs == {"label_issues.png", "cross_split_duplicates.png", "outliers.png"}
    client = mlflow.MlflowClient(tracking.tracking_uri())
    exp = client.get_experiment_by_name(workspace.mlflow.experiment)
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.metrics["audit.cross_split_pairs"] == metrics["cross_split_pairs"]
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "audit")}
    assert "audit/label_issues.csv" in logged
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots/audit")} >= {
        "plots/audit/outliers.png"
    }


def test_disabled_the_stage_writes_empty_outputs_and_audits_nothing(workspace):
    off = workspace.model_copy(
        update={"audit": workspace.audit.model_copy(update={"enabled": False})}
    )
    for path in stagekit.FEATURES.glob("*.npy"):
        path.unlink()  # not even read
    stage_module().run(off)
    assert all(rows == [] for rows in audit_report.read_findings(stagekit.AUDIT).values())
    assert json.loads((stagekit.METRICS / "audit.json").read_text()) == {}
    assert list((stagekit.PLOTS / "audit").iterdir()) == []


def test_findings_with_none_found_are_headers_only(tmp_path):
    audit_report.write_findings(Findings(audited=5), tmp_path)
    assert (tmp_path / "outliers.csv").read_text().splitlines() == ["path,split,score"]


def test_the_terminal_summary_lists_the_top_findings(workspace, capsys):
    stage_module().run(workspace)
    assert cli.main(["audit", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "Near-duplicate pairs: " in out and "set/ant/19.png" in out
    assert "data.exclude_file" in out


def test_the_terminal_summary_before_the_stage_ran_is_one_paragraph(tmp_path, capsys):
    assert cli.main(["audit", "--folder", str(tmp_path / "none")]) == 2
    assert "the audit stage writes it. Run `dvc repro audit`" in capsys.readouterr().err

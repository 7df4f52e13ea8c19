"""The audit's edges: the cached features and manifests in, the CSVs, grids and a terminal
summary out (data/audit/, plots/audit/, `transferline audit`)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np

from transferline.audit import AuditData, Findings
from transferline.errors import StageError
from transferline.feature_files import load_split, read_meta
from transferline.files import DataDirs, write_csv
from transferline.images import read_manifest

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# The CSV contracts: file -> columns (paths as data/splits/*.csv list them).
COLUMNS = {
    "label_issues.csv": ["path", "split", "given", "suggested", "score"],
    "near_duplicates.csv": ["path_a", "split_a", "path_b", "split_b", "similarity"],
    "outliers.csv": ["path", "split", "score"],
}
GRID = 16  # images (or pairs) per grid
THUMB = 96  # px


def load_audit_data(data: DataDirs) -> AuditData:
    """Every split's features with its manifest's paths, train, val and test in turn."""
    xs, ys, splits, paths = [], [], [], []
    for split in SPLITS:
        x, y = load_split(data.features, split)
        manifest = [path for path, _ in read_manifest(data.splits / f"{split}.csv")]
        if len(manifest) != len(y):
            raise StageError(
                f"{data.splits / f'{split}.csv'} lists {len(manifest)} images but "
                f"{data.features} holds features of {len(y)}: the features are older than the "
                f"split. Run `dvc repro` (not a single stage)."
            )
        xs.append(x)
        ys.append(y)
        splits += [split] * len(y)
        paths += manifest
    return AuditData(
        np.concatenate(xs), np.concatenate(ys), splits, paths, read_meta(data.features)["classes"]
    )


def write_findings(findings: Findings | None, out: Path) -> None:
    """The three CSVs into `out` (a header only where nothing was found, or not audited)."""
    lists = {
        "label_issues.csv": findings.label_issues if findings else [],
        "near_duplicates.csv": findings.near_duplicates if findings else [],
        "outliers.csv": findings.outliers if findings else [],
    }
    for name, rows in lists.items():
        write_csv(out / name, rows, COLUMNS[name])


def write_grids(findings: Findings, raw: Path, out: Path) -> None:
    """PNG grids of the most suspect label issues (given -> suggested), the closest
    cross-split pairs side by side and the most unusual images, into `out`.

    Args:
        findings: the audit's findings.
        raw: the folder the paths are relative to (data/raw).
        out: where the PNGs go.
    """
    from transferline.figures import image_grid_png  # noqa: PLC0415

    issues = findings.label_issues[:GRID]
    image_grid_png(
        out / "label_issues.png",
        [_thumbnail(raw / r["path"]) for r in issues],
        [
            f"{_short(r['path'])}\n{r['given']} -> {r['suggested']} ({r['score']:.2f})"
            for r in issues
        ],
        "audit: likeliest label errors (given -> suggested)",
        "no label issues found",
    )
    cross = [p for p in findings.near_duplicates if p["split_a"] != p["split_b"]][:GRID]
    image_grid_png(
        out / "cross_split_duplicates.png",
        [np.hstack([_thumbnail(raw / p["path_a"]), _thumbnail(raw / p["path_b"])]) for p in cross],
        [
            f"{p['split_a']} | {p['split_b']} ({p['similarity']:.3f})\n{_short(p['path_a'])}"
            for p in cross
        ],
        "audit: near-duplicates across splits (leakage)",
        "no near-duplicates across splits",
    )
    odd = findings.outliers[:GRID]
    image_grid_png(
        out / "outliers.png",
        [_thumbnail(raw / r["path"]) for r in odd],
        [f"{_short(r['path'])}\n{r['split']} ({r['score']:.3f})" for r in odd],
        "audit: most unusual images",
        "no outliers found",
    )


def _short(path: str) -> str:
    return Path(path).name[:22]


def _thumbnail(path: Path) -> np.ndarray:
    """The image upright (EXIF), RGB, THUMB x THUMB: for looking at, not for the model."""
    from PIL import Image, ImageOps  # noqa: PLC0415

    from transferline.images import pil_quiet, read_heif  # noqa: PLC0415

    read_heif()
    with pil_quiet(), Image.open(path) as img:
        img.seek(0)
        rgb = ImageOps.exif_transpose(img).convert("RGB")
        return np.asarray(rgb.resize((THUMB, THUMB)))


def read_findings(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """The audit's CSVs as rows (file name -> rows); a missing file is an error naming the
    stage that writes it."""
    out = {}
    for name in COLUMNS:
        path = Path(folder) / name
        if not path.is_file():
            raise StageError(
                f"{path} is missing: the audit stage writes it. Run `dvc repro audit`."
            )
        with path.open(newline="") as f:
            out[name] = list(csv.DictReader(f))
    return out


def summary(findings: dict[str, list[dict[str, Any]]], top: int = 10) -> str:
    """The top findings of each kind as plain text, for a terminal."""
    issues = findings["label_issues.csv"]
    pairs = findings["near_duplicates.csv"]
    cross = [p for p in pairs if p["split_a"] != p["split_b"]]
    odd = findings["outliers.csv"]
    test = sum(r["split"] == "test" for r in issues)
    lines = [f"Label issues: {len(issues)} ({test} in test), likeliest first:"]
    lines += [
        f"  {r['score']}  {r['path']}  [{r['split']}]  {r['given']} -> {r['suggested']}"
        for r in issues[:top]
    ]
    lines += [f"Near-duplicate pairs: {len(pairs)}, {len(cross)} across splits (leakage):"]
    lines += [
        f"  {p['similarity']}  {p['path_a']} [{p['split_a']}]  ~  {p['path_b']} [{p['split_b']}]"
        for p in (cross or pairs)[:top]
    ]
    lines += [f"Outliers: {len(odd)}, most unusual first:"]
    lines += [f"  {r['score']}  {r['path']}  [{r['split']}]" for r in odd[:top]]
    return "\n".join(lines)

"""Shared fixtures: tiny generated images, never real data sets."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]


def make_image(
    path: Path,
    color: tuple[int, int, int],
    size: int = 16,
    fmt: str = "PNG",
    mode: str = "RGB",
    seed: int = 0,
) -> Path:
    """A small image of one dominant colour plus noise (noise keeps every file's bytes unique)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color)[None, None, :] + rng.integers(-20, 20, (size, size, 3)), 0, 255)
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def seed_of(*parts: object) -> int:
    """A stable per-file seed (Python's hash() changes between processes)."""
    return zlib.crc32(repr(parts).encode())


COLORS = {"cat": (200, 40, 40), "dog": (40, 40, 200), "owl": (40, 200, 40)}


def make_class_folders(
    root: Path, per_class: int = 10, classes=("cat", "dog"), ext: str = "png"
) -> Path:
    fmt = {"png": "PNG", "jpg": "JPEG"}[ext]
    for c in classes:
        for i in range(per_class):
            make_image(root / c / f"{c}{i:03d}.{ext}", COLORS[c], fmt=fmt, seed=seed_of(c, i))
    return root


@pytest.fixture
def class_folders(tmp_path: Path) -> Path:
    return make_class_folders(tmp_path / "pets")

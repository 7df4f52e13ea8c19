"""Shared fixtures: tiny generated images, never real data sets."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (pyproject.toml): one worker per usable core, at most 4. Each worker imports
    TensorFlow and the end-to-end tests start DVC stages of their own: the cap bounds their
    memory on a big machine."""
    from transferline.images import usable_cpus

    return max(1, min(4, usable_cpus()))


def refused_uri() -> str:
    """An http tracking URI (with credentials in it) where nothing listens: a port just freed."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://user:secret@127.0.0.1:{port}"


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


def save_turned(path: Path, upright: np.ndarray, orientation: int, fmt: str = "PNG") -> Path:
    """Store `upright` as a camera would: the pixels as the sensor read them, and the EXIF
    orientation tag (0x0112) that says how to turn them back."""
    from PIL import Image, ImageOps

    t = Image.Transpose  # the inverse of each orientation's turn (6 and 8 swap)
    stored = {2: t.FLIP_LEFT_RIGHT, 3: t.ROTATE_180, 4: t.FLIP_TOP_BOTTOM, 5: t.TRANSPOSE}
    stored |= {6: t.ROTATE_90, 7: t.TRANSVERSE, 8: t.ROTATE_270}
    img = Image.fromarray(upright)
    if orientation > 1:
        img = img.transpose(stored[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, exif=exif, quality=95)
    if fmt == "PNG":  # lossless: PIL turns it back exactly
        with Image.open(path) as back:
            assert np.array_equal(np.asarray(ImageOps.exif_transpose(back)), upright)
    return path


def randomize_batchnorm(model, seed: int = 1) -> None:
    """Statistics away from the defaults (mean 0, variance 1), so folding really is tested,
    yet near enough that a deep random net stays well conditioned (wider ranges made the
    deepest EfficientNets chaotic: a batch of 1 and of 2 then differed by 30-70%)."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0, 0.1, shape))
            layer.moving_variance.assign(rng.uniform(0.8, 1.25, shape))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.9, 1.1, shape))
            if layer.center:
                layer.beta.assign(rng.normal(0, 0.05, shape))


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


def split(root: Path, **kw):
    """`dataset.build_split` with the tests' defaults (val and test 0.2, seed 1, one worker)."""
    from transferline import dataset

    rel_to = kw.pop("rel_to", None)
    spec = dataset.SplitSpec(**{"val": 0.2, "test": 0.2, "seed": 1, **kw})
    return dataset.build_split(root, spec, rel_to=rel_to, workers=1)


def add_broken_files(folder: Path) -> dict[str, str]:
    """One file of each broken kind plus system files; returns name -> expected reason part."""
    (folder / "empty.jpg").write_bytes(b"")
    good = make_image(folder / "tmp_full.jpg", (9, 9, 9), size=64, fmt="JPEG")
    data = good.read_bytes()
    good.unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "notes.txt").write_text("not an image")
    make_image(folder / "scan.ppm", (5, 5, 5), fmt="PPM")
    (folder / ".DS_Store").write_bytes(b"\0\1")
    (folder / "Thumbs.db").write_bytes(b"\0\1")
    (folder / "__MACOSX").mkdir()
    (folder / "__MACOSX" / "._cat.png").write_bytes(b"junk")
    return {
        "empty.jpg": "empty file",
        "truncated.jpg": "corrupt or truncated",
        "notes.txt": "not an image",
        "scan.ppm": "unsupported image format PPM",
    }


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes: to prove nothing was modified or deleted."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def class_folders(tmp_path: Path) -> Path:
    return make_class_folders(tmp_path / "pets")

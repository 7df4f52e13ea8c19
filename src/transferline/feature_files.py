"""Reading extract's output: each split's features and labels, and meta.json beside them.

NumPy and JSON only, apart from extraction (features.py), so a stage that only reads cached
features (train_head) does not depend on the code that computes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from transferline.files import read_json

META = "meta.json"  # backbone, weights, image size, pooling and classes of the features


def load_split(features_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's features (n, dim) and integer labels (n,)."""
    return (
        np.load(Path(features_dir) / f"{split}_features.npy"),
        np.load(Path(features_dir) / f"{split}_labels.npy"),
    )


def read_meta(features_dir: Path) -> dict[str, Any]:
    """meta.json of the features: `classes`, `backbone`, `weights`, `image_size`, ..."""
    return read_json(Path(features_dir) / META)

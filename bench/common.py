"""What the decode benchmarks share: photo-like pixels, the pipeline's decode rate, and variants
timed in turns (imported by the scripts beside it, which run as `python bench/NAME.py`)."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence


def decode_args(doc: str) -> argparse.Namespace:
    """--n files of --px width (4:3), decoded to --size, medians of --repeats rounds."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--px", type=int, default=256, help="width of the generated files")
    ap.add_argument("--size", type=int, default=160, help="the model's input size")
    ap.add_argument("--repeats", type=int, default=9)
    return ap.parse_args()


def photo_like(rng, px: int, channels: int = 3):
    """A px x 3/4 px PIL image of smooth pixels, so that it compresses as a photo does."""
    import numpy as np
    from PIL import Image

    side = max(1, px // 16)
    low = rng.integers(0, 255, (side, side, channels), dtype=np.uint8)
    mode = "RGBA" if channels == 4 else "RGB"
    return Image.fromarray(low, mode).resize((px, px * 3 // 4), Image.BILINEAR)


def decode_rate(paths: list[str], size: int, orientations: Sequence[int] | None = None) -> float:
    """images/s of `images.make_image_dataset` alone: decode, resize, (turn,) batch; no model."""
    from transferline import images

    ds = images.make_image_dataset(paths, None, size, 32, orientations=orientations)
    t = time.perf_counter()
    n = sum(int(batch.shape[0]) for batch in ds)
    return n / (time.perf_counter() - t)


def take_turns(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each variant once to warm up (tracing), then `repeats` rounds in which every variant
    runs once in turn, so a slower moment of the machine falls on all of them alike."""
    for measure in variants.values():
        measure()
    runs: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, measure in variants.items():
            runs[name].append(measure())
    return runs


def print_medians(runs: dict[str, list[float]], baseline: str) -> None:
    """The median img/s of each variant and its median round-by-round ratio to `baseline`."""
    for name, values in runs.items():
        ratio = statistics.median(v / b for v, b in zip(values, runs[baseline], strict=True))
        print(
            f"  {name:6s} {statistics.median(values):8.1f} img/s   ratio to {baseline} {ratio:.3f}"
        )

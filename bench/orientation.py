"""Benchmark what turning camera images upright (EXIF orientation) costs the decode (not a test).

On the same generated files, times `images.make_image_dataset` alone (decode, resize, turn,
batch; no model) for three records from the split stage:
  none: no image to turn (the plain decode, what every set without tagged images gets);
  some: 1 image in 10 to turn (orientation 6, a phone held upright);
  all:  every image to turn.
The three take turns round by round; medians of --repeats rounds, and each one's ratio to
`none`, are printed.

    python bench/orientation.py [--n 300] [--px 256] [--size 160] [--repeats 9]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def make_files(root: Path, n: int, px: int) -> list[str]:
    """n photo-like files, half JPEG and half PNG (smooth, so they compress like photos)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        low = rng.integers(0, 255, (max(1, px // 16), max(1, px // 16), 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((px, px * 3 // 4), Image.BILINEAR)
        fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
        path = root / f"{i:05d}.{ext}"
        img.save(path, format=fmt)
        paths.append(str(path))
    return paths


def images_per_second(paths: list[str], size: int, orientations: list[int] | None) -> float:
    from transferline import images

    ds = images.make_image_dataset(paths, None, size, 32, orientations=orientations)
    t = time.perf_counter()
    n = sum(int(batch.shape[0]) for batch in ds)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--px", type=int, default=256, help="width of the generated files")
    ap.add_argument("--size", type=int, default=160, help="the model's input size")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_files(Path(tmp), args.n, args.px)
        records = {
            "none": None,
            "some": [6 if i % 10 == 0 else 1 for i in range(args.n)],
            "all": [6] * args.n,
        }
        for turns in records.values():  # warm-up: trace each pipeline once
            images_per_second(paths, args.size, turns)
        runs: dict[str, list[float]] = {k: [] for k in records}
        for _ in range(args.repeats):
            for name, turns in records.items():
                runs[name].append(images_per_second(paths, args.size, turns))
    print(f"{args.n} files of {args.px}x{args.px * 3 // 4} px -> {args.size} px, decode only:")
    for name, values in runs.items():
        ratio = statistics.median(v / n for v, n in zip(values, runs["none"], strict=True))
        print(f"  {name:5s} {statistics.median(values):8.1f} img/s   ratio to none {ratio:.3f}")


if __name__ == "__main__":
    main()

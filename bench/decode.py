"""Benchmark the decoders behind `images.make_image_dataset` (not a test).

The same generated pixels saved four ways, then `make_image_dataset` alone (decode, resize,
batch; no model) over each set:
  png:   PNG files, decoded by TensorFlow (the plain pipeline);
  tiff:  TIFF files, decoded by PIL (`needs_pil`) through tf.numpy_function;
  webpa: lossless WebP with transparency, decoded by PIL;
  mixed: the PNG set with 1 file in 10 a TIFF: every image goes through the tf.cond.
The sets take turns round by round; medians of --repeats rounds, and each one's ratio to png,
are printed, and the time `make_image_dataset` spends reading the files' headers.

    python bench/decode.py [--n 300] [--px 256] [--size 160] [--repeats 9]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def make_sets(root: Path, n: int, px: int) -> dict[str, list[str]]:
    """Photo-like pixels (smooth, so they compress like photos), one file per set each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    sets: dict[str, list[str]] = {"png": [], "tiff": [], "webpa": [], "mixed": []}
    for i in range(n):
        low = rng.integers(0, 255, (max(1, px // 16), max(1, px // 16), 4), dtype=np.uint8)
        rgba = Image.fromarray(low, "RGBA").resize((px, px * 3 // 4), Image.BILINEAR)
        rgb = rgba.convert("RGB")
        for name, img, ext, kw in (
            ("png", rgb, "png", {}),
            ("tiff", rgb, "tif", {}),
            ("webpa", rgba, "webp", {"lossless": True}),
        ):
            path = root / f"{name}_{i:05d}.{ext}"
            img.save(path, **kw)
            sets[name].append(str(path))
        sets["mixed"].append(sets["tiff" if i % 10 == 0 else "png"][-1])
    return sets


def images_per_second(paths: list[str], size: int) -> float:
    from transferline import images

    ds = images.make_image_dataset(paths, None, size, 32)
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
    from transferline import images

    with tempfile.TemporaryDirectory() as tmp:
        sets = make_sets(Path(tmp), args.n, args.px)
        for paths in sets.values():  # warm-up: trace each pipeline once
            images_per_second(paths, args.size)
        runs: dict[str, list[float]] = {k: [] for k in sets}
        heads: list[float] = []
        for _ in range(args.repeats):
            for name, paths in sets.items():
                runs[name].append(images_per_second(paths, args.size))
            t = time.perf_counter()
            [images.needs_pil(images._head(p)) for p in sets["png"]]
            heads.append((time.perf_counter() - t) / len(sets["png"]))
    print(f"{args.n} files of {args.px}x{args.px * 3 // 4} px -> {args.size} px, decode only:")
    for name, values in runs.items():
        ratio = statistics.median(v / p for v, p in zip(values, runs["png"], strict=True))
        print(f"  {name:6s} {statistics.median(values):8.1f} img/s   ratio to png {ratio:.3f}")
    print(f"  reading the headers: {statistics.median(heads) * 1e6:.1f} us per file")


if __name__ == "__main__":
    main()

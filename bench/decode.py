"""Benchmark the decoders behind `images.make_image_dataset` (not a test).

The same generated pixels saved six ways, then `make_image_dataset` alone (decode, resize,
batch; no model) over each set:
  png:   PNG files, decoded by TensorFlow (the plain pipeline);
  tiff:  TIFF files, decoded by PIL (`needs_pil`) through tf.numpy_function;
  webpa: lossless WebP with transparency, decoded by PIL;
  avif:  AVIF files (quality 80), decoded by PIL;
  heic:  HEIC files (quality 80, written by pillow-heif), decoded by PIL through pi-heif;
  mixed: the PNG set with 1 file in 10 a TIFF: every image goes through the tf.cond.
The sets take turns round by round; medians of --repeats rounds, and each one's ratio to png,
are printed, and the time `make_image_dataset` spends reading the files' headers.

    python bench/decode.py [--n 300] [--px 256] [--size 160] [--repeats 9]
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import decode_args, decode_rate, photo_like, print_medians, take_turns

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def make_sets(root: Path, n: int, px: int) -> dict[str, list[str]]:
    """The same photo-like pixels saved to each set, one file per set each."""
    import numpy as np
    import pillow_heif

    rng = np.random.default_rng(0)
    sets: dict[str, list[str]] = {k: [] for k in ("png", "tiff", "webpa", "avif", "heic", "mixed")}
    for i in range(n):
        rgba = photo_like(rng, px, channels=4)
        rgb = rgba.convert("RGB")
        for name, img, ext, kw in (
            ("png", rgb, "png", {}),
            ("tiff", rgb, "tif", {}),
            ("webpa", rgba, "webp", {"lossless": True}),
            ("avif", rgb, "avif", {"quality": 80}),
        ):
            path = root / f"{name}_{i:05d}.{ext}"
            img.save(path, **kw)
            sets[name].append(str(path))
        path = root / f"heic_{i:05d}.heic"
        pillow_heif.from_pillow(rgb).save(path, quality=80)
        sets["heic"].append(str(path))
        sets["mixed"].append(sets["tiff" if i % 10 == 0 else "png"][-1])
    return sets


def header_seconds(paths: list[str], repeats: int) -> float:
    """Median seconds per file that `make_image_dataset` spends choosing each file's decoder."""
    from transferline import images

    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        [images.needs_pil(images._head(p)) for p in paths]
        times.append((time.perf_counter() - t) / len(paths))
    return statistics.median(times)


def main() -> None:
    args = decode_args(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        sets = make_sets(Path(tmp), args.n, args.px)
        variants = {k: functools.partial(decode_rate, v, args.size) for k, v in sets.items()}
        runs = take_turns(variants, args.repeats)
        heads = header_seconds(sets["png"], args.repeats)
    print(f"{args.n} files of {args.px}x{args.px * 3 // 4} px -> {args.size} px, decode only:")
    print_medians(runs, "png")
    print(f"  reading the headers: {heads * 1e6:.1f} us per file")


if __name__ == "__main__":
    main()

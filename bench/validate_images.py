"""Benchmark the split stage's image validation (not a test).

Generates N small JPEG/PNG files (default 25,000 at 64 px) in a temporary folder, then times
`checks.check_images` with 1 worker and with every core, and reports peak RSS of this process
and of the worker processes. Usage:

    python bench/validate_images.py [--n 25000] [--size 64]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from transferline import checks


def make_files(root: Path, n: int, size: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
        p = root / f"c{i % 10}" / f"{i:06d}.{ext}"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(arr).save(p, format=fmt)
        paths.append(p)
    return paths


def peak_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=25_000)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        paths = make_files(Path(tmp), args.n, args.size)
        print(f"made {len(paths)} files of {args.size}px in {time.perf_counter() - t:.1f} s")
        base_rss = peak_rss_mb(resource.RUSAGE_SELF)
        for workers in (1, os.cpu_count() or 1):
            t = time.perf_counter()
            cpu0 = os.times()
            checked = checks.check_images(paths, workers=workers)
            wall = time.perf_counter() - t
            cpu1 = os.times()
            cpu = sum(cpu1[:4]) - sum(cpu0[:4])  # user+system, self and children
            assert all(c.ok for c in checked)
            print(
                f"workers={workers}: {len(paths) / wall:,.0f} images/s, {wall:.1f} s wall, "
                f"CPU {cpu / wall:.2f} cores busy"
            )
        print(
            f"peak RSS: main process {peak_rss_mb(resource.RUSAGE_SELF):.0f} MB "
            f"(before validation {base_rss:.0f} MB), largest worker "
            f"{peak_rss_mb(resource.RUSAGE_CHILDREN):.0f} MB"
        )


if __name__ == "__main__":
    main()

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

import functools
import os
import tempfile
from pathlib import Path

from common import decode_args, decode_rate, photo_like, print_medians, take_turns

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def make_files(root: Path, n: int, px: int) -> list[str]:
    """n photo-like files, half JPEG and half PNG."""
    import numpy as np

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
        path = root / f"{i:05d}.{ext}"
        photo_like(rng, px).save(path, format=fmt)
        paths.append(str(path))
    return paths


def main() -> None:
    args = decode_args(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_files(Path(tmp), args.n, args.px)
        records = {
            "none": None,
            "some": [6 if i % 10 == 0 else 1 for i in range(args.n)],
            "all": [6] * args.n,
        }
        variants = {
            k: functools.partial(decode_rate, paths, args.size, turns)
            for k, turns in records.items()
        }
        runs = take_turns(variants, args.repeats)
    print(f"{args.n} files of {args.px}x{args.px * 3 // 4} px -> {args.size} px, decode only:")
    print_medians(runs, "none")


if __name__ == "__main__":
    main()

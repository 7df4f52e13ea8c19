"""How many damaged JPEGs pass the split's checks and still fail in TensorFlow (not a test).

Makes N JPEGs from three encodings of one random 64x48 image (baseline, progressive, quality
95), each either cut short (to 50-100% of its bytes) or with 1, 2 or 4 bytes changed, seeded.
Each goes through `checks.check_image` (what the split does); each one it passes is decoded
by TensorFlow as extract decodes it. Prints the counts. Usage:

    python bench/damaged_jpegs.py [--n 10000] [--seed 11]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from transferline import checks


def encodings() -> list[bytes]:
    pixels = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype("uint8")
    out = []
    for options in ({}, {"progressive": True}, {"quality": 95}):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", **options)
        out.append(buf.getvalue())
    return out


def damaged(rng: random.Random, clean: list[bytes]) -> bytes:
    data = bytearray(rng.choice(clean))
    if rng.random() < 0.5:
        for _ in range(rng.choice([1, 2, 4])):
            pos = rng.randrange(len(data))
            data[pos] = rng.randrange(256)
        return bytes(data)
    return bytes(data[: rng.randrange(len(data) // 2, len(data))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="damaged files (default 10000)")
    parser.add_argument("--seed", type=int, default=11, help="random seed (default 11)")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TF C++ logs (not libjpeg warnings)
    import tensorflow as tf  # seconds to import: not for --help

    rng = random.Random(args.seed)
    clean = encodings()
    passed, refused = 0, []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "damaged.jpg"
        for i in range(args.n):
            data = damaged(rng, clean)
            path.write_bytes(data)
            if not checks.check_image(path).ok:
                continue
            passed += 1
            try:
                tf.io.decode_image(data, channels=3, expand_animations=False)
            except tf.errors.OpError:
                refused.append(i)
    print(
        f"{args.n} damaged JPEGs (seed {args.seed}): the split's checks passed {passed}, "
        f"TensorFlow refused {len(refused)} of those (file numbers {refused}); "
        f"{time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()

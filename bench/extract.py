"""Benchmark feature extraction (not a test).

On the same generated image files, backbone and batch size, measures:
  (a) the forward-only ceiling: the base on tensors already in memory;
  (b) transferline's extract path end to end: files -> tf.data -> base -> .npy on disk;
  (c) the common baseline: keras.utils.image_dataset_from_directory + preprocess_input +
      model.predict, the map written plainly (`ds.map(preprocess_input)`);
  (c2) the same baseline tuned: the map with num_parallel_calls=AUTOTUNE, then prefetch;
  (b_xla) with --xla, (b) again with the base compiled by XLA (`extract.xla`);
then prints images/s and the ratios b/a, b/c and b/c2, and the peak RSS of (b) at N and 4N images
(each in a fresh process). Every path runs once to warm up before it is timed.

    python bench/extract.py [--backbone mobilenet_v2] [--size 160] [--n 300] [--batch 32] [--xla]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def make_files(root: Path, n: int, px: int = 256) -> list[str]:
    """n photos-like files (half JPEG, half PNG) in two class folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        low = rng.integers(0, 255, (px // 16, px // 16, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize(
            (px, px), Image.BILINEAR
        )  # smooth, compresses like a photo
        fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
        p = root / f"class{i % 2}" / f"{i:05d}.{ext}"
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p, format=fmt)
        paths.append(str(p))
    return sorted(paths, key=lambda s: (Path(s).parent.name, Path(s).name))


def build(backbone: str, size: int):
    from transferline import backbones
    from transferline.models import build_feature_extractor

    return build_feature_extractor(backbones.get(backbone), "none", size, "avg", seed=0)


def run_ours(model, forward, paths: list[str], size: int, batch: int, out: Path) -> float:
    """The extract stage's path; `forward` is traced once, as the stage does for its splits."""
    from transferline import dataset, features

    images = dataset.make_image_dataset(paths, None, size, batch)
    t = time.perf_counter()
    features.extract_to_npy(model, images, len(paths), out, "float32", desc="ours", forward=forward)
    return time.perf_counter() - t


def rss_child(args: argparse.Namespace) -> None:
    """Run only (b) on --n files and print this process's peak RSS in MB."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_files(Path(tmp) / "img", args.n)
        from transferline.features import compiled_forward

        model = build(args.backbone, args.size)
        run_ours(model, compiled_forward(model), paths, args.size, args.batch, Path(tmp) / "f.npy")
        print(
            json.dumps(
                {
                    "n": args.n,
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                }
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--xla", action="store_true", help="also time (b) with extract.xla on")
    ap.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        return rss_child(args)

    import keras
    import numpy as np
    import tensorflow as tf

    from transferline import backbones, dataset
    from transferline.features import compiled_forward

    spec = backbones.get(args.backbone)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "img"
        paths = make_files(root, args.n)
        model = build(args.backbone, args.size)

        # (a) forward-only ceiling on in-memory tensors
        x = np.concatenate(list(dataset.make_image_dataset(paths, None, args.size, args.batch)))
        forward = compiled_forward(model)
        batches = [tf.constant(x[i : i + args.batch]) for i in range(0, len(x), args.batch)]

        def ceiling() -> float:
            t = time.perf_counter()
            for b in batches:
                forward(b).numpy()
            return time.perf_counter() - t

        # (c) what a user would write
        base = getattr(keras.applications, spec.constructor)(
            include_top=False, weights=None, input_shape=(args.size, args.size, 3), pooling="avg"
        )
        family = {"caffe": "vgg16", "tf": "mobilenet_v2", "torch": "densenet"}.get(
            spec.preprocessing
        )
        prep = getattr(keras.applications, family).preprocess_input if family else (lambda v: v)

        def baseline(tuned: bool = False) -> float:
            t = time.perf_counter()
            ds = keras.utils.image_dataset_from_directory(
                root,
                labels=None,
                image_size=(args.size, args.size),
                batch_size=args.batch,
                shuffle=False,
                verbose=False,
            )
            if tuned:
                ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
            else:
                ds = ds.map(prep)
            base.predict(ds, verbose=0)
            return time.perf_counter() - t

        def ours() -> float:
            return run_ours(model, forward, paths, args.size, args.batch, Path(tmp) / "f.npy")

        results = {}
        paths_to_time = (
            ("a_ceiling", ceiling),
            ("b_ours", ours),
            ("c_baseline", baseline),
            ("c2_tuned", lambda: baseline(tuned=True)),
        )
        if args.xla:
            forward_xla = compiled_forward(model, xla=True)
            paths_to_time += (
                (
                    "b_xla",
                    lambda: run_ours(
                        model, forward_xla, paths, args.size, args.batch, Path(tmp) / "x.npy"
                    ),
                ),
            )
        for name, fn in paths_to_time:
            fn()  # warm-up: tracing, caches
            results[name] = args.n / fn()
    a, b, c = results["a_ceiling"], results["b_ours"], results["c_baseline"]
    c2 = results["c2_tuned"]
    print(
        f"{args.backbone} at {args.size}px, {args.n} files, batch {args.batch}, "
        f"{os.cpu_count()} CPUs, TF {tf.__version__}"
    )
    print(f"(a) forward-only ceiling : {a:8.1f} img/s")
    print(f"(b) transferline extract : {b:8.1f} img/s   b/a = {b / a:.3f}")
    print(f"(c) image_dataset_from_directory + predict: {c:8.1f} img/s   b/c = {b / c:.3f}")
    print(f"(c2) the same, map parallel + prefetch   : {c2:8.1f} img/s   b/c2 = {b / c2:.3f}")
    if args.xla:
        bx = results["b_xla"]
        print(f"(b_xla) extract with extract.xla: true  : {bx:8.1f} img/s   b_xla/b = {bx / b:.3f}")
    rss = []
    for n in (args.n, 4 * args.n):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--rss-child",
                "--n",
                str(n),
                "--backbone",
                args.backbone,
                "--size",
                str(args.size),
                "--batch",
                str(args.batch),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rss.append(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"])
    print(
        f"peak RSS of (b): {rss[0]:.0f} MB at {args.n} images, {rss[1]:.0f} MB at "
        f"{4 * args.n} images (ratio {rss[1] / rss[0]:.3f})"
    )


if __name__ == "__main__":
    main()

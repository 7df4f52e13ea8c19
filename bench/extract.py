"""Benchmark feature extraction (not a test).

On the same generated image files, backbone and batch size, measures:
  (a) the forward-only ceiling: the base on tensors already in memory, as the extract stage
      builds it (BatchNormalization folded into the convolutions);
  (a_plain) the same with the plain Keras base (nothing folded), to show what folding is worth;
  (b) transferline's extract path end to end: files -> tf.data -> base -> .npy on disk;
  (b_autotune) the same with tf.data's autotuner on (TensorFlow's default; transferline turns
      it off), to show what that is worth;
  (b_decoded) (b) from the same pixels already decoded and resized, in memory: tf.data (batch,
      prefetch) -> base -> .npy, no file read or decoded, to split (b)'s gap to (a) into
      decoding and the rest;
  (c) the common baseline: keras.utils.image_dataset_from_directory + preprocess_input +
      model.predict, the map written plainly (`ds.map(preprocess_input)`);
  (c2) the same baseline tuned: the map with num_parallel_calls=AUTOTUNE, then prefetch;
  (b_xla) with --xla, (b) again with the base compiled by XLA (`extract.xla`);
then prints images/s and the ratios b/a, b/c and b/c2, and the peak RSS of (b) at N and 4N images
(each in a fresh process). Every path runs in a process of its own, is warmed up once, and then
timed --repeats times, the paths taking turns round by round; medians are reported.

    python bench/extract.py [--backbone mobilenet_v2] [--size 160] [--n 300] [--batch 32] [--xla]
                             [--repeats 7] [--paths a_ceiling,b_ours,b_autotune]
                             [--mixed-precision auto|on|bfloat16|off] [--formats mixed|jpeg|png]

--formats picks the generated files' formats: mixed (the default: every other file a JPEG, the
rest PNG), or all JPEG, or all PNG, to show what each costs to decode.

--mixed-precision applies `model.mixed_precision` as the extract stage does (auto: on with a
GPU, off on a CPU) in every path's process, the baselines' too, so on a GPU box b/a is the
stage's own ratio under mixed precision, and `--mixed-precision off` gives the float32 one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


FORMATS = {
    "mixed": (("PNG", "png"), ("JPEG", "jpg")),
    "jpeg": (("JPEG", "jpg"),),
    "png": (("PNG", "png"),),
}


def make_files(root: Path, n: int, px: int = 256, formats: str = "mixed") -> list[str]:
    """n photos-like files in two class folders, in `formats` (FORMATS: mixed alternates)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        low = rng.integers(0, 255, (px // 16, px // 16, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize(
            (px, px), Image.BILINEAR
        )  # smooth, compresses like a photo
        fmt, ext = FORMATS[formats][i % len(FORMATS[formats])]
        p = root / f"class{i % 2}" / f"{i:05d}.{ext}"
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p, format=fmt)
        paths.append(str(p))
    return sorted(paths, key=lambda s: (Path(s).parent.name, Path(s).name))


def build(backbone: str, size: int, fold: bool = True):
    """The extract stage's model (folded) or, with fold=False, the plain Keras base."""
    from transferline import backbones
    from transferline.models import build_feature_extractor

    return build_feature_extractor(backbones.get(backbone), "none", size, "avg", seed=0, fold=fold)


def set_precision(mode: str) -> str:
    """`model.mixed_precision` as the extract stage applies it (before any model is built)."""
    from transferline.runtime import set_precision as apply

    return apply(mode)


def run_ours(
    model, forward, paths: list[str], size: int, batch: int, out: Path, autotune: bool = False
) -> float:
    """The extract stage's path; `forward` is traced once, as the stage does for its splits."""
    import tensorflow as tf

    from transferline import features, images

    batches = images.make_image_dataset(paths, None, size, batch)
    if autotune:
        options = tf.data.Options()
        options.autotune.enabled = True
        batches = batches.with_options(options)
    t = time.perf_counter()
    features.extract_to_npy(
        model, batches, len(paths), out, "float32", desc="ours", forward=forward
    )
    return time.perf_counter() - t


def rss_child(args: argparse.Namespace) -> None:
    """Run only (b) on --n files and print this process's peak RSS in MB."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_files(Path(tmp) / "img", args.n, formats=args.formats)
        from transferline.features import compiled_forward

        set_precision(args.mixed_precision)

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


PATHS = (
    "a_ceiling",
    "a_plain",
    "b_ours",
    "b_autotune",
    "b_decoded",
    "c_baseline",
    "c2_tuned",
    "b_xla",
)


def time_path(args: argparse.Namespace) -> None:
    """Worker process for one path: warm it up over the files in --root, say READY, then time
    one pass per RUN line on stdin and answer with its images/s."""
    import keras
    import numpy as np
    import tensorflow as tf

    from transferline import backbones, features, images
    from transferline.features import compiled_forward

    root = Path(args.root)
    paths = sorted((str(p) for p in root.rglob("*.*")), key=lambda s: (Path(s).parent.name, s))
    spec = backbones.get(args.backbone)
    name = args.time_path
    set_precision(args.mixed_precision)

    if name in ("a_ceiling", "a_plain", "b_ours", "b_autotune", "b_decoded", "b_xla"):
        model = build(args.backbone, args.size, fold=name != "a_plain")
        forward = compiled_forward(model, xla=name == "b_xla")
    if name in ("a_ceiling", "a_plain", "b_decoded"):  # the pixels, decoded once, in memory
        x = np.concatenate(list(images.make_image_dataset(paths, None, args.size, args.batch)))
    if name in ("a_ceiling", "a_plain"):  # the base on tensors already in memory
        batches = [tf.constant(x[i : i + args.batch]) for i in range(0, len(x), args.batch)]

        def once() -> float:
            t = time.perf_counter()
            for b in batches:
                forward(b).numpy()
            return time.perf_counter() - t

    elif name == "b_decoded":  # (b)'s tf.data, forward and .npy writing, with nothing to decode
        out = Path(args.root).parent / f"{name}.npy"
        options = tf.data.Options()
        options.autotune.enabled = False  # as images.make_image_dataset

        def once() -> float:
            batches = tf.data.Dataset.from_tensor_slices(x).batch(args.batch)
            batches = batches.prefetch(images.PREFETCH_BATCHES).with_options(options)
            t = time.perf_counter()
            features.extract_to_npy(
                model, batches, len(x), out, "float32", desc=name, forward=forward
            )
            return time.perf_counter() - t

    elif name in ("b_ours", "b_autotune", "b_xla"):
        out = Path(args.root).parent / f"{name}.npy"

        def once() -> float:
            autotune = name == "b_autotune"
            return run_ours(model, forward, paths, args.size, args.batch, out, autotune)

    else:  # what a user would write
        base = getattr(keras.applications, spec.constructor)(
            include_top=False, weights=None, input_shape=(args.size, args.size, 3), pooling="avg"
        )
        family = {"caffe": "vgg16", "tf": "mobilenet_v2", "torch": "densenet"}.get(
            spec.preprocessing
        )
        prep = getattr(keras.applications, family).preprocess_input if family else (lambda v: v)

        def once() -> float:
            t = time.perf_counter()
            ds = keras.utils.image_dataset_from_directory(
                root,
                labels=None,
                image_size=(args.size, args.size),
                batch_size=args.batch,
                shuffle=False,
                verbose=False,
            )
            if name == "c2_tuned":
                ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
            else:
                ds = ds.map(prep)
            base.predict(ds, verbose=0)
            return time.perf_counter() - t

    once()  # warm-up: tracing, compilation, caches
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() == "RUN":
            print(f"RESULT {len(paths) / once()}", flush=True)


def child_cmd(args: argparse.Namespace, *extra: str) -> list[str]:
    return [
        sys.executable,
        __file__,
        "--backbone",
        args.backbone,
        "--size",
        str(args.size),
        "--batch",
        str(args.batch),
        "--mixed-precision",
        args.mixed_precision,
        "--formats",
        args.formats,
        *extra,
    ]


def child(args: argparse.Namespace, *extra: str) -> str:
    out = subprocess.run(child_cmd(args, *extra), capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def answer(worker: subprocess.Popen, prefix: str) -> str:
    """The worker's next stdout line that starts with `prefix` (TensorFlow may print others)."""
    for line in worker.stdout:
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    raise RuntimeError(f"a benchmark worker exited early (exit code {worker.wait()})")


def interleaved(args: argparse.Namespace, names: list[str], root: Path) -> dict[str, list[float]]:
    """images/s of every path, --repeats rounds; each round times every path once in turn.

    Each path lives in its own warmed-up process (paths sharing one process slowed each other
    down: tf.data and Keras' predict leave thread pools behind); the rounds interleave them in
    time, so the speed drift of a shared VM reaches every path alike.
    """
    workers = {}
    try:
        for name in names:  # started and warmed up one at a time, each on an idle machine
            workers[name] = subprocess.Popen(
                child_cmd(args, "--time-path", name, "--root", str(root)),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            answer(workers[name], "READY")
        runs: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.repeats):
            for name, worker in workers.items():
                worker.stdin.write("RUN\n")
                worker.stdin.flush()
                runs[name].append(float(answer(worker, "RESULT ")))
        return runs
    finally:
        for worker in workers.values():
            worker.stdin.close()
            worker.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--xla", action="store_true", help="also time (b) with extract.xla on")
    ap.add_argument("--repeats", type=int, default=7, help="rounds (timed runs per path)")
    ap.add_argument(
        "--mixed-precision",
        choices=("auto", "on", "bfloat16", "off"),
        default="auto",
        help="as model.mixed_precision (auto: on with a GPU)",
    )
    ap.add_argument("--formats", choices=tuple(FORMATS), default="mixed", help="the files' formats")
    ap.add_argument(
        "--paths",
        help=f"comma-separated subset of {','.join(PATHS)} (skips the RSS runs)",
    )
    ap.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--time-path", choices=PATHS, help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    unknown = set(args.paths.split(",")) - set(PATHS) if args.paths else set()
    if unknown:
        ap.error(f"--paths: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PATHS)}")
    if args.rss_child:
        return rss_child(args)
    if args.time_path:
        return time_path(args)

    import tensorflow as tf

    policy = set_precision(args.mixed_precision)
    names = args.paths.split(",") if args.paths else list(PATHS if args.xla else PATHS[:-1])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "img"
        make_files(root, args.n, formats=args.formats)
        runs = interleaved(args, names, root)
    print(
        f"{args.backbone} at {args.size}px, {args.n} files ({args.formats}), batch {args.batch}, "
        f"{os.cpu_count()} CPUs, {len(tf.config.list_physical_devices('GPU'))} GPUs, "
        f"{policy}, TF {tf.__version__}; each path in its own "
        f"process, the paths taking turns; medians of {args.repeats} rounds (min-max); a ratio "
        "is the median of its per-round ratios (both paths timed in the same round)"
    )

    def ratio(top: str, bottom: str) -> float:
        return statistics.median(t / b for t, b in zip(runs[top], runs[bottom], strict=True))

    labels = {
        "a_ceiling": "(a) forward-only ceiling",
        "a_plain": "(a_plain) the same, BatchNorm not folded",
        "b_ours": "(b) transferline extract",
        "b_autotune": "(b_autotune) the same, tf.data autotune on",
        "b_decoded": "(b_decoded) (b) on pixels already decoded",
        "c_baseline": "(c) image_dataset_from_directory + predict",
        "c2_tuned": "(c2) the same, map parallel + prefetch",
        "b_xla": "(b_xla) extract with extract.xla: true",
    }
    ratios = {
        "a_plain": ("a/a_plain", "a_ceiling", "a_plain"),
        "b_ours": ("b/a", "b_ours", "a_ceiling"),
        "b_autotune": ("b_autotune/a", "b_autotune", "a_ceiling"),
        "b_decoded": ("b_decoded/a", "b_decoded", "a_ceiling"),
        "c_baseline": ("b/c", "b_ours", "c_baseline"),
        "c2_tuned": ("b/c2", "b_ours", "c2_tuned"),
        "b_xla": ("b_xla/b", "b_xla", "b_ours"),
    }
    for name in names:
        rates = runs[name]
        line = (
            f"{labels[name]:42s}: {statistics.median(rates):7.1f} img/s "
            f"({min(rates):.1f}-{max(rates):.1f})"
        )
        if name in ratios and {ratios[name][1], ratios[name][2]} <= set(runs):
            label, top, bottom = ratios[name]
            line += f" {label} = {ratio(top, bottom):.3f}"
        print(line)
    if args.paths:
        return
    rss = [
        json.loads(child(args, "--rss-child", "--n", str(n)))["peak_rss_mb"]
        for n in (args.n, 4 * args.n)
    ]
    print(
        f"peak RSS of (b): {rss[0]:.0f} MB at {args.n} images, {rss[1]:.0f} MB at "
        f"{4 * args.n} images (ratio {rss[1] / rss[0]:.3f})"
    )


if __name__ == "__main__":
    main()

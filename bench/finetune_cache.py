"""Fine-tuning throughput: the finetune stage on the trunk cache against the keras.io recipe
(not a test).

The same generated images (two classes of --n / 2 JPEGs, 96 px), split 80/10/10; random
weights, no augmentation, the same unfrozen layers, batch 32, --epochs epochs:

- peer: keras.io's recipe, `keras.utils.image_dataset_from_directory` over the training
  images + the base (preprocess_input inside, called with training=False) + a dense head,
  `fit`: every epoch decodes every image and runs the whole base;
- ours: the pipeline's own functions, as the stages run them: split, extract, a logreg
  head, the trunk stage's cache, then `finetune.run_finetune` training on the cache;
- ours_uncached: the same with `finetune.cache_trunk: off` (training on the images).

With `--views K`, every path augments (`finetune.augment`'s defaults: flip, rotation 0.05,
zoom 0.1): the peer online, in the model, as keras.io's recipe does; ours offline, on a cache
of K augmented views of each training image (`finetune.augment_views: K`, a different regime:
see docs/pipeline.md); ours_uncached online, on the images.

Each path runs in a fresh process. Reported: training images per second (the median over the
epochs after the first, validation apart), the cache's build time and disk size, and each
process's peak RSS.

    python bench/finetune_cache.py [--backbone vgg16 --size 64 --unfreeze 3]
    python bench/finetune_cache.py --backbone mobilenet_v2 --size 160 --unfreeze 20
    python bench/finetune_cache.py --backbone mobilenet_v2 --size 160 --unfreeze 20 --views 4
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def make_images(root: Path, n: int) -> None:
    """Two classes of photo-like JPEGs: class b is brighter in red."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        label = "ab"[i % 2]
        img = rng.integers(0, 200, (96, 96, 3), dtype=np.uint8)
        if label == "b":
            img[..., 0] = np.minimum(255, img[..., 0].astype(int) + 55)
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / label / f"{i:05d}.jpg", quality=90)


def peer(work: Path, args) -> dict:
    import keras

    from transferline import backbones
    from transferline.finetune import TrainClock
    from transferline.models import Preprocess, augmenter, unfreeze_top
    from transferline.params import AugmentParams

    spec = backbones.get(args.backbone)
    train = keras.utils.image_dataset_from_directory(
        work / "peer_train", image_size=(args.size, args.size), batch_size=32, seed=0
    )
    base = getattr(keras.applications, spec.constructor)(
        include_top=False, weights=None, input_shape=(args.size, args.size, 3), pooling="avg"
    )
    unfreeze_top(base, args.unfreeze)
    image = keras.Input((args.size, args.size, 3))
    x = augmenter(AugmentParams(), seed=0)(image) if args.views else image  # keras.io: in the model
    # the backbone's preprocess_input as a layer (tests/test_backbones.py checks they agree)
    x = base(Preprocess(spec.preprocessing)(x), training=False)
    model = keras.Model(image, keras.layers.Dense(2, activation="softmax")(x))
    model.compile(
        optimizer=keras.optimizers.Adam(1e-5),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    clock = TrainClock()
    model.fit(train, epochs=args.epochs, callbacks=[clock], verbose=0)
    later = clock.seconds[1:] or clock.seconds
    return {"images_per_second": round(len(train.file_paths) / float(np.median(later)), 1)}


def ours(work: Path, args, cache: str = "on") -> dict:
    from transferline import dataset, features, finetune, heads, trunk
    from transferline.files import DataDirs
    from transferline.params import ExtractParams, FinetuneParams, HeadParams, ModelParams

    raw = work / "raw"
    data = DataDirs(raw, work / "splits", work / "features", work / "trunk")
    for folder in (data.splits, data.features, data.trunk, work / "head"):
        folder.mkdir()
    spec = dataset.SplitSpec(val=0.1, test=0.1, seed=0)
    dataset.write_split(dataset.build_split(raw / "set", spec, rel_to=raw), data.splits)
    model = ModelParams(backbone=args.backbone, weights="none", image_size=args.size)
    features.extract_dataset(data, model, ExtractParams(batch_size=32), seed=0)
    heads.train_from_features(data.features, work / "head", HeadParams(), seed=0)
    off = {"flip": False, "rotation": 0.0, "zoom": 0.0}
    views = args.views if cache == "on" else 0
    f = FinetuneParams(
        epochs=args.epochs, unfreeze_layers=args.unfreeze, batch_size=32, cache_trunk=cache,
        augment={} if args.views else off, augment_views=views,
    )  # fmt: skip
    meta = trunk.build_cache(data, model, f, 32, 0, data.trunk)
    metrics, _, _ = finetune.run_finetune(data, work / "head", model, f, seed=0)
    return {
        "images_per_second": metrics["train_images_per_second"],
        "cached": metrics["trunk_cached"],
        "cache_seconds": meta.get("seconds"),
        "cache_mb": round(meta.get("bytes", 0) / 1e6, 1),
    }


PATHS = {
    "peer": peer,
    "ours": ours,
    "ours_uncached": lambda work, args: ours(work, args, cache="off"),  # the stage before
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="vgg16", choices=["vgg16", "mobilenet_v2"])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--unfreeze", type=int, default=3)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--views", type=int, default=0, help="augment: offline with K views")
    ap.add_argument("--path", choices=list(PATHS), help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.path:  # the child process
        out = PATHS[args.path](args.work, args)
        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(out))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_images(work / "raw" / "set", args.n)
        _peer_train_folder(work)
        results = {}
        for path in PATHS:
            (work / path).mkdir()
            cmd = [sys.executable, __file__, "--path", path, "--work", str(work / path)]
            cmd += ["--backbone", args.backbone, "--size", str(args.size)]
            cmd += ["--unfreeze", str(args.unfreeze), "--epochs", str(args.epochs)]
            cmd += ["--views", str(args.views)]
            if path.startswith("ours"):
                (work / path / "raw").symlink_to(work / "raw")
            if path == "peer":
                (work / path / "peer_train").symlink_to(work / "peer_train")
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            results[path] = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = results["ours"]["images_per_second"] / results["peer"]["images_per_second"]
    regime = f"augmented (ours: {args.views} views)" if args.views else "no augmentation"
    print(f"{args.backbone} {args.size} px, {args.unfreeze} layers unfrozen, {regime}:")
    for path, r in results.items():
        print(f"  {path}: {json.dumps(r)}")
    print(f"  ours / peer training throughput: {ratio:.2f}")


def _peer_train_folder(work: Path) -> None:
    """The training split's images, as the peer reads them: a folder per class."""
    from transferline import dataset

    spec = dataset.SplitSpec(val=0.1, test=0.1, seed=0)
    split = dataset.build_split(work / "raw" / "set", spec, rel_to=work / "raw")
    for path, label in split.manifests["train"]:
        link = work / "peer_train" / label / Path(path).name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(work / "raw" / path)


if __name__ == "__main__":
    main()

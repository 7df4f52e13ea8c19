"""Bottleneck features: run the frozen base once over every image, stream the result to .npy.

Features go straight from each batch into a memory-mapped .npy beside the target, so peak
memory does not grow with the data set; the file is moved into place only when complete.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.format import open_memmap
from tqdm import tqdm

from transferline.errors import DataError
from transferline.files import atomic_path

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from transferline.files import DataDirs
    from transferline.params import ExtractParams, ModelParams

log = logging.getLogger(__name__)


def compiled_forward(model: keras.Model, strategy=None, xla: bool = False):
    """One traced inference function for every batch size (no retracing on the last batch).

    With a multi-replica `strategy` (the model built in its scope) each batch is split across
    the replicas and the results gathered back in order. `xla` compiles the forward pass with
    XLA (once per distinct batch shape); whether that is faster depends on the model and the
    device, so it is a param (`extract.xla`) measured with bench/extract.py --xla.
    """
    import tensorflow as tf  # noqa: PLC0415

    spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
    if strategy is None or strategy.num_replicas_in_sync == 1:

        @tf.function(input_signature=[spec], reduce_retracing=True, jit_compile=xla)
        def forward(x):
            return model(x, training=False)

        return forward

    @tf.function(reduce_retracing=True, jit_compile=xla)
    def per_replica(part):
        return model(part, training=False)

    @tf.function(reduce_retracing=True)
    def replicated(x, real):  # per-replica parts of a batch padded by `padded_for_replicas`
        out = strategy.gather(strategy.run(per_replica, args=(x,)), axis=0)
        return tf.boolean_mask(out, strategy.gather(real, axis=0) > 0)

    def forward_replicated(batch):
        return replicated(*batch)

    forward_replicated.strategy = strategy  # extract_to_npy distributes the dataset to match
    return forward_replicated


def padded_for_replicas(batches: tf.data.Dataset, replicas: int) -> tf.data.Dataset:
    """Each batch (images, or a tuple such as (images, labels)) padded to a multiple of
    `replicas` rows by repeating its last row, with `real` added last: 1 for the rows that are
    not padding (int32: collectives take no bool).

    Split across replicas, a short last batch (and any batch not a multiple of them) leaves
    some replicas with no image, and a model run on an empty batch is not safe: TensorFlow's
    oneDNN convolution (seen on a Xeon with AVX-512 and AMX) returns its input for one, so
    the next layer fails (tests/test_distribution.py). Padded, every replica gets the same
    number of images, at least one; inference mode makes each image's features independent
    of its batch.
    """
    import tensorflow as tf  # noqa: PLC0415

    def pad(*parts):  # a part may itself be a tuple: a model of several inputs
        n = tf.shape(tf.nest.flatten(parts)[0])[0]
        extra = -n % replicas
        real = tf.cast(tf.range(n + extra) < n, tf.int32)

        def padded():
            rows = tf.concat([tf.range(n), tf.fill([extra], n - 1)], axis=0)
            return tf.nest.map_structure(lambda p: tf.gather(p, rows), parts)

        # a batch that needs no padding passes as it is, not copied
        kept = tf.cond(extra > 0, padded, lambda: tf.nest.map_structure(tf.identity, parts))
        return (*kept, real)

    return batches.map(pad)


def extract_to_npy(
    model: keras.Model,
    images: tf.data.Dataset,
    n: int,
    out: Path,
    dtype: str = "float32",
    desc: str = "extract",
    forward=None,
) -> dict[str, float]:
    """Write model(images) to `out` as an (n, features) array; returns timing figures.

    Pass `forward` (from `compiled_forward`) to reuse one traced function across calls.

    Args:
        model: the feature extractor.
        images: batches of pixels.
        n: how many images.
        out: the .npy file (written through a memory map).
        dtype: the features' dtype on disk.
        desc: the progress bar's label.
        forward: a traced forward pass to reuse.

    Returns:
        `seconds` and `images_per_second`.
    """
    forward = forward or compiled_forward(model)
    strategy = getattr(forward, "strategy", None)
    if strategy is not None:  # each global batch split across the replicas, in order
        images = padded_for_replicas(images, strategy.num_replicas_in_sync)
        images = strategy.experimental_distribute_dataset(images)
    dim = int(model.output_shape[-1])
    start = time.perf_counter()
    with atomic_path(out, suffix=".npy") as tmp:
        arr = open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(n, dim))
        i = 0
        with tqdm(total=n, unit="img", desc=desc, disable=n == 0) as bar:
            for batch in images:
                feats = forward(batch).numpy()
                arr[i : i + len(feats)] = feats
                i += len(feats)
                bar.update(len(feats))
        if i != n:
            raise RuntimeError(f"{desc}: expected {n} images, the pipeline yielded {i}")
        arr.flush()
        del arr
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "images_per_second": round(n / seconds, 2) if n else 0.0}


@contextlib.contextmanager
def undecodable_named(paths: list[str], raw: Path, split: str) -> Iterator[None]:
    """A decoding error from the pipeline (TensorFlow's, naming no file) as one paragraph
    naming the files of `split` that cannot be decoded and how to leave them out."""
    import tensorflow as tf  # noqa: PLC0415

    from transferline import images  # noqa: PLC0415

    try:
        yield
    except tf.errors.OpError:
        bad = images.undecodable(paths)
        if not bad:
            raise
        names = [Path(p).relative_to(raw).as_posix() for p, _ in bad]
        listed = "; ".join(f"{n} ({why})" for n, (_, why) in zip(names[:3], bad, strict=False))
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DataError(
            f"{len(bad)} of the {len(paths)} {split} images cannot be decoded by TensorFlow, "
            f"though the split stage accepted them (it checks images with PIL, which reads "
            f"past some damage TensorFlow's decoders refuse): {listed}{more}. Leave them out "
            f"with data.exclude (paths as data/splits/*.csv lists them, e.g. data.exclude: "
            f"[{', '.join(repr(n) for n in names[:3])}]) and run `dvc repro`."
        ) from None


def extract_dataset(
    data: DataDirs,
    model: ModelParams,
    extract: ExtractParams,
    seed: int,
    devices: list[str] | None = None,
) -> dict:
    """Features and labels of every split, and meta.json, into `data.features`.

    Args:
        data: the images, the split manifests, and where `{split}_features.npy`,
            `{split}_labels.npy` and meta.json go.
        model: the `model` section (backbone, weights, size, pooling, mixed precision).
        extract: the `extract` section (batch size, the features' dtype, XLA).
        seed: seeds the base's initialisation (`weights: none`).
        devices: the devices to split every batch across (default: every GPU).

    Returns:
        The stage metrics: images per second and seconds (in all and per split), the
        precision policy, replicas and the BatchNormalizations folded.
    """
    import json  # noqa: PLC0415

    from transferline import backbones, models, runtime  # noqa: PLC0415

    classes = json.loads((data.splits / "classes.json").read_text())
    policy = runtime.set_precision(model.mixed_precision)
    strategy = runtime.distribution(devices)
    with strategy.scope():
        # BatchNormalization folded into the convolutions: the same features up to rounding.
        extractor = models.build_feature_extractor(
            backbones.get(model.backbone), model.weights, model.size, model.pooling, seed, fold=True
        )
    per_split = _extract_splits(extractor, data, classes, model.size, extract, strategy)
    meta = {
        "backbone": model.backbone,
        "weights": model.weights,
        "image_size": model.size,
        "pooling": model.pooling,
        "dtype": extract.dtype,
        "classes": classes,
        "feature_dim": int(extractor.output_shape[-1]),
        "seed": seed,
    }
    (data.features / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    total_n = sum(m["images"] for m in per_split.values())
    total_s = sum(m["seconds"] for m in per_split.values())
    return {
        "images_per_second": round(total_n / total_s, 2) if total_s else 0.0,
        "seconds": round(total_s, 3),
        "images": total_n,
        "per_split": per_split,  # images, seconds and images per second of each split
        "mixed_precision": policy != "float32",
        "precision": policy,
        "xla": extract.xla,
        "replicas": int(strategy.num_replicas_in_sync),
        "batchnorm_folded": models.folded_batchnorms(extractor),
    }


def _extract_splits(
    extractor: keras.Model,
    data: DataDirs,
    classes: list[str],
    size: int,
    extract: ExtractParams,
    strategy,
) -> dict[str, dict]:
    """Each split's features and labels into `data.features`; per split its images, seconds
    and images per second."""
    from transferline import images, runtime  # noqa: PLC0415

    forward = compiled_forward(extractor, strategy, extract.xla)  # traced once for every split
    per_split = {}
    for split in images.SPLITS:
        paths, labels, turns = images.split_arrays(data.raw, data.splits, split, classes)
        batches = images.make_image_dataset(
            paths, None, size, extract.batch_size, orientations=turns
        )
        with (
            runtime.memory_for_batches("extract.batch_size", extract.batch_size),
            undecodable_named(paths, data.raw, split),
        ):
            per_split[split] = extract_to_npy(
                extractor,
                batches,
                len(paths),
                data.features / f"{split}_features.npy",
                extract.dtype,
                desc=split,
                forward=forward,
            )
        per_split[split]["images"] = len(paths)
        np.save(data.features / f"{split}_labels.npy", labels)
    return per_split

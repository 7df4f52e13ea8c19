"""Fine-tuning at the cost of the layers it trains: the frozen trunk of the base runs once.

When fine-tuning unfreezes only the top of the base, every layer that no trainable layer feeds
gives the same output in every epoch (BatchNorm in inference mode, no augmentation): its
activations where it meets the trainable part are computed once, cached on disk, and the
trainable top of the base and the head train on them. The top's layers are the base's own
(shared, not copied), so the whole model ends with the weights the top was trained to.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferline.errors import StageError
from transferline.files import DataDirs, read_json, write_json
from transferline.params import FinetuneParams, ModelParams

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)


@dataclass
class Cut:
    """The base cut where its frozen trunk meets its trainable top.

    `trunk`: the base's input -> the boundary tensors; `top`: the boundary tensors -> the
    base's output, its layers the base's own; `names`: the layer producing each boundary
    tensor.
    """

    trunk: keras.Model
    top: keras.Model
    names: list[str]


def _parents(layer) -> list:
    """The tensors a layer of a functional model is called on (its first call)."""
    return list(layer._inbound_nodes[0].input_tensors) if layer._inbound_nodes else []


def boundary(base: keras.Model, trainable: set[str]) -> list:
    """The tensors that cross from the frozen part of `base` into the part a trainable layer
    feeds: the outputs of layers no trainable layer feeds, read by layers one does. Models
    with skip connections (ResNet, MobileNet, EfficientNet, DenseNet) cut there as chains do.

    Args:
        base: a functional model (its layers in topological order, as Keras keeps them).
        trainable: the names of its trainable layers.

    Returns:
        The boundary tensors, in the order the top's layers read them.
    """
    fed: set[str] = set()
    for layer in base.layers:  # topological order: a layer's parents come first
        parents = {t._keras_history.operation.name for t in _parents(layer)}
        if layer.name in trainable or parents & fed:
            fed.add(layer.name)
    crossing, seen = [], set()
    for layer in base.layers:
        if layer.name not in fed:
            continue
        for t in _parents(layer):
            if t._keras_history.operation.name not in fed and id(t) not in seen:
                seen.add(id(t))
                crossing.append(t)
    return crossing


def cut(base: keras.Model, trainable: set[str]) -> Cut | None:
    """The base cut at `boundary`; None when there is nothing frozen to cache (the first
    layer trains, or none does).

    Args:
        base: the keras.applications base (functional).
        trainable: the names of its trainable layers (`models.unfreeze_top`'s).
    """
    import keras  # noqa: PLC0415

    tensors = boundary(base, trainable)
    inputs = {id(t) for t in base.inputs}
    if not trainable or not tensors or any(id(t) in inputs for t in tensors):
        return None
    names = [t._keras_history.operation.name for t in tensors]
    trunk = keras.Model(base.inputs, tensors, name="trunk")
    top = keras.Model(tensors, base.outputs, name="top")  # the base's layers, shared
    return Cut(trunk, top, names)


def cached_net(cut_: Cut, head: keras.Model) -> keras.Model:
    """Boundary activations -> probabilities: the base's top, called in inference mode (its
    BatchNorm frozen as in the whole model), then the head."""
    import keras  # noqa: PLC0415

    inputs = [keras.Input(t.shape[1:], name=f"at_{name}") for t, name in zip(
        cut_.top.inputs, cut_.names, strict=True)]  # fmt: skip
    x = cut_.top(inputs if len(inputs) > 1 else inputs[0], training=False)
    return keras.Model(inputs, head(x), name="finetuned_top")


def image_trunk(extractor: keras.Model, cut_: Cut) -> keras.Model:
    """Raw images -> boundary activations: the extractor's preprocessing, then the trunk."""
    import keras  # noqa: PLC0415

    from transferline.models import raw_image_input  # noqa: PLC0415

    image, x = raw_image_input(extractor)
    out = cut_.trunk(x, training=False)
    return keras.Model(image, out if isinstance(out, list) else [out], name="image_trunk")


def cache_bytes(cut_: Cut, images: int, dtype: str) -> int:
    """Disk the activations of `images` images (or views of them) take."""
    per_image = sum(int(np.prod(t.shape[1:])) for t in cut_.top.inputs)
    return per_image * images * np.dtype(dtype).itemsize


def write_activations(
    model: keras.Model, batches, n: int, out: Path, dtype: str, views: int = 0, augment=None
) -> list[Path]:
    """The activations of `model` (`image_trunk`) on `n` images, batch by batch, into one
    memory-mapped `.npy` per boundary tensor in `out` (never all in memory).

    Args:
        model: raw images -> boundary activations.
        batches: the images, batched in order (no labels); re-iterable.
        n: how many images the batches hold.
        out: where `act_{i}.npy` go.
        dtype: the files' type (float32 or float16).
        views: 0: one (n, ...) array per tensor; K: the batches run K times through
            `augment` and `model`, into a (K, n, ...) array.
        augment: random layers (`models.augmenter`), for `views`.
    """
    files = [out / f"act_{i}.npy" for i in range(len(model.outputs))]
    lead = (views, n) if views else (n,)
    arrays = [
        np.lib.format.open_memmap(f, mode="w+", dtype=dtype, shape=(*lead, *t.shape[1:]))
        for f, t in zip(files, model.outputs, strict=True)
    ]
    for view in range(max(views, 1)):
        pos = 0
        for batch in batches:
            # apart from the model: an outer training=False would switch the layers off
            x = augment(batch, training=True) if augment is not None else batch
            outs = model(x, training=False)
            outs = outs if isinstance(outs, list | tuple) else [outs]  # one boundary tensor
            size = int(outs[0].shape[0])
            for array, values in zip(arrays, outs, strict=True):
                target = array[view] if views else array
                target[pos : pos + size] = np.asarray(values, dtype=np.float32)
            pos += size
        if pos != n:
            raise ValueError(f"{pos} images in the batches, {n} expected")
    for array in arrays:
        array.flush()
    return files


def cached_dataset(
    arrays: Sequence[np.ndarray],
    labels: np.ndarray,
    batch_size: int,
    shuffle_seed: int | None = None,
    drop_remainder: bool = False,
    views: int = 0,
) -> Any:
    """Batches of (activations, labels) read from the cache, shuffled as
    `images.make_image_dataset` shuffles its files (the same seed, the same order), so the
    cached and the uncached paths see the same batches.

    Args:
        arrays: one (n, ...) array per boundary tensor (memory-mapped `.npy`); (K, n, ...)
            with `views`.
        labels: the n labels.
        batch_size: images per batch.
        shuffle_seed: reshuffled every epoch with this seed; None keeps the order.
        drop_remainder: leave out the short last batch.
        views: K > 0: each image's activations are those of one of its K views, drawn anew
            every epoch (seeded by `shuffle_seed`).
    """
    import tensorflow as tf  # noqa: PLC0415

    n = len(labels)
    ds = tf.data.Dataset.from_tensor_slices(np.arange(n, dtype=np.int64))
    if shuffle_seed is not None:
        ds = ds.shuffle(n, seed=shuffle_seed, reshuffle_each_iteration=True)
    if views:
        # a seeded random stream that differs every epoch (every iteration of the dataset)
        seed = (shuffle_seed or 0) + 1
        draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip(ds, draws).map(lambda i, r: tf.stack([r % views, i]))
    else:
        ds = ds.map(lambda i: tf.stack([tf.zeros_like(i), i]))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    dtypes = [tf.as_dtype(a.dtype) for a in arrays]
    shapes = [a.shape[2:] if views else a.shape[1:] for a in arrays]

    def gather(rows: np.ndarray) -> list[np.ndarray]:
        view, idx = rows[:, 0], rows[:, 1]
        acts = [np.asarray(a[view, idx] if views else a[idx]) for a in arrays]
        return [*acts, np.asarray(labels[idx])]

    def read(idx):
        out = tf.numpy_function(gather, [idx], [*dtypes, tf.as_dtype(labels.dtype)])
        for t, shape in zip(out[:-1], shapes, strict=True):
            t.set_shape((None, *shape))
        out[-1].set_shape((None,))
        x = tuple(tf.cast(t, tf.float32) for t in out[:-1])
        return (x if len(x) > 1 else x[0]), out[-1]

    from transferline.images import prefetched  # noqa: PLC0415

    return prefetched(ds.map(read, num_parallel_calls=1, deterministic=True))


META = "meta.json"


def decision(f: FinetuneParams) -> str | None:
    """Why the trunk is not cached under these params (None: it is, if there is a cut)."""
    if not f.enabled:
        return "finetune.enabled is false"
    if f.cache_trunk == "off":
        return "finetune.cache_trunk is off"
    if f.augment.active and not f.augment_views:  # `on` then is refused when params load
        return "augmentation is on (finetune.augment), and cached activations cannot be augmented"
    return None


def build_cache(
    data: DataDirs, model: ModelParams, f: FinetuneParams, batch_size: int, seed: int, out: Path
) -> dict[str, Any]:
    """The trunk's activations of the train and val images into `out` (`train/act_*.npy`,
    `val/act_*.npy`) and meta.json; only meta.json, saying why, when nothing is cached.

    Args:
        data: the raw images and the split manifests.
        model, f: the `model` and `finetune` sections (which layers train).
        batch_size: images per forward pass (`extract.batch_size`).
        seed: seeds the base's initialisation (`weights: none`) and the augmented views.
        out: the (temporary) folder to write.

    Returns:
        meta.json's content: whether cached, the boundary, sizes and seconds.
    """
    import time  # noqa: PLC0415

    why, found = decision(f), None
    if why is None:  # TensorFlow only now: a stage with nothing to cache costs no import
        found = _model_and_cut(model, f, seed)
        why = None if found else "nothing below the unfrozen layers is frozen"
    if why is not None:
        if f.cache_trunk == "on":
            raise StageError(
                f"finetune.cache_trunk is on, but {why}: there is nothing to cache. Set "
                f"finetune.cache_trunk: auto (or off), or unfreeze fewer layers."
            )
        log.info("not cached (%s): fine-tuning trains on the images", why)
        meta = {"cached": False, "reason": why}
        write_json(out / META, meta)
        return meta
    from transferline import images, models  # noqa: PLC0415
    from transferline.feature_files import read_meta  # noqa: PLC0415

    extractor, unfrozen, cut_, policy = found
    classes = read_meta(data.features)["classes"]
    splits = {s: images.split_arrays(data.raw, data.splits, s, classes) for s in ("train", "val")}
    views = {"train": f.augment_views, "val": 0}  # validation is never augmented
    rows = sum(len(splits[s][0]) * max(views[s], 1) for s in splits)
    need = cache_bytes(cut_, rows, f.cache_dtype)
    _check_cap(need, f, cut_)
    if f.augment_views:
        log.info(OFFLINE, f.augment_views)
    trunk_model = image_trunk(extractor, cut_)
    start = time.perf_counter()
    for name, (paths, _, turns) in splits.items():
        (out / name).mkdir()
        augment = models.augmenter(f.augment, seed) if views[name] else None
        batches = images.make_image_dataset(paths, None, model.size, batch_size, orientations=turns)
        write_activations(
            trunk_model, batches, len(paths), out / name, f.cache_dtype, views[name], augment
        )
    meta = {
        "cached": True, "boundary": cut_.names, "unfrozen": unfrozen,
        "shapes": [list(t.shape[1:]) for t in cut_.top.inputs], "dtype": f.cache_dtype,
        "views": f.augment_views, "bytes": need, "seconds": round(time.perf_counter() - start, 3),
        "precision": policy, "backbone": model.backbone, "weights": model.weights,
        "image_size": model.size, "pooling": model.pooling,
    }  # fmt: skip
    write_json(out / META, meta)
    log.info("cached at %s, %.1f MB in %.1f s", ", ".join(cut_.names), need / 1e6, meta["seconds"])
    return meta


def _model_and_cut(model: ModelParams, f: FinetuneParams, seed: int) -> tuple | None:
    """The feature extractor the params build (under their precision policy), the layers
    they unfreeze, its `Cut` and the policy; None when nothing is frozen below them."""
    from transferline import backbones, models, runtime  # noqa: PLC0415

    policy = runtime.set_precision(model.mixed_precision)
    extractor = models.build_feature_extractor(
        backbones.get(model.backbone), model.weights, model.size, model.pooling, seed
    )
    base = models.base_of(extractor)
    unfrozen = models.unfreeze_top(base, f.unfreeze_layers, f.unfreeze_from)
    cut_ = cut(base, set(unfrozen))
    return (extractor, unfrozen, cut_, policy) if cut_ else None


# Said by the trunk and the finetune stage: the regime differs from online augmentation's.
OFFLINE = (
    "offline augmentation: %d augmented views of each training image are computed once, and "
    "each epoch trains on one of them per image, drawn at random; not a fresh augmentation "
    "every epoch as online augmentation (cache_trunk: auto or off) gives"
)


def _check_cap(need: int, f: FinetuneParams, cut_: Cut) -> None:
    cap = f.cache_max_gb * 1e9
    if need > cap:
        shrink = "finetune.cache_dtype: float16 (half), " if f.cache_dtype == "float32" else ""
        if f.augment_views > 1:
            shrink += "fewer views (finetune.augment_views), "
        raise StageError(
            f"the trunk cache would take {need / 1e9:.2f} GB (activations at "
            f"{', '.join(cut_.names)}), above finetune.cache_max_gb = {f.cache_max_gb:g}. "
            f"Raise the cap if the disk has room, or shrink it: {shrink}fewer unfrozen layers "
            f"(finetune.unfreeze_layers: the cut moves up, where activations are smaller), or "
            f"finetune.cache_trunk: off (train on the images)."
        )


def read_cache(folder: Path) -> tuple[dict[str, Any], dict[str, list[np.ndarray]]] | None:
    """meta.json and the memory-mapped activations of each split; None when not cached."""
    meta = read_json(Path(folder) / META)
    if not meta.get("cached"):
        return None
    arrays = {}
    for split in ("train", "val"):
        files = sorted((Path(folder) / split).glob("act_*.npy"), key=lambda p: int(p.stem[4:]))
        arrays[split] = [np.load(p, mmap_mode="r") for p in files]
    return meta, arrays


def cache_for_training(
    folder: Path | None, across_machines: bool = False
) -> tuple[dict, dict] | None:
    """The trunk stage's cache (meta, activations), when it cached one; None when fine-tuning
    runs across machines (TF_CONFIG): their lockstep loop trains on the images."""
    if folder is None or not (folder / META).is_file():
        return None
    cache = read_cache(folder)
    if cache and across_machines:
        log.info("cached, but several machines train: fine-tuning reads the images")
        return None
    return cache


def net_on_cache(net: keras.Model, head: keras.Model, meta: dict, f: FinetuneParams) -> keras.Model:
    """Boundary activations -> probabilities, the layers `net`'s own; a StageError when the
    cache was cut for other unfrozen layers than these params unfreeze."""
    from transferline.models import base_of, unfreeze_top  # noqa: PLC0415

    unfrozen = unfreeze_top(base_of(net), f.unfreeze_layers, f.unfreeze_from)
    cut_ = cut(base_of(net), set(unfrozen))
    shapes = [list(t.shape[1:]) for t in cut_.top.inputs] if cut_ else None
    views = meta.get("views", 0)
    if cut_ is None or (unfrozen, cut_.names, shapes, views) != (
        meta["unfrozen"],
        meta["boundary"],
        meta["shapes"],
        f.augment_views,
    ):
        raise StageError(
            f"data/trunk holds activations cut for another model or other layers (at "
            f"{', '.join(meta['boundary'])}, {len(meta['unfrozen'])} unfrozen, {views} augmented "
            f"views) than these params give ({len(unfrozen)} unfrozen, {f.augment_views} "
            f"views): it is older than the params. Run `dvc repro`, which runs the trunk stage "
            f"first."
        )
    log.info("training the top of the base on the activations at %s", ", ".join(cut_.names))
    if views:
        log.info(OFFLINE, views)
    return cached_net(cut_, head)

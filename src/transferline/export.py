"""The model as a product: one Keras file that takes raw RGB images of any size.

The pipeline's models start with transferline's own `Preprocess` layer; a file holding it can
only be loaded where transferline is installed. The exported classifier rebuilds that step from
Keras' built-in layers (Resizing, Rescaling, Normalization, a fixed 1x1 convolution for the
caffe channel flip), so `keras.saving.load_model` and `mlflow.pyfunc.load_model` need nothing
but Keras. Class names travel beside it in `classes.json`. `save_saved_model` writes it as a
TensorFlow SavedModel too, for TensorFlow Serving, which then also takes the image files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import numpy as np

from transferline.files import (
    SAVED_MODEL_HINT,
    atomic_dir,
    read_json,
    require_new_dir,
    write_json,
)
from transferline.models import (
    _CAFFE_MEAN_BGR,
    _TORCH_MEAN,
    _TORCH_STD,
    Preprocess,
    base_of,
    fold_nested_base,
)

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
CLASSES_FILE = "classes.json"


def builtin_preprocessing(mode: str) -> list[keras.layers.Layer]:
    """`Preprocess(mode)` as built-in Keras layers (same numbers, no custom class)."""
    if mode == "tf":
        return [keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess_tf")]
    if mode == "torch":
        return [
            keras.layers.Rescaling(1 / 255.0, name="preprocess_scale"),
            keras.layers.Normalization(
                mean=list(_TORCH_MEAN),
                variance=[s * s for s in _TORCH_STD],
                name="preprocess_torch",
            ),
        ]
    if mode == "caffe":
        flip = keras.layers.Conv2D(3, 1, name="preprocess_caffe", trainable=False)
        flip.build((None, None, None, 3))
        kernel = np.zeros((1, 1, 3, 3), "float32")
        kernel[0, 0, [0, 1, 2], [2, 1, 0]] = 1.0  # RGB -> BGR
        flip.set_weights([kernel, -np.asarray(_CAFFE_MEAN_BGR, "float32")])
        return [flip]
    if mode == "builtin":
        return []
    raise ValueError(f"unknown preprocessing mode {mode!r}")


def export_classifier(model: keras.Model, image_size: int) -> keras.Model:
    """Raw RGB images (any height and width, 0..255) -> class probabilities.

    `model` is a pipeline model (Preprocess, base, head). The exported graph resizes as the
    pipeline's loader does (bilinear, no antialiasing) and shares the trained layers.
    """
    mode = next(layer.mode for layer in model.layers if isinstance(layer, Preprocess))
    base = base_of(model)
    heads = [layer for layer in model.layers if layer.name == "head"]
    if not heads:
        raise ValueError(f"model {model.name} has no layer named 'head'")
    image = keras.Input((None, None, 3), name="image")
    x = keras.layers.Resizing(image_size, image_size, interpolation="bilinear", name="resize")(
        image
    )
    for layer in builtin_preprocessing(mode):
        x = layer(x)
    x = base(x, training=False)
    probs = keras.layers.Activation("linear", dtype="float32", name="probabilities")(heads[0](x))
    return keras.Model(image, probs, name="classifier")


def save_classifier(folder: Path, model: keras.Model, classes: list[str], meta: dict) -> None:
    """`folder/model.keras` + `folder/classes.json`, written together or not at all.

    Args:
        folder: models/classifier (replaced whole).
        model: the exported Keras model.
        classes: the class names.
        meta: image size, source and backbone for classes.json.
    """
    with atomic_dir(folder) as tmp:
        model.save(tmp / MODEL_FILE)
        write_json(tmp / CLASSES_FILE, {"classes": classes, **meta})


@dataclass
class Classifier:
    """Anything that maps float32 RGB batches (0..255) to class probabilities."""

    predict_fn: Callable[[np.ndarray], np.ndarray]
    classes: list[str]
    image_size: int
    model: keras.Model | None = None  # the Keras model that predicts (None: a pyfunc does)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.predict_fn(images))


def load_classifier(path: str | Path) -> Classifier:
    """An exported classifier folder (or its model.keras, with classes.json beside it), or an
    MLflow model: `runs:/ID/model`, `models:/NAME/VERSION`, or a folder holding an MLmodel."""
    text = str(path)
    local = Path(text)
    if "://" in text or text.startswith(("runs:/", "models:/")) or (local / "MLmodel").is_file():
        from transferline import tracking_models  # noqa: PLC0415

        model = tracking_models.load_pyfunc(text)
        meta = model.metadata.metadata or {}
        if "classes" not in meta:
            raise FileNotFoundError(
                f"{text}: this MLflow model carries no class names; log it with transferline's "
                "evaluate stage (metadata: classes, image_size)"
            )
        classes, size = list(meta["classes"]), int(meta["image_size"])
        try:  # the Keras flavour: its model runs as a local one does
            raw = model.get_raw_model()
        except NotImplementedError:  # another flavour: through its pyfunc
            raw = None
        if isinstance(raw, keras.Model):
            return _forward_only(raw, classes, size)
        return Classifier(model.predict, classes, size)
    folder = local if local.is_dir() else local.parent
    model_file = folder / MODEL_FILE if local.is_dir() else local
    classes_file = folder / CLASSES_FILE
    if not model_file.is_file() or not classes_file.is_file():
        raise FileNotFoundError(
            f"{path}: not an exported classifier; expected {MODEL_FILE} and {CLASSES_FILE} in "
            "one folder (`dvc repro` writes models/classifier/), or an MLflow model URI"
        )
    meta = read_json(classes_file)
    model = keras.saving.load_model(model_file)
    return _forward_only(model, list(meta["classes"]), int(meta["image_size"]))


def _forward_only(model: keras.Model, classes: list[str], image_size: int) -> Classifier:
    """Prediction only runs forward: BatchNormalization folded into the convolutions, as in
    the extract stage (the same probabilities up to float rounding, faster). The caller feeds
    one batch at a time, hence `predict_on_batch`: `predict` builds its data pipeline anew on
    every call (115 of 260 ms per batch of 32, vgg16 at 32 px on 2 cores)."""
    model = fold_nested_base(model)
    return Classifier(model.predict_on_batch, classes, image_size, model)


_JPEG_MAX_SEGMENTS = 1000  # more header segments than any camera writes: stop looking there
_JPEG_HEADER_BYTES = 1 << 20  # where the EXIF segment is looked for (cameras: the first 64 KiB)
_EXIF_MAX_ENTRIES = 512  # IFD0 entries looked at (cameras write a dozen or two)


def jpeg_orientation(data: tf.Tensor) -> tf.Tensor:
    """The EXIF orientation (int32, 1..8) of one encoded file, read in the graph as
    `checks.check_image` reads it through PIL: IFD0's tag 0x0112 in the first APP1 "Exif"
    segment before the scan.
    1 (as stored) for anything else: not a JPEG, no EXIF, no such tag, a value outside 1..8.

    For `save_saved_model`'s `serve_bytes`, which gets files, not the split's record of
    them: a phone's portrait JPEG is stored sideways with orientation 6.
    """
    import tensorflow as tf  # noqa: PLC0415

    # The header only (the segments before the image data), not a copy of a whole photo.
    header = _Bytes(tf.io.decode_raw(tf.strings.substr(data, 0, _JPEG_HEADER_BYTES), tf.uint8))
    tiff = _exif_tiff_start(header)
    big = tf.equal(header.byte(tiff), 0x4D)  # "MM": big-endian; "II": little-endian
    valid = (
        (tiff >= 0)
        & tf.equal(header.byte(tiff), header.byte(tiff + 1))
        & tf.equal(header.uint(tiff + 2, 2, big), 42)
    )
    valid &= tf.logical_or(big, tf.equal(header.byte(tiff), 0x49))
    orientation, found = _ifd0_orientation(header, tiff, big)
    ok = valid & found & (orientation >= 1) & (orientation <= 8)
    return tf.cast(tf.where(ok, orientation, 1), tf.int32)


class _Bytes:
    """A file's first bytes as graph tensors: a byte (0 outside the file, so a cut file
    reads as no EXIF) and unsigned integers of either byte order."""

    def __init__(self, raw: tf.Tensor):
        import tensorflow as tf  # noqa: PLC0415

        self.n = tf.size(raw, out_type=tf.int64)
        self.raw = tf.concat([raw, tf.zeros((1,), tf.uint8)], 0)  # never empty

    def byte(self, i: tf.Tensor) -> tf.Tensor:
        import tensorflow as tf  # noqa: PLC0415

        i = tf.cast(i, tf.int64)
        inside = (i >= 0) & (i < self.n)
        value = tf.cast(tf.gather(self.raw, tf.clip_by_value(i, 0, self.n)), tf.int64)
        return tf.where(inside, value, tf.constant(0, tf.int64))

    def uint(self, i: tf.Tensor, size: int, big: tf.Tensor) -> tf.Tensor:
        import tensorflow as tf  # noqa: PLC0415

        parts = [self.byte(i + k) for k in range(size)]
        big_end = parts[0]
        for p in parts[1:]:
            big_end = big_end * 256 + p
        little_end = parts[-1]
        for p in parts[-2::-1]:
            little_end = little_end * 256 + p
        return tf.where(big, big_end, little_end)


def _exif_tiff_start(header: _Bytes) -> tf.Tensor:
    """Where the TIFF structure of the first APP1 "Exif" segment before the scan starts
    (-1: none), walking the JPEG's segments: FF, marker, 2-byte length (itself included)."""
    import tensorflow as tf  # noqa: PLC0415

    yes = tf.constant(True)
    exif_id = [0x45, 0x78, 0x69, 0x66, 0, 0]  # "Exif\0\0"
    byte = header.byte

    def segment(pos, found, done):
        marker = byte(pos + 1)
        stop = tf.logical_or(tf.not_equal(byte(pos), 0xFF), tf.equal(marker, 0xDA))  # scan
        stop = tf.logical_or(stop, tf.equal(marker, 0xD9))  # end of image
        if_exif = tf.logical_and(
            tf.equal(marker, 0xE1),
            tf.reduce_all(
                tf.stack([tf.equal(byte(pos + 4 + k), c) for k, c in enumerate(exif_id)])
            ),
        )
        fill = tf.equal(marker, 0xFF)  # a padding FF before the marker
        bare = tf.logical_or(tf.equal(marker, 0x01), (marker >= 0xD0) & (marker <= 0xD7))
        one, two = tf.constant(1, tf.int64), tf.constant(2, tf.int64)
        step = tf.where(fill, one, tf.where(bare, two, two + header.uint(pos + 2, 2, yes)))
        found = tf.where(tf.logical_and(if_exif, tf.logical_not(stop)), pos + 10, found)
        return pos + step, found, tf.logical_or(stop, found >= 0)

    is_jpeg = tf.logical_and(tf.equal(byte(0), 0xFF), tf.equal(byte(1), 0xD8))
    _, tiff, _ = tf.while_loop(
        lambda pos, found, done: tf.logical_and(tf.logical_not(done), pos < header.n),
        segment,
        (tf.constant(2, tf.int64), tf.constant(-1, tf.int64), tf.logical_not(is_jpeg)),
        maximum_iterations=_JPEG_MAX_SEGMENTS,
    )
    return tiff


def _ifd0_orientation(header: _Bytes, tiff: tf.Tensor, big: tf.Tensor) -> tuple:
    """The orientation tag's value in IFD0 of the TIFF structure at `tiff`, and whether it
    is there (one SHORT or LONG value)."""
    import tensorflow as tf  # noqa: PLC0415

    from transferline.images import EXIF_ORIENTATION  # noqa: PLC0415

    ifd = tiff + header.uint(tiff + 4, 4, big)
    count = header.uint(ifd, 2, big)
    entry = ifd + 2 + 12 * tf.range(_EXIF_MAX_ENTRIES, dtype=tf.int64)
    kind = header.uint(entry + 2, 2, big)
    value = tf.where(
        tf.equal(kind, 3), header.uint(entry + 8, 2, big), header.uint(entry + 8, 4, big)
    )
    hit = (
        tf.equal(header.uint(entry, 2, big), EXIF_ORIENTATION)
        & (tf.range(_EXIF_MAX_ENTRIES, dtype=tf.int64) < count)
        & ((kind == 3) | (kind == 4))  # SHORT (as cameras write it) or LONG
        & tf.equal(header.uint(entry + 4, 4, big), 1)  # one value
    )
    first = tf.argmax(tf.cast(hit, tf.int32))
    return tf.gather(value, first), tf.reduce_any(hit)


def save_saved_model(classifier: Classifier, folder: Path) -> None:
    """The classifier as a TensorFlow SavedModel in `folder` (a new one), the format
    TensorFlow Serving loads, with two signatures, each returning `probabilities` (one per
    class), `label` (the likeliest class's name) and `probability` (its probability):

    - `serve` (also `serving_default`): `images`, float32 RGB batches (0..255) of any size;
    - `serve_bytes`: `image_bytes`, a batch of encoded JPEG, PNG, GIF, BMP or WebP files,
      decoded by TensorFlow in the graph (`images.decode_tf_bytes`), resized (bilinear) and
      turned by a JPEG's EXIF orientation (`jpeg_orientation`; a PNG's or WebP's is not read),
      so a client sends the file instead of its pixels as JSON. JPEG, PNG, GIF and opaque
      WebP decode as in the pipeline; the pipeline reads BMP and transparent or animated WebP
      with PIL, and TIFF, AVIF and HEIC are not read here: send those as pixels (`serve`).
    """
    import tensorflow as tf  # noqa: PLC0415

    from transferline import images  # noqa: PLC0415

    if classifier.model is None:
        raise ValueError(
            "this MLflow model is not a Keras model, so it cannot be saved as a SavedModel; "
            "export the Keras classifier (models/classifier, or a run's logged model) instead"
        )
    folder = Path(folder)
    require_new_dir(folder, SAVED_MODEL_HINT)
    model, size = classifier.model, classifier.image_size
    names = tf.constant(classifier.classes)

    def outputs(probs: tf.Tensor) -> dict[str, tf.Tensor]:
        return {
            "probabilities": probs,
            "label": tf.gather(names, tf.argmax(probs, axis=1)),
            "probability": tf.reduce_max(probs, axis=1),
        }

    def serve(images_: tf.Tensor) -> dict[str, tf.Tensor]:
        return outputs(model(images_, training=False))

    def decoded(data: tf.Tensor) -> tf.Tensor:
        img = tf.image.resize(images.decode_tf_bytes(data), (size, size))
        return images.upright(img, jpeg_orientation(data))

    def serve_bytes(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        spec = tf.TensorSpec((size, size, 3), tf.float32)
        batch = tf.map_fn(decoded, image_bytes, fn_output_signature=spec)
        return outputs(model(batch, training=False))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve", serve, input_signature=[tf.TensorSpec((None, None, None, 3), tf.float32, "images")]
    )
    archive.add_endpoint(
        "serve_bytes",
        serve_bytes,
        input_signature=[tf.TensorSpec((None,), tf.string, "image_bytes")],
    )
    with atomic_dir(folder) as tmp:
        archive.write_out(str(tmp), verbose=False)
    log.info("SavedModel written to %s (signatures serve, serve_bytes)", folder)


def _predict_usable(
    classifier: Classifier, paths: list[Path], checks: list, batch_size: int
) -> np.ndarray:
    """Probabilities of the files whose check passed, in order."""
    from tqdm import tqdm  # noqa: PLC0415

    from transferline import images  # noqa: PLC0415

    good = [str(p) for p, c in zip(paths, checks, strict=True) if c.ok]
    turns = [c.orientation or 1 for c in checks if c.ok]  # 0: no valid tag, as stored
    parts = [np.zeros((0, len(classifier.classes)), np.float32)]
    if good:  # on stderr, from 1000 images on, as the validation's bar before it
        batches = images.make_image_dataset(
            good, None, classifier.image_size, batch_size, orientations=turns
        )
        with tqdm(total=len(good), unit="img", desc="predict", disable=len(good) < 1000) as bar:
            for batch in batches:
                parts.append(classifier.predict(batch.numpy()))
                bar.update(len(parts[-1]))
    return np.concatenate(parts)


def predict_files(
    classifier: Classifier, paths: list[Path], batch_size: int = 32
) -> list[dict[str, object]]:
    """Label and probability per file; a file that is not a usable image gets its reason
    instead of stopping the others. Decoding and resizing are the pipeline's own."""
    import tensorflow as tf  # noqa: PLC0415

    from transferline import checks, images  # noqa: PLC0415

    checked = checks.check_images(paths, threads=True)  # no fork: TensorFlow is loaded
    try:
        probs = _predict_usable(classifier, paths, checked, batch_size)
    except tf.errors.OpError:  # a file PIL read and TensorFlow cannot decode: which?
        bad = dict(
            images.undecodable([str(p) for p, c in zip(paths, checked, strict=True) if c.ok])
        )
        if not bad:
            raise
        checked = [
            checks.Check(False, f"TensorFlow cannot decode it: {bad[str(p)]}", c.digest)
            if c.ok and str(p) in bad
            else c
            for p, c in zip(paths, checked, strict=True)
        ]
        probs = _predict_usable(classifier, paths, checked, batch_size)
    rows, k = [], 0
    for path, check in zip(paths, checked, strict=True):
        if not check.ok:
            rows.append(
                {"path": str(path), "label": None, "probability": None, "error": check.reason}
            )
            continue
        p = probs[k]
        k += 1
        best = int(p.argmax())
        rows.append(
            {
                "path": str(path),
                "label": classifier.classes[best],
                "probability": float(p[best]),
                "error": None,
                **{f"p_{c}": float(v) for c, v in zip(classifier.classes, p, strict=True)},
            }
        )
    return rows


def build_classifier(
    finetuned: keras.Model | None,
    head_dir: Path,
    *,
    backbone: str,
    weights: str,
    image_size: int,
    pooling: str,
    seed: int,
) -> keras.Model:
    """The exported classifier: the fine-tuned model when fine-tuning ran, else base + head.

    Args:
        finetuned: the fine-tuned model, or None when fine-tuning was skipped.
        head_dir: train_head's head.
        backbone, weights, image_size, pooling: the `model` section.
        seed: seeds a rebuilt base.

    Returns:
        A Keras model: raw RGB of any size in, class probabilities out.
    """
    if finetuned is None:
        from transferline import backbones, heads  # noqa: PLC0415
        from transferline.finetune import assemble  # noqa: PLC0415
        from transferline.models import build_feature_extractor  # noqa: PLC0415

        extractor = build_feature_extractor(
            backbones.get(backbone), weights, image_size, pooling, seed
        )
        finetuned = assemble(extractor, heads.keras_head(head_dir))
    return export_classifier(finetuned, image_size)

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
    """`folder/model.keras` + `folder/classes.json`, written together or not at all."""
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
        from transferline import tracking  # noqa: PLC0415

        model = tracking.load_pyfunc(text)
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


def save_saved_model(classifier: Classifier, folder: Path) -> None:
    """The classifier as a TensorFlow SavedModel in `folder` (a new one), the format
    TensorFlow Serving loads, with two signatures:

    - `serve` (also `serving_default`): `images`, float32 RGB batches (0..255) of any height
      and width, as the Keras file takes;
    - `serve_bytes`: `image_bytes`, a batch of encoded JPEG, PNG, GIF, BMP or WebP files,
      each decoded, resized and turned as the pipeline does (`images.decode_tf_bytes`,
      bilinear, a JPEG's EXIF orientation through `images.jpeg_orientation`), so a client
      sends the file, a phone's sideways-stored portrait photo too, instead of its pixels as
      JSON numbers.

    Both return `probabilities` (one per class), `label` (the likeliest class's name) and
    `probability` (its probability). Decoding is TensorFlow's own, in the graph: the EXIF
    orientation of a PNG or WebP file is not read (send those upright), and TIFF, AVIF and
    HEIC are not read at all.
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
        return images.upright(img, images.jpeg_orientation(data))

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


def predict_files(
    classifier: Classifier, paths: list[Path], batch_size: int = 32
) -> list[dict[str, object]]:
    """Label and probability per file; a file that is not a usable image gets its reason
    instead of stopping the others. Decoding and resizing are the pipeline's own."""
    from tqdm import tqdm  # noqa: PLC0415

    from transferline import images  # noqa: PLC0415

    checks = images.check_images(paths, threads=True)  # no fork: TensorFlow is loaded
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
    probs = np.concatenate(parts)
    rows, k = [], 0
    for path, check in zip(paths, checks, strict=True):
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
    """The exported classifier: the fine-tuned model when fine-tuning ran, else base + head."""
    if finetuned is None:
        from transferline import backbones, heads  # noqa: PLC0415
        from transferline.finetune import assemble  # noqa: PLC0415
        from transferline.models import build_feature_extractor  # noqa: PLC0415

        extractor = build_feature_extractor(
            backbones.get(backbone), weights, image_size, pooling, seed
        )
        finetuned = assemble(extractor, heads.keras_head(head_dir))
    return export_classifier(finetuned, image_size)

"""Fine-tuning: base + the trained head, top layers unfrozen, BatchNorm kept in inference mode.

The model starts from the head train_head produced (not a random one), so the first gradient
steps do not wreck the pre-trained features; the base is always called with training=False.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from transferline.errors import StageError
from transferline.models import Preprocess, base_of

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    history: list[dict[str, float]]
    best_epoch: int
    val_before: dict[str, float]
    unfrozen: list[str] = field(default_factory=list)


def assemble(extractor: keras.Model, head: keras.Model) -> keras.Model:
    """Image -> probabilities: the feature extractor's preprocessing and base, then the head."""
    image = keras.Input(extractor.input_shape[1:], name="image")
    mode = next(layer.mode for layer in extractor.layers if isinstance(layer, Preprocess))
    x = Preprocess(mode, name="preprocess")(image)
    x = base_of(extractor)(x, training=False)
    return keras.Model(image, head(x), name="finetuned")


def unfreeze_top(base: keras.Model, n: int, from_layer: str | None = None) -> list[str]:
    """Make the top `n` weighted layers of `base` trainable (or every weighted layer from
    `from_layer` up); BatchNorm stays frozen.

    Counting only layers with weights keeps `n` meaningful across families (pooling and
    activation layers carry nothing to train).
    """
    bn = keras.layers.BatchNormalization
    weighted = [layer for layer in base.layers if layer.weights and not isinstance(layer, bn)]
    if from_layer is not None:
        names = [layer.name for layer in base.layers]
        if from_layer not in names:
            close = difflib.get_close_matches(from_layer, names, n=5, cutoff=0.5)
            raise StageError(
                f"finetune.unfreeze_from: {base.name} has no layer {from_layer!r}. Nearby "
                f"names: {', '.join(close) or '(none)'}; the top layers are "
                f"{', '.join(names[-6:])}. Use one of them, or unfreeze_layers with a count."
            )
        start = names.index(from_layer)
        chosen = [layer for layer in weighted if names.index(layer.name) >= start]
    else:
        chosen = weighted[-n:] if n else []
    base.trainable = True
    for layer in base.layers:
        layer.trainable = False
    for layer in chosen:
        layer.trainable = True
    return [layer.name for layer in chosen]


def augmenter(
    flip: bool,
    rotation: float,
    zoom: float,
    seed: int,
    contrast: float = 0.0,
    translation: float = 0.0,
) -> keras.Sequential | None:
    """Training-time augmentation (Keras random layers are no-ops at inference)."""
    layers = []
    if flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if rotation:
        layers.append(keras.layers.RandomRotation(rotation, fill_mode="reflect", seed=seed + 1))
    if zoom:
        layers.append(keras.layers.RandomZoom(zoom, fill_mode="reflect", seed=seed + 2))
    if translation:
        layers.append(
            keras.layers.RandomTranslation(
                translation, translation, fill_mode="reflect", seed=seed + 3
            )
        )
    if contrast:
        # RandomContrast clips to [0, 255] on raw pixels: our inputs are raw 0..255.
        layers.append(keras.layers.RandomContrast(contrast, value_range=(0, 255), seed=seed + 4))
    return keras.Sequential(layers, name="augment") if layers else None


class KeepBest(keras.callbacks.Callback):
    """Restore the weights with the lowest val_loss at the end, the starting point included.

    If no epoch beats the model as it was before fine-tuning, fine-tuning must not make it worse:
    the starting weights come back and `best_epoch` is -1.
    """

    def __init__(self, start_loss: float):
        super().__init__()
        self.best_loss, self.best_epoch, self._weights = start_loss, -1, None

    def on_train_begin(self, logs=None):
        self._weights = self.model.get_weights()

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("val_loss")
        if loss is not None and loss < self.best_loss:
            self.best_loss, self.best_epoch, self._weights = loss, epoch, self.model.get_weights()

    def on_train_end(self, logs=None):
        if self._weights is not None:
            self.model.set_weights(self._weights)


def compile_model(model: keras.Model, learning_rate: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=False,
    )


def finetune(
    model: keras.Model,
    train_ds,
    val_ds,
    *,
    epochs: int,
    learning_rate: float,
    unfreeze_layers: int,
    unfreeze_from: str | None = None,
) -> FinetuneResult:
    """Unfreeze, recompile, check the starting point, train, keep the best epoch by val loss."""
    unfrozen = unfreeze_top(base_of(model), unfreeze_layers, unfreeze_from)
    log.info("unfrozen %d layers: %s", len(unfrozen), ", ".join(unfrozen) or "(head only)")
    compile_model(model, learning_rate)  # recompile after changing `trainable`
    before = model.evaluate(val_ds, verbose=0, return_dict=True)
    log.info(
        "before fine-tuning: val_loss %.4f val_accuracy %.4f", before["loss"], before["accuracy"]
    )
    keep = KeepBest(before["loss"])
    hist = model.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=[keep], verbose=2)
    history = [
        {"epoch": i, **{k: float(v[i]) for k, v in hist.history.items()}}
        for i in range(len(hist.history["loss"]))
    ]
    if keep.best_epoch < 0:
        log.warning(
            "no fine-tuning epoch beat the starting val_loss %.4f; keeping the starting weights",
            before["loss"],
        )
    return FinetuneResult(
        history, keep.best_epoch, {k: float(v) for k, v in before.items()}, unfrozen
    )


def max_feature_gap(extractor: keras.Model, images: np.ndarray, cached: np.ndarray) -> float:
    """Largest relative difference between the rebuilt base's features and the cached ones."""
    fresh = extractor.predict(images, verbose=0)
    scale = float(np.abs(cached).max()) or 1.0
    return float(np.abs(fresh - cached.astype(np.float32)).max() / scale)


def run_finetune(
    raw: Path,
    splits_dir: Path,
    features_dir: Path,
    init_dir: Path,
    out_path: Path,
    *,
    backbone: str,
    weights: str,
    image_size: int,
    pooling: str,
    epochs: int,
    unfreeze_layers: int,
    unfreeze_from: str | None,
    learning_rate: float,
    batch_size: int,
    flip: bool,
    rotation: float,
    zoom: float,
    contrast: float,
    translation: float,
    seed: int,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Rebuild base + trained head, check the base still yields the cached features, fine-tune,
    save the best model to `out_path`. Returns stage metrics and per-epoch history."""
    from transferline import backbones, dataset, heads  # noqa: PLC0415
    from transferline.files import atomic_path, read_json  # noqa: PLC0415
    from transferline.models import build_feature_extractor  # noqa: PLC0415

    classes = read_json(features_dir / "meta.json")["classes"]
    extractor = build_feature_extractor(backbones.get(backbone), weights, image_size, pooling, seed)
    val_paths, y_val = dataset.split_arrays(raw, splits_dir, "val", classes)
    k = min(16, len(val_paths))
    probe = np.concatenate(list(dataset.make_image_dataset(val_paths[:k], None, image_size, k)))
    gap = max_feature_gap(extractor, probe, np.load(features_dir / "val_features.npy")[:k])
    if gap > 1e-2:
        raise StageError(
            f"the rebuilt {backbone} base does not reproduce the cached features in "
            f"{features_dir} (relative gap {gap:.3g}): the weights changed since extract ran "
            f"(e.g. a different Keras cache or weights file). Run `dvc repro -f extract`."
        )
    model = assemble(extractor, heads.keras_head(init_dir))
    train_paths, y_train = dataset.split_arrays(raw, splits_dir, "train", classes)
    train_ds = dataset.make_image_dataset(
        train_paths,
        y_train,
        image_size,
        batch_size,
        shuffle_seed=seed,
        augment=augmenter(flip, rotation, zoom, seed, contrast, translation),
    )
    val_ds = dataset.make_image_dataset(val_paths, y_val, image_size, batch_size)
    result = finetune(
        model,
        train_ds,
        val_ds,
        epochs=epochs,
        learning_rate=learning_rate,
        unfreeze_layers=unfreeze_layers,
        unfreeze_from=unfreeze_from,
    )
    with atomic_path(out_path, suffix=".keras") as tmp:
        model.save(tmp)
    best = (
        result.history[result.best_epoch]
        if result.best_epoch >= 0
        else {"val_accuracy": result.val_before["accuracy"], "val_loss": result.val_before["loss"]}
    )
    metrics = {
        "val_accuracy_before": round(result.val_before["accuracy"], 6),
        "val_loss_before": round(result.val_before["loss"], 6),
        "val_accuracy": round(best["val_accuracy"], 6),
        "val_loss": round(best["val_loss"], 6),
        "best_epoch": result.best_epoch,
        "epochs": len(result.history),
        "unfrozen_layers": len(result.unfrozen),
        "feature_gap": float(f"{gap:.3g}"),
    }
    return metrics, result.history

"""Keras building blocks shared by extract, finetune and evaluate.

Models take raw RGB pixels in 0..255: each backbone's own preprocessing is a layer inside the
model, so a saved model needs nothing else to predict on images.
"""

from __future__ import annotations

import difflib
import logging
from typing import TYPE_CHECKING

import keras
import numpy as np

from transferline.backbones import Backbone, build_base
from transferline.errors import StageError

if TYPE_CHECKING:
    from transferline.params import AugmentParams

log = logging.getLogger(__name__)

_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="transferline")
class Preprocess(keras.layers.Layer):
    """The backbone family's `preprocess_input`, as a saved layer.

    Modes follow keras.applications: caffe (RGB->BGR, ImageNet mean subtracted), tf (scale to
    -1..1), torch (0..1, ImageNet mean/std), builtin (the model scales its own input).
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("caffe", "tf", "torch", "builtin"):
            raise ValueError(f"unknown preprocessing mode {mode!r}")
        self.mode = mode

    def call(self, x):
        ops = keras.ops
        x = ops.cast(x, self.compute_dtype)
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(_CAFFE_MEAN_BGR, x.dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN, x.dtype)
            std = ops.convert_to_tensor(_TORCH_STD, x.dtype)
            return (x / 255.0 - mean) / std
        return x

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="transferline")
class FoldedBatchNorm(keras.layers.Layer):
    """Stands where a BatchNormalization was folded into the convolution before it."""

    def call(self, x, training=None, mask=None):
        return x


_FOLDABLE = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)


def _foldable_pairs(base: keras.Model) -> dict[str, keras.layers.BatchNormalization]:
    """{convolution name: the BatchNormalization that is the only consumer of its output}."""
    pairs = {}
    for bn in base.layers:
        if type(bn) is not keras.layers.BatchNormalization or len(bn._inbound_nodes) != 1:
            continue
        if bn.axis not in (-1, 3):  # a channels-last 4-D input normalised per channel
            continue
        parents = bn._inbound_nodes[0].parent_nodes
        if len(parents) != 1:
            continue
        conv = parents[0].operation
        if (
            type(conv) in _FOLDABLE
            and conv.data_format == "channels_last"
            and conv.get_config()["activation"] == "linear"
            and len(conv._inbound_nodes) == 1
            and len(conv._outbound_nodes) == 1
        ):
            pairs[conv.name] = bn
    return pairs


def fold_batchnorm(base: keras.Model) -> keras.Model:
    """An inference-only copy of a functional `base` in which every BatchNormalization that
    directly follows a convolution (its output's only consumer, no activation between) is
    folded into that convolution's kernel and bias.

    Why: in inference a BatchNormalization is a fixed per-channel affine map, so folding it
    saves two passes over every activation tensor it touches: mobilenet_v2 at 160 px ran
    1.04x to 1.28x faster on CPU in four runs of bench/extract.py (a_ceiling vs a_plain).
    Outputs equal the original's up to float rounding. Unfolded layers are shared with `base`,
    not copied. Only for a frozen base: the folded copy cannot be trained like the original.
    """
    pairs = _foldable_pairs(base)
    if not pairs:
        return base
    folded_bn = {bn.name for bn in pairs.values()}
    convs: dict[str, keras.layers.Layer] = {}

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        if layer.name in folded_bn:
            return FoldedBatchNorm(name=layer.name, dtype=layer.dtype_policy)
        if layer.name in pairs:
            convs[layer.name] = type(layer).from_config({**layer.get_config(), "use_bias": True})
            return convs[layer.name]
        return layer

    folded = keras.models.clone_model(base, clone_function=clone)
    as64 = lambda v: keras.ops.convert_to_numpy(v).astype("float64")  # noqa: E731
    for name, bn in pairs.items():
        old, new = base.get_layer(name), convs[name]
        scale = (as64(bn.gamma) if bn.scale else 1.0) / np.sqrt(
            as64(bn.moving_variance) + bn.epsilon
        )
        bias = as64(old.bias) if old.use_bias else 0.0
        new.bias.assign(
            (bias - as64(bn.moving_mean)) * scale + (as64(bn.beta) if bn.center else 0.0)
        )
        if isinstance(old, keras.layers.SeparableConv2D):
            new.depthwise_kernel.assign(old.depthwise_kernel)
            new.pointwise_kernel.assign(as64(old.pointwise_kernel) * scale)
        elif isinstance(old, keras.layers.DepthwiseConv2D):  # output channel = in * multiplier + m
            kernel = as64(old.kernel)
            new.kernel.assign(kernel * scale.reshape(kernel.shape[2], kernel.shape[3]))
        else:
            new.kernel.assign(as64(old.kernel) * scale)
    folded.trainable = False
    log.info(
        "folded %d of %d BatchNormalization layers into the convolutions before them",
        len(pairs),
        sum(isinstance(layer, keras.layers.BatchNormalization) for layer in base.layers),
    )
    return folded


def folded_batchnorms(model: keras.Model) -> int:
    """How many BatchNormalization layers `fold_batchnorm` folded in `model` (nested included)."""
    return sum(
        folded_batchnorms(layer)
        if isinstance(layer, keras.Model)
        else isinstance(layer, FoldedBatchNorm)
        for layer in model.layers
    )


def build_feature_extractor(
    backbone: Backbone,
    weights: str,
    image_size: int,
    pooling: str,
    seed: int,
    fold: bool = False,
) -> keras.Model:
    """Raw RGB image -> pooled bottleneck features, base frozen and in inference mode.

    `fold` folds BatchNormalization into the convolutions (`fold_batchnorm`): faster, for
    feature extraction only; never for a model that will be fine-tuned.

    Args:
        backbone: the registry entry.
        weights, image_size, pooling: as the `model` section says.
        seed: seeds the base's initialisation.
        fold: fold BatchNormalization into the convolutions.

    Returns:
        A Keras model: raw RGB 0..255 in, pooled features out.
    """
    base = build_base(backbone, weights, image_size, pooling, seed)
    if fold:
        base = fold_batchnorm(base)
    image = keras.Input((image_size, image_size, 3), name="image")
    x = Preprocess(backbone.preprocessing, name="preprocess")(image)
    features = base(x, training=False)
    return keras.Model(image, features, name=f"{backbone.key}_features")


def base_of(model: keras.Model) -> keras.Model:
    """The keras.applications base nested in a model built by this module."""
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if not nested:
        raise ValueError(f"model {model.name} holds no nested base model")
    return nested[0]


def augmenter(a: AugmentParams, seed: int) -> keras.Sequential | None:
    """Training-time augmentation (Keras random layers are no-ops at inference).

    Args:
        a: `finetune.augment` (0 or false: that layer off).
        seed: the random layers' seed.

    Returns:
        A Keras Sequential of random layers, or None when all are off.
    """
    layers = []
    if a.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if a.rotation:
        layers.append(keras.layers.RandomRotation(a.rotation, fill_mode="reflect", seed=seed + 1))
    if a.zoom:
        layers.append(keras.layers.RandomZoom(a.zoom, fill_mode="reflect", seed=seed + 2))
    if a.translation:
        shift = a.translation
        layers.append(
            keras.layers.RandomTranslation(shift, shift, fill_mode="reflect", seed=seed + 3)
        )
    if a.contrast:
        # RandomContrast clips to [0, 255] on raw pixels: our inputs are raw 0..255.
        layers.append(keras.layers.RandomContrast(a.contrast, value_range=(0, 255), seed=seed + 4))
    return keras.Sequential(layers, name="augment") if layers else None


def raw_image_input(extractor: keras.Model) -> tuple:
    """A raw-pixel input shaped as `extractor`'s, and that input after its preprocessing (a
    fresh `Preprocess` layer of the same mode): the start of every model built on the base."""
    image = keras.Input(extractor.input_shape[1:], name="image")
    mode = next(layer.mode for layer in extractor.layers if isinstance(layer, Preprocess))
    return image, Preprocess(mode, name="preprocess")(image)


def fold_nested_base(model: keras.Model) -> keras.Model:
    """An inference-only copy of `model` (a pipeline model or an exported classifier) whose
    nested models, the base above all, have their BatchNormalization folded (`fold_batchnorm`);
    `model` itself when nothing folds (no BatchNormalization after a convolution, or no nested
    model: a Keras file from elsewhere). For evaluation and prediction, which only run the
    model forward: the same outputs up to float rounding. `model` is not changed; save and
    export it, not the copy.
    """
    swaps = {}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            folded = fold_batchnorm(layer)
            if folded is not layer:
                swaps[id(layer)] = folded
    if not swaps:
        return model
    return keras.models.clone_model(model, clone_function=lambda layer: swaps.get(id(layer), layer))


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

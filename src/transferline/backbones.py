"""Registry of keras.applications backbones.

The registry itself is plain data so that params validation and `transferline backbones` never
import TensorFlow; only `build_base` / `build_feature_extractor` do.
"""

from __future__ import annotations

import inspect
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from transferline.errors import WeightsError

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

Preprocessing = Literal["caffe", "tf", "torch", "builtin"]


@dataclass(frozen=True)
class Backbone:
    """One keras.applications constructor and the facts the pipeline needs about it."""

    key: str
    constructor: str  # attribute of keras.applications
    preprocessing: Preprocessing  # how raw 0..255 RGB must be scaled before the base
    default_size: int
    min_size: int
    features: int  # channels of the pooled output


def _family(
    keys_ctors: list[tuple[str, str, int, int]], preprocessing: Preprocessing, min_size: int
) -> list[Backbone]:
    return [
        Backbone(k, c, preprocessing, size, min_size, feats) for k, c, size, feats in keys_ctors
    ]


_ENTRIES: list[Backbone] = [
    *_family([("vgg16", "VGG16", 224, 512), ("vgg19", "VGG19", 224, 512)], "caffe", 32),
    *_family(
        [
            ("resnet50", "ResNet50", 224, 2048),
            ("resnet101", "ResNet101", 224, 2048),
            ("resnet152", "ResNet152", 224, 2048),
        ],
        "caffe",
        32,
    ),
    *_family(
        [
            ("resnet50_v2", "ResNet50V2", 224, 2048),
            ("resnet101_v2", "ResNet101V2", 224, 2048),
            ("resnet152_v2", "ResNet152V2", 224, 2048),
        ],
        "tf",
        32,
    ),
    *_family([("inception_v3", "InceptionV3", 299, 2048)], "tf", 75),
    *_family([("inception_resnet_v2", "InceptionResNetV2", 299, 1536)], "tf", 75),
    *_family([("xception", "Xception", 299, 2048)], "tf", 71),
    *_family(
        [("mobilenet", "MobileNet", 224, 1024), ("mobilenet_v2", "MobileNetV2", 224, 1280)],
        "tf",
        32,
    ),
    *_family(
        [
            ("mobilenet_v3_small", "MobileNetV3Small", 224, 576),
            ("mobilenet_v3_large", "MobileNetV3Large", 224, 960),
        ],
        "builtin",
        32,
    ),
    *_family(
        [
            ("densenet121", "DenseNet121", 224, 1024),
            ("densenet169", "DenseNet169", 224, 1664),
            ("densenet201", "DenseNet201", 224, 1920),
        ],
        "torch",
        32,
    ),
    *_family(
        [("nasnet_mobile", "NASNetMobile", 224, 1056), ("nasnet_large", "NASNetLarge", 331, 4032)],
        "tf",
        32,
    ),
    *_family(
        [
            ("efficientnet_b0", "EfficientNetB0", 224, 1280),
            ("efficientnet_b1", "EfficientNetB1", 240, 1280),
            ("efficientnet_b2", "EfficientNetB2", 260, 1408),
            ("efficientnet_b3", "EfficientNetB3", 300, 1536),
            ("efficientnet_b4", "EfficientNetB4", 380, 1792),
            ("efficientnet_b5", "EfficientNetB5", 456, 2048),
            ("efficientnet_b6", "EfficientNetB6", 528, 2304),
            ("efficientnet_b7", "EfficientNetB7", 600, 2560),
            ("efficientnet_v2_b0", "EfficientNetV2B0", 224, 1280),
            ("efficientnet_v2_b1", "EfficientNetV2B1", 240, 1280),
            ("efficientnet_v2_b2", "EfficientNetV2B2", 260, 1408),
            ("efficientnet_v2_b3", "EfficientNetV2B3", 300, 1536),
            ("efficientnet_v2_s", "EfficientNetV2S", 384, 1280),
            ("efficientnet_v2_m", "EfficientNetV2M", 480, 1280),
            ("efficientnet_v2_l", "EfficientNetV2L", 480, 1280),
        ],
        "builtin",
        32,
    ),
    *_family(
        [
            ("convnext_tiny", "ConvNeXtTiny", 224, 768),
            ("convnext_small", "ConvNeXtSmall", 224, 768),
            ("convnext_base", "ConvNeXtBase", 224, 1024),
            ("convnext_large", "ConvNeXtLarge", 224, 1536),
            ("convnext_xlarge", "ConvNeXtXLarge", 224, 2048),
        ],
        "builtin",
        32,
    ),
]

REGISTRY: dict[str, Backbone] = {b.key: b for b in _ENTRIES}


def get(key: str) -> Backbone:
    """Registry entry for `key`; params validation has already rejected unknown keys."""
    return REGISTRY[key]


def _offline(backbone: Backbone, exc: Exception) -> str:
    """The message for ImageNet weights that could not be downloaded: which file, where
    Keras looks for it, and the other settings of model.weights."""
    import keras  # noqa: PLC0415

    home = keras.config.keras_home() if hasattr(keras.config, "keras_home") else None
    cache = Path(home or Path.home() / ".keras") / "models"
    url = re.search(r"https?://\S+?\.h5", str(exc))
    wanted = (
        f"{url.group(0).rsplit('/', 1)[1]} (from {url.group(0)})"
        if url
        else "the weights file Keras expects"
    )
    return (
        f"model.weights: could not download the ImageNet weights for {backbone.key} "
        f"({type(exc).__name__}: {exc}). This machine seems to be offline. Either put {wanted} "
        f"into {cache} (copy it from a machine with internet), or set model.weights to 'none' "
        f"(random initialisation) or to the path of a weights file saved from "
        f"{backbone.constructor}(include_top=False)."
    )


def build_base(
    backbone: Backbone, weights: str, image_size: int, pooling: str, seed: int
) -> keras.Model:
    """The frozen convolutional base, pooled, without its classifier. The seed is set right
    before the layers are created so that `weights: none` gives one random base everywhere.

    Args:
        backbone: the registry entry.
        weights, image_size, pooling: as the `model` section says.
        seed: seeds the layers' initialisation.

    Returns:
        The Keras base (frozen), its output pooled.
    """
    import keras  # noqa: PLC0415

    keras.utils.set_random_seed(seed)
    ctor = getattr(keras.applications, backbone.constructor)
    kwargs: dict = {
        "include_top": False,
        "weights": "imagenet" if weights == "imagenet" else None,
        "input_shape": (image_size, image_size, 3),
        "pooling": pooling,
    }
    if "include_preprocessing" in inspect.signature(ctor).parameters:
        # EfficientNetV2, MobileNetV3, ConvNeXt can drop their input scaling; we feed raw 0..255,
        # so it must stay (EfficientNet v1 always keeps it).
        kwargs["include_preprocessing"] = True
    try:
        base = ctor(**kwargs)
    except Exception as exc:  # keras raises plain Exception/URLError/ValueError on download
        if weights == "imagenet" and _looks_like_download_failure(exc):
            raise WeightsError(_offline(backbone, exc)) from exc
        raise
    if weights not in ("imagenet", "none"):
        load_weights_file(base, Path(weights), backbone)
    base.trainable = False
    return base


def _looks_like_download_failure(exc: Exception) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(w in text for w in ("url", "fetch", "download", "connection", "resolve", "http"))


def check_weights_source(weights: str, backbone: Backbone) -> None:
    """A clear error for a weights path that is not there (for library callers: stages get
    it earlier, from params_files.check_files, before TensorFlow is imported)."""
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise WeightsError(
            f"model.weights: the weights file {weights} does not exist. Use 'imagenet', 'none', "
            f"or the path of a weights file saved from {backbone.constructor}(include_top=False)."
        )


def load_weights_file(base: keras.Model, path: Path, backbone: Backbone) -> None:
    """Load a weights file into `base`, refusing anything but an exact match."""
    check_weights_source(str(path), backbone)
    try:
        # Keras warns (instead of failing) when some layers keep their fresh weights: a partial
        # load is a mismatch too.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            base.load_weights(str(path))
        if caught:
            raise ValueError(str(caught[0].message))
    except Exception as exc:
        raise WeightsError(
            f"model.weights: {path} does not match {backbone.key} at this input size without "
            f"its top ({type(exc).__name__}: {exc}). Save the file from "
            f"keras.applications.{backbone.constructor}(include_top=False) with "
            f"model.save_weights('name.weights.h5'), or use 'imagenet' or 'none'."
        ) from exc

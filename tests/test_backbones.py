import numpy as np
import pytest

from transferline import backbones
from transferline.backbones import WeightsError

keras = pytest.importorskip("keras")
from transferline.models import Preprocess, build_feature_extractor  # noqa: E402

FAST = ["vgg16", "mobilenet_v2", "efficientnet_b0", "densenet121"]


def build(key: str, size: int = 32):
    b = backbones.get(key)
    return build_feature_extractor(b, "none", max(size, b.min_size), "avg", seed=0)


@pytest.mark.parametrize("key", FAST)
def test_representative_entries_yield_documented_feature_size(key):
    model = build(key)
    out = model.predict(np.zeros((2, *model.input_shape[1:]), "float32"), verbose=0)
    assert out.shape == (2, backbones.get(key).features)


@pytest.mark.slow
@pytest.mark.parametrize("key", [k for k in backbones.REGISTRY if k not in FAST])
def test_every_entry_builds_with_documented_feature_size(key):
    spec = backbones.get(key)
    model = build(key, spec.min_size)
    assert model.output_shape[-1] == spec.features


@pytest.mark.parametrize(
    "family,mode",
    [
        ("vgg16", "caffe"),
        ("resnet50", "caffe"),
        ("mobilenet_v2", "tf"),
        ("xception", "tf"),
        ("densenet", "torch"),
    ],
)
def test_preprocess_layer_matches_keras_preprocess_input(family, mode):
    pixels = np.array([[[[0, 0, 0], [255, 255, 255]], [[12, 130, 250], [255, 0, 64]]]], "float32")
    expected = getattr(keras.applications, family).preprocess_input(pixels.copy())
    got = keras.ops.convert_to_numpy(Preprocess(mode)(pixels))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_registry_entries_match_their_family_preprocessing():
    assert backbones.get("vgg19").preprocessing == "caffe"
    assert backbones.get("inception_v3").preprocessing == "tf"
    assert backbones.get("densenet201").preprocessing == "torch"
    assert backbones.get("convnext_tiny").preprocessing == "builtin"


def test_same_seed_same_random_base():
    a, b = build("mobilenet_v2"), build("mobilenet_v2")
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(a.predict(x, verbose=0), b.predict(x, verbose=0))


def test_weights_file_loads_and_mismatch_is_an_error(tmp_path):
    spec = backbones.get("mobilenet_v2")
    src = backbones.build_base(spec, "none", 32, "avg", seed=5)
    path = tmp_path / "mnv2.weights.h5"
    src.save_weights(path)
    loaded = backbones.build_base(spec, str(path), 32, "avg", seed=99)
    for w1, w2 in zip(src.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(w1, w2)
    other = backbones.build_base(backbones.get("vgg16"), "none", 32, "avg", seed=0)
    wrong = tmp_path / "vgg.weights.h5"
    other.save_weights(wrong)
    with pytest.raises(WeightsError, match="does not match mobilenet_v2"):
        backbones.build_base(spec, str(wrong), 32, "avg", seed=0)
    with pytest.raises(WeightsError, match="does not exist"):
        backbones.check_weights_source(str(tmp_path / "missing.h5"), spec)


def test_offline_imagenet_names_the_options(monkeypatch):
    url = (
        "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    )

    def no_network(**kwargs):  # Keras 3.15's words, offline
        raise Exception(f"URL fetch failure on {url}: None -- [Errno -2] Name or service not known")

    monkeypatch.setattr(keras.applications, "MobileNetV2", no_network)
    with pytest.raises(WeightsError) as info:
        backbones.build_base(backbones.get("mobilenet_v2"), "imagenet", 32, "avg", seed=0)
    msg = str(info.value)
    assert "'none'" in msg and "path of a weights file" in msg and "models" in msg
    # The file to fetch by hand, and from where, for an air-gapped machine.
    assert f"put {url.rsplit('/', 1)[1]} (from {url}) into " in msg

import numpy as np
import pytest

keras = pytest.importorskip("keras")
from transferline import backbones  # noqa: E402
from transferline.models import (  # noqa: E402
    FoldedBatchNorm,
    augmenter,
    base_of,
    build_feature_extractor,
    fold_batchnorm,
    fold_nested_base,
    folded_batchnorms,
)
from transferline.params import AugmentParams  # noqa: E402

from conftest import randomize_batchnorm  # noqa: E402

L = keras.layers


def batchnorms(model: keras.Model) -> list[str]:
    return [layer.name for layer in model.layers if isinstance(layer, L.BatchNormalization)]


def handmade() -> keras.Model:
    image = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(image)
    x = L.BatchNormalization(name="bn_conv")(x)  # folded
    x = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(x)
    x = L.BatchNormalization(name="bn_dw")(x)  # folded, into a kernel with a bias already
    x = L.SeparableConv2D(5, 3, padding="same", name="sep")(x)
    x = L.BatchNormalization(scale=False, center=False, name="bn_sep")(x)  # folded
    x = L.Conv2D(5, 1, activation="relu", name="conv_relu")(x)
    x = L.BatchNormalization(name="bn_after_relu")(x)  # kept: an activation between
    y = L.Conv2D(5, 1, name="conv_shared")(x)
    x = L.Add()([L.BatchNormalization(name="bn_shared")(y), L.ReLU()(y)])  # kept: 2 consumers
    x = L.BatchNormalization(name="bn_after_add")(x)  # kept: not after a convolution
    x = L.GlobalAveragePooling2D()(x)
    x = L.BatchNormalization(name="bn_dense")(L.Dense(3, name="dense")(x))  # kept: not a conv
    return keras.Model(image, x)


def test_fold_batchnorm_folds_only_a_convolutions_sole_consumer():
    model = handmade()
    randomize_batchnorm(model)
    x = np.random.default_rng(0).normal(0, 1, (4, 8, 8, 3)).astype("float32")
    before = keras.ops.convert_to_numpy(model(x, training=False))
    folded = fold_batchnorm(model)
    assert sorted(set(batchnorms(model)) - set(batchnorms(folded))) == [
        "bn_conv",
        "bn_dw",
        "bn_sep",
    ]
    assert folded_batchnorms(folded) == 3
    assert isinstance(folded.get_layer("bn_conv"), FoldedBatchNorm)
    assert folded.get_layer("conv").use_bias and not folded.trainable
    got = keras.ops.convert_to_numpy(folded(x, training=False))
    np.testing.assert_allclose(got, before, rtol=1e-5, atol=1e-5)
    # the original is untouched: its layers, weights and outputs are as before
    assert len(batchnorms(model)) == 7 and not model.get_layer("conv").use_bias
    after = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_array_equal(after, before)


def test_a_model_without_foldable_batchnorm_is_returned_as_is():
    image = keras.Input((8, 8, 3))
    model = keras.Model(image, L.Conv2D(2, 3)(image))
    assert fold_batchnorm(model) is model


def check_every_fold(base: keras.Model, folded: keras.Model) -> int:
    """Each folded convolution alone against the original convolution + BatchNormalization,
    on random input of its real shape; returns how many were checked. Local, so it holds in
    nets too deep for an end-to-end comparison (below)."""
    rng = np.random.default_rng(2)
    checked = 0
    for layer in folded.layers:
        if not isinstance(layer, FoldedBatchNorm):
            continue
        new = layer._inbound_nodes[0].parent_nodes[0].operation
        old, bn = base.get_layer(new.name), base.get_layer(layer.name)
        assert old is not new and new.use_bias
        x = rng.normal(0, 1, (1, *old.input.shape[1:])).astype("float32")
        expected = keras.ops.convert_to_numpy(bn(old(x), training=False))
        got = keras.ops.convert_to_numpy(new(x))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
        checked += 1
    return checked


FOLD_FAST = ["mobilenet_v2", "xception", "resnet50_v2"]


@pytest.mark.parametrize(
    "key",
    [k if k in FOLD_FAST else pytest.param(k, marks=pytest.mark.slow) for k in backbones.REGISTRY],
)
def test_folded_backbone_gives_the_same_features(key):
    """Fast: Conv2D + DepthwiseConv2D (mobilenet_v2), SeparableConv2D (xception), and
    pre-activation blocks whose BatchNormalization must stay (resnet50_v2); every entry under
    the slow marker."""
    spec = backbones.get(key)
    extractor = build_feature_extractor(spec, "none", spec.min_size, "avg", seed=0)
    base = base_of(extractor)
    randomize_batchnorm(base)
    folded = fold_batchnorm(base)
    assert check_every_fold(base, folded) == folded_batchnorms(folded) <= len(batchnorms(base))
    assert (folded_batchnorms(folded) > 0) == bool(batchnorms(base))
    if key in ("mobilenet_v2", "xception"):
        assert batchnorms(folded) == []
    x = np.random.default_rng(0).uniform(-1, 1, (2, spec.min_size, spec.min_size, 3))
    x = x.astype("float32")
    expected = keras.ops.convert_to_numpy(base(x, training=False))
    got = keras.ops.convert_to_numpy(folded(x, training=False))
    # End to end, float32 rounding grows with depth. Where the base itself is that sensitive
    # (running it on a batch of 1 instead of 2 moves the features by more than 1e-4 of their
    # largest: randomly initialised efficientnet_v2 models) only the local checks count.
    alone = keras.ops.convert_to_numpy(base(x[:1], training=False))
    scale = np.abs(expected).max()
    stable = np.abs(alone[0] - expected[0]).max() <= 1e-4 * scale
    assert stable or key not in FOLD_FAST
    if stable:
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * scale)


def test_build_feature_extractor_folds_on_request():
    spec = backbones.get("mobilenet_v2")
    plain = build_feature_extractor(spec, "none", 32, "avg", seed=0)
    folded = build_feature_extractor(spec, "none", 32, "avg", seed=0, fold=True)
    assert folded_batchnorms(plain) == 0 and folded_batchnorms(folded) == len(
        batchnorms(base_of(plain))
    )
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        folded.predict(x, verbose=0), plain.predict(x, verbose=0), rtol=1e-4, atol=1e-6
    )


def pipeline(key: str) -> keras.Model:
    """The model the finetune stage saves and evaluate loads: base and head nested."""
    from transferline import finetune, heads

    extractor = build_feature_extractor(backbones.get(key), "none", 32, "avg", seed=0)
    dim = int(extractor.output_shape[-1])
    return finetune.assemble(extractor, heads.build_dense_head(dim, 3, 0, 0.0))


def test_fold_nested_base_folds_the_base_inside_a_whole_model():
    model = pipeline("mobilenet_v2")
    randomize_batchnorm(base_of(model))
    n = len(batchnorms(base_of(model)))
    folded = fold_nested_base(model)
    assert folded_batchnorms(base_of(folded)) == n and batchnorms(base_of(folded)) == []
    assert len(batchnorms(base_of(model))) == n  # the original is untouched
    assert folded.get_layer("head") is model.get_layer("head")  # the head is shared, not copied
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        folded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-4, atol=1e-6
    )
    vgg = pipeline("vgg16")
    assert fold_nested_base(vgg) is vgg  # no BatchNormalization: nothing to fold
    flat = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(2, 3), L.BatchNormalization()])
    assert fold_nested_base(flat) is flat  # no nested base (a Keras file from elsewhere)


def test_fold_under_mixed_precision_keeps_the_policy_and_the_outputs():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = handmade()
        randomize_batchnorm(model)
        folded = fold_batchnorm(model)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert folded.get_layer("conv").dtype_policy.name == "mixed_float16"
    assert folded.get_layer("conv").kernel.dtype == "float32"  # variables stay float32
    x = np.random.default_rng(0).normal(0, 1, (4, 8, 8, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x, training=False)).astype("float32")
    got = keras.ops.convert_to_numpy(folded(x, training=False)).astype("float32")
    np.testing.assert_allclose(got, expected, rtol=2e-2, atol=2e-2)


def test_out_of_memory_under_mixed_precision_names_the_parameter_only():
    import tensorflow as tf

    from transferline.errors import StageError
    from transferline.runtime import memory_for_batches

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with pytest.raises(StageError) as info, memory_for_batches("finetune.batch_size", 1):
            raise tf.errors.ResourceExhaustedError(None, None, "Out of memory while trying\nx")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert str(info.value) == (
        "out of memory on CPU with batches of 1 image (TensorFlow: Out of memory while trying)."
        " Lower model.image_size."
    )
    # any other error passes through as it is
    with pytest.raises(ValueError, match="unrelated"), memory_for_batches("extract.batch_size", 8):
        raise ValueError("unrelated")


def test_cpu_flags_read_from_proc_cpuinfo(tmp_path):
    from transferline.runtime import cpu_flags

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile\nbugs\t\t: spectre\n")
    assert cpu_flags(info) == {"fpu", "avx512f", "amx_bf16", "amx_tile"}
    assert cpu_flags(tmp_path / "missing") is None  # not Linux: unknown, not "none"


@pytest.mark.parametrize(
    ("mode", "flags", "policy", "said"),
    [
        ("bfloat16", {"amx_bf16"}, "mixed_bfloat16", ["mixed precision on (mixed_bfloat16)"]),
        ("bfloat16", {"avx2"}, "mixed_bfloat16", ["mixed precision on", "no bfloat16 instr"]),
        ("bfloat16", None, "mixed_bfloat16", ["mixed precision on (mixed_bfloat16)"]),
        ("auto", {"avx512_bf16"}, "float32", ["computes bfloat16 natively"]),
        ("auto", {"avx2"}, "float32", []),
        ("on", {"avx2"}, "mixed_float16", ["mixed precision on (mixed_float16)"]),
        ("off", {"amx_bf16"}, "float32", []),
    ],
)
def test_precision_policy_per_mode_and_cpu(monkeypatch, caplog, mode, flags, policy, said):
    """On a CPU: auto stays float32 (with a hint where bfloat16 is native), bfloat16 warns
    where the CPU would emulate it, on is mixed_float16."""
    from transferline import runtime

    monkeypatch.setattr(runtime, "gpus", lambda: [])
    monkeypatch.setattr(runtime, "cpu_flags", lambda: flags)  # None: unknown (not Linux)
    caplog.set_level("INFO", logger="transferline.runtime")
    try:
        assert runtime.set_precision(mode) == policy
        assert keras.mixed_precision.global_policy().name == policy
    finally:
        keras.mixed_precision.set_global_policy("float32")
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == len(said), logged
    for message, part in zip(logged, said, strict=True):
        assert part in message
    if "no bfloat16 instr" in " ".join(said):
        assert (
            "model.mixed_precision: off" in logged[-1] and caplog.records[-1].levelname == "WARNING"
        )


def test_the_bfloat16_hint_prints_its_percent_sign_once(monkeypatch, caplog):
    from transferline import runtime

    monkeypatch.setattr(runtime, "gpus", lambda: [])
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"amx_bf16"})
    caplog.set_level("INFO", logger="transferline.runtime")
    assert runtime.set_precision("auto") == "float32"
    (hint,) = [r.getMessage() for r in caplog.records]
    assert "up to about 2% of the largest" in hint and "%%" not in hint


def test_augmenter_layers_keep_shape_and_pixel_range():
    a = AugmentParams(flip=True, rotation=0.1, zoom=0.1, contrast=0.3, translation=0.1)
    aug = augmenter(a, seed=0)
    assert len(aug.layers) == 5
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    out = np.asarray(aug(x, training=True))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 255
    assert not np.array_equal(out, x)
    np.testing.assert_array_equal(np.asarray(aug(x, training=False)), x)  # off at evaluation
    off = AugmentParams(flip=False, rotation=0.0, zoom=0.0)
    assert augmenter(off, seed=0) is None

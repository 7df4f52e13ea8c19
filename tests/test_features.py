import json

import numpy as np
import pytest

from transferline import backbones, dataset, feature_files, features, images
from transferline.errors import DataError, StageError
from transferline.files import DataDirs
from transferline.models import build_feature_extractor
from transferline.params import ExtractParams, ModelParams

from conftest import make_class_folders


@pytest.fixture
def extractor():
    return build_feature_extractor(backbones.get("mobilenet_v2"), "none", 32, "avg", seed=0)


def test_streams_features_equal_to_predict(tmp_path, extractor, class_folders):
    paths = sorted(str(p) for p in class_folders.rglob("*.png"))
    batches = images.make_image_dataset(paths, None, 32, batch_size=3)
    out = tmp_path / "out" / "f.npy"
    out.parent.mkdir()
    timing = features.extract_to_npy(extractor, batches, len(paths), out, "float32")
    got = np.load(out)
    assert got.shape == (20, 1280) and got.dtype == np.float32
    expected = extractor.predict(np.concatenate(list(batches)), verbose=0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert timing["images_per_second"] > 0
    assert [p.name for p in out.parent.iterdir()] == ["f.npy"]  # no temporary file left


def test_xla_forward_gives_the_same_features(tmp_path, extractor, class_folders):
    """extract.xla: the XLA-compiled base writes the plain path's features (to rounding),
    uneven last batch included (20 images in batches of 8)."""
    paths = sorted(str(p) for p in class_folders.rglob("*.png"))
    batches = images.make_image_dataset(paths, None, 32, batch_size=8)
    forward = features.compiled_forward(extractor, xla=True)
    features.extract_to_npy(extractor, batches, len(paths), tmp_path / "x.npy", forward=forward)
    features.extract_to_npy(extractor, batches, len(paths), tmp_path / "p.npy")
    xla, plain = np.load(tmp_path / "x.npy"), np.load(tmp_path / "p.npy")
    assert xla.shape == (20, 1280)
    np.testing.assert_allclose(xla, plain, rtol=1e-4, atol=1e-4)


def test_float16_halves_the_file(tmp_path, extractor, class_folders):
    paths = sorted(str(p) for p in class_folders.rglob("*.png"))
    batches = images.make_image_dataset(paths, None, 32, batch_size=8)
    features.extract_to_npy(extractor, batches, len(paths), tmp_path / "a.npy", "float32")
    features.extract_to_npy(extractor, batches, len(paths), tmp_path / "b.npy", "float16")
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert b.dtype == np.float16
    assert b.nbytes * 2 == a.nbytes
    np.testing.assert_allclose(b.astype(np.float32), a, rtol=1e-2, atol=1e-2)


def test_count_mismatch_leaves_no_output(tmp_path, extractor, class_folders):
    paths = sorted(str(p) for p in class_folders.rglob("*.png"))
    batches = images.make_image_dataset(paths, None, 32, batch_size=8)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RuntimeError, match="expected 21 images"):
        features.extract_to_npy(extractor, batches, 21, out / "c.npy")
    assert list(out.iterdir()) == []


def test_batches_are_padded_for_the_replicas_and_the_padding_is_marked():
    """Several replicas: every batch a multiple of them, so none gets an empty share."""
    import tensorflow as tf

    x = np.arange(13, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    y = np.arange(13) % 3
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)  # 5, 5, 3
    got = [tuple(t.numpy() for t in b) for b in features.padded_for_replicas(batches, 4)]
    assert [len(b[0]) for b in got] == [8, 8, 4]
    for (gx, gy, real), first in zip(got, (0, 5, 10), strict=True):
        n = min(5, 13 - first)
        rows = [*range(first, first + n), *[first + n - 1] * (len(real) - n)]  # last repeated
        np.testing.assert_array_equal(gx, x[rows])
        np.testing.assert_array_equal(gy, y[rows])
        assert real.tolist() == [1] * n + [0] * (len(real) - n) and real.dtype == np.int32
    # images alone (the extract stage's batches): (images, real); a full share is left as is
    alone = [b for b in features.padded_for_replicas(batches.map(lambda a, _: a), 5)]
    assert [(len(a), int(r.numpy().sum())) for a, r in alone] == [(5, 5), (5, 5), (5, 3)]


TINY_VGG = ModelParams(backbone="vgg16", weights="none", image_size=32)


def split_pets(tmp_path):
    """20 images in class folders, split; returns (raw, splits, an empty features folder)."""
    raw = make_class_folders(tmp_path / "raw" / "pets", per_class=10)
    result = dataset.build_split(raw.parent, dataset.SplitSpec(val=0.2, test=0.2), workers=1)
    splits = tmp_path / "splits"
    splits.mkdir()
    dataset.write_split(result, splits)
    out = tmp_path / "features"
    out.mkdir()
    return raw.parent, splits, out


def test_extract_dataset_writes_every_split_and_meta(tmp_path):
    raw, splits, out = split_pets(tmp_path)
    metrics = features.extract_dataset(
        DataDirs(raw, splits, out),
        TINY_VGG.model_copy(update={"pooling": "max"}),
        ExtractParams(batch_size=4, dtype="float16"),
        seed=0,
    )
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == ["cat", "dog"] and meta["feature_dim"] == 512
    assert meta["pooling"] == "max" and meta["dtype"] == "float16"
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        x, y = feature_files.load_split(out, split)
        assert x.shape == (n, 512) and x.dtype == np.float16
        assert sorted(np.bincount(y)) == [n // 2, n // 2]
    assert metrics["images"] == 20 and set(metrics["per_split"]) == {"train", "val", "test"}


def test_a_batch_too_large_for_the_device_names_extract_batch_size(tmp_path, monkeypatch):
    """What a GPU's allocator raises for a batch too large for it (no GPU here: the forward
    pass raises it) ends the stage with one paragraph, and leaves no half-written features."""
    import tensorflow as tf

    raw, splits, out = split_pets(tmp_path)

    def out_of_memory(model, strategy=None, xla=False):
        def forward(x):
            raise tf.errors.ResourceExhaustedError(
                None,
                None,
                "{{function_node __inference_forward_9}} OOM when allocating tensor with "
                "shape[8,16,16,64] and type float on /job:localhost/replica:0/task:0/device:"
                "GPU:0 by allocator GPU_0_bfc",
            )

        return forward

    monkeypatch.setattr(features, "compiled_forward", out_of_memory)
    with pytest.raises(StageError) as info:
        features.extract_dataset(
            DataDirs(raw, splits, out), TINY_VGG, ExtractParams(batch_size=8), 0
        )
    assert str(info.value) == (
        "out of memory on CPU with batches of 8 images (TensorFlow: OOM when allocating tensor "
        "with shape[8,16,16,64]). Lower extract.batch_size (e.g. `dvc exp run -S "
        "extract.batch_size=4`) or model.image_size; on a GPU, model.mixed_precision: on "
        "halves the activations."
    )
    assert list(out.iterdir()) == []


def test_an_image_tensorflow_cannot_decode_is_named_with_the_way_to_leave_it_out(tmp_path):
    """TensorFlow's error names no file; the stage's names the file and data.exclude."""
    raw, splits, out = split_pets(tmp_path)
    name = images.read_manifest(splits / "val.csv")[1][0]
    damaged = bytearray((raw / name).read_bytes())  # a PNG; its IDAT chunk's CRC broken
    at = damaged.index(b"IDAT")
    damaged[at + 4 + int.from_bytes(damaged[at - 4 : at], "big")] ^= 0xFF
    (raw / name).write_bytes(bytes(damaged))
    with pytest.raises(DataError) as info:
        features.extract_dataset(
            DataDirs(raw, splits, out), TINY_VGG, ExtractParams(batch_size=4), 0
        )
    message = str(info.value)
    assert message.startswith("1 of the 4 val images cannot be decoded by TensorFlow")
    assert f"{name} (" in message and f"data.exclude: ['{name}']" in message
    assert not (out / "val_features.npy").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left

    spec = dataset.SplitSpec(val=0.2, test=0.2, exclude=[name])
    result = dataset.build_split(raw, spec, workers=1)  # the fix the message names
    assert (name, f"left out by data.exclude ({name})") in result.rejected
    assert name not in [p for rows in result.manifests.values() for p, _ in rows]

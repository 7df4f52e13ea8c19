"""The exported classifier: built-in layers only, any input size, same numbers as the pipeline."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest

from transferline import backbones, checks, export, finetune, heads, images
from transferline.models import Preprocess, base_of, build_feature_extractor, folded_batchnorms

from conftest import add_broken_files, make_class_folders, randomize_batchnorm, save_turned


@pytest.mark.parametrize("mode", ["caffe", "tf", "torch", "builtin"])
def test_builtin_preprocessing_equals_the_pipeline_layer(mode):
    x = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3)).astype("float32")
    y = x
    for layer in export.builtin_preprocessing(mode):
        y = layer(y)
    np.testing.assert_allclose(np.asarray(y), np.asarray(Preprocess(mode)(x)), atol=1e-4)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny VGG16 (random weights) + 2-class head, exported as `dvc repro` does."""
    folder = tmp_path_factory.mktemp("export") / "classifier"
    ext = build_feature_extractor(backbones.get("vgg16"), "none", 32, "avg", seed=0)
    head = heads.build_dense_head(512, 2, 0, 0.0)
    model = finetune.assemble(ext, head)
    clf = export.export_classifier(model, 32)
    export.save_classifier(folder, clf, ["cat", "dog"], {"image_size": 32})
    x = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    np.save(folder.parent / "x.npy", x)
    np.save(folder.parent / "expected.npy", model.predict(x, verbose=0))
    return folder


def test_export_predicts_like_the_pipeline_model_at_any_size(classifier_dir):
    clf = export.load_classifier(classifier_dir)
    x = np.load(classifier_dir.parent / "x.npy")
    np.testing.assert_allclose(
        clf.predict(x), np.load(classifier_dir.parent / "expected.npy"), atol=1e-5
    )
    big = clf.predict(np.zeros((2, 70, 50, 3), "float32"))  # resized inside the model
    assert big.shape == (2, 2) and np.allclose(big.sum(1), 1.0, atol=1e-5)
    assert clf.classes == ["cat", "dog"] and clf.image_size == 32
    names = {type(layer).__name__ for layer in keras.saving.load_model(
        classifier_dir / export.MODEL_FILE).layers}  # fmt: skip
    assert "Preprocess" not in names and "Resizing" in names


def test_a_local_classifier_predicts_with_batchnorm_folded(tmp_path):
    """The saved file keeps the plain base; the loaded model folds it, as extract does."""
    ext = build_feature_extractor(backbones.get("mobilenet_v2"), "none", 32, "avg", seed=0)
    randomize_batchnorm(base_of(ext))
    model = export.export_classifier(
        finetune.assemble(ext, heads.build_dense_head(1280, 2, 0, 0.0)), 32
    )
    export.save_classifier(tmp_path / "clf", model, ["cat", "dog"], {"image_size": 32})
    clf = export.load_classifier(tmp_path / "clf")
    assert folded_batchnorms(base_of(clf.model)) > 0
    saved = keras.saving.load_model(tmp_path / "clf" / export.MODEL_FILE)
    assert folded_batchnorms(base_of(saved)) == 0
    x = np.random.default_rng(2).uniform(0, 255, (3, 48, 40, 3)).astype("float32")
    np.testing.assert_allclose(clf.predict(x), saved.predict(x, verbose=0), atol=1e-5)


def test_export_loads_where_transferline_is_not_imported(classifier_dir):
    code = (
        "import sys, json, numpy as np, keras\n"
        "m = keras.saving.load_model(sys.argv[1])\n"
        "assert not any(k.startswith('transferline') for k in sys.modules)\n"
        "print(json.dumps(m.predict(np.load(sys.argv[2]), verbose=0).tolist()))\n"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(classifier_dir / export.MODEL_FILE),
            str(classifier_dir.parent / "x.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = np.array(json.loads(out.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(got, np.load(classifier_dir.parent / "expected.npy"), atol=1e-5)


def test_predict_files_reports_broken_files_per_file(classifier_dir, tmp_path):
    root = make_class_folders(tmp_path / "imgs", per_class=2)
    add_broken_files(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    rows = export.predict_files(export.load_classifier(classifier_dir), files, batch_size=3)
    by_name = {p["path"].split("/")[-1]: p for p in rows}
    assert len(rows) == len(files)
    for name in ("cat000.png", "dog001.png"):
        r = by_name[name]
        assert r["error"] is None and r["label"] in ("cat", "dog")
        assert r["probability"] == pytest.approx(max(r["p_cat"], r["p_dog"]))
    assert "empty file" in by_name["empty.jpg"]["error"]
    assert "corrupt or truncated" in by_name["truncated.jpg"]["error"]
    assert by_name["notes.txt"]["label"] is None


def test_predict_files_turns_camera_images_upright(classifier_dir, tmp_path):
    upright = np.random.default_rng(2).integers(0, 255, (24, 40, 3), dtype=np.uint8)
    files = [save_turned(tmp_path / f"o{o}.png", upright, o) for o in (1, 6, 8, 3)]
    # the pixels of o6.png without its tag: what a loader that ignores EXIF would see
    from PIL import Image

    with Image.open(files[1]) as img:
        img.convert("RGB").save(tmp_path / "untagged.png")
    rows = export.predict_files(
        export.load_classifier(classifier_dir), [*files, tmp_path / "untagged.png"]
    )
    p = np.array([r["p_cat"] for r in rows])
    # a random-weight VGG averages much of a turn away (1.2e-4 apart when measured), but
    # the same picture agrees to float rounding
    np.testing.assert_allclose(p[1:4], p[0], atol=1e-6)
    assert abs(p[4] - p[0]) > 2e-5


def test_predict_out_of_memory_names_the_batch_size_option(
    classifier_dir, tmp_path, monkeypatch, capfd
):
    import tensorflow as tf

    from transferline import cli

    clf = export.load_classifier(classifier_dir)

    def out_of_memory(images):
        raise tf.errors.ResourceExhaustedError(
            None, None, "OOM when allocating tensor with shape[8]"
        )

    monkeypatch.setattr(clf, "predict", out_of_memory)
    monkeypatch.setattr(export, "load_classifier", lambda uri: clf)
    image = make_class_folders(tmp_path / "imgs", per_class=1) / "cat" / "cat000.png"
    assert cli.main(["predict", str(classifier_dir), str(image), "--batch-size", "8"]) == 2
    # (predict filters TensorFlow's native log on the stderr file descriptor: capfd, not capsys)
    assert capfd.readouterr().err.strip() == (
        "transferline predict: out of memory on CPU with batches of 8 images (TensorFlow: OOM "
        "when allocating tensor with shape[8]). Lower --batch-size (e.g. `--batch-size 4`)."
    )


def test_saved_model_serves_pixels_and_encoded_files(classifier_dir, tmp_path):
    """The SavedModel (TensorFlow Serving's format) predicts as the Keras classifier does,
    from pixels and from the files themselves, decoded as the pipeline decodes them."""

    import tensorflow as tf
    from PIL import Image

    from transferline import images

    clf = export.load_classifier(classifier_dir)
    export.save_saved_model(clf, tmp_path / "saved" / "1")
    served = tf.saved_model.load(str(tmp_path / "saved" / "1"))
    assert {"serving_default", "serve", "serve_bytes"} <= set(served.signatures)
    x = np.load(classifier_dir.parent / "x.npy")
    out = served.signatures["serving_default"](images=tf.constant(x))
    expected = np.load(classifier_dir.parent / "expected.npy")
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-4)
    assert out["label"].numpy().tolist() == [[b"cat", b"dog"][i] for i in expected.argmax(1)]
    np.testing.assert_allclose(out["probability"].numpy(), expected.max(1), atol=1e-4)

    rng = np.random.default_rng(5)
    pixels = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((40, 50), (70, 20))]
    files = []
    for i, (rgb, fmt) in enumerate(zip(pixels, ("PNG", "JPEG"), strict=True)):
        path = tmp_path / f"img{i}.{fmt.lower()}"
        Image.fromarray(rgb).save(path, format=fmt, quality=90)
        files.append(path)
    for turn in (6, 3):  # phone photos stored turned, as their EXIF orientation says
        path = tmp_path / f"turned{turn}.jpg"
        exif = Image.Exif()
        exif[images.EXIF_ORIENTATION] = turn
        Image.fromarray(pixels[0]).save(path, format="JPEG", quality=90, exif=exif.tobytes())
        files.append(path)
    blobs = tf.constant([p.read_bytes() for p in files])
    got = served.signatures["serve_bytes"](image_bytes=blobs)["probabilities"].numpy()
    turns = [c.orientation for c in checks.check_images(files, threads=True)]
    assert turns == [1, 1, 6, 3]
    (batch,) = list(
        images.make_image_dataset([str(p) for p in files], None, 32, 4, orientations=turns)
    )
    np.testing.assert_allclose(got, clf.predict(batch.numpy()), atol=1e-4)
    assert not np.allclose(got[0], got[1], atol=1e-3)  # two images, two answers
    assert not np.allclose(got[2], got[3], atol=1e-3)  # one image, turned two ways

    with pytest.raises(FileExistsError, match="not an empty folder"):
        export.save_saved_model(clf, tmp_path / "saved" / "1")
    assert (tmp_path / "saved" / "1" / "saved_model.pb").is_file()  # left as it was


def _tiff_big_endian(orientation: int, kind: int) -> bytes:
    """EXIF as Motorola-order cameras write it ("MM"): a maker tag, then the orientation as a
    SHORT (kind 3) or a LONG (kind 4)."""
    import struct

    value = struct.pack(">HH", orientation, 0) if kind == 3 else struct.pack(">I", orientation)
    ifd = (
        struct.pack(">H", 2)
        + struct.pack(">HHII", 0x010F, 2, 4, 0)
        + struct.pack(">HHI", 0x0112, kind, 1)
        + value
    )
    return b"MM\x00\x2a" + struct.pack(">I", 8) + ifd + b"\x00" * 4


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # PIL, on "IFD past the end"
def test_jpeg_orientation_in_the_graph_reads_what_pil_reads(tmp_path):
    """The SavedModel's own reading of the EXIF orientation (it gets files, not split's record)
    agrees with `check_image` (PIL) on every tag value, both byte orders, a segment before the
    EXIF one, and on files with no EXIF, cut short, or not JPEG at all."""
    import io

    import tensorflow as tf
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 20, 3), np.uint8))

    def jpeg(**kw) -> bytes:
        out = io.BytesIO()
        img.save(out, "JPEG", **kw)
        return out.getvalue()

    files = {}
    for value in range(10):  # 0 and 9: no valid orientation, used as stored
        exif = Image.Exif()
        exif[0x010F] = "maker"
        if value:
            exif[images.EXIF_ORIENTATION] = value
        files[f"II {value}"] = jpeg(exif=exif.tobytes())
    files["MM 6 short"] = jpeg(exif=b"Exif\x00\x00" + _tiff_big_endian(6, 3))
    files["MM 8 long"] = jpeg(exif=b"Exif\x00\x00" + _tiff_big_endian(8, 4))
    plain = jpeg()
    app2 = b"\xff\xe2" + (2 + 300).to_bytes(2, "big") + b"ICC_PROFILE\x00" + b"\x00" * 288
    files["APP2 first, then MM 5"] = (
        plain[:2]
        + app2
        + b"\xff\xe1"
        + (2 + 6 + 38).to_bytes(2, "big")
        + b"Exif\x00\x00"
        + _tiff_big_endian(5, 3)
        + plain[2:]
    )
    files["no EXIF"] = plain
    files["IFD past the end"] = jpeg(exif=b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xf0")
    png = io.BytesIO()
    img.save(png, "PNG")
    files["PNG"] = png.getvalue()
    read = tf.function(export.jpeg_orientation)
    for name, data in files.items():
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.img"
        path.write_bytes(data)
        check = checks.check_image(path)
        assert check.ok, (name, check.reason)
        assert int(read(tf.constant(data))) == (check.orientation or 1), name
    assert [int(read(tf.constant(files[f"II {v}"]))) for v in range(10)] == [1, *range(1, 9), 1]
    assert int(read(tf.constant(files["APP2 first, then MM 5"]))) == 5
    for cut in (b"", b"\xff\xd8", files["II 6"][:40]):  # never a graph error: as stored
        assert int(read(tf.constant(cut))) == 1


def test_predict_files_names_a_file_tensorflow_cannot_decode_and_labels_the_others(
    classifier_dir, tmp_path, monkeypatch
):
    """The odd file PIL reads and TensorFlow refuses (here: damage the check would catch,
    with that check off) is that file's error, not the end of every prediction."""
    root = make_class_folders(tmp_path / "imgs", per_class=2)
    damaged = bytearray((root / "cat" / "cat001.png").read_bytes())
    at = damaged.index(b"IDAT")
    damaged[at + 4 + int.from_bytes(damaged[at - 4 : at], "big")] ^= 0xFF  # the IDAT's CRC
    (root / "cat" / "cat001.png").write_bytes(bytes(damaged))
    monkeypatch.setattr(checks, "tensorflow_damage", lambda data: "")
    files = sorted(root.rglob("*.png"))
    rows = export.predict_files(export.load_classifier(classifier_dir), files, batch_size=2)
    by_name = {r["path"].split("/")[-1]: r for r in rows}
    assert by_name["cat001.png"]["error"].startswith("TensorFlow cannot decode it: ")
    assert by_name["cat001.png"]["label"] is None
    for name in ("cat000.png", "dog000.png", "dog001.png"):
        assert by_name[name]["error"] is None and by_name[name]["label"] in ("cat", "dog")

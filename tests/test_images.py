import json
import multiprocessing
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from transferline import checks, dataset, images
from transferline.errors import DataError

from conftest import add_broken_files, make_class_folders, make_image, save_turned, split


def test_split_arrays_name_images_gone_since_the_split(tmp_path, class_folders):
    out = tmp_path / "splits"
    out.mkdir()
    dataset.write_split(split(class_folders), out)
    paths, labels, turns = images.split_arrays(class_folders, out, "train", ["cat", "dog"])
    assert len(paths) == len(labels) == len(turns) > 1 and all(Path(p).is_file() for p in paths)
    Path(paths[1]).unlink()  # data/raw edited after the split: one paragraph, not a TF error
    with pytest.raises(DataError) as err:
        images.split_arrays(class_folders, out, "train", ["cat", "dog"])
    msg = str(err.value)
    assert f"1 of the {len(paths)} images that {out / 'train.csv'} lists are missing" in msg
    assert f"(e.g. {paths[1]})" in msg and "Run `dvc repro`" in msg
    # Features from an earlier split (other classes): one paragraph, not a KeyError.
    with pytest.raises(DataError) as err:
        images.split_arrays(class_folders, out, "test", [str(d) for d in range(10)])
    assert "test.csv lists classes the model has no output for (cat, dog; it has 10: 0, 1, " in (
        str(err.value)
    )
    assert "Run `dvc repro`, which extracts them again" in str(err.value)
    (out / "val.csv").unlink()
    with pytest.raises(DataError, match=r"val\.csv is missing: the split stage writes it"):
        images.split_arrays(class_folders, out, "val", ["cat", "dog"])


def test_parallel_validation_matches_serial(tmp_path):
    root = make_class_folders(tmp_path / "many", per_class=40)
    add_broken_files(root / "cat")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    serial = checks.check_images(files, workers=1)
    assert len(files) >= 64 and not all(c.ok for c in serial)  # big enough for a pool
    assert checks.check_images(files, workers=2) == serial
    assert checks.check_images(files, workers=2, threads=True) == serial  # predict's


_CHECK_IMAGE = checks.check_image
_PYTEST_PID = os.getpid()


def _check_or_die(path, **kw):
    """`check_image`, except that a worker process reading a file named die*.png is killed,
    as a native decoder crash or the out-of-memory killer would kill it."""
    if Path(path).name.startswith("die") and os.getpid() != _PYTEST_PID:
        os.kill(os.getpid(), signal.SIGKILL)
    return _CHECK_IMAGE(path, **kw)


@pytest.mark.skipif(
    multiprocessing.get_start_method() != "fork", reason="the workers must see the patch"
)
def test_a_file_that_kills_its_worker_is_rejected_and_the_others_are_checked(
    tmp_path, monkeypatch, caplog
):
    root = make_class_folders(tmp_path / "many", per_class=60)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    serial = checks.check_images(files, workers=1)
    # 120 files, chunks of 16: a worker dies on file 5; files 0-95 (what two workers may have
    # held) are checked one at a time, where file 70 kills that worker too; a new pool takes
    # files 96-119, and dies on 110.
    dying = (5, 70, 110)
    for i in dying:
        files[i] = files[i].rename(files[i].with_name(f"die{i}.png"))
    monkeypatch.setattr(checks, "check_image", _check_or_die)
    checked = checks.check_images(files, workers=2)
    assert [i for i, c in enumerate(checked) if c.reason == checks.WORKER_DIED] == list(dying)
    assert not checked[5].ok and checked[5].digest == serial[5].digest
    assert [c for i, c in enumerate(checked) if i not in dying] == [
        c for i, c in enumerate(serial) if i not in dying
    ]
    assert f"the worker process died on {files[110]}; leaving it out" in caplog.text
    assert caplog.text.count("a worker process checking images died") == 2


def test_image_dataset_decodes_to_rgb_at_size(tmp_path):
    paths = [
        make_image(tmp_path / "a.png", (255, 0, 0), mode="L"),
        make_image(tmp_path / "b.jpg", (0, 0, 255), fmt="JPEG"),
        make_image(tmp_path / "c.png", (0, 255, 0), mode="P"),
    ]
    ds = images.make_image_dataset([str(p) for p in paths], [0, 1, 2], 24, batch_size=2)
    batches = list(ds)
    assert [tuple(x.shape) for x, _ in batches] == [(2, 24, 24, 3), (1, 24, 24, 3)]
    x = np.concatenate([b.numpy() for b, _ in batches])
    assert x.min() >= 0 and x.max() <= 255
    assert x[1, ..., 2].mean() > 150 > x[1, ..., 0].mean()  # blue stays blue
    # tf.data's autotuner off: with it, deleting a finished iterator stalled up to 2.3 s
    assert ds.options().autotune.enabled is False
    full = images.make_image_dataset(
        [str(p) for p in paths], [0, 1, 2], 24, 2, training=images.Training(drop_remainder=True)
    )
    assert [tuple(y.shape) for _, y in full] == [(2,)]  # the short last batch left out


def test_cmyk_16_bit_and_mpo_decode_to_the_right_rgb(tmp_path):
    from PIL import Image

    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[...] = (200, 100, 30)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    Image.fromarray(np.full((8, 8), 200 * 257, np.uint16)).save(tmp_path / "i16.png")
    # a camera's multi-picture JPEG (MPO): the first picture is the photo
    first, second = (Image.fromarray(np.full((8, 8, 3), c, np.uint8)) for c in (60, 250))
    first.save(tmp_path / "camera.jpg", "MPO", save_all=True, append_images=[second])
    assert Image.open(tmp_path / "i16.png").mode == "I;16"
    assert Image.open(tmp_path / "camera.jpg").format == "MPO"
    paths = [str(tmp_path / name) for name in ("cmyk.jpg", "i16.png", "camera.jpg")]
    assert [checks.check_image(p).reason for p in paths] == ["", "", ""]
    (x,) = list(images.make_image_dataset(paths, None, 8, batch_size=3))
    x = x.numpy()
    np.testing.assert_allclose(x[0, 4, 4], (200, 100, 30), atol=2)
    np.testing.assert_allclose(x[1, 4, 4], (200, 200, 200), atol=1)  # scaled, not clipped
    np.testing.assert_allclose(x[2], 60, atol=2)


def test_webp_photos_decode_like_pil_and_pil_decodes_the_webp_tf_cannot(tmp_path):
    import tensorflow as tf
    from PIL import Image

    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 255, (12, 20, 3), dtype=np.uint8)
    alpha = np.dstack([rgb, rng.integers(1, 255, (12, 20, 1), dtype=np.uint8)])
    Image.fromarray(rgb).save(tmp_path / "photo.webp", quality=80)  # lossy
    Image.fromarray(rgb).save(tmp_path / "lossless.webp", lossless=True)
    Image.fromarray(rgb).save(tmp_path / "named_wrong.jpg", "WEBP")  # the content decides
    Image.fromarray(alpha, "RGBA").save(tmp_path / "logo.webp", lossless=True)
    Image.fromarray(alpha, "RGBA").save(tmp_path / "logo_lossy.webp", quality=90)
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    names = ["photo.webp", "lossless.webp", "named_wrong.jpg", "logo.webp", "logo_lossy.webp"]
    paths = [str(tmp_path / n) for n in [*names, "anim.webp"]]
    assert [checks.check_image(p).reason for p in paths] == [""] * 6
    heads = [images.needs_pil(Path(p).read_bytes()[:32]) for p in paths]
    assert heads == [False, False, False, True, True, True]
    with pytest.raises(tf.errors.InvalidArgumentError):  # why PIL decodes logo.webp
        tf.io.decode_image((tmp_path / "logo.webp").read_bytes(), channels=3)
    expected = []
    for p in paths:  # PIL's pixels (alpha dropped, the first frame), the pipeline's resize
        with Image.open(p) as img:
            expected.append(tf.image.resize(np.asarray(img.convert("RGB")), (16, 16)).numpy())
    (got,) = list(images.make_image_dataset(paths, None, 16, batch_size=6))
    np.testing.assert_allclose(got.numpy(), np.stack(expected), atol=1e-3)
    np.testing.assert_array_equal(got.numpy()[5], got.numpy()[1])  # anim: its first frame


def test_tiff_decodes_as_the_same_pixels_in_png_do(tmp_path):
    # TensorFlow reads no TIFF (PCam / histopathologic-cancer-detection ships 220,025 .tif).
    from PIL import Image

    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 255, (12, 20, 3), dtype=np.uint8)
    gray16 = rng.integers(0, 65535, (12, 20), dtype=np.uint16)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.tif")
    Image.fromarray(rgb).save(tmp_path / "lzw.tiff", compression="tiff_lzw")
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    Image.fromarray(gray16).save(tmp_path / "gray16.tif")
    Image.fromarray(rgb).save(tmp_path / "turned.tif", tiffinfo={images.EXIF_ORIENTATION: 3})
    Image.fromarray(gray16.astype(np.float32)).save(tmp_path / "float.tif")
    names = ["rgb.png", "rgb.tif", "lzw.tiff", "gray16.png", "gray16.tif", "turned.tif"]
    checked = [checks.check_image(tmp_path / n) for n in names]
    assert [c.reason for c in checked] == [""] * 6
    assert checked[5].orientation == 1  # PIL turns a TIFF by its own tag while decoding it
    float_tiff = checks.check_image(tmp_path / "float.tif")
    assert not float_tiff.ok and float_tiff.reason.startswith("32-bit float TIFF")
    paths = [str(tmp_path / n) for n in names]
    turns = [c.orientation for c in checked]
    (got,) = list(images.make_image_dataset(paths, None, 16, batch_size=6, orientations=turns))
    got = got.numpy()
    np.testing.assert_array_equal(got[1], got[0])
    np.testing.assert_array_equal(got[2], got[0])
    np.testing.assert_allclose(got[4], got[3], atol=1)  # 16 bits cut to 8 as TensorFlow does
    np.testing.assert_array_equal(got[5], got[0][::-1, ::-1])  # orientation 3: half a turn


def test_exif_orientation_turns_camera_images_upright(tmp_path, caplog):
    """Phones store pixels as the sensor read them plus an EXIF tag saying how to turn them;
    split records the tag and every loader turns the image as PIL's exif_transpose does."""
    import tensorflow as tf
    from PIL import Image, ImageOps

    rng = np.random.default_rng(0)
    upright = rng.integers(0, 255, (12, 20, 3), dtype=np.uint8)  # landscape, no symmetry
    root = tmp_path / "raw"
    for o in range(1, 9):
        save_turned(root / "cat" / f"o{o}.png", upright, o)
        save_turned(root / "dog" / f"o{o}.png", 255 - upright, o)
    broken = save_turned(root / "dog" / "bad_tag.png", upright[:, ::-1].copy(), 1)
    with Image.open(broken) as img:
        img.load()
        exif = img.getexif()
        exif[images.EXIF_ORIENTATION] = 9  # no such orientation: used as stored
        img.save(broken, exif=exif)
    assert checks.check_image(broken).orientation == 0
    assert checks.check_image(root / "cat/o6.png").orientation == 6
    result = split(root, val=0.2, test=0.2)
    assert "corrupt EXIF), e.g. dog/bad_tag.png: they are used as stored" in caplog.text
    assert result.orientations == {f"{c}/o{o}.png": o for c in ("cat", "dog") for o in range(2, 9)}
    out = tmp_path / "splits"
    out.mkdir()
    dataset.write_split(result, out)
    assert json.loads((out / dataset.SUMMARY_FILE).read_text())["exif_turned"] == 14
    paths, labels, turns = [], [], []
    for s in images.SPLITS:
        p, y, o = images.split_arrays(root, out, s, ["cat", "dog"])
        paths += p
        labels += list(y)
        turns += list(o)
    assert sorted(turns) == [1, 1, 1, *sorted(2 * list(range(2, 9)))]
    # The reference: PIL turns the file upright, then the pipeline's own resize.
    expected = []
    for p in paths:
        with Image.open(p) as img:
            ref = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        expected.append(tf.image.resize(ref, (16, 16)).numpy())
    got = np.concatenate(list(images.make_image_dataset(paths, None, 16, 5, orientations=turns)))
    np.testing.assert_allclose(got, np.stack(expected), atol=1e-3)
    # all eight cats are one upright picture, whatever their tag
    cat = expected[paths.index(str(root / "cat/o1.png"))]
    assert sum(np.allclose(x, cat, atol=1e-3) for x in got) == 8
    # with labels and shuffling, each file's turn travels with it
    ds = images.make_image_dataset(
        paths, labels, 16, 4, orientations=turns, training=images.Training(shuffle_seed=3)
    )
    for x, y in ds:
        for img, label in zip(x.numpy(), y.numpy(), strict=True):
            match = [i for i, e in enumerate(expected) if np.allclose(img, e, atol=1e-3)]
            assert match and all(labels[i] == label for i in match)
    # without the record, files are used as stored (a plain tf.data decode)
    plain = np.concatenate(list(images.make_image_dataset(paths, None, 16, 5)))
    assert not np.allclose(plain, got, atol=1)


def test_unreadable_exif_never_costs_a_usable_image(tmp_path, monkeypatch):
    from PIL import Image

    path = make_image(tmp_path / "a.jpg", (10, 20, 30), fmt="JPEG")

    def broken(self):
        raise KeyError("a maker note PIL cannot parse")

    monkeypatch.setattr(Image.Image, "getexif", broken)
    check = checks.check_image(path)
    assert check.ok and check.orientation == 0  # used as stored


def test_exif_orientation_of_a_jpeg_is_read(tmp_path):
    upright = np.zeros((16, 24, 3), np.uint8)
    upright[:, :8] = 255  # white on the left
    path = save_turned(tmp_path / "photo.jpg", upright, 6, fmt="JPEG")
    check = checks.check_image(path)
    assert check.ok and check.orientation == 6
    (x,) = list(images.make_image_dataset([str(path)], None, 24, 1, orientations=[6]))
    x = x.numpy()[0]
    assert x[:, :6].mean() > 200 and x[:, -10:].mean() < 40  # left is white again


def test_avif_decodes_like_pil_and_unread_formats_say_what_to_do(tmp_path):
    """AVIF (Pillow's wheels read it; TensorFlow does not) goes through PIL, turned by its EXIF
    tag as a JPEG is. DICOM, which neither reads, gets a reason that says what to do."""
    import tensorflow as tf
    from PIL import Image, ImageOps

    rgb = np.random.default_rng(4).integers(0, 255, (12, 20, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = 6
    Image.fromarray(rgb).save(tmp_path / "photo.avif", quality=90)
    Image.fromarray(rgb).save(tmp_path / "turned.avif", quality=90, exif=exif)
    paths = [str(tmp_path / n) for n in ("photo.avif", "turned.avif")]
    checked = [checks.check_image(p) for p in paths]
    assert [(c.ok, c.orientation) for c in checked] == [(True, 1), (True, 6)]
    assert all(images.needs_pil(Path(p).read_bytes()[:32]) for p in paths)
    expected = []
    for p in paths:  # PIL's pixels turned upright as photo viewers show them, then our resize
        with Image.open(p) as img:
            upright = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        expected.append(tf.image.resize(upright, (16, 16)).numpy())
    turns = [c.orientation for c in checked]
    (got,) = list(images.make_image_dataset(paths, None, 16, batch_size=2, orientations=turns))
    np.testing.assert_allclose(got.numpy(), np.stack(expected), atol=1e-3)

    (tmp_path / "scan.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    assert checks.check_image(tmp_path / "scan.dcm").reason.startswith("DICOM (a medical scan)")


def test_heic_photos_decode_upright(tmp_path):
    """HEIC, phones' photo format, is read through pi-heif. A phone stores a portrait photo as
    landscape pixels and a rotation the HEIF reader applies (pillow-heif writes EXIF
    orientation 6 as one): it decodes upright, with nothing left to turn. AVIF, the same
    ISO container, is still Pillow's to read."""
    import pillow_heif
    import tensorflow as tf
    from PIL import Image

    rgb = np.zeros((24, 40, 3), np.uint8)
    rgb[:12, :20] = 255  # white top left, green bottom right: blocks survive lossy coding
    rgb[12:, 20:, 1] = 200
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = 6  # turn 90 degrees clockwise to view
    pillow_heif.from_pillow(Image.fromarray(rgb)).save(tmp_path / "a.heic", quality=95)
    turned = pillow_heif.from_pillow(Image.fromarray(rgb))
    turned.save(tmp_path / "portrait.HEIC", quality=95, exif=exif.tobytes())
    Image.fromarray(rgb).save(tmp_path / "b.avif", quality=95)
    paths = [str(tmp_path / n) for n in ("a.heic", "portrait.HEIC", "b.avif")]
    checked = [checks.check_image(p) for p in paths]
    assert [(c.ok, c.reason, c.orientation) for c in checked] == [(True, "", 1)] * 3
    assert all(images.needs_pil(Path(p).read_bytes()[:32]) for p in paths)
    assert images.pil_rgb(paths[1]).shape == (40, 24, 3)  # upright: portrait
    (tmp_path / "cut.heic").write_bytes(Path(paths[0]).read_bytes()[:200])
    assert checks.check_image(tmp_path / "cut.heic").reason.startswith("HEIC/HEIF that libheif")
    (got,) = list(images.make_image_dataset(paths, None, 16, batch_size=3))
    for x, want in zip(got.numpy(), (rgb, np.rot90(rgb, k=-1), rgb), strict=True):
        want = tf.image.resize(want, (16, 16)).numpy()
        assert np.abs(x - want).mean() < 4, np.abs(x - want).mean()


def test_bmp_of_any_depth_decodes_like_pil(tmp_path):
    """TensorFlow's BMP decoder reads a palette's indices as grey and refuses 1-bit files."""
    import tensorflow as tf
    from PIL import Image

    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    rgb.save(tmp_path / "rgb24.bmp")
    rgb.quantize(16).save(tmp_path / "palette.bmp")
    rgb.convert("1").save(tmp_path / "mono.bmp")
    paths = [str(tmp_path / n) for n in ("rgb24.bmp", "palette.bmp", "mono.bmp")]
    assert [checks.check_image(p).reason for p in paths] == ["", "", ""]
    assert all(images.needs_pil(Path(p).read_bytes()[:32]) for p in paths)
    tf_palette = tf.io.decode_image(Path(paths[1]).read_bytes(), channels=3).numpy()
    with Image.open(paths[1]) as img:
        assert np.abs(tf_palette.astype(int) - np.asarray(img.convert("RGB"))).max() > 50
    (got,) = list(images.make_image_dataset(paths, None, 16, batch_size=3))
    for p, x in zip(paths, got.numpy(), strict=True):
        with Image.open(p) as img:
            np.testing.assert_array_equal(x, np.asarray(img.convert("RGB"), np.float32))


def _damaged(tmp_path):
    """Files PIL decodes and TensorFlow refuses, each with the reason the split gives."""
    import io
    import struct
    import zlib

    from PIL import Image

    pixels = Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), np.uint8))
    buf = io.BytesIO()
    pixels.save(buf, "PNG")
    png = buf.getvalue()
    idat = png.index(b"IDAT") - 4
    n = int.from_bytes(png[idat : idat + 4], "big")
    bad_crc = bytearray(png)
    bad_crc[idat + 8 + n] ^= 0xFF  # the IDAT chunk's CRC
    text = b"tEXt" + b"Comment\0hello"
    chunk = struct.pack(">I", len(text) - 4) + text + struct.pack(">I", zlib.crc32(text) ^ 1)
    buf = io.BytesIO()
    pixels.save(buf, "JPEG", exif=Image.Exif())
    jpeg = buf.getvalue()
    # an EXIF thumbnail holds a whole JPEG of its own, end marker included
    thumb = io.BytesIO()
    pixels.resize((4, 4)).save(thumb, "JPEG")
    tiff = b"MM\0*\0\0\0\x08\0\0\0\0\0\0"
    app1 = b"Exif\0\0" + tiff + thumb.getvalue()
    with_thumb = jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]
    files = {
        "crc.png": (bytes(bad_crc), "corrupt PNG: bad CRC in its IDAT chunk"),
        "cut.png": (png[: png.index(b"IEND") - 4], "truncated PNG: it ends before its IEND"),
        # its end marker zeroed, as in a download whose end never came into a preallocated file
        "zeroed.jpg": (jpeg[:-2] + bytes(64), "truncated JPEG: no end-of-image marker"),
        "zeroed_thumb.jpg": (with_thumb[:-2] + bytes(64), "truncated JPEG: no end-of-image"),
    }
    fine = {  # libpng skips an ancillary chunk with a bad CRC; a whole JPEG with a thumbnail
        "ancillary.png": png[: png.index(b"IEND") - 4] + chunk + png[png.index(b"IEND") - 4 :],
        "thumb.jpg": with_thumb,
    }
    return files, fine


def test_files_tensorflow_refuses_are_rejected_at_the_split(tmp_path):
    """PIL decodes these, TensorFlow does not: passed, they would stop extract halfway."""
    import tensorflow as tf

    damaged, fine = _damaged(tmp_path)
    for name, (data, reason) in damaged.items():
        (tmp_path / name).write_bytes(data)
        check = checks.check_image(tmp_path / name)
        assert not check.ok and check.reason.startswith(reason), (name, check)
        with pytest.raises(tf.errors.InvalidArgumentError):
            tf.io.decode_image(data, channels=3, expand_animations=False)
    for name, data in fine.items():
        (tmp_path / name).write_bytes(data)
        assert checks.check_image(tmp_path / name).ok, name
        tf.io.decode_image(data, channels=3, expand_animations=False)


def test_pil_exceptions_beyond_oserror_and_huge_images_are_reasons(tmp_path, monkeypatch, recwarn):
    from PIL import Image, ImageFile

    path = make_image(tmp_path / "a.png", (10, 20, 30))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 16x16 = 256 pixels, over twice it
    check = checks.check_image(path)
    assert not check.ok and check.reason.startswith("too many pixels to decode safely")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # over it, under twice it: a warning
    assert checks.check_image(path).ok
    assert not [w for w in recwarn if "PIL" in w.filename]  # held back, once per file else

    def broken(self):
        raise EOFError("Decoder plugin generated an error")  # as pi-heif raises on a cut file

    monkeypatch.setattr(ImageFile.ImageFile, "load", broken)
    check = checks.check_image(path)
    assert not check.ok and "Decoder plugin generated an error" in check.reason


def test_what_libtiff_prints_on_a_damaged_tiff_goes_into_the_reason(tmp_path, capfd):
    import io

    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "TIFF", compression="tiff_lzw")
    data = bytearray(buf.getvalue())
    data[28:48] = b"\xff" * 20  # inside the LZW strip, which starts after the 8-byte header
    (tmp_path / "scan.tif").write_bytes(data)
    make_class_folders(tmp_path, per_class=40)
    files = sorted(tmp_path.rglob("*.*"))
    capfd.readouterr()
    quiet = checks.check_image(tmp_path / "scan.tif", native_stderr=True)
    # libtiff's words (not on the terminal), without the name PIL gives its in-memory file
    assert quiet.reason.startswith("corrupt or truncated image: decoder error -2 (Using code")
    assert "tempfile.tif" not in quiet.reason and capfd.readouterr().err == ""
    loud = checks.check_image(tmp_path / "scan.tif")  # predict's threads: stderr left alone
    assert loud.reason == "corrupt or truncated image: decoder error -2"
    assert "Using code not yet in table" in capfd.readouterr().err
    for workers in (1, 2):  # the split: in its own process, and in worker processes
        checked = checks.check_images(files, workers=workers)
        assert checked[files.index(tmp_path / "scan.tif")] == quiet
        assert sum(not c.ok for c in checked) == 1
    assert capfd.readouterr().err == ""
    print("after", file=sys.stderr)  # stderr works again, here and in C
    os.write(2, b"fd 2\n")
    assert capfd.readouterr().err == "after\nfd 2\n"


def test_damaged_files_are_rejected_with_a_reason_or_decode(tmp_path):
    """Files of every format cut short or with bytes changed (a fixed sample): validation never
    raises, and each file it passes decodes the way extract will decode it."""
    import io
    import random

    import pillow_heif
    import tensorflow as tf
    from PIL import Image

    rng = random.Random(0)
    pixels = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), np.uint8))
    encoded = []
    for fmt, options in [
        ("JPEG", {}),
        ("JPEG", {"progressive": True}),
        ("PNG", {}),
        ("BMP", {}),
        ("GIF", {}),
        ("WEBP", {}),
        ("WEBP", {"lossless": True}),
        ("TIFF", {}),
        ("AVIF", {}),
    ]:
        buf = io.BytesIO()
        pixels.save(buf, fmt, **options)
        encoded.append(buf.getvalue())
    buf = io.BytesIO()
    pillow_heif.from_pillow(pixels).save(buf)
    encoded.append(buf.getvalue())
    passed = 0
    for i in range(400):
        data = bytearray(rng.choice(encoded))
        if rng.random() < 0.3:
            data = data[: rng.randrange(1, len(data))]
        else:
            for _ in range(rng.choice([1, 2, 4, 8])):
                data[rng.randrange(len(data))] = rng.randrange(256)
        path = tmp_path / f"{i}.img"
        path.write_bytes(bytes(data))
        check = checks.check_image(path)  # raises nothing
        if not check.ok:
            assert check.reason
            continue
        passed += 1
        if images.needs_pil(bytes(data[:32])):
            assert images.pil_rgb(str(path)).shape[2] == 3
        else:
            assert (
                tf.io.decode_image(bytes(data), channels=3, expand_animations=False).shape[2] == 3
            )
    assert 100 < passed < 400  # both kinds were tried

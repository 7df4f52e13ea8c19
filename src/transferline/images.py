"""Reading the images: checking each file, decoding it to RGB, and the tf.data pipeline over a
split's manifest.

The extract, finetune and evaluate stages (and `transferline predict`) read images through this
module, and DVC lists it, not `dataset.py`, `layouts.py` or `labels_csv.py`, as their dependency: a
change to how the split is made re-runs the split stage, and extraction only when the manifests
it writes change. TensorFlow is imported inside the loaders only: the split stage, which uses
the checks, never imports it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transferline.errors import DataError

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Formats the pipeline reads: TensorFlow decodes them in `load_image`, except what `needs_pil`
# picks out (TIFF, AVIF, HEIF, BMP; WebP with transparency or animation), which PIL decodes (HEIF
# through pi-heif). MPO is a camera's JPEG with more pictures (e.g. a depth map) after the
# photo; both decode the photo.
SUPPORTED_FORMATS = {"JPEG", "MPO", "PNG", "BMP", "GIF", "WEBP", "TIFF", "AVIF", "HEIF"}
HEAD_BYTES = 32  # what `needs_pil` reads of a file
EXIF_ORIENTATION = 0x0112  # the EXIF tag saying how a camera's stored pixels must be turned
ORIENTATION_FILE = "orientation.csv"  # split's record of the images to turn (path,orientation)


# ---------------------------------------------------------------- decoding with PIL


def exif_orientation(img) -> int:
    """The EXIF orientation of an opened PIL image, as PIL's `ImageOps.exif_transpose` reads
    it; 0 for a tag that holds no valid value (then the pixels are used as stored)."""
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # metadata only: unreadable EXIF must not cost a usable image
        return 0
    return value if isinstance(value, int) and 1 <= value <= 8 else 0


@functools.cache
def read_heif() -> None:
    """Teach PIL to open HEIC/HEIF (phones' photos) through pi-heif, libheif built to decode
    only. On first use, not on import; once per process (split's workers are processes).

    pi-heif applies the file's rotation and mirroring boxes (as the HEIF standard requires,
    and as phones store a portrait photo) and then reads the EXIF orientation as 1, so such a
    photo is upright as decoded and never turned twice.
    """
    import pi_heif  # noqa: PLC0415

    pi_heif.register_heif_opener()


@contextlib.contextmanager
def pil_quiet() -> Iterator[None]:
    """Hold back PIL's warnings while one file is read: a corrupt EXIF block (PIL skips the
    tag, as its `exif_transpose` does) and an image over `Image.MAX_IMAGE_PIXELS` (up to twice
    that, above which PIL refuses it and the file is rejected). Neither changes the pixels
    used, and the split's workers would print them once per file."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"PIL\.")
        yield


def needs_pil(head: bytes) -> bool:
    """Whether a file starting with `head` (its first HEAD_BYTES) is decoded by PIL rather
    than TensorFlow: TIFF, AVIF and HEIC, which TensorFlow does not read, and WebP with
    transparency or animation (TensorFlow decodes the first only as RGBA, and its decoder
    corrupted memory on an animated one, TF 2.21), and BMP. Decided from the header, the same
    way at validation and at loading."""
    if head[:4] in (b"II*\0", b"MM\0*") or head[4:8] == b"ftyp":  # TIFF; AVIF, HEIC (ISO)
        return True
    if head[:2] == b"BM":  # TensorFlow reads a BMP's palette indices as grey and fails on 1-,
        return True  # 4- and 16-bit or compressed ones; PIL reads them all (24-bit: same pixels)
    if head[:4] != b"RIFF" or head[8:12] != b"WEBP" or len(head) < 25:
        return False
    if head[12:16] == b"VP8X":  # extended: flags byte, alpha 0x10, animation 0x02
        return bool(head[20] & 0x12)
    if head[12:16] == b"VP8L":  # lossless: after the 0x2f signature, 14 + 14 bits of size,
        return bool(int.from_bytes(head[21:25], "little") >> 28 & 1)  # then the alpha bit
    return False


def _head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(HEAD_BYTES)


def pil_rgb(path: bytes | str) -> np.ndarray:
    """What `load_image` gets from TensorFlow's decoders, for a file `needs_pil` picks out:
    the first frame or page, as RGB uint8, alpha dropped, 16 bits cut to 8 as TensorFlow cuts
    a 16-bit PNG (the high byte)."""
    from PIL import Image  # noqa: PLC0415

    read_heif()
    with pil_quiet(), Image.open(path.decode() if isinstance(path, bytes) else path) as img:
        img.seek(0)
        if img.mode.startswith("I;16"):
            gray = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)
            return np.repeat(gray[..., None], 3, axis=2)
        return np.asarray(img.convert("RGB"))


# ---------------------------------------------------------------- tf.data


def read_manifest(path: Path) -> list[tuple[str, str]]:
    import csv  # noqa: PLC0415

    with Path(path).open(newline="") as f:
        return [(r["path"], r["label"]) for r in csv.DictReader(f)]


# EXIF orientation -> (transpose, flip left-right, flip top-bottom), applied in that order:
# the same pixels as PIL's ImageOps.exif_transpose (tests/test_images.py).
_ORIENTATION_STEPS = {
    1: (0, 0, 0),
    2: (0, 1, 0),
    3: (0, 1, 1),
    4: (0, 0, 1),
    5: (1, 0, 0),
    6: (1, 1, 0),
    7: (1, 1, 1),
    8: (1, 0, 1),
}


def decode_tf_bytes(data: tf.Tensor) -> tf.Tensor:
    """An encoded image's RGB uint8 pixels, as TensorFlow decodes them, in a graph of
    TensorFlow ops only, so a SavedModel can decode too (`export.save_saved_model`). The
    pipeline uses it for the files `needs_pil` does not pick out: JPEG, PNG, GIF's first frame
    and opaque still WebP (BMP and transparent or animated WebP go through PIL)."""
    import tensorflow as tf  # noqa: PLC0415

    return tf.io.decode_image(data, channels=3, expand_animations=False)


def load_image(
    path: tf.Tensor,
    image_size: int,
    orientation: tf.Tensor | None = None,
    pil: tf.Tensor | None = None,
) -> tf.Tensor:
    """Decode any supported file to RGB float32 0..255 at image_size x image_size, turned
    upright by its EXIF `orientation` (1..8) when one is given; with `pil` true, by PIL
    (`pil_rgb`), for the files `needs_pil` picks out.

    Args:
        path: the file.
        image_size: the side it is resized to.
        orientation: its EXIF orientation, if known.
        pil: decode with PIL.

    Returns:
        A float32 tensor (image_size, image_size, 3).
    """
    import tensorflow as tf  # noqa: PLC0415

    def decode_tf() -> tf.Tensor:
        return decode_tf_bytes(tf.io.read_file(path))

    def decode_pil() -> tf.Tensor:
        img = tf.numpy_function(pil_rgb, [path], tf.uint8, stateful=False)
        img.set_shape((None, None, 3))
        return img

    img = decode_tf() if pil is None else tf.cond(pil, decode_pil, decode_tf)
    # Bilinear without antialiasing, as keras.utils.image_dataset_from_directory does: 25%
    # faster on CPU (bench/extract.py), and what ImageNet-trained bases usually see.
    img = tf.image.resize(img, (image_size, image_size))
    img = tf.ensure_shape(img, (image_size, image_size, 3))
    return img if orientation is None else upright(img, orientation)


def upright(img: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """`img` (one square image) turned as EXIF `orientation` (1..8) says.

    Turned after the resize, on fewer pixels: resizing to a square works per axis, so the
    order gives the same numbers. tf.switch_case runs only the turn an image needs (tf.where
    over every turn made all decoding about 3x slower); what is left costs small files some
    decode speed, camera-sized ones none (bench/orientation.py).
    """
    import tensorflow as tf  # noqa: PLC0415

    def turn(transpose: int, flip_lr: int, flip_ud: int):
        def branch() -> tf.Tensor:
            out = tf.transpose(img, (1, 0, 2)) if transpose else img
            out = tf.reverse(out, [1]) if flip_lr else out
            return tf.reverse(out, [0]) if flip_ud else out

        return branch

    branches = [turn(*_ORIENTATION_STEPS[o]) for o in range(1, 9)]
    return tf.switch_case(tf.clip_by_value(orientation, 1, 8) - 1, branches)


@dataclass(frozen=True)
class Training:
    """How training batches differ from the others: shuffled with `shuffle_seed` (reshuffled
    every epoch), `augment` (a Keras layer, called with training=True here, never saved with
    the model), and the short last batch left out with `drop_remainder`
    (`replicas.epoch_plan`)."""

    shuffle_seed: int | None = None
    augment: object = None
    drop_remainder: bool = False


def make_image_dataset(
    paths: Sequence[str],
    labels: Sequence[int] | None,
    image_size: int,
    batch_size: int,
    orientations: Sequence[int] | None = None,
    training: Training | None = None,
) -> tf.data.Dataset:
    """Parallel, deterministic decode + resize + batch (+ augment) + prefetch over image files.

    `orientations` (EXIF, 1..8 per path, from `split_arrays` or `check_images`) turn camera
    images upright; a set with none to turn, and no file for PIL (`needs_pil`, read from each
    file's header rather than a tf.cond per image, which slows decoding), decodes plainly.

    tf.data's autotuner is off and the parallelism fixed (one decode per usable core, a few
    batches ahead): with it on, deleting a finished iterator can block for seconds, a stall
    paid by every extract split and every epoch (`bench/extract.py --paths b_autotune`).

    Args:
        paths: the image files.
        labels: their labels, or None for images only.
        image_size: the side every image is resized to.
        batch_size: images per batch.
        orientations: their EXIF orientations.
        training: shuffling, augmentation and the dropped remainder.

    Returns:
        A tf.data.Dataset of batches (images, or (images, labels)).
    """
    import tensorflow as tf  # noqa: PLC0415

    training = training or Training()
    parallel = usable_cpus()
    files = _file_slices(paths, orientations)
    ds = tf.data.Dataset.from_tensor_slices(files if len(files) > 1 else list(paths))

    def load(file) -> tf.Tensor:  # file: a path, or {"path", "orientation"?, "pil"?}
        if not isinstance(file, dict):
            return load_image(file, image_size)
        return load_image(file["path"], image_size, file.get("orientation"), file.get("pil"))

    if labels is not None:
        ds = tf.data.Dataset.zip(ds, tf.data.Dataset.from_tensor_slices(np.asarray(labels)))
    if training.shuffle_seed is not None:
        ds = ds.shuffle(len(paths), seed=training.shuffle_seed, reshuffle_each_iteration=True)
    if labels is not None:
        ds = ds.map(lambda f, y: (load(f), y), num_parallel_calls=parallel, deterministic=True)
    else:
        ds = ds.map(load, num_parallel_calls=parallel, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=training.drop_remainder)
    if training.augment is not None:
        augment = training.augment
        ds = ds.map(
            lambda x, y: (augment(x, training=True), y),
            num_parallel_calls=parallel,
            deterministic=True,
        )
    return prefetched(ds)


def prefetched(ds: tf.data.Dataset) -> tf.data.Dataset:
    """`ds` reading `PREFETCH_BATCHES` batches ahead, tf.data's autotuner off (the stall
    `make_image_dataset` explains)."""
    import tensorflow as tf  # noqa: PLC0415

    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(PREFETCH_BATCHES).with_options(options)


def _file_slices(paths: Sequence[str], orientations: Sequence[int] | None) -> dict[str, object]:
    """What `make_image_dataset` slices per file: its path, and only where some file needs
    them, its EXIF orientation and whether PIL decodes it (from the file's header)."""
    files: dict[str, object] = {"path": list(paths)}
    if orientations is not None and any(o != 1 for o in orientations):
        if len(orientations) != len(paths):
            raise ValueError(f"{len(orientations)} orientations for {len(paths)} paths")
        files["orientation"] = np.asarray(orientations, dtype=np.int32)
    pil = np.asarray([needs_pil(_head(p)) for p in paths], dtype=bool)
    if pil.any():
        files["pil"] = pil
    return files


PREFETCH_BATCHES = 3


def undecodable(paths: Sequence[str]) -> list[tuple[str, str]]:
    """(path, error) for each file the pipeline cannot decode, each decoded alone by the
    decoder the pipeline picks for it (TensorFlow's, or PIL's for `needs_pil` files).

    For after a pipeline stopped on a decoding error, which names no file: the split checks
    every image with PIL, and `tensorflow_damage` rejects the damage TensorFlow is known to
    refuse, but its JPEG decoder still fails on the odd file PIL reads (2 of the 4,157 that
    passed, of 10,000 JPEGs cut short or with bytes changed, in a fuzzing run)."""
    import tensorflow as tf  # noqa: PLC0415

    bad = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
            if needs_pil(data[:HEAD_BYTES]):
                pil_rgb(path)
            else:
                tf.io.decode_image(data, channels=3, expand_animations=False)
        except Exception as exc:  # whichever: the file is the one to name
            # TensorFlow's "{{function_node ...}} Invalid PNG data, size 847 [Op:DecodeImage]"
            text = re.sub(r"\{\{[^}]*\}\}|\[Op:[^]]*\].*", "", str(exc)).strip()
            bad.append((str(path), text.splitlines()[0][:200] if text else type(exc).__name__))
    return bad


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def read_orientations(splits_dir: Path) -> dict[str, int]:
    """The split stage's record of images to turn upright (path -> EXIF orientation 2..8).
    A splits folder without one (e.g. manifests written by hand) has none to turn."""
    import csv  # noqa: PLC0415

    path = Path(splits_dir) / ORIENTATION_FILE
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return {r["path"]: int(r["orientation"]) for r in csv.DictReader(f)}


def split_arrays(
    raw: Path, splits_dir: Path, split: str, classes: list[str]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Absolute file paths, integer labels and EXIF orientations of one split's manifest.

    Every listed image must still be under `raw`: a file gone since the split (data/raw
    edited by hand, or `dvc repro -s` after a new download) stops the stage here with the fix,
    not as a TensorFlow read error halfway through a split.

    Args:
        raw: the images' folder.
        splits_dir: the manifests' folder.
        split: train, val or test.
        classes: the class names, in label order.
    """
    manifest = splits_dir / f"{split}.csv"
    if not manifest.is_file():
        raise DataError(
            f"{manifest} is missing: the split stage writes it. Run `dvc repro` (or "
            f"`dvc checkout {splits_dir}` to restore the last split DVC recorded)."
        )
    rows = read_manifest(manifest)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({lbl for _, lbl in rows} - set(index))
    if unknown:
        raise DataError(
            f"{manifest} lists classes the model has no output for ({', '.join(unknown[:5])}"
            f"{', ...' if len(unknown) > 5 else ''}; it has {len(classes)}: "
            f"{', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}): the split "
            f"changed after the features were extracted. Run `dvc repro`, which extracts them "
            f"again (not `dvc repro -s` or a stage script alone)."
        )
    turned = read_orientations(splits_dir)
    paths = [raw / p for p, _ in rows]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(paths)} images that {manifest} lists are missing "
            f"under {raw}/ (e.g. {missing[0]}): {raw} changed after the split stage ran. Run "
            f"`dvc repro`, which splits again when {raw} changed (`dvc repro -s` or "
            f"--single-item skips that), or `dvc checkout {raw}` to restore the download "
            f"this split was made from."
        )
    return (
        [str(p) for p in paths],
        np.array([index[lbl] for _, lbl in rows], dtype=np.int64),
        np.array([turned.get(p, 1) for p, _ in rows], dtype=np.int32),
    )

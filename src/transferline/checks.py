"""Checking each image once, as the split stage does: can it be decoded the way the pipeline
decodes it, what damage would TensorFlow refuse, its content digest (for de-duplication) and
EXIF orientation; over all cores, a crashing decoder costing only its file."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    pass

from transferline.images import (
    HEAD_BYTES,
    SUPPORTED_FORMATS,
    exif_orientation,
    needs_pil,
    pil_quiet,
    read_heif,
    usable_cpus,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    ok: bool
    reason: str
    digest: str
    # EXIF orientation 1..8 (1: as stored, or no tag); 0: a tag with no valid value
    orientation: int = 1


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CRITICAL = {b"IHDR", b"PLTE", b"IDAT", b"IEND"}


def _png_damage(data: bytes) -> str:
    """Why libpng, TensorFlow's PNG decoder, refuses a PNG that PIL reads: PIL does not check
    the image data's CRC, nor read on to the end chunk. Empty when there is none. As libpng: a
    critical chunk (first letter upper case) must have a good CRC and be known; an ancillary
    one with a bad CRC is skipped."""
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):
            break
        critical = kind[:1].isupper()
        if critical and kind not in _PNG_CRITICAL:
            return f"corrupt PNG: unknown critical chunk {kind!r} at byte {pos}"
        crc = int.from_bytes(data[end - 4 : end], "big")
        if critical and zlib.crc32(data[pos + 4 : end - 4]) != crc:
            return f"corrupt PNG: bad CRC in its {kind.decode('latin-1')} chunk at byte {pos}"
        if kind == b"IEND":
            return ""
        pos = end
    return "truncated PNG: it ends before its IEND chunk"


def _jpeg_damage(data: bytes) -> str:
    """Why TensorFlow refuses a JPEG that PIL reads: TensorFlow's decoder reads on to the
    end-of-image marker (EOI) and fails where the data ends without one (a download whose end
    was never written), which PIL lets pass once it has every row. Empty when an EOI follows
    the first image's scan. Walks the header's segments to that scan, so an EXIF thumbnail's
    own EOI does not count."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return ""  # not a marker where one should be: left to the decoders
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan: entropy-coded data, then (more scans and) EOI
            return (
                "" if data.find(b"\xff\xd9", pos) > 0 else "truncated JPEG: no end-of-image marker"
            )
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return ""


def tensorflow_damage(data: bytes) -> str:
    """Damage that TensorFlow's decoders refuse in a file PIL decodes (PNG, JPEG), as a
    rejection reason, or empty: the split rejects such files, or extract would stop halfway."""
    if data.startswith(_PNG_SIGNATURE):
        return _png_damage(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_damage(data)
    return ""


def content_digest(data: bytes) -> str:
    """A file's identity for de-duplication: identical bytes, identical digest."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def check_image(path: str | Path, native_stderr: bool = False) -> Check:
    """Decode one file fully; say why it is unusable, and hash its bytes for de-duplication.

    `native_stderr`: what C libraries print while the file is read (libtiff's errors on a
    damaged TIFF, which PIL's exception does not carry: "decoder error -2") goes into the
    reason instead of the terminal. Only where no other thread writes to stderr (the split's
    workers, not predict's threads): the capture redirects the whole process's stderr.
    """
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return Check(False, f"unreadable: {exc.strerror or exc}", "")
    digest = content_digest(data)
    if not data:
        return Check(False, "empty file (0 bytes)", digest)
    read_heif()
    said: list[str] = []
    native = _native_stderr(said) if native_stderr else contextlib.nullcontext()
    try:
        with native, pil_quiet(), Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            if fmt not in SUPPORTED_FORMATS:
                supported = ", ".join(sorted(SUPPORTED_FORMATS))
                reason = f"unsupported image format {fmt} (supported: {supported})"
                return Check(False, reason, digest)
            if img.mode in ("I", "F") and needs_pil(data[:HEAD_BYTES]):
                return Check(
                    False,
                    f"32-bit {'float' if img.mode == 'F' else 'integer'} {fmt} (no fixed way to "
                    f"8-bit colour); save it as 8- or 16-bit",
                    digest,
                )
            img.load()
            if img.width < 1 or img.height < 1:
                return Check(False, "image has no pixels", digest)
            orientation = exif_orientation(img)
    except UnidentifiedImageError:
        return Check(
            False, _unread_format(data) or "not an image (unrecognised file format)", digest
        )
    except Image.DecompressionBombError as exc:  # PIL's guard against decompression bombs
        size = str(exc).partition(", could")[0]  # Image size (N pixels) exceeds limit of M pixels
        reason = f"too many pixels to decode safely: {size}; scale it down (the model sees it "
        return Check(False, reason + "at model.image_size px anyway)", digest)
    except Exception as exc:  # PIL's plugins raise more than OSError on a damaged file (found
        # by fuzzing: RuntimeError from AVIF, EOFError from HEIC): whichever, it is a reason
        why = f"{exc or type(exc).__name__}{_first_said(said)}"
        return Check(False, f"corrupt or truncated image: {why}", digest)
    damage = tensorflow_damage(data)
    if damage:
        return Check(False, damage, digest)
    return Check(True, "", digest, orientation)


_STDERR_FILES: dict[int, IO[bytes]] = {}  # process id -> its capture file, reused


@contextlib.contextmanager
def _native_stderr(into: list[str]) -> Iterator[None]:
    """Send file descriptor 2 (where C libraries print) to a file while the body runs, and
    append the lines written there to `into`."""
    pid = os.getpid()  # a forked worker must not share its parent's file (and offset)
    if pid not in _STDERR_FILES:
        _STDERR_FILES[pid] = tempfile.TemporaryFile()  # noqa: SIM115 (kept, reused)
    tmp = _STDERR_FILES[pid]
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all (closed): nothing to keep off it
        yield
        return
    os.dup2(tmp.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        if os.fstat(tmp.fileno()).st_size:  # mostly nothing was said: one call, no read
            tmp.seek(0)
            into.extend(line.strip() for line in tmp.read().decode(errors="replace").splitlines())
            tmp.seek(0)
            tmp.truncate()


def _first_said(lines: list[str]) -> str:
    """The first line a C library printed, as an addition to a reason (libtiff prefixes the
    name PIL gives its in-memory file, which is not the user's)."""
    said = next((line for line in lines if line), "")
    said = said.removeprefix("tempfile.tif: ")
    return f" ({said[:200]})" if said else ""


def _unread_format(data: bytes) -> str:
    """The reason for a known kind of file that PIL does not open, with what to do."""
    if data[128:132] == b"DICM":
        return (
            "DICOM (a medical scan), which is not read: convert it to PNG first (e.g. with "
            "pydicom, applying the scan's window)"
        )
    if data[4:8] == b"ftyp":
        size = int.from_bytes(data[:4], "big")
        brands = {data[i : i + 4] for i in range(8, min(size, 64), 4)}
        if brands & {b"avif", b"avis"}:
            return "AVIF, which this Pillow build cannot read (Pillow's wheels can, from 11.3 on)"
        if brands & {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}:
            return "HEIC/HEIF that libheif cannot read (damaged, truncated, or an unusual codec)"
    return ""


Checker = Callable[[Path], Check]


def check_images(
    paths: Sequence[Path], workers: int | None = None, threads: bool = False
) -> list[Check]:
    """`check_image` over all cores, with a progress bar; results in input order.

    Each worker holds one file at a time, so memory does not grow with the data set. Worker
    processes by default; `threads` for a process that must not fork (TensorFlow loaded, as
    in predict): PIL and the hash release the GIL while they work, so threads still spread
    most of it over the cores.
    """
    from tqdm import tqdm  # noqa: PLC0415

    workers = workers or usable_cpus()
    check = functools.partial(check_image, native_stderr=not threads)
    out: list[Check] = []
    with tqdm(total=len(paths), unit="img", desc="validate", disable=len(paths) < 1000) as bar:
        if workers == 1 or len(paths) < 64:
            results: Iterable[Check] = map(check, paths)
        elif threads:
            results = _checked_in_threads(check, paths, workers)
        else:
            results = _checked_in_processes(check, paths, workers)
        for result in results:
            out.append(result)
            bar.update()
    return out


def _checked_in_threads(check: Checker, paths: Sequence[Path], workers: int) -> Iterator[Check]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(check, paths, chunksize=_chunk(len(paths), workers))


def _chunk(n: int, workers: int) -> int:
    return max(16, min(256, n // (workers * 8)))


def _checked_in_processes(check: Checker, paths: Sequence[Path], workers: int) -> Iterator[Check]:
    """`check_image` in worker processes, in input order, surviving a worker that dies.

    A worker can die on one file (a crash in a native decoder, or the system's out-of-memory
    killer on a huge image): the pool then fails every file it held. The files that may have
    been in flight are checked again one at a time in a single worker, so the one that kills
    it is found and rejected with a reason, and the rest of the split goes on as before.
    """
    from concurrent.futures.process import BrokenProcessPool  # noqa: PLC0415

    done = 0
    while done < len(paths):
        chunk = _chunk(len(paths) - done, workers)
        try:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for result in pool.map(check, paths[done:], chunksize=chunk):
                    yield result
                    done += 1
        except BrokenProcessPool:
            # in flight past the last result: a chunk in each worker, workers + 1 queued
            suspects = paths[done : done + chunk * (2 * workers + 2)]
            log.warning(
                "a worker process checking images died; checking the %d files it may have "
                "held one at a time to find the one that killed it",
                len(suspects),
            )
            for result in _checked_one_by_one(check, suspects):
                yield result
                done += 1


def _checked_one_by_one(check: Checker, paths: Sequence[Path]) -> Iterator[Check]:
    """`check_image` over `paths` in order in a single worker process: a file on which it dies
    gets a reason, and a fresh worker takes the next file."""
    from concurrent.futures.process import BrokenProcessPool  # noqa: PLC0415

    done = 0
    while done < len(paths):
        with ProcessPoolExecutor(max_workers=1) as pool:
            futures = [pool.submit(check, p) for p in paths[done:]]
            try:
                for future in futures:
                    yield future.result()
                    done += 1
            except BrokenProcessPool:  # one worker taking the files in order: it died on this
                log.warning("the worker process died on %s; leaving it out", paths[done])
                yield Check(False, WORKER_DIED, _digest(paths[done]))
                done += 1


WORKER_DIED = (
    "the process decoding it died (a crash in an image library, or the system's out-of-memory "
    "killer); check it opens in an image viewer, or re-save it"
)


def _digest(path: Path) -> str:
    try:
        return content_digest(Path(path).read_bytes())
    except OSError:
        return ""

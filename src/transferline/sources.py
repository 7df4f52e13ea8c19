"""The download stage: turn `data.dataset` into a folder of images under data/raw.

Sources: presets, kaggle://datasets/OWNER/NAME, kaggle://competitions/NAME, https:// archives,
local folders and archives (also file://). Only this module imports `kaggle`, and only lazily,
because importing it tries to authenticate.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from transferline.errors import SourceError
from transferline.files import repo_root

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


@dataclass(frozen=True)
class Preset:
    source: str
    subdir: str | None  # the folder inside the download that holds the labelled images
    note: str


PRESETS: dict[str, Preset] = {
    # The Kaggle competition: a zip of train.zip (cat.0.jpg, dog.0.jpg, ...) and an unlabelled
    # test1.zip; only train/ carries labels.
    "cats_vs_dogs": Preset(
        "kaggle://competitions/dogs-vs-cats", "train", "25,000 labelled photos of cats and dogs"
    ),
    # Pre-split into Data/train, Data/valid, Data/test with four classes.
    "chest_ct": Preset(
        "kaggle://datasets/mohamedhanyyy/chest-ctscan-images", "Data", "4-class chest CT scans"
    ),
    "digits": Preset("builtin://digits", None, "scikit-learn's 1,797 8x8 digits, offline"),
}


def preset_subdir(dataset: str) -> str | None:
    preset = PRESETS.get(dataset)
    return preset.subdir if preset else None


def dataset_name(dataset: str) -> str:
    """A short name for `data.dataset`, as MLflow lists data sets: the preset, Kaggle's
    OWNER/NAME or competition name, or the archive's or folder's name."""
    if dataset in PRESETS:
        return dataset
    if dataset.startswith("kaggle://"):
        return dataset.removeprefix("kaggle://").split("/", 1)[1].strip("/")
    if dataset.startswith("https://"):
        name = urllib.parse.urlsplit(dataset).path.rstrip("/").rsplit("/", 1)[-1]
    else:
        name = Path(dataset.removeprefix("file://")).expanduser().resolve().name
    return _archive_stem(Path(name)) if is_archive(Path(name)) else name


# ---------------------------------------------------------------- archives


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _inside(root: Path, name: str) -> bool:
    target = (root / name).resolve()
    return target == root or root in target.parents


def extract_archive(archive: Path, dest: Path) -> None:
    """Extract zip or tar into `dest`, refusing entries that would land outside it."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                bad = [n for n in zf.namelist() if n.startswith("/") or not _inside(root, n)]
                if bad:
                    raise SourceError(
                        f"{archive}: refusing to extract; entry {bad[0]!r} would be written "
                        f"outside the target folder (absolute path or '..'). Re-create the "
                        f"archive with relative paths inside it."
                    )
                if any(info.flag_bits & 0x1 for info in zf.infolist()):
                    raise SourceError(
                        f"{archive}: its entries are encrypted (a password-protected zip), "
                        f"which the pipeline cannot open. Extract it yourself (`unzip "
                        f"{archive.name} -d FOLDER` asks for the password) and set "
                        f"data.dataset to that folder."
                    )
                try:
                    zf.extractall(dest)
                except NotImplementedError as exc:  # e.g. Deflate64, Windows' for large zips
                    raise SourceError(
                        f"{archive}: Python's zipfile cannot read its compression method "
                        f"({exc}; Windows writes large zips with Deflate64). Extract it with "
                        f"`unzip` or 7-Zip and set data.dataset to that folder."
                    ) from exc
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                try:
                    tf.extractall(dest, filter="data")
                except tarfile.FilterError as exc:
                    raise SourceError(
                        f"{archive}: refusing to extract ({exc}); the entry would be written "
                        f"outside the target folder or is an unsafe link. Re-create the archive "
                        f"with relative paths and no links pointing outside it."
                    ) from exc
        else:
            raise SourceError(
                f"{archive}: not a zip or tar archive this pipeline can read. Supported: "
                f"{', '.join(ARCHIVE_SUFFIXES)}."
            )
    except (zipfile.BadZipFile, tarfile.ReadError, EOFError) as exc:
        raise SourceError(f"{archive}: the archive is damaged ({exc}). Download it again.") from exc


def _archive_stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def expand_nested_archives(root: Path, max_depth: int = 3) -> None:
    """Extract archives found inside a download (Kaggle ships zips of zips), in place.

    Only ever called on our own download folder, never on a user's folder.
    """
    for _ in range(max_depth):
        nested = sorted(p for p in root.rglob("*") if p.is_file() and is_archive(p))
        if not nested:
            return
        for archive in nested:
            target = archive.with_name(_archive_stem(archive))
            if target.exists():
                target = archive.with_name(_archive_stem(archive) + "_extracted")
            log.info("extracting nested archive %s", archive.relative_to(root))
            extract_archive(archive, target)
            archive.unlink()


# ---------------------------------------------------------------- kaggle


class KaggleClient(Protocol):
    def dataset_download_files(self, dataset: str, path: str, quiet: bool, unzip: bool) -> Any:
        """Kaggle's client call: download data set `dataset` into `path`.

        Args:
            dataset: OWNER/NAME.
            path: the folder to write into.
            quiet: no progress output.
            unzip: extract the archive.
        """

    def competition_download_files(self, competition: str, path: str, quiet: bool) -> Any: ...


def kaggle_credentials_present(env: dict[str, str] | None = None, home: Path | None = None) -> bool:
    """Whether any credential the kaggle package accepts is present, without importing it."""
    env = dict(os.environ) if env is None else env
    home = Path.home() if home is None else home
    if env.get("KAGGLE_API_TOKEN") or (env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY")):
        return True
    dirs = [Path(env["KAGGLE_CONFIG_DIR"])] if env.get("KAGGLE_CONFIG_DIR") else []
    dirs += [home / ".kaggle", home / ".config" / "kaggle"]
    names = ("kaggle.json", "access_token", "credentials.json")
    return any((d / n).is_file() for d in dirs for n in names)


def _local_path(source: str) -> Path:
    """A local data.dataset (a path, or file://). A relative one starts at the repository root,
    as docs/data.md says, also in a `dvc exp run --temp/--queue` copy (.dvc/tmp/exps/...), where
    the folder would not be found, or be another one."""
    path = Path(source.removeprefix("file://")).expanduser()
    return path if path.is_absolute() else repo_root() / path


def readiness(dataset: str, env: dict[str, str] | None = None, home: Path | None = None) -> str:
    """What the download stage will need for `dataset`, and whether this machine has it, in
    one line (no network, nothing imported): for `transferline check`."""
    source = PRESETS[dataset].source if dataset in PRESETS else dataset
    if source.startswith("builtin://"):
        return f"data: {dataset}, bundled with scikit-learn: nothing to fetch"
    if source.startswith("kaggle://"):
        if kaggle_credentials_present(env, home):
            return f"data: {source}: Kaggle credentials found"
        return f"data: {source}: no Kaggle credentials found, so the download stage will stop. " + (
            _NO_CREDENTIALS.removeprefix("Kaggle credentials not found. ")
        )
    if source.startswith("https://"):
        return f"data: {source}, fetched by the download stage (needs the network)"
    path = _local_path(source)
    if path.exists():
        return (
            f"data: {path} ({'folder' if path.is_dir() else 'file'}), copied by the download stage"
        )
    return f"data: {path} does not exist, so the download stage will stop"


_NO_CREDENTIALS = (
    "Kaggle credentials not found. Create an API token at https://www.kaggle.com/settings "
    "(API -> Create New Token) and either save kaggle.json to ~/.kaggle/kaggle.json (chmod 600; "
    "or to the folder named by KAGGLE_CONFIG_DIR), or export KAGGLE_USERNAME and KAGGLE_KEY, or "
    "export KAGGLE_API_TOKEN. To work without Kaggle, set data.dataset to a local folder or "
    "archive, an https:// archive, or the offline preset 'digits'."
)


def default_kaggle_client() -> KaggleClient:
    """The real client, imported and authenticated only now."""
    if not kaggle_credentials_present():
        raise SourceError(_NO_CREDENTIALS)
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi  # noqa: PLC0415
    except SystemExit as exc:  # the package exits on failed authentication at import
        raise SourceError(_NO_CREDENTIALS) from exc
    api = KaggleApi()
    try:
        api.authenticate()
    except SystemExit as exc:
        raise SourceError(_NO_CREDENTIALS) from exc
    return api


def _http_status(exc: BaseException) -> int | None:
    for obj in (getattr(exc, "response", None), exc):
        for attr in ("status_code", "status"):
            value = getattr(obj, attr, None)
            if isinstance(value, int):
                return value
    return None


def download_kaggle(
    source: str, dest: Path, client_factory: Callable[[], KaggleClient] = default_kaggle_client
) -> None:
    """Download a Kaggle data set or competition into `dest` and unpack it."""
    kind, _, slug = source.removeprefix("kaggle://").strip("/").partition("/")
    client = client_factory()
    page = (
        f"https://www.kaggle.com/competitions/{slug}"
        if kind == "competitions"
        else f"https://www.kaggle.com/datasets/{slug}"
    )
    try:
        if kind == "datasets":
            client.dataset_download_files(slug, path=str(dest), quiet=False, unzip=False)
        else:
            client.competition_download_files(slug, path=str(dest), quiet=False)
    except SourceError:
        raise
    except Exception as exc:
        status = _http_status(exc)
        if status == 404:
            raise SourceError(
                f"data.dataset: Kaggle has no {kind[:-1]} '{slug}' (404). Check the slug on "
                f"{page} (datasets are OWNER/NAME, competitions NAME)."
            ) from exc
        if status == 403 and kind == "competitions":
            raise SourceError(
                f"data.dataset: Kaggle refused the download of competition '{slug}' (403): its "
                f"rules have not been accepted with this account. Open {page}/rules, click "
                f"'I Understand and Accept', then run the stage again."
            ) from exc
        if status in (401, 403):
            raise SourceError(
                f"data.dataset: Kaggle refused the credentials ({status}) for {page}. Create a "
                f"new API token at https://www.kaggle.com/settings and replace "
                f"~/.kaggle/kaggle.json or KAGGLE_USERNAME/KAGGLE_KEY/KAGGLE_API_TOKEN."
            ) from exc
        raise SourceError(
            f"data.dataset: downloading {source} failed ({type(exc).__name__}: {exc}). Check "
            f"the network connection and {page}."
        ) from exc
    archives = sorted(p for p in dest.iterdir() if p.is_file() and is_archive(p))
    for archive in archives:
        extract_archive(archive, dest)
        archive.unlink()
    expand_nested_archives(dest)


# ---------------------------------------------------------------- https and local


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download_https(url: str, dest: Path, sha256: str | None = None) -> None:
    """Fetch an archive over https into `dest`, check its SHA-256 if given, unpack it."""
    name = Path(url.split("?")[0].rstrip("/")).name or "download"
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        archive = Path(tmp) / name
        try:
            from tqdm import tqdm  # noqa: PLC0415

            with urllib.request.urlopen(url, timeout=60) as resp, archive.open("wb") as out:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=name) as bar:
                    while chunk := resp.read(1 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
        except OSError as exc:
            raise SourceError(
                f"data.dataset: could not download {url} ({exc}). Check the address and the "
                f"network, or download it yourself and set data.dataset to the local file."
            ) from exc
        if sha256 and (actual := sha256_of(archive)) != sha256:
            raise SourceError(
                f"data.sha256: {url} has SHA-256 {actual}, not the expected {sha256}. The file "
                f"changed or the download was damaged; nothing was extracted. Check the "
                f"address, or update data.sha256 if the new file is the one you want."
            )
        if not is_archive(archive) and not zipfile.is_zipfile(archive):
            raise SourceError(
                f"data.dataset: {url} is not an archive ({', '.join(ARCHIVE_SUFFIXES)}); "
                f"point it at a zip or tar of image folders."
            )
        extract_archive(archive, dest)
    expand_nested_archives(dest)


def copy_local(path: Path, dest: Path) -> None:
    """Copy a local folder (or unpack a local archive) into `dest`; the original is untouched."""
    if path.is_dir() and dest.resolve().is_relative_to(path.resolve()):
        raise SourceError(
            f"data.dataset: {path} holds the download's own folder ({dest.parent}), so it "
            f"would be copied into itself. Point data.dataset at the folder of the images "
            f"(e.g. a folder beside data/raw, such as data/my_images)."
        )
    if path.is_dir():
        try:
            shutil.copytree(path, dest, dirs_exist_ok=True, symlinks=False)
        except shutil.Error as exc:  # raised at the end: everything else was copied
            _left_out(path, exc.args[0])
    elif path.is_file() and (is_archive(path) or zipfile.is_zipfile(path)):
        extract_archive(path, dest)
        expand_nested_archives(dest)
    elif path.exists():
        raise SourceError(
            f"data.dataset: {path} is neither a folder nor a zip/tar archive. Point it at a "
            f"folder of class folders, or an archive of one."
        )
    else:
        raise SourceError(
            f"data.dataset: {path} does not exist. Use a preset ({', '.join(PRESETS)}), "
            f"kaggle://datasets/OWNER/NAME, kaggle://competitions/NAME, an https:// archive, or "
            f"an existing local folder or archive (relative paths start at the repository root)."
        )


def _left_out(folder: Path, errors: list[tuple[str, str, str]]) -> None:
    """What copytree could not copy: links to files that are gone and files this user may not
    read are left out with a warning (as split rejects broken images); anything else (a full
    disk, a failing drive) stops the download."""
    skipped = [
        (src, why)
        for src, _, why in errors
        if (os.path.islink(src) and not os.path.exists(src)) or not os.access(src, os.R_OK)
    ]
    if len(skipped) < len(errors):
        src, _, why = next(e for e in errors if (e[0], e[2]) not in skipped)
        raise SourceError(
            f"data.dataset: copying {folder} failed for {len(errors) - len(skipped)} entries, "
            f"e.g. {src}: {why}. Fix that (free space, the drive, permissions) and run the "
            f"download stage again (data/raw was left as it was)."
        )
    log.warning(
        "left out of the copy of %s, as unreadable (a link to a file that is gone, or a file "
        "you may not read): %d, e.g. %s",
        folder,
        len(skipped),
        Path(skipped[0][0]).relative_to(folder).as_posix(),
    )


def write_digits(dest: Path) -> int:
    """scikit-learn's bundled 8x8 digits as PNG files in class folders (no network needed)."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415
    from sklearn.datasets import load_digits  # noqa: PLC0415

    digits = load_digits()
    images = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)
    for i, (img, label) in enumerate(zip(images, digits.target, strict=True)):
        folder = dest / "digits" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(folder / f"{i:04d}.png")
    return len(images)


def download(
    dataset: str,
    dest: Path,
    client_factory: Callable[[], KaggleClient] = default_kaggle_client,
    sha256: str | None = None,
) -> None:
    """Fill the (empty, temporary) folder `dest` from `data.dataset` (`sha256`: https only).

    Args:
        dataset: `data.dataset` (preset, kaggle://, https://, or a path).
        dest: the temporary folder to fill.
        client_factory: makes the Kaggle client (a fake in tests).
        sha256: `data.sha256`.
    """
    source = PRESETS[dataset].source if dataset in PRESETS else dataset
    log.info("download: %s -> %s", source, dest)
    if source == "builtin://digits":
        n = write_digits(dest)
        log.info("wrote %d digit images", n)
    elif source.startswith("kaggle://"):
        download_kaggle(source, dest, client_factory)
    elif source.startswith("https://"):
        download_https(source, dest, sha256)
    else:
        copy_local(_local_path(source), dest)
    renamed = utf8_names(dest)
    if renamed:
        old, fixed = renamed[0]
        log.warning(
            "%d file or folder names in the download were not UTF-8, which DVC cannot record: "
            "renamed in data/raw, their bytes read as Windows-1252, e.g. %s -> %s (the "
            "originals are untouched)",
            len(renamed),
            old,
            fixed,
        )


def utf8_names(root: Path) -> list[tuple[str, str]]:
    """Rename, inside our own download folder, every name that is not valid UTF-8 (bytes
    from an old archive or file system, which Python holds as surrogates): its bytes are read
    as Windows-1252 (Latin-1 where that has no character), so b'caf\\xe9.png' is café.png. A name
    taken already gets `_2`, `_3`... before its extension. Returns (old, new) names, the old
    as the repr of its bytes (printable, unlike the name itself)."""
    renamed = []
    for folder, dirs, files in os.walk(root, topdown=False):  # children before their folder
        for name in [*files, *dirs]:
            try:
                name.encode("utf-8")
                continue
            except UnicodeEncodeError:
                raw = os.fsencode(name)
            try:
                fixed = raw.decode("cp1252")
            except UnicodeDecodeError:
                fixed = raw.decode("latin-1")
            stem, dot, ext = fixed.rpartition(".") if "." in fixed.lstrip(".") else (fixed, "", "")
            n = 1
            while os.path.lexists(os.path.join(folder, fixed)):
                n += 1
                fixed = f"{stem}_{n}{dot}{ext}"
            os.rename(os.path.join(folder, name), os.path.join(folder, fixed))
            renamed.append((repr(raw), fixed))
    return renamed

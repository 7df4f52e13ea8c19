"""Atomic outputs: a killed stage never leaves a half-written file or folder behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def repo_root(start: Path | None = None) -> Path:
    """The user's repository root, also from inside `dvc exp run --temp/--queue` copies.

    DVC runs those in <repo>/.dvc/tmp/exps/..., so the part before `.dvc` is the real root:
    every experiment lands in the same MLflow store, and a relative data.dataset path means
    the same folder as in the workspace.
    """
    start = (start or Path.cwd()).resolve()
    parts = start.parts
    for i in range(len(parts) - 2):
        if parts[i] == ".dvc" and parts[i + 1] == "tmp" and parts[i + 2] == "exps":
            return Path(*parts[:i])
    return start


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only
    read it by setting it, racing other threads that create files meanwhile)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _tmp_sibling(target: Path, suffix: str = "") -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp" + suffix, dir=target.parent
    )
    os.close(fd)
    # mkstemp makes it 0600: the output would stay unreadable to the group and others (a
    # shared GPU box, a web server showing the plots) where a plain open() honours the umask.
    Path(name).chmod(0o666 & ~_umask())
    return Path(name)


def _replace(tmp: Path, target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()
    os.replace(tmp, target)


@contextlib.contextmanager
def atomic_path(target: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path beside `target`; move it into place only on success.

    `suffix` keeps an extension some writers insist on (Keras wants `.keras`).
    """
    target = Path(target)
    tmp = _tmp_sibling(target, suffix)
    try:
        yield tmp
        _replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; it replaces `target` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700 (see _tmp_sibling)
        yield tmp
        _replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# What `transferline export` says when its OUT is taken (checked in the CLI before the model
# loads, and again where the SavedModel is written).
SAVED_MODEL_HINT = (
    "TensorFlow Serving loads numbered version folders beside each other: "
    "exported/classifier/1, exported/classifier/2, ..."
)


def require_new_dir(folder: Path, hint: str = "") -> None:
    """Refuse a `folder` that exists and is not an empty folder (FileExistsError), so that a
    command writing one overwrites nothing; `hint` ends the message. Cheap: callers check before
    their slow work, not after it."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(
            f"{folder} exists and is not an empty folder: name a new one, nothing is "
            f"overwritten{f' ({hint})' if hint else ''}"
        )


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def md5_of(path: Path, chunk: int = 1 << 20) -> str:
    """MD5 of a file's bytes: what DVC 3 records for a file (its `.dvc` file), so they match."""
    digest = hashlib.md5(usedforsecurity=False)
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def write_csv(path: Path, rows: list[dict[str, Any]], header: list[str] | None = None) -> None:
    """Rows of dicts as CSV (header from the first row unless given)."""
    import csv  # noqa: PLC0415

    header = header or (list(rows[0]) if rows else [])
    with atomic_path(Path(path)) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


SKIPPED_KEY = "transferline_skipped"


def write_skip_marker(path: Path, reason: str) -> None:
    """A small JSON file standing where a skipped stage's model would be, so the DAG stays whole."""
    write_json(path, {SKIPPED_KEY: True, "reason": reason})


def is_skip_marker(path: Path) -> bool:
    path = Path(path)
    if path.stat().st_size > 4096:
        return False
    try:
        return bool(read_json(path).get(SKIPPED_KEY))
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False


@dataclass(frozen=True)
class DataDirs:
    """Where a stage finds the pipeline's data: the raw images, the split manifests
    (data/splits), the cached features (data/features) and the trunk cache (data/trunk)."""

    raw: Path
    splits: Path
    features: Path
    trunk: Path | None = None

"""What identifies an MLflow run and what reproduces it, read from the repository: the
inputs that produced its numbers (`RunInputs`: params, data, weights file, code, machine) and
the context (commit, dirty flag, DVC experiment, versions). No mlflow import: tracking.py tags
runs with these."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

import yaml

HASH_TAG = "transferline.params_hash"
INPUTS_TAG = "transferline.inputs"  # params + data + weights + code: runs of the same inputs
KEY_TAG = "transferline.run_key"  # the inputs and the machine: the run's identity
SAME_INPUTS_TAG = "transferline.same_inputs_as"  # first run of these inputs, another machine
DIFFERS_TAG = "transferline.differs_from"  # latest run of these params, and what changed
_PACKAGES = ("tensorflow", "keras", "dvc", "mlflow", "scikit-learn", "transferline")


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=20, check=False
        )
    except OSError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


# Files that DVC itself writes in a run: a change there is not a change of the code. Under
# `dvc exp run` params.yaml holds DVC's own overrides too (the experiment's commit records them).
DVC_WRITES = ("dvc.lock", "metrics/", "plots/", "models/", "data/")


def git_dirty(under_experiment: bool) -> bool:
    """Whether tracked files differ from HEAD, apart from what DVC writes in a run (and
    params.yaml's overrides under `dvc exp run`)."""
    ours = DVC_WRITES + (("params.yaml",) if under_experiment else ())

    def written_by_dvc(path: str) -> bool:
        return any(path == o or (o.endswith("/") and path.startswith(o)) for o in ours)

    changed = _git("diff", "--name-only", "HEAD").splitlines()
    return any(not written_by_dvc(path) for path in changed)


def context_tags() -> dict[str, str]:
    """What reproduces the run: the commit and a dirty flag, the DVC experiment (name, ref
    and baseline) under `dvc exp run`, Python and package versions."""
    exp_name = os.environ.get("DVC_EXP_NAME", "")
    tags = {"git.commit": _git("rev-parse", "HEAD") or "none"}
    tags["git.dirty"] = str(git_dirty(under_experiment=bool(exp_name))).lower()
    if exp_name:
        tags["dvc.exp_name"] = exp_name
        baseline = os.environ.get("DVC_EXP_BASELINE_REV", "")
        if baseline:
            tags["dvc.exp_baseline"] = baseline
            # The ref DVC keeps the experiment's commit under (`dvc exp push/pull` move it).
            tags["dvc.exp_ref"] = f"refs/exps/{baseline[:2]}/{baseline[2:]}/{exp_name}"
    tags["version.python"] = platform.python_version()
    for pkg in _PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            tags[f"version.{pkg}"] = metadata.version(pkg)
    return tags


def dvc_lock_hash(stage: str, path: str, lock: Path = Path("dvc.lock")) -> str | None:
    try:
        data = yaml.safe_load(lock.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    for out in data.get("stages", {}).get(stage, {}).get("outs", []):
        if out.get("path") == path:
            return out.get("md5")
    return None


CODE_FILES = ("stages/*.py", "dvc.yaml")  # with every module of the imported package


def code_digest(root: Path | None = None) -> str:
    """Hash of the code that computes a run: the package's modules, the stage scripts and
    dvc.yaml under `root` (default: the current directory, where DVC runs a stage: the
    workspace, or the copy `dvc exp run --temp/--queue` runs in). The modules are those under
    `root`/src/transferline, the files DVC tracks as the stages' deps; the imported package's
    where there is no such folder."""
    base = (root or Path.cwd()).resolve()
    package = base / "src" / "transferline"
    if not package.is_dir():
        package = Path(__file__).resolve().parent
    files = [(f"transferline/{f.name}", f) for f in sorted(package.glob("*.py"))]
    for pattern in CODE_FILES:
        files += [(f.relative_to(base).as_posix(), f) for f in sorted(base.glob(pattern))]
    digest = hashlib.sha256()
    for name, path in files:
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def machine_name() -> str:
    """The machine that computes a run: its host name, and CUDA_VISIBLE_DEVICES when set (it
    changes the device, and with it the numbers)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = "" if visible is None else f" (CUDA_VISIBLE_DEVICES={visible})"
    return socket.gethostname() + shown


@dataclasses.dataclass(frozen=True)
class RunInputs:
    """What produces a run's numbers; two sets of stages share a run only if all agree.

    Args:
        params: digest of the resolved params (`Params.digest()`).
        data: DVC's hash of data/raw from dvc.lock ("none" before the download stage ran).
        weights: md5 of a `model.weights` file, or the setting itself (`imagenet`, `none`).
        code: `code_digest()`.
        machine: `machine_name()`.
    """

    params: str
    data: str
    weights: str
    code: str
    machine: str

    @classmethod
    def here(cls, params_hash: str, weights: str = "none") -> RunInputs:
        """The inputs of a stage run in the current directory: `weights` is `model.weights`
        (a file's md5 is taken)."""
        is_file = weights not in ("imagenet", "none")
        return cls(
            params=params_hash,
            data=dvc_lock_hash("download", "data/raw") or "none",
            weights=_md5_cached(*_file_version(Path(weights))) if is_file else weights,
            code=code_digest(),
            machine=machine_name(),
        )

    def digest(self) -> str:
        """The inputs without the machine: equal for a recomputation elsewhere."""
        blob = "\0".join((self.params, self.data, self.weights, self.code))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def key(self) -> str:
        blob = f"{self.digest()}\0{self.machine}"
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def tags(self) -> dict[str, str]:
        return {
            HASH_TAG: self.params,
            INPUTS_TAG: self.digest(),
            KEY_TAG: self.key(),
            "data.raw_md5": self.data,
            "model.weights_md5": self.weights,
            "code.digest": self.code,
            "machine": self.machine,
        }


# What a changed input is called in DIFFERS_TAG and the log, by the tag that holds it.
INPUT_NAMES = {
    "data.raw_md5": "data",
    "model.weights_md5": "weights",
    "code.digest": "code",
    "machine": "machine",
}


def _file_version(path: Path) -> tuple[Path, int, int]:
    stat = path.stat()
    return path.resolve(), stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=8)
def _md5_cached(path: Path, mtime_ns: int, size: int) -> str:
    # A weights file can be large, and each stage asks for its hash; a file replaced since
    # (another modification time or size) is hashed again.
    from transferline.files import md5_of  # noqa: PLC0415

    return md5_of(path)

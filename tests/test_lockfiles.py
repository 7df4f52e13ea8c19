"""requirements/*.txt (uv's universal lock, see requirements/lock.sh) must still satisfy
pyproject.toml: a range changed without re-locking fails here, not on a user's machine."""

import re
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ImportError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def pins(lock: Path) -> dict[str, list[tuple[str, str | None]]]:
    out: dict[str, list[tuple[str, str | None]]] = {}
    for line in lock.read_text().splitlines():
        m = PIN.match(line)
        if m:
            out.setdefault(canonicalize_name(m[1]), []).append((m[2], m[3]))
    return out


def project_requirements(extras: list[str]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


@pytest.mark.parametrize(("lock", "extras"), [("cpu.txt", ["dev"]), ("gpu.txt", ["dev", "gpu"])])
def test_lock_pins_every_requirement_within_its_range(lock, extras):
    text = (ROOT / "requirements" / lock).read_text()
    assert "--generate-hashes" in text.splitlines()[1], "lock.sh writes hashes"
    locked = pins(ROOT / "requirements" / lock)
    for req in project_requirements(extras):
        here = [
            version
            for version, marker in locked.get(canonicalize_name(req.name), [])
            if marker is None or Marker(marker).evaluate()
        ]
        assert len(here) == 1, f"{lock}: {req.name} pinned {len(here)} times for this Python"
        assert req.specifier.contains(here[0], prereleases=True), (
            f"{lock} pins {req.name}=={here[0]}, outside pyproject's {req}: "
            "run requirements/lock.sh"
        )


def test_every_pin_has_a_hash():
    for lock in ("cpu.txt", "gpu.txt"):
        lines = (ROOT / "requirements" / lock).read_text().splitlines()
        for i, line in enumerate(lines):
            if PIN.match(line):
                assert lines[i + 1].strip().startswith("--hash=sha256:"), f"{lock}: {line}"


def test_gpu_lock_has_the_cuda_wheels():
    locked = pins(ROOT / "requirements" / "gpu.txt")
    assert "nvidia-cudnn-cu12" in locked and "nvidia-cublas-cu12" in locked
    assert "nvidia-cudnn-cu12" not in pins(ROOT / "requirements" / "cpu.txt")

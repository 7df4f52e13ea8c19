"""The README stays short and points into the docs site, and the site builds."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETUP = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements/cpu.txt "
    "&& pip install --no-deps -e . && "
)


def test_readme_is_short_and_holds_the_two_setup_commands():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    assert SETUP + "transferline quickstart\n" in readme
    assert SETUP + "pytest\n" in readme


def test_every_docs_link_in_the_readme_names_a_page_of_the_site():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    links = set(re.findall(r"\]\((docs/[^)#]+)", readme))
    assert len(links) >= 9
    for link in links:
        assert (REPO / link).is_file(), link


def test_the_site_builds_with_strict_checks(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "parameters" / "index.html").is_file()
    assert (tmp_path / "img" / "mlflow-runs.png").is_file()

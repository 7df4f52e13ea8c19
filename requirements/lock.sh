#!/usr/bin/env bash
# Regenerate the fully pinned lock files from pyproject.toml's version ranges.
#
# uv's universal resolution: one file serves Python 3.10-3.13 on any OS (environment markers
# pick the right pins), with the hash of every artefact, so `pip install -r` installs the
# same bytes everywhere. cpu.txt: the project + dev tools; gpu.txt: the same + TensorFlow's
# CUDA wheels (the `gpu` extra). Needs uv (`pip install uv`); run after changing pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-uv}
common=(pip compile pyproject.toml --universal --python-version 3.10 --generate-hashes
        --no-python-downloads --extra dev)
"$uv" "${common[@]}" -o requirements/cpu.txt
"$uv" "${common[@]}" --extra gpu -o requirements/gpu.txt

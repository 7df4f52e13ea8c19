"""Logging set-up shared by the stage scripts and the CLI."""

from __future__ import annotations

import logging
import os


def setup(verbose: bool = False, quiet: bool = False) -> None:
    """One readable line per event; TensorFlow's C++ chatter only when verbose."""
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in (
        "absl",
        "tensorflow",
        "h5py",
        "PIL",
        "matplotlib",
        "urllib3",
        "alembic",
        "mlflow",
        "git",
    ):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)

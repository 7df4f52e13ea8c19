"""Logging set-up shared by the stage scripts and the CLI."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# Lines of Google's C++ logging (absl / TensorFlow's tsl) at info, warning or error level, and
# the banner absl prints before its first line. TensorFlow writes them straight to file
# descriptor 2 while importing and while probing for GPUs, before absl is initialised, so
# TF_CPP_MIN_LOG_LEVEL cannot silence them.
_NATIVE_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|[IWE]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\]"
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWE] \S+:\d+\])"
)

# libjpeg's warnings, which its default handler prints to file descriptor 2 from TensorFlow's
# JPEG decoder: one per damaged JPEG it still decodes (and again every epoch), never naming the
# file ("Corrupt JPEG data: 65 extraneous bytes before marker 0xd9", common in photo sets).
_JPEG_WARNING = re.compile(
    r"^(Corrupt JPEG data: |Premature end of JPEG file$|Invalid SOS parameters for sequential"
    r" JPEG$|Inconsistent progression sequence for component|Warning: unknown JFIF revision)"
)

log = logging.getLogger("transferline")


def setup(verbose: bool = False, quiet: bool = False) -> None:
    """One readable line per event; TensorFlow's C++ chatter only when verbose."""
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        # MLflow sets its own loggers' level when imported; this is the level it reads.
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
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


def is_native_noise(line: str) -> bool:
    """True for a C++ log line at info/warning/error level (fatal lines are never noise)."""
    return bool(_NATIVE_NOISE.match(line))


@contextlib.contextmanager
def native_log_filtered(enabled: bool = True) -> Iterator[None]:
    """Hold back TensorFlow's C++ log lines for the duration of the block, and sum up
    libjpeg's warnings in one line.

    File descriptor 2 goes to a temporary file while Python's own stderr (logging, progress
    bars, error messages) keeps writing to the terminal through a duplicate of it. At the end
    every captured line except C++ info/warning/error lines (fatal ones, anything from
    subprocesses) is written out, so nothing that matters is lost; libjpeg's warnings become
    one count with an example. A process killed inside the block loses its held-back lines:
    `-v` shows them live.
    """
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved_fd = os.dup(2)
    terminal = open(saved_fd, "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
    old_stderr = sys.stderr
    rebound = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and h.stream is old_stderr
    ]
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        sys.stderr = terminal
        for h in rebound:
            h.setStream(terminal)
        try:
            yield
        finally:
            terminal.flush()
            os.dup2(saved_fd, 2)
            sys.stderr = old_stderr
            for h in rebound:
                h.setStream(old_stderr)
            terminal.close()
            capture.seek(0)
            lines = capture.read().decode("utf-8", "replace").splitlines(keepends=True)
            jpeg, kept = [], []
            for line in lines:
                if _JPEG_WARNING.match(line):
                    jpeg.append(line.strip())
                elif not is_native_noise(line):
                    kept.append(line)
            old_stderr.write("".join(kept))
            old_stderr.flush()
            if jpeg:
                log.warning(
                    "TensorFlow's JPEG decoder (libjpeg) warned %s of damaged JPEG data it "
                    "decodes past, e.g. %r (`-v` shows each warning as it comes)",
                    "once" if len(jpeg) == 1 else f"{len(jpeg)} times",
                    jpeg[0],
                )

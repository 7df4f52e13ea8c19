import subprocess
import sys

import pytest

from transferline.logs import is_native_noise

SCRIPT = """
import logging, os, sys
from transferline import logs
logs.setup()
log = logging.getLogger("transferline")
try:
    with logs.native_log_filtered(enabled={enabled}):
        log.info("python line")
        os.write(2, b"I0000 00:00:1795382486.946736   21735 cudart_stub.cc:31] no cuda\\n")
        os.write(2, b"2025-09-17 14:44:05.157831: W external/x/y.cc:32] a warning\\n")
        os.write(2, b"E0000 00:00:1795382493.244914   21735 cuda_platform.cc:52] cuInit\\n")
        os.write(2, b"F0000 00:00:1795382493.244914   21735 check.cc:1] Check failed\\n")
        os.write(2, b"a subprocess said this\\n")
        os.write(2, b"Corrupt JPEG data: 65 extraneous bytes before marker 0xd9\\n")
        os.write(2, b"Corrupt JPEG data: premature end of data segment\\n")
        print("progress bar", file=sys.stderr)
        {raise_}
except RuntimeError:
    print("ERROR in stage: handled", file=sys.stderr)
log.info("after")
"""


def run(enabled: bool, raise_: str = "") -> str:
    code = SCRIPT.format(enabled=enabled, raise_=raise_)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return proc.stderr


@pytest.mark.parametrize("raise_", ["", "raise RuntimeError('boom')"])
def test_native_info_warning_error_lines_held_back_the_rest_kept(raise_):
    err = run(True, raise_)
    assert "cudart_stub" not in err and "a warning" not in err and "cuInit" not in err
    assert "Check failed" in err and "a subprocess said this" in err
    # Python's own output stays live and in order; the kept native lines follow the block
    order = [err.index(s) for s in ("python line", "progress bar", "Check failed", "after")]
    assert order == sorted(order)
    if raise_:
        assert "ERROR in stage: handled" in err
    # libjpeg's warnings (one per damaged JPEG TensorFlow decodes, every epoch): one count
    assert "premature end" not in err and err.count("extraneous bytes") == 1
    assert (
        "TensorFlow's JPEG decoder (libjpeg) warned 2 times of damaged JPEG data it decodes "
        "past, e.g. 'Corrupt JPEG data: 65 extraneous bytes before marker 0xd9'"
    ) in err


def test_verbose_shows_everything():
    err = run(False)
    for s in ("cudart_stub", "a warning", "cuInit", "Check failed", "python line"):
        assert s in err
    assert "premature end of data segment" in err and "warned 2 times" not in err


def test_noise_pattern():
    assert is_native_noise("WARNING: All log messages before absl::InitializeLog() is called are")
    assert is_native_noise("W0000 00:00:1795382493.244914  1 gpu_device.cc:2341] Cannot dlopen")
    assert not is_native_noise("F0000 00:00:1795382493.244914  1 check.cc:1] Check failed")
    assert not is_native_noise("Traceback (most recent call last):")
    assert not is_native_noise("ERROR in stage 'split': class 'owl' has 2 usable images")


def test_real_tensorflow_import_is_quiet():
    """TensorFlow's import-time C++ lines (absl banner, CUDA probing) stay out of the way."""
    code = """
from transferline import logs
logs.setup()
with logs.native_log_filtered(enabled={enabled}):
    import tensorflow as tf
    tf.config.list_physical_devices("GPU")
"""
    loud = subprocess.run(
        [sys.executable, "-c", code.format(enabled=False)], capture_output=True, text=True
    ).stderr
    quiet = subprocess.run(
        [sys.executable, "-c", code.format(enabled=True)], capture_output=True, text=True
    ).stderr
    noise = [line for line in loud.splitlines() if is_native_noise(line)]
    assert noise, "TensorFlow printed no C++ log lines at import; nothing to check"
    assert not [line for line in quiet.splitlines() if is_native_noise(line)]

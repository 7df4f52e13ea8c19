"""Where and how the models run: seeds, devices, precision, tf.distribute strategies and
clusters, and TensorFlow's out-of-memory error as one paragraph. TensorFlow is imported inside
the functions that use it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np

from transferline.errors import StageError

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and Keras/TensorFlow and make TF ops deterministic."""
    import tensorflow as tf  # noqa: PLC0415

    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def gpus() -> list[str]:
    """Names of the visible GPUs (empty on a CPU machine)."""
    import tensorflow as tf  # noqa: PLC0415

    return [d.name for d in tf.config.list_physical_devices("GPU")]


# CPU flags of native bfloat16 arithmetic (x86: AMX tiles, or AVX-512's BF16 instructions);
# elsewhere TensorFlow emulates bfloat16, slower than float32.
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU's feature flags, as Linux lists them; None where unknown (not Linux)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


def set_precision(mode: str) -> str:
    """Apply `model.mixed_precision` (auto | on | bfloat16 | off); returns the Keras policy.

    auto is mixed_float16 only with a GPU: on a CPU float16 is slower and gains nothing.
    bfloat16 (mixed_bfloat16) is for CPUs that compute it natively (AMX on Xeons since Sapphire
    Rapids; `bench/precision.py` measures it) and for GPUs from Ampere on; it needs no loss
    scaling. Heads keep a float32 softmax, and features are cast to `extract.dtype` when
    written.
    """
    on_gpu = bool(gpus())
    policy = {"on": "mixed_float16", "bfloat16": "mixed_bfloat16", "off": "float32"}.get(
        mode, "mixed_float16" if on_gpu else "float32"
    )
    keras.mixed_precision.set_global_policy(policy)
    flags = cpu_flags()
    native_bf16 = flags is not None and any(f in flags for f in _BF16_CPU_FLAGS)
    if policy != "float32":
        log.info("mixed precision on (%s)", policy)
    if policy == "mixed_bfloat16" and not on_gpu and flags is not None and not native_bf16:
        log.warning(
            "model.mixed_precision is bfloat16, but this CPU has no bfloat16 instructions "
            "(no %s in /proc/cpuinfo): TensorFlow emulates them, slower than float32. Set "
            "model.mixed_precision: off here.",
            " or ".join(_BF16_CPU_FLAGS),
        )
    if mode == "auto" and not on_gpu and native_bf16:
        log.info(
            "this CPU computes bfloat16 natively: model.mixed_precision: bfloat16 may extract "
            "features several times faster, fine-tuning less so (measure with "
            "bench/precision.py; features differ from float32's by up to about 2% of the "
            "largest)"
        )
    return policy


def cluster_task() -> tuple[str, int, int] | None:
    """(task type, index, number of workers) from TF_CONFIG when it names several machines;
    None when there is none or it names only this one."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
        members = {kind: list(addresses) for kind, addresses in config["cluster"].items()}
        task = config["task"]
        kind, index = str(task["type"]), int(task["index"])
        if not 0 <= index < len(members[kind]):
            raise IndexError(index)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise StageError(
            f"TF_CONFIG is not a usable cluster description ({type(exc).__name__}: {exc}). "
            'Set it to JSON like {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}} (a different index on each machine), or '
            "unset it to train on this machine alone."
        ) from None
    workers = sum(len(a) for k, a in members.items() if k in ("chief", "worker"))
    return (kind, index, workers) if workers > 1 else None


def is_chief() -> bool:
    """Whether this process logs for the cluster: the chief, or worker 0 when there is none
    (always true without a multi-machine TF_CONFIG)."""
    task = cluster_task()
    if task is None:
        return True
    kind, index, _ = task
    has_chief = "chief" in json.loads(os.environ["TF_CONFIG"])["cluster"]
    return kind == "chief" or (kind == "worker" and index == 0 and not has_chief)


def distribution(devices: list[str] | None = None, multi_worker: bool = False):
    """The tf.distribute strategy to build models in.

    With `multi_worker` and a TF_CONFIG naming several machines: MultiWorkerMirroredStrategy
    over every GPU of every machine (create it before any other TensorFlow work). Otherwise
    MirroredStrategy over `devices` or, by default, every visible GPU when there are two or
    more; else TensorFlow's default (single-device) strategy.
    """
    import tensorflow as tf  # noqa: PLC0415

    task = cluster_task() if devices is None else None
    if task is not None and multi_worker:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        log.info(
            "MultiWorkerMirroredStrategy: %s %d of a %d-machine cluster, %d replicas in all",
            task[0],
            task[1],
            task[2],
            strategy.num_replicas_in_sync,
        )
        return strategy
    if task is not None:
        log.info("TF_CONFIG names %d machines; this stage runs on this machine only", task[2])
    where = device_description()
    log.info(
        "running on %s%s",
        where,
        " (no GPU visible to TensorFlow; -v shows its reasons)" if where == "CPU" else "",
    )
    if devices is None:
        found = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in found] if len(found) > 1 else None
    if devices:
        log.info("MirroredStrategy over %d devices: %s", len(devices), ", ".join(devices))
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()


def device_description() -> str:
    """The accelerator the stage ran on, for MLflow tags and metrics files."""
    import tensorflow as tf  # noqa: PLC0415

    found = tf.config.list_physical_devices("GPU")
    if not found:
        return "CPU"
    names = []
    for d in found:
        details = tf.config.experimental.get_device_details(d)
        names.append(details.get("device_name", d.name))
    return f"{len(found)} x GPU ({', '.join(sorted(set(names)))})"


def runtime_tags() -> dict[str, str]:
    """The device a stage ran on and the CUDA/cuDNN versions TensorFlow was built with
    ("none" for a CPU-only build), for the MLflow run."""
    import tensorflow as tf  # noqa: PLC0415

    build = tf.sysconfig.get_build_info()
    return {
        "device": device_description(),
        "version.cuda": str(build.get("cuda_version") or "none"),
        "version.cudnn": str(build.get("cudnn_version") or "none"),
    }


@contextlib.contextmanager
def memory_for_batches(param: str, batch_size: int) -> Iterator[None]:
    """TensorFlow's out-of-memory error (what a GPU's allocator raises for a batch too large
    for it) as one paragraph naming the parameter to lower, not a page of traceback."""
    import tensorflow as tf  # noqa: PLC0415

    try:
        yield
    except tf.errors.ResourceExhaustedError as exc:
        message = (exc.message or "").strip()
        found = re.search(r"OOM when allocating tensor with shape\[[^\]]*\]", message)
        what = found.group(0) if found else next(iter(message.splitlines()), "")[:200]
        half = batch_size // 2
        if param.startswith("--"):  # transferline predict's option, not a param
            fix = f"Lower {param} (e.g. `{param} {half}`)" if half else "Free the device's memory"
        else:
            run = f"`dvc exp run -S {param}={half}`"
            fix = (
                f"Lower {param} (e.g. {run}) or model.image_size"
                if half
                else "Lower model.image_size"
            )
            if not keras.mixed_precision.global_policy().name.startswith("mixed"):
                fix += "; on a GPU, model.mixed_precision: on halves the activations"
        raise StageError(
            f"out of memory on {device_description()} with batches of {batch_size} "
            f"image{'s' if batch_size != 1 else ''} (TensorFlow: {what or 'no details'}). {fix}."
        ) from None

"""Forward-only throughput of a keras.applications base per precision policy (not a test).

The model ceiling that bench/extract.py calls (a), measured on whatever Keras backend is set
(KERAS_BACKEND=tensorflow|jax), for float32, mixed_float16 and mixed_bfloat16, on random
images already on the device and, separately, with each batch coming from host memory
(uint8, as a decode pipeline would hand it over). Used for GPU boxes where the TensorFlow
CUDA build is not installed but another Keras backend is.

    KERAS_BACKEND=jax python bench/forward.py --backbone resnet50 --size 224 --batch 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls, after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(backbone: str, size: int, batch: int, steps: int, policy: str) -> dict[str, float]:
    import keras
    import numpy as np

    from transferline import backbones
    from transferline.export import builtin_preprocessing

    keras.mixed_precision.set_global_policy(policy)
    spec = backbones.get(backbone)
    base = getattr(keras.applications, spec.constructor)(
        include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg"
    )
    inputs = keras.Input((size, size, 3))
    x = inputs
    for layer in builtin_preprocessing(spec.preprocessing):  # as in the exported classifier
        x = layer(x)
    out = keras.layers.Activation("linear", dtype="float32")(base(x, training=False))
    model = keras.Model(inputs, out)
    rng = np.random.default_rng(0)
    host = [rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8) for _ in range(steps)]
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        tv = [v.value for v in model.trainable_variables]
        ntv = [v.value for v in model.non_trainable_variables]

        @jax.jit
        def fwd(x):
            return model.stateless_call(tv, ntv, x.astype(jnp.float32), training=False)[0]

        dev = [jax.device_put(h) for h in host]

        def on_device():
            outs = [fwd(d) for d in dev]
            jax.block_until_ready(outs)

        def from_host():
            outs = [fwd(jax.device_put(h)) for h in host]
            jax.block_until_ready(outs)

        device = str(jax.devices()[0])
    else:
        import tensorflow as tf

        @tf.function(jit_compile=False, reduce_retracing=True)
        def fwd(x):
            return model(tf.cast(x, tf.float32), training=False)

        with tf.device("/GPU:0" if tf.config.list_physical_devices("GPU") else "/CPU:0"):
            dev = [tf.constant(h) for h in host]

        def on_device():
            for d in dev:
                out = fwd(d)
            out.numpy()

        def from_host():
            for h in host:
                out = fwd(h)
            out.numpy()

        device = str(tf.config.list_physical_devices("GPU") or "CPU")
    n = batch * steps
    return {
        "on_device": n / timed(on_device, 5),
        "from_host": n / timed(from_host, 5),
        "device": device,
        "backend": backend,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="batches per timed pass")
    ap.add_argument(
        "--policies", default="float32,mixed_float16,mixed_bfloat16", help="comma-separated"
    )
    args = ap.parse_args()
    rows = []
    for policy in args.policies.split(","):
        r = measure(args.backbone, args.size, args.batch, args.steps, policy)
        rows.append((policy, r))
        print(f"{policy:15s} {r['on_device']:9.0f} img/s on device {r['from_host']:9.0f} from host")
    first = rows[0][1]
    print(
        f"\n{args.backbone} at {args.size}px, batch {args.batch}, backend {first['backend']}, "
        f"{first['device']}, {os.cpu_count()} CPUs"
    )
    for policy, r in rows:
        print(
            f"{policy:15s} on-device {r['on_device']:8.0f} img/s  from-host {r['from_host']:8.0f} "
            f"img/s  vs float32 {r['on_device'] / first['on_device']:.2f}x"
        )


if __name__ == "__main__":
    main()

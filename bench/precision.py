"""What `model.mixed_precision` is worth on this machine, for extract and for finetune (not a test).

For each Keras precision policy, in a process of its own (the policy is global), on random
images in memory, random weights:
  extract:  the extract stage's model (BatchNormalization folded into the convolutions) called
            as the stage calls it (`features.compiled_forward`), img/s, median of --repeats
            passes after a warm-up pass;
  finetune: `finetune.finetune` as the stage calls it (base + dense head, --unfreeze layers,
            BatchNormalization frozen and in inference mode, a validation pass before and
            after every epoch), --epochs epochs on --n images; images trained per second of
            the whole call (compilation included, as the stage pays it), median of --repeats
            calls, each on a freshly built model.
Then prints each policy's figures and their ratio to float32's.

    python bench/precision.py [--backbone mobilenet_v2] [--size 160] [--n 192] [--batch 32]
                              [--policies float32,mixed_bfloat16] [--epochs 3] [--unfreeze 20]
                              [--repeats 3]

On a CPU, mixed_bfloat16 pays where the CPU computes bfloat16 natively (AMX, AVX512_BF16):
`model.mixed_precision: bfloat16`. mixed_float16 is `on`, for GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def measure(args: argparse.Namespace, policy: str) -> dict[str, float]:
    """img/s of the extract model and of fine-tuning under `policy` (this process only)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from transferline import backbones, finetune, heads, models
    from transferline.features import compiled_forward
    from transferline.params import FinetuneParams

    keras.mixed_precision.set_global_policy(policy)
    spec = backbones.get(args.backbone)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (args.n, args.size, args.size, 3)).astype("float32")
    y = rng.integers(0, 2, args.n)

    model = models.build_feature_extractor(spec, "none", args.size, "avg", seed=0, fold=True)
    forward = compiled_forward(model)
    batches = [tf.constant(x[i : i + args.batch]) for i in range(0, args.n, args.batch)]

    def extract_once() -> float:
        t = time.perf_counter()
        for b in batches:
            forward(b).numpy()
        return args.n / (time.perf_counter() - t)

    extract_once()  # warm-up: tracing
    extract = statistics.median(extract_once() for _ in range(args.repeats))

    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch).cache()
    val = train.take(1)

    def finetune_once() -> float:
        keras.utils.set_random_seed(0)
        ext = models.build_feature_extractor(spec, "none", args.size, "avg", seed=0)
        dim = int(ext.output_shape[-1])
        full = finetune.assemble(ext, heads.build_dense_head(dim, 2, 0, 0.0))
        t = time.perf_counter()
        f = FinetuneParams(epochs=args.epochs, learning_rate=1e-4, unfreeze_layers=args.unfreeze)
        finetune.finetune(full, train, val, f)
        return args.epochs * args.n / (time.perf_counter() - t)

    tuned = statistics.median(finetune_once() for _ in range(args.repeats))
    return {"extract": extract, "finetune": tuned}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--n", type=int, default=192, help="images (random, in memory)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--policies", default="float32,mixed_bfloat16", help="comma-separated")
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs per timed call")
    ap.add_argument("--unfreeze", type=int, default=20, help="layers fine-tuning unfreezes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args, args.child)), flush=True)
        return
    policies = args.policies.split(",")
    results = {}
    for policy in policies:  # one process each: the policy is global to a process
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", policy]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[policy] = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    print(
        f"{args.backbone} at {args.size}px, {args.n} random images, batch {args.batch}, "
        f"{os.cpu_count()} CPUs; fine-tuning {args.epochs} epochs, {args.unfreeze} layers "
        f"unfrozen; medians of {args.repeats}"
    )
    base = results.get("float32")
    for policy, r in results.items():
        line = (
            f"{policy:15s} extract {r['extract']:8.1f} img/s   finetune {r['finetune']:7.1f} img/s"
        )
        if base and policy != "float32":
            line += (
                f"   (x{r['extract'] / base['extract']:.2f} and "
                f"x{r['finetune'] / base['finetune']:.2f} of float32)"
            )
        print(line)


if __name__ == "__main__":
    main()

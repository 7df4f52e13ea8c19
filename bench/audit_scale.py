"""Time and peak memory of the audit on large feature sets (not a test).

For each feature size, a fresh process generates --n feature vectors (10 Gaussian classes,
float32, 1% of the labels flipped, 0.5% near-copies), runs `audit.audit` as the audit stage
does (cross-validated probabilities, then cleanlab's Datalab) and reports the seconds for the
whole audit and for the cross-validation alone, the counts found, and the process's peak RSS
(features included: --n x dim x 4 bytes).

    python bench/audit_scale.py [--n 25000] [--dims 512,1280,2048]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def generated(n: int, dim: int, seed: int = 0):
    from transferline.audit import AuditData

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    x = rng.normal(size=(10, dim)).astype(np.float32)[labels] * 0.6
    x += rng.normal(size=(n, dim)).astype(np.float32)
    copies = rng.choice(n, n // 200, replace=False)
    half = len(copies) // 2
    x[copies[:half]] = x[copies[half : 2 * half]] + 0.01
    flips = rng.choice(n, n // 100, replace=False)
    labels[flips] = (labels[flips] + 1) % 10
    splits = rng.choice(["train", "val", "test"], n, p=[0.8, 0.1, 0.1]).tolist()
    paths = [f"c{c}/{i:06d}.jpg" for i, c in enumerate(labels)]
    return AuditData(x, labels, splits, paths, [f"c{c}" for c in range(10)])


def one(n: int, dim: int) -> dict:
    from transferline import audit
    from transferline.params import AuditParams

    data = generated(n, dim)
    params = AuditParams()
    start = time.perf_counter()
    found = audit.audit(data, params, 0)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    audit.out_of_sample_probs(data.features, data.labels, 10, params, 0)  # its first step again
    cv = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"dim": dim, "seconds": seconds, "cv_seconds": cv, "peak_rss_mb": rss_mb,
            **found.metrics()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=25_000)
    ap.add_argument("--dims", default="512,1280,2048")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.n, args.one)))
        return
    for dim in (int(d) for d in args.dims.split(",")):
        out = subprocess.run(
            [sys.executable, __file__, "--n", str(args.n), "--one", str(dim)],
            capture_output=True, text=True,
        )  # fmt: skip
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"n={args.n} dim={r['dim']}: audit {r['seconds']:.1f} s (cross-validation "
            f"{r['cv_seconds']:.1f} s), peak RSS {r['peak_rss_mb']:,.0f} MB; label issues "
            f"{r['label_issues']}, near-duplicate pairs {r['near_duplicate_pairs']}, outliers "
            f"{r['outliers']}"
        )


if __name__ == "__main__":
    main()

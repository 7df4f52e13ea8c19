"""How well the audit finds planted label errors and near-duplicate copies (not a test).

Builds a data set from scikit-learn's digits, as 32-px PNGs in class folders: a fraction of
the images moved into a wrong class's folder (label errors) and copies of others re-encoded
as JPEG (quality 85) and resized to 29-35 px, each beside its original (near-duplicates that
byte-level de-duplication misses). Then the pipeline's own functions: the split, features
from a random-weight VGG16 at 32 px (as the quickstart extracts them), and the audit. Prints:

- precision among the top k (k = the label errors planted) of the audit's ranking, and of
  plain `cleanlab.filter.find_label_issues` on probabilities from a cross-validated logistic
  regression on the same features (the baseline the audit must match);
- the share of the planted errors among the rows the audit flags;
- the share of the planted copy pairs among the near-duplicate pairs it finds.

    python bench/audit_quality.py [--per-class 120] [--flip 0.05] [--copies 40] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from transferline import audit, audit_report
from transferline.params import AuditParams, ExtractParams, ModelParams


@dataclass(frozen=True)
class Planted:
    """What was planted, by manifest path (relative to the folder above `digits/`)."""

    flipped: frozenset[str]
    pairs: frozenset[frozenset[str]]


def planted_digits(raw: Path, per_class: int, flip: float, copies: int, seed: int) -> Planted:
    """Digits as 32-px PNGs under raw/digits/CLASS/, with planted label errors and copies."""
    from PIL import Image
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits()
    picked = np.concatenate([np.flatnonzero(digits.target == c)[:per_class] for c in range(10)])
    pixels = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)
    n_flip = round(flip * len(picked))
    flip_idx = set(rng.choice(len(picked), n_flip, replace=False).tolist())
    rest = [i for i in range(len(picked)) if i not in flip_idx]
    copy_idx = rng.choice(rest, copies, replace=False).tolist()
    flipped, pairs = set(), set()
    for k, i in enumerate(picked):
        label = int(digits.target[i])
        if k in flip_idx:  # into another class's folder: a label error
            label = int((label + rng.integers(1, 10)) % 10)
        img = Image.fromarray(pixels[i]).resize((32, 32), Image.BILINEAR).convert("RGB")
        rel = f"digits/{label}/{k:04d}.png"
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(raw / rel)
        if k in flip_idx:
            flipped.add(rel)
        if k in copy_idx:  # re-encoded and slightly resized, beside its original
            side = int(rng.integers(29, 36))
            buf = io.BytesIO()
            img.resize((side, side), Image.BICUBIC).save(buf, "JPEG", quality=85)
            copy = f"digits/{label}/{k:04d}_copy.jpg"
            (raw / copy).write_bytes(buf.getvalue())
            pairs.add(frozenset((rel, copy)))
    return Planted(frozenset(flipped), frozenset(pairs))


def features_of(raw: Path, work: Path, seed: int) -> audit.AuditData:
    """Split `raw` and extract random-weight VGG16 features at 32 px, as the pipeline does."""
    from transferline import dataset, features
    from transferline.files import DataDirs

    data = DataDirs(raw, work / "splits", work / "features")
    data.splits.mkdir(parents=True)
    data.features.mkdir(parents=True)
    spec = dataset.SplitSpec(val=0.15, test=0.15, seed=seed)
    dataset.write_split(dataset.build_split(raw / "digits", spec, rel_to=raw), data.splits)
    model = ModelParams(backbone="vgg16", weights="none", image_size=32)
    features.extract_dataset(data, model, ExtractParams(batch_size=64), seed)
    return audit_report.load_audit_data(data)


def baseline_ranking(data: audit.AuditData, params: AuditParams, seed: int) -> list[int]:
    """Plain cleanlab: find_label_issues on the same out-of-sample probabilities, ranked."""
    from cleanlab.filter import find_label_issues

    x = np.asarray(data.features, np.float32)
    probs = audit.out_of_sample_probs(x, data.labels, len(data.classes), params, seed)
    return find_label_issues(
        data.labels,
        probs,
        filter_by=params.label_filter,
        return_indices_ranked_by="self_confidence",
        n_jobs=1,  # no forked pool (see audit._datalab)
    ).tolist()


def scores(data: audit.AuditData, found: audit.Findings, planted: Planted, base: list[int]) -> dict:
    """Precision at k of the audit and of the baseline, the audit's recall of the planted
    errors among its flagged rows, and of the planted pairs among its near-duplicates."""
    k = len(planted.flipped)
    ours = [r["path"] for r in found.label_issues]
    theirs = [data.paths[i] for i in base]
    pairs = {frozenset((p["path_a"], p["path_b"])) for p in found.near_duplicates}
    return {
        "planted_errors": k,
        "planted_pairs": len(planted.pairs),
        "audit_precision_at_k": len(set(ours[:k]) & planted.flipped) / k,
        "baseline_precision_at_k": len(set(theirs[:k]) & planted.flipped) / k,
        "flagged": len(ours),
        "flagged_recall": len(set(ours) & planted.flipped) / k,
        "pairs_found": len(pairs),
        "pair_recall": len(pairs & planted.pairs) / max(1, len(planted.pairs)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=120)
    ap.add_argument("--flip", type=float, default=0.05)
    ap.add_argument("--copies", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    params = AuditParams()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        planted = planted_digits(raw, args.per_class, args.flip, args.copies, args.seed)
        data = features_of(raw, Path(tmp), args.seed)
        start = time.perf_counter()
        found = audit.audit(data, params, args.seed)
        seconds = time.perf_counter() - start
        result = scores(data, found, planted, baseline_ranking(data, params, args.seed))
    print(f"{len(data.paths)} images, audit {seconds:.1f} s")
    for key, value in result.items():
        print(f"  {key:24} {value:.3f}" if isinstance(value, float) else f"  {key:24} {value}")


if __name__ == "__main__":
    main()

"""Validation, de-duplication and the stratified split: what the split stage makes of a
download's labelled files (`layouts.py` and `labels_csv.py` label them). Reading the images
(checking and decoding them) is `images.py`'s.

Pure Python (PIL, NumPy, scikit-learn): the split stage never imports TensorFlow.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from transferline.checks import check_images
from transferline.errors import DataError
from transferline.images import ORIENTATION_FILE, SPLITS
from transferline.labels_csv import LabelsCsv, csv_candidates
from transferline.layouts import Candidate, Layout, folder_candidates, relabel

COUNTS_FILE = "counts.csv"  # in data/splits: class,train,val,test (a DVC plot)
SUMMARY_FILE = "summary.json"  # in data/splits: layout, images turned upright

log = logging.getLogger(__name__)


@dataclass
class SplitResult:
    manifests: dict[str, list[tuple[str, str]]]  # split -> [(path, label)]
    classes: list[str]
    rejected: list[tuple[str, str]]  # (path, reason)
    duplicates: int
    layout: str
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    # kept images whose EXIF orientation is not 1 (as stored), path -> orientation 2..8
    orientations: dict[str, int] = field(default_factory=dict)


def find_candidates(
    root: Path,
    layout: Layout = "auto",
    rel_to: Path | None = None,
    label_map: dict[str, str] | None = None,
    labels: LabelsCsv | None = None,
) -> tuple[str, list[Candidate]]:
    """Label every visible file under `root`: by the CSV when `labels` is given, else by the
    layout (detected when auto). Returns the layout and the candidates.

    Paths are relative to `rel_to` (default: `root`); `label_map` renames labels first (several
    names may map to one class).

    Args:
        root: the folder of the labelled images.
        layout: `data.layout`.
        rel_to: what paths are relative to.
        label_map: `data.label_map`.
        labels: the CSV that labels the images, if any.

    Returns:
        The layout and one Candidate per visible file.
    """
    rel_to = rel_to or root
    if not root.is_dir():
        raise DataError(
            f"{root}: no such folder. Run the download stage first, or fix data.subdir."
        )
    if labels is not None:
        return "csv", relabel(csv_candidates(root, rel_to, labels), label_map)
    return folder_candidates(root, layout, rel_to, label_map)


# ---------------------------------------------------------------- split


def _seeded_order(items: list[Candidate], seed: int, salt: str) -> list[Candidate]:
    """Deterministic shuffle that ignores listing order: sort by path, then permute by seed."""
    ordered = sorted(items, key=lambda c: c.path)
    rng = np.random.default_rng([seed, int(hashlib.md5(salt.encode()).hexdigest()[:8], 16)])
    return [ordered[i] for i in rng.permutation(len(ordered))]


def split_candidates(
    cands: list[Candidate], val: float, test: float, seed: int, max_per_class: int | None
) -> dict[str, list[Candidate]]:
    """Stratified, seeded split; pre-split (given) assignments are kept, missing splits carved
    out of train.

    Args:
        cands: the labelled, de-duplicated images.
        val, test: the fractions per class.
        seed: the shuffle's seed.
        max_per_class: a cap per class (None: all).

    Returns:
        The candidates of each split, `{"train": [...], "val": [...], "test": [...]}`.
    """
    by_class: dict[str, list[Candidate]] = defaultdict(list)
    for c in cands:
        by_class[c.label].append(c)
    if not by_class:
        raise DataError("no usable images were found. Check data.dataset and data.subdir.")
    if len(by_class) < 2:
        ((only, items),) = by_class.items()
        raise DataError(
            f"only one class ({only!r}, {len(items)} images) was found; classification needs at "
            f"least two class folders (or file-name prefixes)."
        )
    if any(c.group for c in cands):
        return _split_by_group(by_class, val, test, seed, max_per_class)
    out: dict[str, list[Candidate]] = {s: [] for s in SPLITS}
    for label in sorted(by_class):
        items = by_class[label]
        given = {  # val/test folders of a pre-split layout, kept as they are
            s: _seeded_order([c for c in items if c.split == s], seed, label + s)[:max_per_class]
            for s in ("val", "test")
        }
        pool = _seeded_order([c for c in items if c.split in (None, "train")], seed, label)
        pool = pool[:max_per_class]
        n = len(pool)
        n_val = 0 if given["val"] else round(n * val)
        n_test = 0 if given["test"] else round(n * test)
        too_few = (not given["val"] and n_val < 1) or (not given["test"] and n_test < 1)
        if too_few or n - n_val - n_test < 1:
            minimum = int(np.ceil(1 / min(val, test))) + 1
            raise DataError(
                f"class {label!r} has {n} usable images, too few to split with val={val}, "
                f"test={test} (every split needs at least one). Add images (about {minimum} or "
                f"more), raise the fractions, or drop the class folder."
            )
        out["test"] += given["test"] or pool[:n_test]
        out["val"] += given["val"] or pool[n_test : n_test + n_val]
        out["train"] += pool[n_test + n_val :]
    return out


def _groups_from_paths(cands: list[Candidate], pattern: str) -> list[Candidate]:
    """Each image's group from its path (chest X-rays' person1_bacteria_1.jpeg with
    'person\\d+'): the pattern's first group, else its whole match."""
    rx = re.compile(pattern)
    out, missed = [], []
    for c in cands:
        m = rx.search(c.path)
        if m:
            out.append(replace(c, group=m.group(1) if rx.groups else m.group(0)))
        else:
            out.append(c)
            missed.append(c.path)
    if cands and len(missed) == len(cands):
        raise DataError(
            f"split.group_pattern '{pattern}' is found in none of the {len(cands)} image paths "
            f"(e.g. {cands[0].path!r}, searched as a regular expression). Fix the pattern, or "
            f"set it to null."
        )
    if missed:
        log.warning(
            "split.group_pattern '%s' is not found in %d of %d image paths (e.g. %r): each of "
            "them is a group of its own",
            pattern,
            len(missed),
            len(cands),
            missed[0],
        )
    return out


def _refused_summary(rejected: list[tuple[str, str]], found: int) -> str:
    """The refused files by reason, most common first, with an example of each."""
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for path, reason in sorted(rejected):
        groups[re.split(r":| \(", reason, maxsplit=1)[0]].append((path, reason))
    ranked = sorted(groups.items(), key=lambda g: -len(g[1]))
    parts = [f"{len(g)} {kind} (e.g. {g[0][0]}: {g[0][1][:150]})" for kind, g in ranked[:3]]
    more = f"; {len(ranked) - 3} other reasons" if len(ranked) > 3 else ""
    return f"Of the {found} files found, {len(rejected)} were refused: {'; '.join(parts)}{more}."


def _split_by_group(
    by_class: dict[str, list[Candidate]],
    val: float,
    test: float,
    seed: int,
    max_per_class: int | None,
) -> dict[str, list[Candidate]]:
    """Whole groups to one split, stratified by class as far as whole groups allow. A
    patient's (or a lesion's) images in train and test would score the model on what it has
    seen, as HAM10000's several images per lesion do. Given val/test folders are kept."""

    def capped(split_names: tuple[str | None, ...], salt: str) -> list[Candidate]:
        out = []
        for label in sorted(by_class):
            items = [c for c in by_class[label] if c.split in split_names]
            out += _seeded_order(items, seed, label + salt)[:max_per_class]
        return sorted(out, key=lambda c: c.path)

    pool = capped((None, "train"), "")
    given = {s: capped((s,), s) for s in ("val", "test")}
    test_part, rest = (
        (given["test"], pool) if given["test"] else _carve_groups(pool, test, seed, "test")
    )
    fraction = val if given["test"] else val / (1 - test)
    val_part, train = (
        (given["val"], rest) if given["val"] else _carve_groups(rest, fraction, seed, "val")
    )
    out = {"train": train, "val": val_part, "test": test_part}
    for label in sorted(by_class):
        empty = [s for s in SPLITS if not any(c.label == label for c in out[s])]
        if empty:
            groups = len({_group(c) for c in pool if c.label == label})
            raise DataError(
                f"class {label!r} has images in {groups} groups, and with each group's "
                f"images kept in one split the {' and '.join(empty)} split gets none of them. "
                f"Add images of more groups, raise split.val/split.test, or drop the class."
            )
    groups = {s: {_group(c) for c in out[s]} for s in SPLITS}
    for s in ("val", "test"):
        others = set().union(*(groups[o] for o in SPLITS if o != s))
        if given[s] and (shared := groups[s] & others):
            log.warning(
                "%d groups (e.g. %r) have images in the given %s folder and in another split: "
                "the data set's own split puts them on both sides",
                len(shared),
                sorted(shared)[0],
                s,
            )
    log.info("split by group: %s groups in train, val, test", [len(groups[s]) for s in SPLITS])
    return out


def _group(c: Candidate) -> str:
    return c.group or c.path  # no group: a group of its own


def _carve_groups(
    items: list[Candidate], fraction: float, seed: int, name: str
) -> tuple[list[Candidate], list[Candidate]]:
    """About `fraction` of the items, in whole groups, stratified by class: one fold of
    scikit-learn's StratifiedGroupKFold with round(1 / fraction) folds."""
    from sklearn.model_selection import StratifiedGroupKFold  # noqa: PLC0415

    groups = [_group(c) for c in items]
    folds = max(2, round(1 / fraction))
    if len(set(groups)) < folds:
        raise DataError(
            f"the images are in {len(set(groups))} groups, too few "
            f"to carve {name} ({fraction:.0%} of them) from whole groups. Add images of more "
            f"groups, or raise split.{name}."
        )
    cv = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # a class in fewer groups than folds: checked by the caller
        warnings.simplefilter("ignore", UserWarning)
        _, picked = next(cv.split(np.zeros(len(items)), [c.label for c in items], groups))
    chosen = set(picked.tolist())
    return [items[i] for i in sorted(chosen)], [c for i, c in enumerate(items) if i not in chosen]


@dataclass(frozen=True)
class ExcludeList:
    """Files to leave out by their exact manifest path (`data.exclude_file`)."""

    source: str
    paths: frozenset[str]


def read_exclude_file(path: Path) -> ExcludeList:
    """The paths a CSV lists in its `path` column, else its `path_b` column (the audit's
    near_duplicates.csv: the second image of each pair)."""
    import csv  # noqa: PLC0415

    with Path(path).open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        column = next((c for c in ("path", "path_b") if c in columns), None)
        if column is None:
            raise DataError(
                f"data.exclude_file {path}: no `path` column (it has {columns or 'no header'}). "
                f"Give it a header row with a `path` column listing the files as "
                f"data/splits/*.csv does, as the audit's label_issues.csv has."
            )
        return ExcludeList(str(path), frozenset(row[column] for row in reader if row[column]))


def _excluded(
    cands: list[Candidate], patterns: Sequence[str], listed: ExcludeList | None = None
) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """Candidates kept, and (path, reason) of those `data.exclude` or `data.exclude_file`
    leaves out. What matches nothing is a warning: a typo would otherwise keep the file
    unseen."""
    import fnmatch  # noqa: PLC0415

    kept, left_out, used = [], [], set()
    listed_paths = listed.paths if listed else frozenset()
    for c in cands:
        hit = next((p for p in patterns if fnmatch.fnmatchcase(c.path, p)), None)
        if c.path in listed_paths:
            used.add(c.path)
            left_out.append((c.path, f"left out by data.exclude_file ({listed.source})"))
        elif hit is None:
            kept.append(c)
        else:
            used.add(hit)
            left_out.append((c.path, f"left out by data.exclude ({hit})"))
    unused = [p for p in patterns if p not in used]
    if unused:
        log.warning(
            "data.exclude: %s matches no file (patterns match paths as data/splits/*.csv "
            "lists them, e.g. PetImages/Cat/666.jpg or */666.jpg)",
            ", ".join(repr(p) for p in unused),
        )
    missing = sorted(listed_paths - used)
    if missing:
        log.warning(
            "data.exclude_file: %d of the %d files %s lists are not in the download (e.g. %s)",
            len(missing),
            len(listed_paths),
            listed.source,
            missing[0],
        )
    return kept, left_out


@dataclass(frozen=True)
class SplitSpec:
    """How to label and split a download (`data.*` and `split.*`).

    `group_pattern`: a regex whose match in an image's path (its first group, else the whole
    match) is the image's group; `exclude`: shell patterns of manifest paths to leave out,
    `exclude_list`: exact manifest paths to leave out (both listed in `rejected`).
    """

    layout: Layout = "auto"
    val: float = 0.1
    test: float = 0.1
    seed: int = 0
    max_per_class: int | None = None
    label_map: dict[str, str] | None = None
    labels: LabelsCsv | None = None
    group_pattern: str | None = None
    exclude: Sequence[str] = ()
    exclude_list: ExcludeList | None = None


def build_split(
    root: Path, spec: SplitSpec, rel_to: Path | None = None, workers: int | None = None
) -> SplitResult:
    """Detect the layout, validate every file once (each is read), drop duplicates, split.
    Writes and changes no file.

    Args:
        root: the folder holding the labelled images.
        spec: the layout, split fractions, seed, caps, labels, groups and exclusions.
        rel_to: what manifest paths are relative to (default: `root`).
        workers: processes checking the images (default: every usable core).

    Returns:
        The manifests, classes, rejected files with their reasons, the duplicates dropped,
        the layout, per-class counts and the images to turn upright.
    """
    rel_to = rel_to or root
    chosen, cands = find_candidates(root, spec.layout, rel_to, spec.label_map, spec.labels)
    log.info("layout: %s, %d candidate files", chosen, len(cands))
    labelled, rejected = _labelled(cands, spec)
    good, orientation = _checked(labelled, rel_to, workers, rejected)
    kept, duplicates = _deduplicated(good, rejected)
    try:
        split = split_candidates(kept, spec.val, spec.test, spec.seed, spec.max_per_class)
    except DataError as exc:  # no rejected.csv is written then: say what it would hold
        if not rejected:
            raise
        raise DataError(f"{exc} {_refused_summary(rejected, len(cands))}") from None
    classes = sorted({c.label for c in kept})
    manifests = {s: sorted((c.path, c.label) for c in split[s]) for s in SPLITS}
    counts = {s: dict(sorted(Counter(lbl for _, lbl in manifests[s]).items())) for s in SPLITS}
    turned = {c.path: orientation[c.path] for c in kept if orientation[c.path] > 1}
    return SplitResult(
        manifests,
        classes,
        sorted(rejected),
        duplicates,
        chosen,
        counts,
        dict(sorted(turned.items())),
    )


def _labelled(
    cands: list[Candidate], spec: SplitSpec
) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """The candidates with a label (grouped by `spec.group_pattern`), and the others, excluded
    or unlabelled, as (path, reason)."""
    rejected: list[tuple[str, str]] = []
    if spec.exclude or spec.exclude_list:
        cands, left_out = _excluded(cands, spec.exclude, spec.exclude_list)
        rejected += left_out
    labelled = []
    # Only the filename layout leaves a file unlabelled without saying why (`Candidate.why`).
    no_label = "no label: the file name has no class prefix like cat.1.jpg"
    for c in cands:
        if c.label:
            labelled.append(c)
        else:
            rejected.append((c.path, c.why or no_label))
    if spec.group_pattern:
        labelled = _groups_from_paths(labelled, spec.group_pattern)
    for s in ("val", "test"):
        given = [c for c in cands if c.split == s]
        if given and not any(c.label for c in given):
            log.warning(
                "the given %s folder holds %d files but no class folders (unlabelled, as a "
                "competition's test set is): they are not used (rejected.csv), and %s is "
                "carved from train",
                s,
                len(given),
                s,
            )
    return labelled, rejected


def _checked(
    labelled: list[Candidate], rel_to: Path, workers: int | None, rejected: list
) -> tuple[list[tuple[Candidate, str]], dict[str, int]]:
    """The usable images with their content digests, and each one's EXIF orientation; the
    others go to `rejected` with the reason."""
    checks = check_images([rel_to / c.path for c in labelled], workers)
    good: list[tuple[Candidate, str]] = []
    orientation: dict[str, int] = {}
    for c, chk in zip(labelled, checks, strict=True):
        if chk.ok:
            good.append((c, chk.digest))
            orientation[c.path] = chk.orientation
        else:
            rejected.append((c.path, chk.reason))
    invalid = sorted(path for path, o in orientation.items() if o == 0)
    if invalid:
        log.warning(
            "%d images have an EXIF orientation that cannot be read (a tag outside 1-8, or "
            "corrupt EXIF), e.g. %s: they are used as stored, as image viewers show them",
            len(invalid),
            invalid[0],
        )
    return good, orientation


def _deduplicated(good: list[tuple[Candidate, str]], rejected: list) -> tuple[list[Candidate], int]:
    """One copy of each set of byte-identical images (a given val/test split's copy, else the
    first by path) and how many copies were dropped. Copies that disagree on the label all go
    to `rejected`: no rule can say which label is right."""
    by_digest: dict[str, list[Candidate]] = defaultdict(list)
    for c, d in sorted(good, key=lambda t: t[0].path):
        by_digest[d].append(c)
    kept, duplicates = [], 0
    for copies in by_digest.values():
        duplicates += len(copies) - 1
        if len({c.label for c in copies}) > 1:
            others = ", ".join(f"{c.path} ({c.label})" for c in copies)
            rejected += [
                (c.path, f"identical bytes under different labels: {others}") for c in copies
            ]
            continue
        kept.append(next((c for c in copies if c.split in ("test", "val")), copies[0]))
    return kept, duplicates


def write_split(result: SplitResult, folder: Path) -> dict:
    """Manifests, classes.json, rejected.csv, the per-class counts (counts.csv: class, train,
    val, test) and summary.json (layout, images turned upright) into `folder`; returns the
    split's headline metrics (images per split, rejected, duplicates)."""
    import csv  # noqa: PLC0415
    import json  # noqa: PLC0415

    def table(name: str, header: tuple[str, ...], rows: list[tuple]) -> None:
        with (folder / name).open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)

    for split, rows in result.manifests.items():
        table(f"{split}.csv", ("path", "label"), rows)
    table("rejected.csv", ("path", "reason"), result.rejected)
    table(ORIENTATION_FILE, ("path", "orientation"), list(result.orientations.items()))
    splits = ("train", "val", "test")
    table(
        COUNTS_FILE,
        ("class", *splits),
        [(c, *(result.counts.get(s, {}).get(c, 0) for s in splits)) for c in result.classes],
    )
    (folder / "classes.json").write_text(json.dumps(result.classes, indent=2) + "\n")
    summary = {"layout": result.layout, "exif_turned": len(result.orientations)}
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return {
        **{f"{s}_images": sum(result.counts.get(s, {}).values()) for s in splits},
        "rejected": len(result.rejected),
        "duplicates": result.duplicates,
    }

"""Layouts, labels, validation, de-duplication and the stratified split: what the split stage
makes of a download. Reading the images (checking and decoding them) is `images.py`'s.

Pure Python (PIL, NumPy, scikit-learn): the split stage never imports TensorFlow.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import logging
import os
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from transferline.errors import DataError
from transferline.images import ORIENTATION_FILE, SPLITS, check_images

COUNTS_FILE = "counts.csv"  # in data/splits: class,train,val,test (a DVC plot)
SUMMARY_FILE = "summary.json"  # in data/splits: layout, images turned upright

log = logging.getLogger(__name__)

SPLIT_DIR_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
# File names that look like images, for the few places that go by name: a wrapper folder
# has none beside it; `transferline predict` expands folders to them.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IMAGE_SUFFIXES |= {".avif", ".heic", ".heif"}
SYSTEM_NAMES = {"thumbs.db", "desktop.ini", "__macosx", ".ds_store", "icon\r"}
Layout = Literal["auto", "class_folders", "presplit", "filename", "csv"]


@dataclass(frozen=True)
class LabelsCsv:
    """A CSV that labels the images (`data.labels`): one row per image, with a column naming
    it (a path, a file name, or a file name without its extension, as Kaggle's ids are) and
    one holding its class; None picks the first and the second column."""

    path: Path
    image_column: str | None = None
    # one column holding the class, or one-hot columns named after the classes (plant-
    # pathology's healthy,multiple_diseases,rust,scab: the class is the one set to 1)
    label_column: str | Sequence[str] | None = None
    # a column naming each image's group (a patient, a lesion): a group's images share a split
    group_column: str | None = None


@dataclass(frozen=True)
class Candidate:
    path: str  # relative to the raw root, posix
    label: str  # "" when the file has none: it is rejected, with `why` as the reason if given
    split: str | None = None  # given by a pre-split layout
    why: str = ""
    group: str = ""  # images of one group (a patient) go to one split; "": a group of its own


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


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_NAMES


def _visible(entries: Iterable[Path]) -> list[Path]:
    return sorted((p for p in entries if not is_hidden(p.name)), key=lambda p: p.name)


def _files_under(folder: Path) -> list[Path]:
    """Every visible file below `folder`, skipping hidden files and system folders."""
    return [folder / f for f in _rel_files(folder, folder)]


def _rel(path: Path, rel_to: Path) -> str:
    """`path` relative to `rel_to`, posix; "" for `rel_to` itself."""
    rel = path.relative_to(rel_to).as_posix()
    return "" if rel == "." else rel


def _rel_files(folder: Path, rel_to: Path) -> list[str]:
    """Every visible file below `folder` (hidden files and system folders skipped), as posix
    paths relative to `rel_to`."""
    # Strings, not a Path per file: those dominate the listing of a large data set.
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        rel = _rel(Path(dirpath), rel_to)
        prefix = f"{rel}/" if rel else ""
        out += [prefix + f for f in sorted(filenames) if not is_hidden(f)]
    return out


def _inside(rel: str, folder: str) -> bool:
    """Whether the relative path `rel` lies under the relative folder `folder` ("": the top)."""
    return not folder or rel.startswith(f"{folder}/")


def _unwrap(folder: Path, classes_below: bool = False) -> Path:
    """Descend through wrapper folders: one visible subfolder, and beside it no file named as
    an image (a README or LICENSE does not count: Kaggle's PetImages/ comes with both).

    `classes_below`: `folder` holds class folders (a given split's), so a lone subfolder that
    holds files itself is its one class, not a wrapper (a test/ with only test/cat/ in it).
    """
    while True:
        entries = _visible(folder.iterdir())
        dirs = [e for e in entries if e.is_dir()]
        if len(dirs) != 1 or any(e.suffix.lower() in IMAGE_SUFFIXES for e in entries):
            return folder
        if classes_below and any(not e.is_dir() for e in _visible(dirs[0].iterdir())):
            return folder
        folder = dirs[0]


_SPLIT_NAME = re.compile(
    rf"(?:.*[\W_])?({'|'.join(SPLIT_DIR_NAMES)})(?:[\W_]*(?:set|data|images|imgs))?[\W_]*\d*"
)


def split_of(name: str) -> str | None:
    """The split a folder name stands for, if any: `valid` -> val, and with the words data
    sets add (`training_set`, `Test_Images`, Intel's `seg_train`, a competition's `test1`)."""
    m = _SPLIT_NAME.fullmatch(name.lower())
    return SPLIT_DIR_NAMES[m.group(1)] if m else None


def _split_dirs(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in _visible(folder.iterdir()):
        name = split_of(d.name)
        if d.is_dir() and name:
            if name in found:
                raise DataError(
                    f"{folder}: both {found[name].name}/ and {d.name}/ look like the {name} split; "
                    f"keep one, or set data.subdir to the one to use."
                )
            found[name] = d
    return found


_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9-]*?)[._ -]")
_NUMBERED = re.compile(r"([A-Za-z][A-Za-z0-9._ -]*?)(?:[._ -]+\d+)+")


def label_from_filename(name: str) -> str | None:
    """`cat.0.jpg` -> `cat`, `dog_12.png` -> `dog`, `english_setter_3.jpg` -> `english_setter`
    (Oxford-IIIT Pet's names: the whole name before the number, or `english_setter` and
    `english_cocker_spaniel` would be one class); without a number, the first word
    (`cat_fluffy.jpg` -> `cat`). None when the name carries no label."""
    m = _NUMBERED.fullmatch(Path(name).stem) or _PREFIX.match(name)
    return m.group(1).lower() if m else None


def _class_folder_candidates(folder: Path, rel_to: Path, split: str | None) -> list[Candidate]:
    """Files under each class folder, labelled by it (files beside them: `_passed_over`)."""
    folder = _unwrap(folder, classes_below=split is not None)
    out = []
    for class_dir in _visible(folder.iterdir()):
        if class_dir.is_dir():
            out += [Candidate(f, class_dir.name, split) for f in _rel_files(class_dir, rel_to)]
    return out


def _filename_candidates(folder: Path, rel_to: Path) -> list[Candidate]:
    return [
        Candidate(rel, label_from_filename(rel.rpartition("/")[2]) or "")
        for rel in _rel_files(folder, rel_to)
    ]


def detect_layout(root: Path) -> str:
    folder = _unwrap(root)
    if len(_split_dirs(folder)) >= 2 and "train" in _split_dirs(folder):
        return "presplit"
    entries = _visible(folder.iterdir())
    if any(e.is_dir() for e in entries):
        return "class_folders"
    return "filename"


def reconcile_labels(
    cands: list[Candidate], label_map: dict[str, str] | None = None
) -> list[Candidate]:
    """Make class names agree across given splits.

    Rules, for labels that differ between splits: names that differ in case only are one
    class, spelt as in train (`test/bird` joins `train/Bird`), unless one split holds both
    spellings as two classes; then a label is mapped to the shortest label of another split
    that is its prefix at a `.`/`_`/`-`/space boundary (chest CT:
    `adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib` -> `adenocarcinoma`). Explicit `label_map`
    entries win. A label still present in one split but not another is an error that
    suggests the `data.label_map` entries to add.
    """
    cands = _relabel(cands, label_map)
    per_split: dict[str, set[str]] = defaultdict(set)
    for c in cands:
        if c.label:  # files outside class folders are rejected later, not a class
            per_split[c.split or "all"].add(c.label)
    if len({frozenset(s) for s in per_split.values()}) <= 1:
        return cands
    all_labels = set().union(*per_split.values())
    mapping = _case_joins(per_split)
    all_labels -= set(mapping)
    for label in all_labels:
        prefixes = [
            other
            for other in all_labels
            if other != label and label.startswith(other) and label[len(other)] in "._- "
        ]
        if prefixes:
            mapping[label] = min(prefixes, key=len)
    mapping = {k: mapping.get(v, v) for k, v in mapping.items()}  # `bird_x` -> `Bird_x` -> `Bird`
    cands = [replace(c, label=mapping.get(c.label, c.label)) for c in cands]
    per_split = defaultdict(set)
    for c in cands:
        if c.label:
            per_split[c.split or "all"].add(c.label)
    if len({frozenset(s) for s in per_split.values()}) > 1:
        listing = "; ".join(f"{s}: {sorted(v)}" for s, v in sorted(per_split.items()))
        every = set().union(*per_split.values())
        lacks = "; ".join(
            f"{s} has no {', '.join(sorted(every - v))}"
            for s, v in sorted(per_split.items())
            if every - v
        )
        hint = _label_map_hint(per_split)
        raise DataError(
            f"the class folders differ between the given splits and no rule joins them "
            f"({listing}): {lacks}. Where names in different splits mean one class, join them "
            f"with data.label_map in params.yaml"
            + (
                f", e.g. {{{hint}}}, or with dvc exp run -S '++data.label_map={{{hint}}}'"
                if hint
                else ""
            )
            + " (several names may map to one); every split needs images of every class."
        )
    if mapping:
        log.info("reconciled labels across splits: %s", mapping)
    return cands


def _case_joins(per_split: dict[str, set[str]]) -> dict[str, str]:
    """Labels to respell so that names differing in case only are one class: the train
    split's spelling, else the first split's by name. None where a split has two labels of
    one case-folded name (EMNIST's `A` and `a` are two classes)."""
    if any(len({lb.casefold() for lb in labels}) < len(labels) for labels in per_split.values()):
        return {}
    spelling: dict[str, str] = {}
    for split in sorted(per_split, key=lambda s: (s != "train", s)):
        for label in sorted(per_split[split]):
            spelling.setdefault(label.casefold(), label)
    all_labels = set().union(*per_split.values())
    return {lb: spelling[lb.casefold()] for lb in all_labels if spelling[lb.casefold()] != lb}


def _label_map_hint(per_split: dict[str, set[str]]) -> str:
    """Example data.label_map entries for the error: each label that train (else the split
    with the most classes) lacks, mapped to its most similar train label, where one is close."""
    ref = "train" if "train" in per_split else max(per_split, key=lambda s: len(per_split[s]))
    odd = sorted(set().union(*per_split.values()) - per_split[ref])
    entries = []
    for label in odd:
        close = difflib.get_close_matches(label, sorted(per_split[ref]), n=1, cutoff=0.5)
        if close:
            entries.append(f"{label}: {close[0]}")
    return ", ".join(entries[:3])


def find_candidates(
    root: Path,
    layout: Layout = "auto",
    rel_to: Path | None = None,
    label_map: dict[str, str] | None = None,
    labels: LabelsCsv | None = None,
) -> tuple[str, list[Candidate]]:
    """Label every visible file under `root` according to the layout (detected when auto;
    `labels` given: the CSV's).

    Paths are relative to `rel_to` (default: `root`); `label_map` renames labels first (several
    names may map to one class).
    """
    rel_to = rel_to or root
    if not root.is_dir():
        raise DataError(
            f"{root}: no such folder. Run the download stage first, or fix data.subdir."
        )
    if labels is not None:
        return "csv", _relabel(_csv_candidates(root, rel_to, labels), label_map)
    chosen = detect_layout(root) if layout == "auto" else layout
    folder = _unwrap(root)
    if chosen == "presplit":
        dirs = _split_dirs(folder)
        if "train" not in dirs:
            raise DataError(
                f"{folder}: data.layout is presplit but there is no train/ folder; found "
                f"{[d.name for d in _visible(folder.iterdir())]}. Use data.layout: auto."
            )
        cands = []
        for split, d in dirs.items():
            cands += _class_folder_candidates(d, rel_to, split)
        if not any(c.label for c in cands if c.split == "train"):
            raise DataError(_no_train_classes_message(dirs["train"], rel_to))
        cands += _passed_over(root, folder, rel_to, cands, dirs)
        return chosen, reconcile_labels(cands, label_map)
    if chosen == "class_folders":
        cands = _class_folder_candidates(folder, rel_to, None)
        if layout == "auto":
            labelled = {c.label for c in cands if c.label}
            _refuse_split_names_as_classes(folder, rel_to, labelled)
            _refuse_part_names_as_classes(folder, rel_to, labelled)
            _refuse_shared_subfolders(folder, rel_to)
            _refuse_a_lone_wrapper(folder, rel_to, labelled)
            _refuse_nested_data_sets(folder, rel_to)
    else:
        cands = _filename_candidates(folder, rel_to)
        if cands and not any(c.label for c in cands):
            raise DataError(_unlabelled_message(root, folder, len(cands)))
    return chosen, _relabel(cands + _passed_over(root, folder, rel_to, cands), label_map)


def _csv_candidates(root: Path, rel_to: Path, labels: LabelsCsv) -> list[Candidate]:
    """Every visible file under `root`, labelled by the CSV's row that names it; the others
    unlabelled, with the reason. A row may name its image by path (from `root` or from the
    download's top), by file name, or by file name without its extension."""
    import csv  # noqa: PLC0415

    table = labels.path
    shown = table.relative_to(rel_to).as_posix() if table.is_relative_to(rel_to) else str(table)
    if not table.is_file():
        found = sorted(f.relative_to(rel_to).as_posix() for f in rel_to.rglob("*.csv"))[:5]
        raise DataError(
            f"data.labels.file: {shown} is not in the download ({rel_to.as_posix()}/); CSV files "
            f"there: {', '.join(found) or 'none'}. Give its path inside the download."
        )
    data = table.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"data.labels.file: {shown} is not UTF-8 text (byte 0x{data[exc.start]:02x} on "
            f"line {line}): save it as UTF-8 (Excel: 'CSV UTF-8'), or convert a copy, e.g. "
            f"`iconv -f cp1252 -t utf-8 {table.name} > labels_utf8.csv`, and point "
            f"data.labels.file at that."
        ) from None
    # Comma-separated as Kaggle ships them; a semicolon (Excel in much of Europe), tab or pipe
    # is taken when the header row is split by it and not by commas.
    first = text.split("\n", 1)[0]
    delimiter = next((d for d in ",;\t|" if d in first), ",")
    if delimiter != ",":
        log.info("%s: columns separated by %r", shown, delimiter)
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    header, rows = (rows[0], rows[1:]) if rows else ([], [])
    if len(header) < 2:
        raise DataError(
            f"data.labels.file: {shown} needs a header row and at least two columns (the "
            f"image and its class), separated by commas, semicolons or tabs; its first row is "
            f"{header!r}."
        )
    image = _column(header, labels.image_column, 0, "image_column", shown)
    group = (
        None
        if labels.group_column is None
        else _column(header, labels.group_column, 0, "group_column", shown)
    )
    if labels.label_column is None or isinstance(labels.label_column, str):
        label = _column(header, labels.label_column, 1, "label_column", shown)
        needed = max(image, label)

        def label_of(row: list[str]) -> tuple[str, str]:
            """(the class, "") or ("", why the row gives none); ("", "") for an empty cell."""
            return row[label].strip(), ""
    else:  # one-hot: the class is the one column set
        hot = [_column(header, c, 1, "label_column", shown) for c in labels.label_column]
        needed = max(image, *hot)
        columns = ", ".join(header[i] for i in hot)

        def label_of(row: list[str]) -> tuple[str, str]:
            on = [header[i] for i in hot if row[i].strip().lower() in ("1", "1.0", "true")]
            if len(on) == 1:
                return on[0], ""
            return "", f"{len(on)} of the columns {columns} set in {shown}, not one"

    files = [f for f in _files_under(root) if f != table]
    exact = {f.relative_to(root).as_posix(): f for f in files}
    exact.update({f.relative_to(rel_to).as_posix(): f for f in files})
    by_name: dict[str, list[Path]] = defaultdict(list)
    by_stem: dict[str, list[Path]] = defaultdict(list)  # Kaggle's ids: names without extension
    for f in files:
        by_name[f.name].append(f)
        by_stem[f.stem].append(f)
    given: dict[Path, set[str]] = defaultdict(set)
    group_of: dict[Path, str] = {}
    refused: dict[Path, str] = {}  # rows that name the image but give it no single class
    unmatched: list[str] = []
    for row in rows:
        if len(row) <= needed:
            continue
        cls, why = label_of(row)
        if not cls and not why:
            continue
        name = _clean(row[image])
        hit = [exact[name]] if name in exact else by_name.get(name) or by_stem.get(name, [])
        # Files of one size under one name are taken for copies (a download holding a folder
        # twice): all labelled, and validation keeps one of identical files. Files of other
        # sizes are other images, and which one the row means is unknown.
        if len(hit) > 1 and len({h.stat().st_size for h in hit}) > 1:
            raise DataError(
                f"data.labels.file: {shown} names {name!r}, and {len(hit)} different files "
                f"match it ({', '.join(h.relative_to(rel_to).as_posix() for h in hit[:3])}). "
                f"Set data.subdir to the folder of the labelled images, so that one does."
            )
        for h in hit:
            if cls:
                given[h].add(cls)
                if group is not None and len(row) > group and row[group].strip():
                    group_of.setdefault(h, row[group].strip())
            else:
                refused[h] = why
        if not hit:
            unmatched.append(name)
    if not given and unmatched:
        # Another column may name them (HAM10000's metadata: lesion_id first, image_id second)
        known = exact.keys() | by_name.keys() | by_stem.keys()
        hits = {
            col: sum(1 for row in rows if len(row) > i and _clean(row[i]) in known)
            for i, col in enumerate(header)
            if i != image
        }
        best = max(hits, key=hits.get, default=None)
        fix = (
            f"Set data.labels.image_column: {best} ({hits[best]} of its rows name a file)"
            if best and hits[best]
            else f"Set data.subdir to the images' folder, or data.labels.image_column to the "
            f"column naming them (columns: {', '.join(header)})"
        )
        raise DataError(
            f"data.labels.file: none of the {len(rows)} rows of {shown} names a file under "
            f"{root.as_posix()}/ (e.g. {unmatched[0]!r} in column {header[image]!r}). {fix}."
        )
    if not given:
        raise DataError(f"data.labels.file: {shown} has no row with an image and a label.")
    if unmatched:
        log.warning(
            "%d rows of %s name no file under %s/ (e.g. %r): those images are missing",
            len(unmatched),
            shown,
            root.as_posix(),
            unmatched[0],
        )
    out = []
    for f in files:
        rel = f.relative_to(rel_to).as_posix()
        found = sorted(given.get(f, ()))
        if len(found) == 1:
            out.append(Candidate(rel, found[0], group=group_of.get(f, "")))
        elif found:
            out.append(Candidate(rel, "", why=f"two labels in {shown}: {', '.join(found)}"))
        elif f in refused:
            out.append(Candidate(rel, "", why=refused[f]))
        else:
            out.append(Candidate(rel, "", why=f"no label: not in {shown}"))
    return out


def _clean(cell: str) -> str:
    """A CSV cell naming an image, as a path inside the download."""
    return cell.strip().replace("\\", "/").removeprefix("./")


def _column(header: list[str], wanted: str | None, default: int, key: str, shown: str) -> int:
    """Index of the column `wanted` (None: the `default`-th), or a clear error."""
    if wanted is None:
        return default
    if wanted in header:
        return header.index(wanted)
    close = difflib.get_close_matches(wanted, header, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise DataError(
        f"data.labels.{key}: {shown} has no column {wanted!r}.{hint} Its columns: "
        f"{', '.join(header)}."
    )


def _passed_over(
    root: Path,
    folder: Path,
    rel_to: Path,
    cands: list[Candidate],
    split_dirs: dict[str, Path] | None = None,
) -> list[Candidate]:
    """Every visible file under `root` that the layout gave no place, as an unlabelled
    candidate with the reason, so that rejected.csv lists it: files beside a wrapper folder
    (a README beside PetImages/), beside the split folders, or beside class folders (in a
    given split's folder: with that split, so that an unlabelled test/ can be told)."""
    seen = {c.path for c in cands}
    split_dirs = split_dirs or {}
    names = ", ".join(sorted(d.name for d in split_dirs.values()))
    inside_splits = {s: _rel(d, rel_to) for s, d in split_dirs.items()}
    found_in = _rel(folder, rel_to)
    out = []
    for rel in _rel_files(root, rel_to):
        if rel in seen:
            continue
        split = next((s for s, d in inside_splits.items() if _inside(rel, d)), None)
        if not _inside(rel, found_in):
            why = f"no label: outside {folder.name}/, the folder the images were found in"
        elif split_dirs and split is None:
            why = f"no label: not in a split folder ({names})"
        else:
            why = "no label: not inside a class folder"
        out.append(Candidate(rel, "", split, why))
    return out


def _refuse_split_names_as_classes(folder: Path, rel_to: Path, labels: set[str]) -> None:
    """Class folders named like splits are a download's split folders taken for classes (a
    Kaggle competition's train/ and test1/): a classifier of folders, with no error."""
    odd = sorted(lb for lb in labels if split_of(lb))
    if not odd:
        return
    # The labelled images: in train/, else in the other folder beside the split-named one (a
    # download's data folder beside its unlabelled test/)
    others = sorted(labels - set(odd))
    trains = [lb for lb in odd if lb.lower().startswith("train")]
    example = _subdir_example(folder, rel_to, (trains or others or odd)[0])
    raise DataError(
        f"{folder.as_posix()}/: the class folder{'s' * (len(odd) > 1)} {', '.join(odd)} "
        f"look{'s' * (len(odd) == 1)} like the data set's splits, not classes (as a Kaggle "
        f"competition's train/ and test1/ are). Set data.subdir to the folder with the "
        f"labelled images (e.g. data.subdir: {example}), or data.layout: class_folders if "
        f"these really are class names."
    )


# Folder names of a data set's parts, not of classes: a detection or segmentation set's
# images/ beside annotations/ or masks/ (Stanford Dogs, Oxford-IIIT Pet, face-mask sets),
# Pascal VOC's JPEGImages/ beside Annotations/ and ImageSets/.
_PART_NAMES = {
    "images", "image", "imgs", "jpegimages", "annotations", "annotation", "labels", "masks",
    "trimaps", "xmls", "imagesets", "segmentationclass", "segmentationobject", "metadata",
}  # fmt: skip


def _subdir_example(folder: Path, rel_to: Path, name: str) -> str:
    at = folder.relative_to(rel_to).as_posix()
    return name if at == "." else f"{at}/{name}"


def _refuse_part_names_as_classes(folder: Path, rel_to: Path, labels: set[str]) -> None:
    """Class folders named like a data set's parts (images/ beside annotations/): taken as
    classes, they train an images-vs-annotations classifier, with no error."""
    parts = sorted(lb for lb in labels if lb.lower() in _PART_NAMES)
    if not parts or len(labels) < 2:
        return
    images = next((p for p in parts if p.lower() in ("images", "image", "imgs", "jpegimages")), "")
    example = f" (e.g. data.subdir: {_subdir_example(folder, rel_to, images)})" if images else ""
    raise DataError(
        f"{folder.as_posix()}/: the class folders {', '.join(sorted(labels))} look like the "
        f"parts of the data set (images beside their annotations or masks), not classes. Set "
        f"data.subdir to the folder of the labelled images{example}, with data.labels.file if "
        f"a CSV gives their classes; or data.layout: class_folders if these really are class "
        f"names."
    )


def _refuse_shared_subfolders(folder: Path, rel_to: Path) -> None:
    """Class folders that each hold the same subfolders are versions of the data set with the
    classes inside (PlantVillage's color/, grayscale/ and segmented/, each with the 38 disease
    folders): taken as classes, they train a color-vs-grayscale classifier, with no error.
    Shared split names (cat/train/, dog/train/) are left alone: the labels are right. A
    class folder that holds folders named like the classes beside it is refused too: a copy of
    the data set (Flowers Recognition's flowers/flowers/)."""
    subs = {
        c.name: {d.name for d in _visible(c.iterdir()) if d.is_dir()}
        for c in _visible(folder.iterdir())
        if c.is_dir()
    }
    for name, inner in subs.items():
        copied = sorted(inner & set(subs) - {name})
        if len(copied) >= 2:
            raise DataError(
                f"{folder.as_posix()}/: the class folder {name}/ holds folders named like the "
                f"classes beside it ({', '.join(copied[:3])}{', ...' * (len(copied) > 3)}), so "
                f"it looks like a copy of the data set, not a class. Set data.subdir to the "
                f"copy to use (e.g. data.subdir: {_subdir_example(folder, rel_to, name)}), or "
                f"data.layout: class_folders if {name} really is a class."
            )
    if len(subs) < 2 or not all(subs.values()):
        return
    shared = sorted(n for n in set.intersection(*subs.values()) if not split_of(n))
    if len(shared) < 2:
        return
    outer = list(subs)
    shown = ", ".join(shared[:3]) + (", ..." if len(shared) > 3 else "")
    raise DataError(
        f"{folder.as_posix()}/: each of the folders {', '.join(outer)} holds the same "
        f"{len(shared)} folders ({shown}), so they look like versions or parts of the data "
        f"set with the classes inside them, not classes. Set data.subdir to the one to use "
        f"(e.g. data.subdir: {_subdir_example(folder, rel_to, outer[0])}), or data.layout: "
        f"class_folders if {', '.join(outer)} really are the classes."
    )


def _refuse_a_lone_wrapper(folder: Path, rel_to: Path, labels: set[str]) -> None:
    """One class folder that holds class folders of its own is a wrapper that an image file
    beside it kept from being unwrapped (PetImages/ beside a sample.jpg): one class, else."""
    if len(labels) != 1:
        return
    (only,) = labels
    inner = [d.name for d in _visible((folder / only).iterdir()) if d.is_dir()]
    if len(inner) < 2:
        return
    beside = [f.name for f in _visible(folder.iterdir()) if f.is_file()]
    raise DataError(
        f"{folder.as_posix()}/: the only class folder, {only}/, holds the folders "
        f"{', '.join(inner[:3])}{', ...' * (len(inner) > 3)}: it looks like a wrapper folder, "
        f"taken for a class because of the files beside it ({', '.join(beside[:3])}). Set "
        f"data.subdir: {_subdir_example(folder, rel_to, only)}."
    )


def _refuse_nested_data_sets(folder: Path, rel_to: Path) -> None:
    """A class folder with a train folder of class folders somewhere inside holds a data set
    of its own (an archive of two versions: blood-cells' dataset2-master/.../images/TRAIN/
    with the four cell types, beside dataset-master/): taken as classes, the versions train a
    classifier of folders, with no error."""
    for class_dir in _visible(folder.iterdir()):
        if not class_dir.is_dir():
            continue
        for dirpath, dirnames, _ in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
            here = Path(dirpath)
            if here != class_dir and split_of(here.name) == "train" and len(dirnames) >= 2:
                data_set = here.parent.relative_to(rel_to).as_posix()
                raise DataError(
                    f"{folder.as_posix()}/: the class folder {class_dir.name}/ holds a data set "
                    f"of its own ({here.relative_to(rel_to).as_posix()}/ with the folders "
                    f"{', '.join(dirnames[:3])}{', ...' * (len(dirnames) > 3)}), so it is not a "
                    f"class. Set data.subdir to the data set to use (e.g. data.subdir: "
                    f"{data_set})."
                )


def _no_train_classes_message(train: Path, rel_to: Path) -> str:
    """A pre-split layout whose train/ has no class folders: most often a Kaggle competition,
    with labels in train/'s file names (cat.0.jpg) and an unlabelled test/."""
    loose = _files_under(train)
    named = sum(1 for f in loose if label_from_filename(f.name))
    subdir = train.relative_to(rel_to).as_posix()
    splits = ", ".join(sorted(d.name for d in train.parent.iterdir() if d.is_dir()))
    text = (
        f"{train.as_posix()}/ holds {len(loose)} files but no class folders, so the split "
        f"folders ({splits}) cannot be used as given splits."
    )
    if named:
        return text + (
            f" {named} of its file names start with a class (as cat.1.jpg does): set "
            f"data.subdir: {subdir} to take the labels from the names (val and test are then "
            f"carved from it; a competition's unlabelled test/ cannot be scored)."
        )
    return text + " Give each class its own folder under it (train/cat/, train/dog/)."


def _unlabelled_message(root: Path, folder: Path, n: int) -> str:
    """Files but no class: most often a single class folder taken for a wrapper folder."""
    text = (
        f"{folder.as_posix()}/ holds {n} file{'s' * (n != 1)} but no class folders, and no "
        f"file name starts with a class (as cat.1.jpg does), so no image has a label."
    )
    if folder != root:
        text += (
            f" {folder.name}/ was taken for a wrapper folder, being the only folder in "
            f"{folder.parent.as_posix()}/: if it is a class, it is the only one, and a "
            f"classifier needs at least two."
        )
    return text + (
        " Give each class its own folder (e.g. cat/ and dog/ side by side), or name the files "
        "by class (cat.1.jpg, dog.1.jpg)."
    )


def _relabel(cands: list[Candidate], label_map: dict[str, str] | None) -> list[Candidate]:
    if not label_map:
        return cands
    return [replace(c, label=label_map.get(c.label, c.label)) for c in cands]


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
    out of train."""
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


def _excluded(
    cands: list[Candidate], patterns: Sequence[str]
) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """Candidates kept, and (path, reason) of those `data.exclude` leaves out. A pattern that
    matches nothing is a warning: a typo would otherwise keep the file unseen."""
    import fnmatch  # noqa: PLC0415

    kept, left_out, used = [], [], set()
    for c in cands:
        hit = next((p for p in patterns if fnmatch.fnmatchcase(c.path, p)), None)
        if hit is None:
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
    return kept, left_out


def build_split(
    root: Path,
    *,
    layout: Layout,
    val: float,
    test: float,
    seed: int,
    max_per_class: int | None,
    rel_to: Path | None = None,
    label_map: dict[str, str] | None = None,
    labels: LabelsCsv | None = None,
    group_pattern: str | None = None,
    workers: int | None = None,
    exclude: Sequence[str] = (),
) -> SplitResult:
    """Detect the layout, validate every file once (each is read), drop duplicates, split.
    Writes and changes no file.

    Manifest paths are relative to `rel_to` (default: `root`). `group_pattern`: a regex whose
    match in an image's path (its first group, else the whole match) is the image's group.
    `exclude`: shell patterns of manifest paths to leave out (listed in `rejected`).
    """
    rel_to = rel_to or root
    chosen, cands = find_candidates(root, layout, rel_to, label_map, labels)
    log.info("layout: %s, %d candidate files", chosen, len(cands))
    rejected: list[tuple[str, str]] = []
    if exclude:
        cands, left_out = _excluded(cands, exclude)
        rejected += left_out
    labelled = []
    # Only the filename layout leaves a file unlabelled without saying why (`Candidate.why`).
    no_label = "no label: the file name has no class prefix like cat.1.jpg"
    for c in cands:
        if c.label:
            labelled.append(c)
        else:
            rejected.append((c.path, c.why or no_label))
    if group_pattern:
        labelled = _groups_from_paths(labelled, group_pattern)
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
    # Exact duplicates: one copy survives (the first by path); copies that disagree on the
    # label are all refused, since no rule can say which label is right.
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
        given = next((c for c in copies if c.split in ("test", "val")), copies[0])
        kept.append(given)
    try:
        split = split_candidates(kept, val, test, seed, max_per_class)
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

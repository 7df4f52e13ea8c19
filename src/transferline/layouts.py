"""Layouts: how a download's folders and file names label its images (class folders,
presplit train/val/test folders, labels in file names), detected or given, and the refusals of
what looks like a layout but is not (split or part folders taken for classes, wrappers, nested
data sets). Each file becomes a `Candidate`; the CSV labels are `labels_csv.py`'s.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from transferline.errors import DataError

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
class Candidate:
    path: str  # relative to the raw root, posix
    label: str  # "" when the file has none: it is rejected, with `why` as the reason if given
    split: str | None = None  # given by a pre-split layout
    why: str = ""
    group: str = ""  # images of one group (a patient) go to one split; "": a group of its own


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_NAMES


def visible(entries: Iterable[Path]) -> list[Path]:
    return sorted((p for p in entries if not is_hidden(p.name)), key=lambda p: p.name)


def files_under(folder: Path) -> list[Path]:
    """Every visible file below `folder`, skipping hidden files and system folders."""
    return [folder / f for f in rel_files(folder, folder)]


def rel_path(path: Path, rel_to: Path) -> str:
    """`path` relative to `rel_to`, posix; "" for `rel_to` itself."""
    rel = path.relative_to(rel_to).as_posix()
    return "" if rel == "." else rel


def rel_files(folder: Path, rel_to: Path) -> list[str]:
    """Every visible file below `folder` (hidden files and system folders skipped), as posix
    paths relative to `rel_to`."""
    # Strings, not a Path per file: those dominate the listing of a large data set.
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        rel = rel_path(Path(dirpath), rel_to)
        prefix = f"{rel}/" if rel else ""
        out += [prefix + f for f in sorted(filenames) if not is_hidden(f)]
    return out


def is_inside(rel: str, folder: str) -> bool:
    """Whether the relative path `rel` lies under the relative folder `folder` ("": the top)."""
    return not folder or rel.startswith(f"{folder}/")


def _unwrap(folder: Path, classes_below: bool = False) -> Path:
    """Descend through wrapper folders: one visible subfolder, and beside it no file named as
    an image (a README or LICENSE does not count: Kaggle's PetImages/ comes with both).

    `classes_below`: `folder` holds class folders (a given split's), so a lone subfolder that
    holds files itself is its one class, not a wrapper (a test/ with only test/cat/ in it).
    """
    while True:
        entries = visible(folder.iterdir())
        dirs = [e for e in entries if e.is_dir()]
        if len(dirs) != 1 or any(e.suffix.lower() in IMAGE_SUFFIXES for e in entries):
            return folder
        if classes_below and any(not e.is_dir() for e in visible(dirs[0].iterdir())):
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
    for d in visible(folder.iterdir()):
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
    for class_dir in visible(folder.iterdir()):
        if class_dir.is_dir():
            out += [Candidate(f, class_dir.name, split) for f in rel_files(class_dir, rel_to)]
    return out


def _filename_candidates(folder: Path, rel_to: Path) -> list[Candidate]:
    return [
        Candidate(rel, label_from_filename(rel.rpartition("/")[2]) or "")
        for rel in rel_files(folder, rel_to)
    ]


def detect_layout(root: Path) -> str:
    folder = _unwrap(root)
    if len(_split_dirs(folder)) >= 2 and "train" in _split_dirs(folder):
        return "presplit"
    entries = visible(folder.iterdir())
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
    cands = relabel(cands, label_map)
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
        raise DataError(_splits_differ(per_split))
    if mapping:
        log.info("reconciled labels across splits: %s", mapping)
    return cands


def _splits_differ(per_split: dict[str, set[str]]) -> str:
    """The message for given splits whose classes differ: which lacks what, and the
    data.label_map that would join them."""
    listing = "; ".join(f"{s}: {sorted(v)}" for s, v in sorted(per_split.items()))
    every = set().union(*per_split.values())
    lacks = "; ".join(
        f"{s} has no {', '.join(sorted(every - v))}"
        for s, v in sorted(per_split.items())
        if every - v
    )
    hint = _label_map_hint(per_split)
    example = f", e.g. {{{hint}}}, or with dvc exp run -S '++data.label_map={{{hint}}}'"
    return (
        f"the class folders differ between the given splits and no rule joins them "
        f"({listing}): {lacks}. Where names in different splits mean one class, join them "
        f"with data.label_map in params.yaml{example if hint else ''} (several names may map "
        f"to one); every split needs images of every class."
    )


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


def folder_candidates(
    root: Path,
    layout: Layout = "auto",
    rel_to: Path | None = None,
    label_map: dict[str, str] | None = None,
) -> tuple[str, list[Candidate]]:
    """Label every visible file under the folder `root` by its folders or file name, as the
    layout says (detected when auto); returns the layout and the candidates.

    Paths are relative to `rel_to` (default: `root`); `label_map` renames labels first (several
    names may map to one class).

    Args:
        root: the folder of the labelled images.
        layout: `data.layout` (not csv).
        rel_to: what paths are relative to.
        label_map: `data.label_map`.
    """
    rel_to = rel_to or root
    chosen = detect_layout(root) if layout == "auto" else layout
    folder = _unwrap(root)
    if chosen == "presplit":
        dirs = _split_dirs(folder)
        if "train" not in dirs:
            raise DataError(
                f"{folder}: data.layout is presplit but there is no train/ folder; found "
                f"{[d.name for d in visible(folder.iterdir())]}. Use data.layout: auto."
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
    return chosen, relabel(cands + _passed_over(root, folder, rel_to, cands), label_map)


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
    inside_splits = {s: rel_path(d, rel_to) for s, d in split_dirs.items()}
    found_in = rel_path(folder, rel_to)
    out = []
    for rel in rel_files(root, rel_to):
        if rel in seen:
            continue
        split = next((s for s, d in inside_splits.items() if is_inside(rel, d)), None)
        if not is_inside(rel, found_in):
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
        c.name: {d.name for d in visible(c.iterdir()) if d.is_dir()}
        for c in visible(folder.iterdir())
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
    inner = [d.name for d in visible((folder / only).iterdir()) if d.is_dir()]
    if len(inner) < 2:
        return
    beside = [f.name for f in visible(folder.iterdir()) if f.is_file()]
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
    for class_dir in visible(folder.iterdir()):
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
    loose = files_under(train)
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


def relabel(cands: list[Candidate], label_map: dict[str, str] | None) -> list[Candidate]:
    if not label_map:
        return cands
    return [replace(c, label=label_map.get(c.label, c.label)) for c in cands]

"""Labels from a CSV (`data.labels`), as Kaggle competitions ship them: a column naming each
image (path, file name or id), its class (one column or one-hot columns), and optionally its
group (a patient), matched to the files of the download."""

from __future__ import annotations

import difflib
import io
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transferline.errors import DataError
from transferline.layouts import Candidate, files_under

log = logging.getLogger(__name__)


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


def csv_candidates(root: Path, rel_to: Path, labels: LabelsCsv) -> list[Candidate]:
    """Every visible file under `root`, labelled by the CSV's row that names it; the others
    unlabelled, with the reason. A row may name its image by path (from `root` or from the
    download's top), by file name, or by file name without its extension."""
    shown, header, rows = _read_table(labels.path, rel_to)
    reader = _RowReader(header, labels, shown)
    files = _FileIndex(root, rel_to, [f for f in files_under(root) if f != labels.path])
    given: dict[Path, set[str]] = defaultdict(set)
    group_of: dict[Path, str] = {}
    refused: dict[Path, str] = {}  # rows that name the image but give it no single class
    unmatched: list[str] = []
    for row in rows:
        if len(row) <= reader.needed:
            continue
        cls, why = reader.label_of(row)
        if not cls and not why:
            continue
        name = _clean(row[reader.image])
        hit = files.matching(name, shown)
        group = reader.group_of(row)
        for h in hit:
            if cls:
                given[h].add(cls)
                if group:
                    group_of.setdefault(h, group)
            else:
                refused[h] = why
        if not hit:
            unmatched.append(name)
    if not given:
        raise DataError(_nothing_matched(shown, header, rows, reader.image, files, unmatched))
    if unmatched:
        log.warning(
            "%d rows of %s name no file under %s/ (e.g. %r): those images are missing",
            len(unmatched),
            shown,
            root.as_posix(),
            unmatched[0],
        )
    out = []
    for f in files.files:
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


def _read_table(table: Path, rel_to: Path) -> tuple[str, list[str], list[list[str]]]:
    """The CSV as its name shown in messages, its header and its rows; DataError when it is
    missing, not UTF-8, or has fewer than two columns."""
    import csv  # noqa: PLC0415

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
    return shown, header, rows


class _RowReader:
    """Which columns of a row name its image, its class (one column, or one-hot columns)
    and its group, as `data.labels` says."""

    def __init__(self, header: list[str], labels: LabelsCsv, shown: str):
        self.header, self.shown = header, shown
        self.image = _column(header, labels.image_column, 0, "image_column", shown)
        self.group = (
            None
            if labels.group_column is None
            else _column(header, labels.group_column, 0, "group_column", shown)
        )
        self.hot: list[int] | None = None
        if labels.label_column is None or isinstance(labels.label_column, str):
            self.label = _column(header, labels.label_column, 1, "label_column", shown)
            self.needed = max(self.image, self.label)
        else:  # one-hot: the class is the one column set
            self.hot = [_column(header, c, 1, "label_column", shown) for c in labels.label_column]
            self.needed = max(self.image, *self.hot)

    def label_of(self, row: list[str]) -> tuple[str, str]:
        """(the class, "") or ("", why the row gives none); ("", "") for an empty cell."""
        if self.hot is None:
            return row[self.label].strip(), ""
        on = [self.header[i] for i in self.hot if row[i].strip().lower() in ("1", "1.0", "true")]
        if len(on) == 1:
            return on[0], ""
        columns = ", ".join(self.header[i] for i in self.hot)
        return "", f"{len(on)} of the columns {columns} set in {self.shown}, not one"

    def group_of(self, row: list[str]) -> str:
        if self.group is None or len(row) <= self.group:
            return ""
        return row[self.group].strip()


class _FileIndex:
    """The files a row's image name may mean: by path (from `root` or `rel_to`), by file
    name, or by name without its extension (Kaggle's ids)."""

    def __init__(self, root: Path, rel_to: Path, files: list[Path]):
        self.files, self.root, self.rel_to = files, root, rel_to
        self.exact = {f.relative_to(root).as_posix(): f for f in files}
        self.exact.update({f.relative_to(rel_to).as_posix(): f for f in files})
        self.by_name: dict[str, list[Path]] = defaultdict(list)
        self.by_stem: dict[str, list[Path]] = defaultdict(list)
        for f in files:
            self.by_name[f.name].append(f)
            self.by_stem[f.stem].append(f)

    def known(self) -> set[str]:
        return self.exact.keys() | self.by_name.keys() | self.by_stem.keys()

    def matching(self, name: str, shown: str) -> list[Path]:
        if name in self.exact:
            return [self.exact[name]]
        hit = self.by_name.get(name) or self.by_stem.get(name, [])
        # Files of one size under one name are taken for copies (a download holding a folder
        # twice): all labelled, and validation keeps one of identical files. Files of other
        # sizes are other images, and which one the row means is unknown.
        if len(hit) > 1 and len({h.stat().st_size for h in hit}) > 1:
            listed = ", ".join(h.relative_to(self.rel_to).as_posix() for h in hit[:3])
            raise DataError(
                f"data.labels.file: {shown} names {name!r}, and {len(hit)} different files "
                f"match it ({listed}). Set data.subdir to the folder of the labelled images, "
                f"so that one does."
            )
        return hit


def _nothing_matched(
    shown: str, header: list[str], rows: list, image: int, files: _FileIndex, unmatched: list
) -> str:
    """Why no row labelled a file, and the fix: another column that names files, if one
    does (HAM10000's metadata: lesion_id first, image_id second)."""
    if not unmatched:
        return f"data.labels.file: {shown} has no row with an image and a label."
    known = files.known()
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
    return (
        f"data.labels.file: none of the {len(rows)} rows of {shown} names a file under "
        f"{files.root.as_posix()}/ (e.g. {unmatched[0]!r} in column {header[image]!r}). {fix}."
    )


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

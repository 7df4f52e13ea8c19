"""Reading params.yaml: YAML 1.2, one readable paragraph per problem (key, bad value,
accepted values), and the checks of the files params name (under weights/ and data/exclude/).

Every stage loads params through `load_params` before any heavy import happens.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from transferline.errors import ParamsError
from transferline.params import Params


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """Accepted keys at the parent of `loc`, for unknown-key messages."""
    for part in loc[:-1]:
        ann = model.model_fields[str(part)].annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _describe(err: dict, source: str) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        accepted = _field_names(Params, loc)
        close = difflib.get_close_matches(str(loc[-1]), accepted, n=1)
        hint = f" Did you mean `{'.'.join(map(str, (*loc[:-1], close[0])))}`?" if close else ""
        return (
            f"{source}: unknown key `{key}`.{hint} Accepted keys here: {', '.join(accepted)}. "
            f"Remove or rename it."
        )
    if err["type"] == "missing":
        return f"{source}: required key `{key}` is missing. Add it (docs/parameters.md lists all)."
    msg = str(err["msg"]).removeprefix("Value error, ")
    value = err.get("input")
    if err["type"] == "literal_error":
        msg = f"must be one of {err['ctx']['expected']}"
    if isinstance(value, dict):  # model-level validators report on the section
        return f"{source}: `{key}`: {msg}. Fix it in {source} or in your `-S` override."
    return f"{source}: `{key}` = {value!r} {msg}. Fix it in {source} or in your `-S` override."


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a raw mapping; raise ParamsError naming every bad key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level.")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError("\n".join(_describe(e, source) for e in exc.errors())) from None


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans (true/false only), as DVC reads and writes params.yaml.
    PyYAML's YAML 1.1 reads an unquoted yes/no/on/off as a boolean: `dvc exp run -S
    model.mixed_precision=off` writes `mixed_precision: off`, which was then False and refused;
    a brain-MRI set's `no` class was False in data.label_map."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str) -> Any:
    """Parse YAML as DVC does (YAML 1.2's booleans)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # a SafeLoader


def read_raw(path: str | Path = "params.yaml") -> dict:
    """The YAML of a params file, a mapping not yet validated (overrides apply to it)."""
    path = Path(path)
    try:
        raw = load_yaml(path.read_text())
    except FileNotFoundError:
        raise ParamsError(
            f"{path}: not found. Run the stage from the repository root, where params.yaml is."
        ) from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({exc}). Fix the syntax.") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level.")
    return raw


def load_params(path: str | Path = "params.yaml", root: Path | None = None) -> Params:
    """params.yaml validated, and the files it names checked. Relative paths are taken from
    `root`, by default the working directory: where stages run and read them (DVC runs them
    from the repository root)."""
    path = Path(path)
    params = parse_params(read_raw(path), str(path))
    check_files(params, Path.cwd() if root is None else root, str(path))
    return params


WEIGHTS_DIR = "weights"


def _weights_outside(source: str, weights: str, folder: Path) -> str:
    """The message for a weights file outside weights/: why it must be there, and how."""
    name = Path(weights).name
    return (
        f"{source}: `model.weights` = {weights!r} is outside the repository's {WEIGHTS_DIR}/ "
        f"folder ({folder}). DVC tracks that folder as a dependency of every stage that builds "
        f"the base, so it re-runs them when a weights file changes; a file elsewhere "
        f"could change unseen and leave features from other weights. Copy it there "
        f"(`cp {weights} {WEIGHTS_DIR}/`), set model.weights: {WEIGHTS_DIR}/{name}, and "
        f"version it with `dvc add {WEIGHTS_DIR}/{name}` (`dvc exp run --temp/--queue` "
        f"copies hold only what git and DVC track)."
    )


EXCLUDE_DIR = "data/exclude"


def _placed(root: Path, given: str, folder: str) -> tuple[Path, Path, bool]:
    """`given` as a path from `root`, the folder `root`/`folder`, and whether it lies inside.
    abspath, not resolve: a symlink inside the folder is fine (DVC hashes what it points to)."""
    path = Path(given) if Path(given).is_absolute() else Path(root) / given
    inside = Path(os.path.abspath(Path(root) / folder))
    return path, inside, Path(os.path.abspath(path)).is_relative_to(inside)


def _check_exclude_file(p: Params, root: Path, source: str) -> None:
    """data.exclude_file must lie under data/exclude/, a dependency of the split stage, so
    that DVC splits again when the list changes."""
    listed = p.data.exclude_file
    if listed is None:
        return
    path, folder, inside = _placed(root, listed, EXCLUDE_DIR)
    if not inside:
        raise ParamsError(
            f"{source}: `data.exclude_file` = {listed!r} is outside {EXCLUDE_DIR}/ ({folder}). "
            f"dvc.yaml makes that folder a dependency of the split stage, so DVC splits again "
            f"when the list changes; a file elsewhere could change unseen. Copy it there "
            f"(`cp {listed} {EXCLUDE_DIR}/`) and set data.exclude_file: "
            f"{EXCLUDE_DIR}/{Path(listed).name}."
        )
    if not path.is_file():
        raise ParamsError(
            f"{source}: `data.exclude_file` = {listed!r}: no such file ({os.path.abspath(path)}). "
            f"Copy the list there, e.g. `cp data/audit/label_issues.csv {EXCLUDE_DIR}/`, and "
            f"`git add` it (`dvc exp run --temp/--queue` copies hold only what git tracks)."
        )


def check_files(p: Params, root: Path, source: str = "params.yaml") -> None:
    """A weights file must exist and lie under `root`/weights/: dvc.yaml makes that folder a
    dependency of every stage that builds the base, so DVC re-runs them when a file in it
    changes. A file elsewhere could change unseen and leave features from other weights.
    data.exclude_file likewise lies under data/exclude/ (the split stage's dependency)."""
    _check_exclude_file(p, root, source)
    weights = p.model.weights
    if weights in ("imagenet", "none"):
        return
    ctor = f"keras.applications.{p.model.spec.constructor}(include_top=False)"
    path, folder, inside = _placed(root, weights, WEIGHTS_DIR)
    if not inside:
        raise ParamsError(_weights_outside(source, weights, folder))
    if not path.is_file():
        raise ParamsError(
            f"{source}: `model.weights` = {weights!r}: no such file ({os.path.abspath(path)}). "
            f"Use 'imagenet', 'none', or the path of a weights file under {WEIGHTS_DIR}/ saved "
            f"from {ctor} with save_weights('NAME.weights.h5'). If your workspace has it, "
            f"this ran in a `dvc exp run --temp/--queue` copy, which holds only what git and "
            f"DVC track: `dvc add {weights}` puts it there too."
        )

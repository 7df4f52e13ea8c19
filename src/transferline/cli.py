"""`transferline` command line: list backbones, check params, run the offline quickstart,
predict with a trained model, export it as a SavedModel, compare MLflow runs, reproduce one.

TensorFlow is imported only by `predict` and `export`, so `--help`, `check` and `compare`
answer at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

from transferline import backbones, logs
from transferline.errors import TransferlineError

log = logging.getLogger("transferline")

# The offline quickstart: scikit-learn's digits, a randomly initialised VGG16 at 32 px (no
# download), two fine-tuning epochs of the top two conv layers (each unfrozen 512-channel layer
# costs about 0.3 s a step on 2 CPU cores). Horizontal flips would mirror the digits, so off.
QUICKSTART = {
    "data.dataset": "digits",
    "model.backbone": "vgg16",
    "model.weights": "none",
    "model.image_size": "32",
    "extract.batch_size": "64",
    "finetune.epochs": "2",
    "finetune.unfreeze_layers": "2",
    "finetune.batch_size": "32",
    "finetune.augment.flip": "false",
    "mlflow.experiment": "quickstart",
}

# `dvc exp show --only-changed` keeps every column whose values differ, the baseline's row
# included, which holds no metrics when its results were never committed. These columns are
# never what tells two experiments apart: the time, the deps' hashes, the split totals, the
# secondary test figures and the audit's counts (all in `dvc metrics show`). DVC matches each
# column's name from its start (re.match).
EXP_SHOW_DROP = (
    r"Created|.*/.*|weights|.*_images|rejected|duplicates"
    r"|.*\.(balanced_accuracy|log_loss|roc_auc|top5_accuracy)$"
    r"|images_audited|label_issues|near_duplicate_pairs|cross_split_pairs|outliers"
)


def exp_show_command(fixed: list[str]) -> list[str]:
    """`dvc exp show` of the headline figures and the params that differ between experiments;
    `fixed` params (set alike in every experiment, e.g. the quickstart's) are left out too."""
    drop = "|".join([EXP_SHOW_DROP, *(key.replace(".", r"\.") + "$" for key in fixed)])
    return ["dvc", "exp", "show", "--only-changed", "--drop", drop]


_FALLBACK_IDENTITY = {
    "GIT_AUTHOR_NAME": "transferline quickstart",
    "GIT_AUTHOR_EMAIL": "quickstart@transferline.invalid",
    "GIT_COMMITTER_NAME": "transferline quickstart",
    "GIT_COMMITTER_EMAIL": "quickstart@transferline.invalid",
}


def positive_int(text: str) -> int:
    """argparse type for counts and batch sizes: 0 or less is a usage error, not a traceback
    from TensorFlow or MLflow later on."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _git_config(key: str) -> str:
    out = subprocess.run(
        ["git", "config", "--get", key], capture_output=True, text=True, check=False
    )
    return out.stdout.strip()


def experiment_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for `dvc exp run`, with a stand-in git identity only where none is set.

    `dvc exp run` records experiments as git commits and stops with "Git user name and email
    must be configured" on machines without an identity (fresh machines, CI). Environment
    variables fill the gap for this one command; no git config is written.
    """
    env = dict(os.environ if env is None else env)
    if not (env.get("GIT_AUTHOR_NAME") or _git_config("user.name")):
        env.update({k: v for k, v in _FALLBACK_IDENTITY.items() if "NAME" in k})
    if not (env.get("GIT_AUTHOR_EMAIL") or _git_config("user.email")):
        env.update({k: v for k, v in _FALLBACK_IDENTITY.items() if "EMAIL" in k})
    return env


def quickstart_overrides(extra: list[str]) -> dict[str, str]:
    """The offline overrides, then the user's `-S key=value` items on top."""
    overrides = dict(QUICKSTART)
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"transferline quickstart: -S expects key=value, got {item!r}")
        overrides[key] = value
    return overrides


def quickstart_command(name: str | None, overrides: dict[str, str]) -> list[str]:
    cmd = ["dvc", "exp", "run", *(["--name", name] if name else [])]
    for key, value in overrides.items():
        cmd += ["-S", f"{key}={value}"]
    return cmd


def apply_overrides(raw: dict, overrides: dict[str, str]) -> dict:
    """`raw` params with dotted-key overrides applied, values parsed as YAML (as DVC does;
    Hydra's `+`/`++` prefixes, which let DVC add keys to a mapping, are not part of the key)."""
    import copy  # noqa: PLC0415

    from transferline.params_files import load_yaml  # noqa: PLC0415

    out = copy.deepcopy(raw)
    for key, value in overrides.items():
        *parents, leaf = key.lstrip("+").split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = load_yaml(value)
    return out


def cmd_quickstart(args: argparse.Namespace) -> int:
    if not Path("dvc.yaml").is_file():
        print(
            "transferline quickstart: run it from the transferline repository root "
            "(where dvc.yaml is).",
            file=sys.stderr,
        )
        return 2
    from transferline.errors import ParamsError  # noqa: PLC0415
    from transferline.params_files import check_files, parse_params, read_raw  # noqa: PLC0415

    overrides = quickstart_overrides(args.set or [])
    try:  # the overridden params must be valid before DVC starts anything
        raw = apply_overrides(read_raw(), overrides)
        source = "params.yaml with the quickstart overrides"
        check_files(parse_params(raw, source), Path("."), source)
    except ParamsError as exc:
        print(f"transferline quickstart: {exc}", file=sys.stderr)
        return 2
    cmd = quickstart_command(args.name, overrides)
    print("+ " + shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    code = subprocess.run(cmd, env=experiment_env(), check=False).returncode
    if code == 0:
        user_set = {item.partition("=")[0] for item in args.set or []}
        show = exp_show_command([k for k in QUICKSTART if k not in user_set])
        print(
            f"Compare the experiments (headline figures, params that differ):\n  {shlex.join(show)}"
        )
    return code


def cmd_backbones(args: argparse.Namespace) -> int:
    rows = [("key", "keras.applications", "features", "default px", "min px", "preprocessing")]
    rows += [
        (
            b.key,
            b.constructor,
            str(b.features),
            str(b.default_size),
            str(b.min_size),
            b.preprocessing,
        )
        for b in backbones.REGISTRY.values()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from transferline.errors import ParamsError  # noqa: PLC0415
    from transferline.params_files import load_params  # noqa: PLC0415

    try:
        p = load_params(args.params)
    except ParamsError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(
        f"{args.params}: OK ({p.data.dataset}, {p.model.backbone} at {p.model.size} px, "
        f"head {p.head.type}, finetune {'on' if p.finetune.enabled else 'off'}; "
        f"params hash {p.digest()})"
    )
    from transferline import sources  # noqa: PLC0415

    print(sources.readiness(p.data.dataset))
    if p.model.weights == "imagenet":
        # Where keras.utils.get_file caches (keras.config.keras_home()), without importing it.
        home = Path.home() if os.access(Path.home(), os.W_OK) else Path("/tmp")
        cache = Path(os.environ.get("KERAS_HOME", home / ".keras")) / "models"
        have = len(list(cache.glob("*.h5"))) if cache.is_dir() else 0
        print(
            f"weights: ImageNet, fetched by Keras on first use into {cache} (needs the network "
            f"once; {have} weights files there now)"
        )
    return 0


def expand_paths(items: list[str]) -> tuple[list[Path], list[str]]:
    """Files as given, folders walked for image files (hidden/system files skipped);
    returns the files and the arguments that do not exist."""
    from transferline.layouts import IMAGE_SUFFIXES, is_hidden  # noqa: PLC0415

    files, missing = [], []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files += sorted(
                f
                for f in path.rglob("*")
                if f.is_file()
                and f.suffix.lower() in IMAGE_SUFFIXES
                and not any(is_hidden(part) for part in f.relative_to(path).parts)
            )
        elif path.is_file():
            files.append(path)
        else:
            missing.append(item)
    return files, missing


def _load_classifier(command: str, model: str):
    """MODEL of `predict` and `export` as an `export.Classifier`, or None after one line on
    stderr saying why it cannot be loaded."""
    from transferline.stagekit import share_gpus  # noqa: PLC0415

    share_gpus()  # before TensorFlow starts
    from transferline import export  # noqa: PLC0415  (TensorFlow)
    from transferline.errors import StageError  # noqa: PLC0415

    try:
        return export.load_classifier(model)
    except (FileNotFoundError, OSError, ValueError, StageError) as exc:
        print(f"transferline {command}: cannot load the model: {exc}", file=sys.stderr)
        return None


def cmd_predict(args: argparse.Namespace) -> int:
    import csv  # noqa: PLC0415

    files, missing = expand_paths(args.paths)
    for item in missing:
        print(f"transferline predict: {item}: no such file or folder", file=sys.stderr)
    if not files:
        print("transferline predict: no image files to predict", file=sys.stderr)
        return 2
    classifier = _load_classifier("predict", args.model)
    if classifier is None:
        return 2
    from transferline import export  # noqa: PLC0415
    from transferline.errors import StageError  # noqa: PLC0415
    from transferline.runtime import memory_for_batches  # noqa: PLC0415

    try:
        with memory_for_batches("--batch-size", args.batch_size):
            rows = export.predict_files(classifier, files, batch_size=args.batch_size)
    except StageError as exc:
        print(f"transferline predict: {exc}", file=sys.stderr)
        return 2
    if args.csv:
        fields = ["path", "label", "probability", "error"]
        fields += [f"p_{c}" for c in classifier.classes]
        w = csv.DictWriter(sys.stdout, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    else:
        width = max(len(r["path"]) for r in rows)
        for r in rows:
            if r["error"]:
                print(f"{r['path']:<{width}}  ERROR  {r['error']}")
            else:
                ranked = sorted(classifier.classes, key=lambda c: -r[f"p_{c}"])[: args.top]
                best = "  ".join(f"{c}  {r[f'p_{c}']:.4f}" for c in ranked)
                print(f"{r['path']:<{width}}  {best}")
    bad = sum(1 for r in rows if r["error"])
    if bad:
        print(f"transferline predict: {bad} of {len(rows)} files unusable", file=sys.stderr)
    return 1 if bad or missing else 0


def cmd_export(args: argparse.Namespace) -> int:
    from transferline.files import SAVED_MODEL_HINT, require_new_dir  # noqa: PLC0415

    try:  # before the model loads (seconds): a taken OUT fails at once
        require_new_dir(Path(args.out), SAVED_MODEL_HINT)
    except FileExistsError as exc:
        print(f"transferline export: {exc}", file=sys.stderr)
        return 2
    classifier = _load_classifier("export", args.model)
    if classifier is None:
        return 2
    from transferline import export  # noqa: PLC0415

    try:
        export.save_saved_model(classifier, Path(args.out))
    except (FileExistsError, ValueError) as exc:
        print(f"transferline export: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: TensorFlow SavedModel, signatures serve (float32 images) and serve_bytes")
    return 0


# The widest each text column of `compare` may be, so a row stays within 160 columns.
COMPARE_WIDTHS = {"run": 24, "dvc_exp": 16, "backbone": 16}


def fit_columns(table: list[list[str]], widths: dict[str, int]) -> list[str]:
    """The table's rows as aligned lines; a cell of a column named in `widths` (by its
    header) is cut to that width with '…'."""
    limits = [widths.get(h.replace(" ", "_"), 0) for h in table[0]]
    cut = [
        [c if not n or len(c) <= n else c[: n - 1] + "…" for c, n in zip(row, limits, strict=True)]
        for row in table
    ]
    sizes = [max(len(row[i]) for row in cut) for i in range(len(table[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, sizes, strict=True)).rstrip() for row in cut]


def cmd_audit(args: argparse.Namespace) -> int:
    from transferline import audit_report  # noqa: PLC0415

    try:
        findings = audit_report.read_findings(args.folder)
    except TransferlineError as exc:
        print(f"transferline audit: {exc}", file=sys.stderr)
        return 2
    print(audit_report.summary(findings, args.top))
    print(
        f"Grids: plots/audit/*.png. To leave files out: copy a CSV from {args.folder} to "
        "data/exclude/, delete the rows to keep, set data.exclude_file to it, then "
        "`dvc exp run` and compare (docs/audit.md)."
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from transferline import tracking, tracking_queries  # noqa: PLC0415
    from transferline.errors import ParamsError  # noqa: PLC0415
    from transferline.params_files import load_params  # noqa: PLC0415

    experiment = args.experiment
    if experiment is None:
        try:
            experiment = load_params(args.params).mlflow.experiment
        except ParamsError as exc:
            print(f"transferline compare: {exc} (or pass --experiment NAME)", file=sys.stderr)
            return 2
    try:
        tracking.check_store()
    except tracking.TrackingError as exc:
        print(f"transferline compare: {exc}", file=sys.stderr)
        return 2
    rows = tracking_queries.latest_runs(experiment, args.limit)
    if not rows:
        others = tracking_queries.experiments_with_runs()
        hint = (
            f"; experiments with runs there: {', '.join(others)} (pick one with --experiment)"
            if others
            else "; it has none with runs yet (`dvc repro` or `transferline quickstart` logs one)"
        )
        print(
            f"transferline compare: no runs in experiment {experiment!r} at "
            f"{tracking.tracking_uri()}{hint}",
            file=sys.stderr,
        )
        return 1
    # The run ID first: it is what runs:/ID/model takes (the name is what the UI shows).
    # `inputs` is shared by runs of the same params, data, weights and code (another machine).
    head = ["run id", "run", "dvc_exp", "backbone", "size", "head", "head acc", "ft acc",
            "ft macro-F1", "inputs", "status"]  # fmt: skip
    metrics = tracking_queries.COMPARE_METRICS
    keys = ["run_id", "run", "dvc_exp", "backbone", "size", "head", *metrics, "inputs",
            "status"]  # fmt: skip
    table = [head] + [
        ["-" if r[k] is None else f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k])
         for k in keys]
        for r in rows
    ]  # fmt: skip
    print(f"experiment {experiment!r}, finished runs first, best test accuracy first:")
    for row in fit_columns(table, COMPARE_WIDTHS):
        print(row)
    tested = [r for r in rows if r["best"] is not None and r["status"] == "FINISHED"]
    best = tested[0]["run_id"] if tested else "RUN_ID"
    print(f"predict with a run's model: transferline predict runs:/{best}/model IMAGE...")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from transferline import reproduce, tracking, tracking_queries  # noqa: PLC0415
    from transferline.files import repo_root  # noqa: PLC0415

    repo = repo_root()
    folder = args.run or Path("..") / f"reproduce-{args.run_id[:8]}"
    try:
        run = tracking_queries.run_record(args.run_id)
        recipe = reproduce.plan(run, args.run_id, repo, tracking.tracking_uri())
        print(reproduce.describe(recipe, str(folder)))
        if args.run is None:
            return 0
        env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_EXP_")}
        rows = reproduce.recompute(recipe, repo, args.run, env)
    except (reproduce.ReproduceError, tracking.TrackingError) as exc:
        print(f"transferline reproduce: {exc}", file=sys.stderr)
        return 2
    table = [["metric", "run", "recomputed", ""]]
    for key, logged, again in rows:
        same = again is not None and abs(again - logged) <= reproduce.TOLERANCE
        shown = "-" if again is None else f"{again:.6f}"
        table.append([key, f"{logged:.6f}", shown, "same" if same else "DIFFERS"])
    print("\n".join(fit_columns(table, {})))
    differ = [r[0] for r in table[1:] if r[3] != "same"]
    if differ:
        print(
            f"{len(differ)} of {len(rows)} metrics differ: the same inputs gave other numbers "
            "here (another device or precision, GPU non-determinism: compare the tags device "
            "and precision), or the run's figures are not from its last evaluate.",
            file=sys.stderr,
        )
        return 1
    print(f"all {len(rows)} test metrics recomputed as the run has them ({args.run}).")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transferline",
        description="Reproducible transfer learning for image classification. The pipeline "
        "itself runs with `dvc repro` / `dvc exp run`; these are helpers around it.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logs, TensorFlow's C++ log too"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_pipeline_commands(sub)
    _add_model_commands(sub)
    _add_run_commands(sub)
    return parser


def _add_pipeline_commands(sub) -> None:
    """backbones, check, quickstart."""
    p = sub.add_parser("backbones", help="list every supported backbone and its sizes")
    p.set_defaults(func=cmd_backbones)
    p = sub.add_parser("check", help="validate params.yaml without running anything")
    p.add_argument("--params", default="params.yaml", help="the file to check (params.yaml)")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser(
        "quickstart",
        help="run the whole pipeline offline on the digits data set (a `dvc exp run`)",
        description="Runs `dvc exp run` with the offline overrides (digits, random VGG16 at "
        "32 px). The command is printed first; extra -S key=value overrides are passed on.",
    )
    p.add_argument("--name", help="experiment name for dvc exp show / MLflow")
    p.add_argument(
        "-S",
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="another params override, e.g. -S head.type=dense",
    )
    p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    p.set_defaults(func=cmd_quickstart)
    p = sub.add_parser(
        "audit",
        help="the audit stage's top findings: label issues, near-duplicates, outliers",
    )
    p.add_argument("--folder", type=Path, default=Path("data/audit"), help="its CSVs (data/audit)")
    p.add_argument("--top", type=positive_int, default=10, help="rows of each kind (default 10)")
    p.set_defaults(func=cmd_audit)


def _add_model_commands(sub) -> None:
    """predict, export."""
    p = sub.add_parser(
        "predict",
        help="label images with a trained model",
        description="Prints label and probability per image. MODEL is models/classifier "
        "(written by `dvc repro`) or an MLflow model URI (runs:/ID/model, models:/NAME/1). "
        "Unusable files are reported per file; the exit status is 1 if there were any.",
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("paths", metavar="PATH", nargs="+", help="image files or folders")
    p.add_argument("--csv", action="store_true", help="CSV with every class's probability")
    p.add_argument(
        "--top",
        type=positive_int,
        default=1,
        metavar="K",
        help="the K likeliest labels per image, likeliest first (default 1)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=32, help="images per batch (default 32)"
    )
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser(
        "export",
        help="save a trained model as a TensorFlow SavedModel (TensorFlow Serving)",
        description="Writes MODEL (models/classifier or an MLflow model URI, as for predict) "
        "to OUT, a new folder, as a TensorFlow SavedModel with two signatures: serve "
        "(float32 RGB images of any size, 0..255) and serve_bytes (encoded JPEG, PNG, GIF, "
        "BMP or WebP files, decoded by TensorFlow: the pipeline reads BMP and transparent "
        "WebP with PIL, so send those as pixels). Each returns probabilities, label and "
        "probability.",
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("out", metavar="OUT", help="a new folder, e.g. exported/classifier/1")
    p.set_defaults(func=cmd_export)


def _add_run_commands(sub) -> None:
    """compare, reproduce: MLflow runs."""
    p = sub.add_parser(
        "compare",
        help="the latest MLflow runs as a table, best test accuracy first",
    )
    p.add_argument("--experiment", help="MLflow experiment (default: mlflow.experiment)")
    p.add_argument(
        "--params", default="params.yaml", help="where --experiment's default is read from"
    )
    p.add_argument(
        "-n", "--limit", type=positive_int, default=20, help="newest N runs (default 20)"
    )
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser(
        "reproduce",
        help="from an MLflow run to its inputs: print the commands that recompute its "
        "metrics, or (--run DIR) run them in a new git worktree and compare",
    )
    p.add_argument("run_id", help="the MLflow run's ID (`transferline compare` lists them)")
    p.add_argument(
        "--run",
        metavar="DIR",
        type=Path,
        help="check out the run's revision and data into this new folder, run the pipeline "
        "there and compare its test metrics with the run's",
    )
    p.set_defaults(func=cmd_reproduce)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.verbose)
    try:
        if args.func in (cmd_predict, cmd_export):  # the commands that load TensorFlow
            with logs.native_log_filtered(enabled=not args.verbose):
                return args.func(args)
        return args.func(args)
    except BrokenPipeError:
        # The reader left (`transferline predict ... --csv | head`): stop quietly, as a
        # command killed by SIGPIPE does, instead of a traceback. Python would otherwise
        # fail again flushing stdout at exit, hence stdout goes to /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13  # 128 + SIGPIPE, the status a shell reports for such a command


if __name__ == "__main__":
    raise SystemExit(main())

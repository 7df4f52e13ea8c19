import functools
import subprocess
import sys

import pytest
import yaml

from transferline.errors import ParamsError
from transferline.params_files import load_params, parse_params

from conftest import REPO


def base() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def load_with(path, section: str, key: str, value):
    """The committed params with `section.key` set to `value`, written to `path` and loaded."""
    raw = base()
    raw[section][key] = value
    path.write_text(yaml.safe_dump(raw))
    return load_params(path)


def error_for(raw: dict) -> str:
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    return str(info.value)


def test_committed_params_are_valid_and_the_cats_vs_dogs_job():
    p = load_params(REPO / "params.yaml")
    assert p.data.dataset == "cats_vs_dogs"
    assert p.model.backbone == "vgg16" and p.model.weights == "imagenet"
    assert p.model.size == 224  # the backbone's default when image_size is null
    assert p.flat()["model.backbone"] == "vgg16"


def test_unknown_key_names_it_and_suggests_the_right_one():
    raw = base()
    raw["model"]["backbon"] = "vgg16"
    msg = error_for(raw)
    assert "unknown key `model.backbon`" in msg
    assert "Did you mean `model.backbone`?" in msg
    assert "pooling" in msg  # lists the accepted keys


def test_misspelt_backbone_lists_accepted_values():
    raw = base()
    raw["model"]["backbone"] = "vgg61"
    msg = error_for(raw)
    assert "`model.backbone` = 'vgg61'" in msg
    assert "'vgg16'" in msg and "efficientnet_b0" in msg


@pytest.mark.parametrize("key,value", [("val", 0.0), ("test", 1.0), ("val", -0.1), ("test", 1.5)])
def test_split_fraction_outside_open_interval(key, value):
    raw = base()
    raw["split"][key] = value
    msg = error_for(raw)
    assert f"`split.{key}` = {value!r}" in msg and "between 0 and 1" in msg


def test_val_plus_test_at_least_one():
    raw = base()
    raw["split"].update(val=0.5, test=0.5)
    msg = error_for(raw)
    assert "split.val + split.test = 1" in msg and "below 1" in msg


def test_image_size_below_backbone_minimum():
    raw = base()
    raw["model"].update(backbone="inception_v3", image_size=64)
    msg = error_for(raw)
    assert "minimum of 75" in msg and "inception_v3" in msg


@pytest.mark.parametrize("source", ["kaggle://someone", "http://example.com/a.zip", "ftp://x/y"])
def test_bad_sources_rejected(source):
    raw = base()
    raw["data"]["dataset"] = source
    assert "`data.dataset`" in error_for(raw)


def test_literal_values_listed():
    raw = base()
    raw["head"]["type"] = "svm"
    msg = error_for(raw)
    assert "`head.type` = 'svm'" in msg and "'logreg'" in msg and "'dense'" in msg


def test_digest_changes_with_any_param():
    raw = base()
    a = parse_params(raw).digest()
    raw["head"]["logreg"]["C"] = 2.0
    assert parse_params(raw).digest() != a


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_params_as_dvc_exp_run_set_param_writes_them(tmp_path):
    # `dvc exp run -S` writes YAML 1.2: `mixed_precision: off` unquoted. PyYAML's YAML 1.1
    # read that as False and refused it; a class named no was False too. The function is the
    # one DVC's -S calls (DVC is pinned by the lock).
    from dvc.utils.hydra import apply_overrides

    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    apply_overrides(
        str(params),
        ["model.mixed_precision=off", "++data.label_map={no: healthy, yes: tumor, 0: zero}"],
    )
    assert "mixed_precision: off" in params.read_text()
    p = load_params(params)
    assert p.model.mixed_precision == "off"
    assert p.data.label_map == {"no": "healthy", "yes": "tumor", "0": "zero"}
    params.write_text(params.read_text().replace("no: healthy", "true: healthy"))
    with pytest.raises(ParamsError, match="reads an unquoted true or false as the boolean True"):
        load_params(params)


def test_a_weights_file_must_exist_under_the_weights_folder(tmp_path, monkeypatch):
    """dvc.yaml makes weights/ a dependency of the stages that load a base: a file elsewhere
    could change without DVC re-running them."""
    repo = tmp_path / "repo"
    (repo / "weights").mkdir(parents=True)
    (repo / "weights" / "base.weights.h5").write_bytes(b"\0")
    outside = tmp_path / "elsewhere.weights.h5"
    outside.write_bytes(b"\0")
    params = tmp_path / "other_params.yaml"  # `--params` elsewhere: paths are from the cwd
    monkeypatch.chdir(repo)

    load = functools.partial(load_with, params, "model", "weights")

    assert load("weights/base.weights.h5").model.weights == "weights/base.weights.h5"
    assert load(str(repo / "weights" / "base.weights.h5")).model.weights.endswith("h5")
    with pytest.raises(ParamsError) as info:
        load("weights/typo.weights.h5")
    msg = str(info.value)
    assert "`model.weights` = 'weights/typo.weights.h5': no such file" in msg
    assert "keras.applications.VGG16(include_top=False)" in msg
    for where in (str(outside), "weights/../../elsewhere.weights.h5"):
        with pytest.raises(ParamsError) as info:
            load(where)
        msg = str(info.value)
        assert "outside the repository's weights/ folder" in msg
        assert "dvc add weights/elsewhere.weights.h5" in msg
    # A link inside weights/ is the user's choice: DVC hashes the file it points to.
    (repo / "weights" / "linked.weights.h5").symlink_to(outside)
    assert load("weights/linked.weights.h5").model.weights == "weights/linked.weights.h5"


def test_stage_rejects_bad_params_before_importing_tensorflow(tmp_path):
    raw = base()
    raw["model"]["backbone"] = "vgg61"
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['extract.py', '--params', {str(bad)!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(REPO / 'stages' / 'extract.py')!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print('rc', e.code, 'tf', 'tensorflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "rc 2 tf False" in out.stdout
    assert "ERROR in stage 'extract'" in out.stderr and "model.backbone" in out.stderr
    assert "Traceback" not in out.stderr


def test_sha256_and_label_map():
    raw = base()
    raw["data"].update(sha256="abc", label_map={"Cat": "cat"})
    assert "`data.sha256` = 'abc'" in error_for(raw)
    raw["data"]["sha256"] = "A" * 64
    p = parse_params(raw)
    assert p.data.sha256 == "a" * 64 and p.data.label_map == {"Cat": "cat"}


def test_finetune_warmup_must_leave_epochs_and_c_grid_positive():
    raw = base()
    raw["finetune"].update(epochs=3, warmup_epochs=3)
    msg = error_for(raw)
    assert "finetune.warmup_epochs = 3" in msg and "smaller than epochs" in msg
    raw = base()
    raw["head"]["logreg"]["C_grid"] = [0.1, -1]
    assert "`head.logreg.C_grid`" in error_for(raw)
    raw = base()
    raw["finetune"]["optimizer"] = "rmsprop"
    msg = error_for(raw)
    assert "`finetune.optimizer` = 'rmsprop'" in msg and "'adamw'" in msg


@pytest.mark.parametrize(
    "path,value,says",
    [
        ("seed", -1, "greater than or equal to 0"),  # NumPy refuses it, in the split stage
        ("seed", 2**32, "less than or equal to 4294967295"),
        ("finetune.unfreeze_from", "", "at least 1 character"),
        ("mlflow.register_as", "", "at least 1 character"),  # was: silently not registered
        ("mlflow.register_as", "team/pets", "cannot hold '/' or ':'"),  # MLflow, in evaluate
        ("data.subdir", "../elsewhere", "inside the download"),  # files DVC does not track
        ("data.subdir", "/home/me/images", "inside the download"),
    ],
)
def test_values_that_failed_or_did_nothing_later_are_refused_up_front(path, value, says):
    raw = base()
    section, _, key = path.rpartition(".")
    (raw[section] if section else raw)[key] = value
    msg = error_for(raw)
    assert f"`{path}` = {value!r}" in msg and says in msg


def test_a_labels_csv_is_a_path_in_the_download_and_its_own_layout():
    raw = base()
    raw["data"]["labels"] = {"file": "train.csv", "label_column": "breed"}
    p = parse_params(raw)
    assert (p.data.labels.file, p.data.labels.image_column, p.data.labels.label_column) == (
        "train.csv",
        None,
        "breed",
    )
    assert p.flat()["data.labels.file"] == "train.csv"
    raw["data"]["layout"] = "class_folders"
    assert "data.layout is class_folders" in error_for(raw)
    raw["data"].update(layout="csv", labels={})
    assert "data.layout is csv but data.labels.file is not set" in error_for(raw)
    for bad in ("/data/train.csv", "../train.csv"):
        raw["data"].update(layout="auto", labels={"file": bad})
        assert "must be a path inside the download" in error_for(raw)
    raw["data"]["labels"] = {"file": "t.csv", "colum": "x"}
    assert "unknown key `data.labels.colum`" in error_for(raw)
    # A column without the CSV would be ignored in silence.
    raw["data"]["labels"] = {"group_column": "patient_id"}
    assert "data.labels.group_column is set but data.labels.file is not" in error_for(raw)
    raw["data"]["labels"] = {"file": "t.csv", "group_column": "patient_id"}
    assert parse_params(raw).data.labels.group_column == "patient_id"
    raw["split"] = {"group_pattern": "person\\d+"}
    assert "split.group_pattern and data.labels.group_column both say" in error_for(raw)
    raw["data"]["labels"] = {}
    assert parse_params(raw).split.group_pattern == "person\\d+"
    raw["split"] = {"group_pattern": "person(\\d+"}
    assert "`split.group_pattern` = 'person(\\\\d+'" in error_for(raw)
    assert "is not a regular expression (missing ), unterminated subpattern" in error_for(raw)


def test_one_hot_label_columns_are_a_list_of_two_or_more():
    raw = base()
    raw["data"]["labels"] = {"file": "train.csv", "label_column": ["healthy", "rust", "scab"]}
    assert parse_params(raw).data.labels.label_column == ["healthy", "rust", "scab"]
    cases = [
        (["rust"], "names the one-hot columns of the classes, at least two"),
        (["rust", "rust"], "each once"),
        ("", "must name the CSV's column"),
    ]
    for bad, says in cases:
        raw["data"]["labels"]["label_column"] = bad
        msg = error_for(raw)
        assert f"`data.labels.label_column` = {bad!r}" in msg and says in msg


def test_an_exclude_file_must_exist_under_data_exclude(tmp_path, monkeypatch):
    """dvc.yaml makes data/exclude/ a dependency of the split: a list elsewhere could change
    without DVC splitting again."""
    (tmp_path / "data" / "exclude").mkdir(parents=True)
    (tmp_path / "data" / "exclude" / "issues.csv").write_text("path\n")
    (tmp_path / "issues.csv").write_text("path\n")
    params = tmp_path / "params.yaml"
    monkeypatch.chdir(tmp_path)

    load = functools.partial(load_with, params, "data", "exclude_file")

    assert load("data/exclude/issues.csv").data.exclude_file == "data/exclude/issues.csv"
    with pytest.raises(ParamsError, match="is outside data/exclude/") as info:
        load("issues.csv")
    assert "cp issues.csv data/exclude/" in str(info.value)
    with pytest.raises(ParamsError, match="no such file") as info:
        load("data/exclude/typo.csv")
    assert "git add" in str(info.value)

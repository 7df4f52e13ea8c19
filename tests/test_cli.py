import os
import subprocess
import sys

import pytest

from transferline import cli, stagekit

from conftest import REPO


def run_cli(*args, cwd=REPO, timeout=60, env=None):
    return subprocess.run(
        [sys.executable, "-m", "transferline.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_backbones_lists_every_entry_without_tensorflow():
    code = (
        "import sys; from transferline import cli; cli.main(['backbones']); "
        "print('TF', 'tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "TF False"
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert rows["mobilenet_v2"] == ["mobilenet_v2", "MobileNetV2", "1280", "224", "32", "tf"]
    assert set(rows) == set(cli.backbones.REGISTRY)


def test_a_reader_that_leaves_early_stops_the_output_without_a_traceback():
    # `transferline backbones | head -0`: the reader is gone before the first line.
    cmd = [sys.executable, "-m", "transferline.cli", "backbones"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141 and err == b""


def test_export_refuses_a_taken_out_before_loading_the_model(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code = (
        "import sys; from transferline import cli; "
        f"rc = cli.main(['export', {str(tmp_path / 'no_model')!r}, {str(tmp_path / 'out')!r}]); "
        "print('RC', rc, 'TF', 'tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split()[-4:] == ["RC", "2", "TF", "False"]  # the model was never loaded
    assert "out exists and is not an empty folder" in out.stderr
    assert "exported/classifier/1" in out.stderr and "cannot load" not in out.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_check_reports_bad_params(tmp_path):
    ok = run_cli("check")
    assert ok.returncode == 0 and "params.yaml: OK" in ok.stdout
    bad = tmp_path / "p.yaml"
    bad.write_text("data: {dataset: digits}\nmodel: {backbone: resnet5}\n")
    out = run_cli("check", "--params", str(bad))
    assert out.returncode == 2 and "'resnet50'" in out.stderr and "Traceback" not in out.stderr


def test_check_says_what_the_run_will_need_from_this_machine(tmp_path, monkeypatch):
    for var in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "KERAS_HOME"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    bare = {"HOME": str(home), "KAGGLE_CONFIG_DIR": str(home / "none")}
    out = run_cli("check", env=bare)  # the committed params: Kaggle's cats vs dogs, ImageNet
    assert out.returncode == 0
    assert "data: kaggle://competitions/dogs-vs-cats: no Kaggle credentials found, so the " in (
        out.stdout
    )
    assert f"into {home}/.keras/models (needs the network once; 0 weights files" in out.stdout
    (tmp_path / "keras" / "models").mkdir(parents=True)
    (tmp_path / "keras" / "models" / "vgg16_notop.h5").write_bytes(b"")
    ready = {**bare, "KAGGLE_API_TOKEN": "t", "KERAS_HOME": str(tmp_path / "keras")}
    out = run_cli("check", env=ready)
    assert "data: kaggle://competitions/dogs-vs-cats: Kaggle credentials found" in out.stdout
    assert "1 weights files there now" in out.stdout
    local = tmp_path / "p.yaml"
    local.write_text(f"data: {{dataset: {tmp_path / 'missing'}}}\nmodel: {{weights: none}}\n")
    out = run_cli("check", "--params", str(local), env=bare)
    assert f"data: {tmp_path / 'missing'} does not exist, so the download stage will stop" in (
        out.stdout
    )
    assert "weights:" not in out.stdout


def test_quickstart_dry_run_prints_the_dvc_command():
    out = run_cli("quickstart", "--dry-run", "-S", "head.type=dense")
    assert out.returncode == 0
    assert "dvc exp run -S data.dataset=digits" in out.stdout
    assert "-S head.type=dense" in out.stdout


def test_quickstart_validates_overrides_before_running():
    out = run_cli("quickstart", "--dry-run", "-S", "split.val=2")
    assert out.returncode == 2 and "split.val" in out.stderr
    # As DVC reads them: `off` is a string (YAML 1.2), `++` adds keys to a mapping.
    ok = ["model.mixed_precision=off", "++data.label_map={no: healthy}"]
    out = run_cli("quickstart", "--dry-run", *(a for o in ok for a in ("-S", o)))
    assert out.returncode == 0, out.stderr
    out = run_cli("quickstart", "--dry-run", "-S", "++data.label_map={no: [healthy]}")
    assert out.returncode == 2 and "data.label_map.no" in out.stderr


def test_experiment_env_fills_a_missing_git_identity_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "none"))
    monkeypatch.chdir(tmp_path)
    env = cli.experiment_env({"PATH": "/usr/bin:/bin"})
    assert env["GIT_AUTHOR_NAME"] == env["GIT_COMMITTER_NAME"] == "transferline quickstart"
    kept = cli.experiment_env({"GIT_AUTHOR_NAME": "me", "GIT_AUTHOR_EMAIL": "me@x"})
    assert kept["GIT_AUTHOR_NAME"] == "me" and "GIT_COMMITTER_NAME" not in kept


def test_predict_prints_labels_and_reports_broken_files(tmp_path):
    import csv
    import io

    import pillow_heif
    from PIL import Image

    from transferline import backbones, export, finetune, heads
    from transferline.models import build_feature_extractor

    from conftest import add_broken_files, make_class_folders, make_image

    ext = build_feature_extractor(backbones.get("mobilenet_v2"), "none", 32, "avg", seed=0)
    clf = export.export_classifier(
        finetune.assemble(ext, heads.build_dense_head(1280, 2, 0, 0.0)), 32
    )
    export.save_classifier(tmp_path / "classifier", clf, ["cat", "dog"], {"image_size": 32})
    imgs = make_class_folders(tmp_path / "imgs", per_class=2)
    add_broken_files(imgs / "cat")
    make_image(imgs / "dog" / "scan.tif", (40, 40, 200), fmt="TIFF")  # PIL decodes it
    pillow_heif.from_pillow(Image.new("RGB", (40, 30), (90, 60, 30))).save(imgs / "phone.heic")

    out = run_cli("predict", str(tmp_path / "classifier"), str(imgs), timeout=300)
    assert out.returncode == 1, out.stderr  # some files were unusable
    lines = out.stdout.splitlines()
    good = [ln for ln in lines if ln.endswith(tuple("0123456789")) and "ERROR" not in ln]
    assert len(good) == 6 and all((" cat " in ln or " dog " in ln) for ln in good)
    assert any("scan.tif" in ln for ln in good) and any("phone.heic" in ln for ln in good)
    assert any("empty.jpg" in ln and "ERROR" in ln and "empty file" in ln for ln in lines)
    assert not any(".DS_Store" in ln or "notes.txt" in ln for ln in lines)  # not images
    assert "2 of 8 files unusable" in out.stderr

    one = imgs / "dog" / "dog000.png"
    out = run_cli("predict", str(tmp_path / "classifier"), str(one), "--csv", timeout=300)
    assert out.returncode == 0, out.stderr
    (row,) = list(csv.DictReader(io.StringIO(out.stdout)))
    assert row["path"] == str(one) and row["label"] in ("cat", "dog") and row["error"] == ""
    assert float(row["p_cat"]) + float(row["p_dog"]) == pytest.approx(1.0, abs=1e-5)

    out = run_cli("predict", str(tmp_path / "classifier"), str(one), "--top", "5", timeout=300)
    assert out.returncode == 0, out.stderr
    path, *ranked = out.stdout.split()  # every class (there are 2), likeliest first
    assert path == str(one) and sorted(ranked[::2]) == ["cat", "dog"]
    top = [float(v) for v in ranked[1::2]]
    assert top == sorted(top, reverse=True) and sum(top) == pytest.approx(1.0, abs=1e-3)
    assert ranked[::2][0] == row["label"]

    served = tmp_path / "served" / "1"
    out = run_cli("export", str(tmp_path / "classifier"), str(served), timeout=300)
    assert out.returncode == 0, out.stderr
    assert (served / "saved_model.pb").is_file() and "serve_bytes" in out.stdout

    out = run_cli("predict", str(tmp_path / "nothing"), str(one), timeout=300)
    assert out.returncode == 2 and "not an exported classifier" in out.stderr


def test_compare_prints_runs_best_first(tmp_path):
    from transferline import tracking

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(*next(iter(env.items())))
        ids = {}
        for h, acc in (("resnet50", 0.81), ("vgg16", 0.93)):
            run = tracking.open_run(
                "cmp", tracking.RunInputs.here(h), {"model.backbone": h}, f"{h}-run"
            )
            run.log_metrics({"test.head.accuracy": acc})
            tracking.close_run(run)
            ids[h] = run.run_id
        out = run_cli("compare", "--experiment", "cmp", env=env)
    assert out.returncode == 0, out.stderr
    rows = [ln.split() for ln in out.stdout.splitlines() if "-run" in ln]
    # The ID first, as runs:/ID/model takes it; then the name the MLflow UI shows.
    assert [r[:2] for r in rows] == [[ids["vgg16"], "vgg16-run"], [ids["resnet50"], "resnet50-run"]]
    assert "0.9300" in rows[0]
    hint = f"transferline predict runs:/{ids['vgg16']}/model IMAGE"
    assert out.stdout.splitlines()[-1].endswith(hint + "...")
    # A run's name where its ID belongs is a common slip: the error names the ID.
    image = tmp_path / "x.png"
    image.write_bytes(b"not read: the model fails first")
    out = run_cli("predict", "runs:/vgg16-run/model", str(image), env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"'vgg16-run' is a run's name, and runs:/ takes its ID: runs:/{ids['vgg16']}/model" in (
        out.stderr
    )
    missing = run_cli("compare", "--experiment", "nope", env=env)
    assert missing.returncode == 1 and "no runs in experiment 'nope'" in missing.stderr
    assert "experiments with runs there: cmp (pick one with --experiment)" in missing.stderr


def test_compare_fits_160_columns_whatever_the_names(tmp_path, monkeypatch):
    from transferline import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_EXP_NAME", "a-rather-long-experiment-name-of-a-sweep")
    params = {"model.backbone": "efficientnet_v2_b3", "model.image_size": 300,
              "head.type": "logreg", "finetune.enabled": True}  # fmt: skip
    run = tracking.open_run("wide", tracking.RunInputs.here("w"), params, "x" * 60)
    run.log_metrics({"test.head.accuracy": 0.5, "test.finetune.accuracy": 0.25})
    tracking.close_run(run)
    out = run_cli("compare", "--experiment", "wide", env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert max(len(line) for line in lines) <= 160
    row = lines[2].split()
    assert row[0] == run.run_id and row[1] == "x" * 23 + "…" and row[2].endswith("…")
    assert "0.2500" in row and "FINISHED" in row


@pytest.mark.parametrize(
    "args",
    [("predict", "models/classifier", "x.jpg", "--batch-size", "0"), ("compare", "-n", "-3"),
     ("compare", "--limit", "many")],
    ids=["batch-size", "limit", "not-a-number"],
)  # fmt: skip
def test_counts_below_one_are_usage_errors(args):
    # Not TensorFlow's "Batch size must be greater than zero" or MLflow's max_results traceback.
    out = run_cli(*args)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1].split(": error: argument ")[1] in (
        "--batch-size: must be 1 or more, got 0",
        "-n/--limit: must be 1 or more, got -3",
        "-n/--limit: expected a whole number, got 'many'",
    )


def test_mlflow_commands_fail_at_once_with_one_paragraph(tmp_path):
    from conftest import make_image, refused_uri

    image = tmp_path / "x.png"
    make_image(image, (200, 30, 30))
    down = {"MLFLOW_TRACKING_URI": refused_uri()}
    for args in (("compare", "--experiment", "x"), ("predict", "runs:/0123abc/model", str(image))):
        out = run_cli(*args, env=down)
        assert out.returncode == 2, out.stderr
        assert "cannot be reached ([Errno 111] Connection refused)" in out.stderr
        assert "Traceback" not in out.stderr and "secret" not in out.stderr
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    out = run_cli("predict", "runs:/" + "0" * 32 + "/model", str(image), env=store)
    assert out.returncode == 2 and "MLflow cannot load it" in out.stderr
    assert "Traceback" not in out.stderr


def test_predict_and_export_let_tensorflow_take_gpu_memory_as_needed(tmp_path, monkeypatch, capsys):
    """As the stages do (tests/test_stagekit.py): a GPU shared with a running stage."""
    monkeypatch.delenv(stagekit.GPU_GROWTH, raising=False)
    assert cli._load_classifier("predict", str(tmp_path / "missing")) is None
    assert "cannot load the model" in capsys.readouterr().err
    assert os.environ[stagekit.GPU_GROWTH] == "true"

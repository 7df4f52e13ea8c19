import subprocess
import sys

from transferline import cli

from conftest import REPO


def run_cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "transferline.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
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


def test_check_reports_bad_params(tmp_path):
    ok = run_cli("check")
    assert ok.returncode == 0 and "params.yaml: OK" in ok.stdout
    bad = tmp_path / "p.yaml"
    bad.write_text("data: {dataset: digits}\nmodel: {backbone: resnet5}\n")
    out = run_cli("check", "--params", str(bad))
    assert out.returncode == 2 and "'resnet50'" in out.stderr and "Traceback" not in out.stderr


def test_quickstart_dry_run_prints_the_dvc_command():
    out = run_cli("quickstart", "--dry-run", "-S", "head.type=dense")
    assert out.returncode == 0
    assert "dvc exp run -S data.dataset=digits" in out.stdout
    assert "-S head.type=dense" in out.stdout


def test_quickstart_validates_overrides_before_running():
    out = run_cli("quickstart", "--dry-run", "-S", "split.val=2")
    assert out.returncode == 2 and "split.val" in out.stderr


def test_experiment_env_fills_a_missing_git_identity_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "none"))
    monkeypatch.chdir(tmp_path)
    env = cli.experiment_env({"PATH": "/usr/bin:/bin"})
    assert env["GIT_AUTHOR_NAME"] == env["GIT_COMMITTER_NAME"] == "transferline quickstart"
    kept = cli.experiment_env({"GIT_AUTHOR_NAME": "me", "GIT_AUTHOR_EMAIL": "me@x"})
    assert kept["GIT_AUTHOR_NAME"] == "me" and "GIT_COMMITTER_NAME" not in kept

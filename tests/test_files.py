import hashlib
import os
import stat

import pytest

from transferline import files


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring the old one afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077], ids=oct)
def test_outputs_get_the_modes_a_plain_write_would(tmp_path, umask, mask):
    # mkstemp/mkdtemp create 0600/0700; outputs moved into place must honour the umask like
    # any file the user's tools write (teammates on a shared box read data/features, plots).
    umask(mask)
    assert files._umask() == mask
    files.write_json(tmp_path / "m.json", {"a": 1})
    with files.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x.npy").write_bytes(b"x")
    plain = tmp_path / "plain"
    plain.write_text("")
    plain_dir = tmp_path / "plain_dir"
    plain_dir.mkdir()
    assert mode(tmp_path / "m.json") == mode(plain) == 0o666 & ~mask
    assert mode(tmp_path / "out") == mode(plain_dir) == 0o777 & ~mask
    assert mode(tmp_path / "out" / "x.npy") == 0o666 & ~mask


def test_a_failed_write_leaves_the_old_output_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    files.write_json(target, {"old": True})
    with pytest.raises(RuntimeError), files.atomic_path(target) as tmp:
        tmp.write_text('{"half": ')
        raise RuntimeError("killed")
    assert files.read_json(target) == {"old": True}

    folder = tmp_path / "features"
    with files.atomic_dir(folder) as tmp:
        (tmp / "a.npy").write_bytes(b"old")
    with pytest.raises(RuntimeError), files.atomic_dir(folder) as tmp:
        (tmp / "a.npy").write_bytes(b"half")
        raise RuntimeError("killed")
    assert [p.name for p in folder.iterdir()] == ["a.npy"]
    assert (folder / "a.npy").read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_a_finished_write_replaces_a_file_with_a_folder_and_back(tmp_path):
    target = tmp_path / "models" / "finetuned.keras"
    files.write_skip_marker(target, "finetune.enabled is false")  # parents are created
    assert files.is_skip_marker(target)
    with files.atomic_dir(target) as tmp:
        (tmp / "weights.h5").write_bytes(b"w")
    assert target.is_dir() and not files.is_skip_marker(target / "weights.h5")
    files.write_skip_marker(target, "off again")
    assert target.is_file() and files.read_json(target)["reason"] == "off again"
    assert leftovers(target.parent) == []


def test_skip_marker_is_told_from_real_files(tmp_path):
    other = tmp_path / "other.json"
    files.write_json(other, ["a list"])
    big = tmp_path / "big.keras"
    big.write_bytes(b"PK" + b"\0" * 5000)
    binary = tmp_path / "small.keras"
    binary.write_bytes(b"\xff\xfe\x00")
    assert not any(files.is_skip_marker(p) for p in (other, big, binary))


def test_md5_is_dvcs_file_hash_over_several_chunks(tmp_path):
    data = os.urandom(3 * 1024 + 17)
    path = tmp_path / "w.h5"
    path.write_bytes(data)
    assert files.md5_of(path, chunk=1024) == hashlib.md5(data).hexdigest()


def test_csv_rows_header_and_empty(tmp_path):
    files.write_csv(tmp_path / "a.csv", [{"path": "x.jpg", "label": "cat"}])
    assert (tmp_path / "a.csv").read_text().splitlines() == ["path,label", "x.jpg,cat"]
    files.write_csv(tmp_path / "b.csv", [], header=["path", "reason"])
    assert (tmp_path / "b.csv").read_text().splitlines() == ["path,reason"]


def test_repo_root_seen_from_a_dvc_temp_experiment(tmp_path):
    inner = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    inner.mkdir(parents=True)
    assert files.repo_root(inner) == (tmp_path / "repo").resolve()
    assert files.repo_root(tmp_path) == tmp_path.resolve()

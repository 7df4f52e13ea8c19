import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from transferline import sources
from transferline.sources import SourceError

from conftest import make_class_folders, make_image, snapshot


def test_digits_preset_writes_class_folders_offline(tmp_path):
    sources.download("digits", tmp_path)
    files = sorted((tmp_path / "digits").rglob("*.png"))
    assert len(files) == 1797
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == [str(i) for i in range(10)]


def test_local_folder_copied_and_left_untouched(tmp_path, class_folders):
    before = snapshot(class_folders)
    dest = tmp_path / "raw"
    dest.mkdir()
    sources.download(str(class_folders), dest)
    assert snapshot(dest) == before
    assert snapshot(class_folders) == before


def test_names_that_are_not_utf8_are_renamed_in_the_copy_only(tmp_path, caplog):
    """DVC cannot record a name that is not UTF-8 (it stops with an 'unexpected error'), and
    old archives and file systems have them: the copy gets the name read as Windows-1252."""
    src = make_class_folders(tmp_path / "src", per_class=2)
    latin = os.fsencode(src) + b"/caf\xe9"  # a class folder, and a file, named in Latin-1
    try:
        os.rename(src / "cat", latin)
    except OSError:  # a file system that refuses such names (macOS) cannot have them
        pytest.skip("this file system stores only UTF-8 names")
    os.rename(latin + b"/cat000.png", latin + b"/\xe9t\xe9.png")
    # names taken already: a UTF-8 été.png beside the Latin-1 one, a UTF-8 café/ beside caf\xe9/
    make_image(Path(os.fsdecode(latin + "/été.png".encode())), (1, 2, 3))
    make_image(src / "café" / "x.png", (4, 5, 6))
    before = {os.fsencode(p): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    dest = tmp_path / "raw"
    dest.mkdir()
    sources.download(str(src), dest)
    names = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.png"))
    assert names == [
        "café/x.png",
        "café_2/cat001.png",
        "café_2/été.png",
        "café_2/été_2.png",
        "dog/dog000.png",
        "dog/dog001.png",
    ]
    assert (dest / "café_2/été_2.png").read_bytes() == before[latin + b"/\xe9t\xe9.png"]
    assert "2 file or folder names in the download were not UTF-8" in caplog.text
    assert {os.fsencode(p): p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    # A tar archive with such a name: extracted, then renamed the same way.
    with tarfile.open(tmp_path / "old.tar", "w", encoding="utf-8", errors="surrogateescape") as t:
        t.add(os.fsdecode(latin + b"/\xe9t\xe9.png"), arcname=os.fsdecode(b"caf\xe9/\xe9t\xe9.png"))
    (tmp_path / "raw2").mkdir()
    sources.download(str(tmp_path / "old.tar"), tmp_path / "raw2")
    assert [p.name for p in (tmp_path / "raw2" / "café").iterdir()] == ["été.png"]


def test_a_link_to_a_file_that_is_gone_is_left_out_but_a_failed_copy_stops(
    tmp_path, caplog, monkeypatch
):
    import shutil

    src = make_class_folders(tmp_path / "src", per_class=2)
    os.symlink(tmp_path / "moved_away.png", src / "cat" / "dangling.png")
    dest = tmp_path / "raw"
    dest.mkdir()
    sources.download(str(src), dest)
    assert snapshot(dest) == snapshot(src)  # every image; the dead link alone left out
    assert "a file you may not read): 1, e.g. cat/dangling.png" in caplog.text

    def full_disk(source, target, **kw):
        raise shutil.Error([(str(source / "dog/dog000.png"), "x", "No space left on device")])

    monkeypatch.setattr(shutil, "copytree", full_disk)
    with pytest.raises(SourceError) as info:
        sources.download(str(src), tmp_path / "raw2")
    assert "dog000.png: No space left on device. Fix that" in str(info.value)


def test_a_folder_holding_the_download_itself_is_refused(tmp_path):
    # data.dataset: data (the repository's data/ folder) copied data/raw's temporary folder
    # into itself, and an earlier data/raw into the new one.
    make_class_folders(tmp_path / "data" / "imgs", per_class=2)
    dest = tmp_path / "data" / ".raw.tmp"
    dest.mkdir()
    with pytest.raises(SourceError, match="would be copied into itself"):
        sources.download(str(tmp_path / "data"), dest)
    assert list(dest.iterdir()) == []
    sources.download(str(tmp_path / "data" / "imgs"), dest)  # the images' own folder: fine
    assert sorted(p.name for p in dest.iterdir()) == ["cat", "dog"]


def test_local_zip_extracted_with_nested_zip(tmp_path):
    src = make_class_folders(tmp_path / "src", per_class=2)
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        for f in src.rglob("*.png"):
            z.write(f, f"train/{f.relative_to(src).as_posix()}")
    outer = tmp_path / "comp.zip"
    with zipfile.ZipFile(outer, "w") as z:
        z.writestr("train.zip", inner.getvalue())
        z.writestr("sampleSubmission.csv", "id,label\n")
    dest = tmp_path / "raw"
    dest.mkdir()
    sources.download(f"file://{outer}", dest)
    assert len(list((dest / "train").rglob("*.png"))) == 4
    assert not list(dest.rglob("*.zip"))
    assert outer.exists()  # the user's archive stays


def test_a_zip_that_zipfile_cannot_open_is_one_clear_error(tmp_path):
    """A password-protected zip, and one compressed with Deflate64 (Windows, large zips)."""

    def patched(name: str, local: int, central: int, value: int) -> Path:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("cat/a.png", b"x" * 100)
        data = bytearray(buf.getvalue())
        for sig, at in ((b"PK\x03\x04", local), (b"PK\x01\x02", central)):
            i = data.index(sig) + at
            data[i : i + 2] = value.to_bytes(2, "little")
        (tmp_path / name).write_bytes(bytes(data))
        return tmp_path / name

    for archive, expected in (
        (patched("locked.zip", 6, 8, 0x1), r"its entries are encrypted \(a password-protected"),
        (patched("big.zip", 8, 10, 9), "zipfile cannot read its compression method"),
    ):
        dest = tmp_path / archive.stem
        with pytest.raises(SourceError, match=expected) as info:
            sources.download(str(archive), dest)
        assert "set data.dataset to that folder" in str(info.value)


def test_zip_slip_refused(tmp_path):
    bad = tmp_path / "evil.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("../escape.txt", "x")
    dest = tmp_path / "raw"
    dest.mkdir()
    with pytest.raises(SourceError, match="outside the target folder"):
        sources.download(str(bad), dest)
    assert not (tmp_path / "escape.txt").exists()


def test_tar_with_parent_path_refused(tmp_path):
    bad = tmp_path / "evil.tar"
    with tarfile.open(bad, "w") as t:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    dest = tmp_path / "raw"
    dest.mkdir()
    with pytest.raises(SourceError, match="refusing to extract"):
        sources.download(str(bad), dest)


def test_a_relative_path_starts_at_the_repository_root_also_in_a_dvc_temp_copy(
    tmp_path, monkeypatch
):
    repo = tmp_path / "repo"
    make_class_folders(repo / "my_images", per_class=2)
    before = snapshot(repo / "my_images")
    for cwd in (repo, repo / ".dvc" / "tmp" / "exps" / "tmp4f2a"):  # workspace, --temp copy
        cwd.mkdir(parents=True, exist_ok=True)
        monkeypatch.chdir(cwd)
        dest = tmp_path / f"raw-{cwd.name}"
        dest.mkdir()
        sources.download("my_images", dest)
        assert snapshot(dest) == before


def test_missing_local_path_explains_the_options(tmp_path):
    with pytest.raises(SourceError) as info:
        sources.download(str(tmp_path / "nowhere"), tmp_path)
    assert "does not exist" in str(info.value) and "kaggle://" in str(info.value)


class FakeKaggle:
    """Stands in for kaggle's KaggleApi at the client boundary."""

    def __init__(self, tmp: Path, error: Exception | None = None):
        self.tmp, self.error, self.calls = tmp, error, []

    def _zip(self, path: str, name: str) -> None:
        src = make_class_folders(self.tmp / "fake_src", per_class=2)
        with zipfile.ZipFile(Path(path) / name, "w") as z:
            for f in src.rglob("*.png"):
                z.write(f, f"Data/{f.relative_to(src).as_posix()}")

    def dataset_download_files(self, dataset, path, quiet, unzip):
        self.calls.append(("dataset", dataset))
        if self.error:
            raise self.error
        self._zip(path, dataset.split("/")[1] + ".zip")

    def competition_download_files(self, competition, path, quiet):
        self.calls.append(("competition", competition))
        if self.error:
            raise self.error
        self._zip(path, competition + ".zip")


class HTTPError(Exception):
    def __init__(self, status):
        super().__init__(f"{status} Client Error")
        self.response = type("R", (), {"status_code": status})()


def test_kaggle_dataset_downloaded_and_unpacked(tmp_path):
    fake = FakeKaggle(tmp_path)
    dest = tmp_path / "raw"
    dest.mkdir()
    sources.download("chest_ct", dest, client_factory=lambda: fake)
    assert fake.calls == [("dataset", "mohamedhanyyy/chest-ctscan-images")]
    assert len(list((dest / "Data").rglob("*.png"))) == 4
    assert not list(dest.glob("*.zip"))


def test_kaggle_competition_slug(tmp_path):
    fake = FakeKaggle(tmp_path)
    dest = tmp_path / "raw"
    dest.mkdir()
    sources.download("cats_vs_dogs", dest, client_factory=lambda: fake)
    assert fake.calls == [("competition", "dogs-vs-cats")]


def test_kaggle_404_names_the_slug(tmp_path):
    fake = FakeKaggle(tmp_path, HTTPError(404))
    with pytest.raises(SourceError) as info:
        sources.download("kaggle://datasets/me/nothing", tmp_path, client_factory=lambda: fake)
    assert "no dataset 'me/nothing' (404)" in str(info.value)


def test_kaggle_403_competition_says_accept_rules(tmp_path):
    fake = FakeKaggle(tmp_path, HTTPError(403))
    with pytest.raises(SourceError) as info:
        sources.download(
            "kaggle://competitions/dogs-vs-cats", tmp_path, client_factory=lambda: fake
        )
    msg = str(info.value)
    assert "rules have not been accepted" in msg
    assert "https://www.kaggle.com/competitions/dogs-vs-cats/rules" in msg


def test_missing_credentials_clear_error(tmp_path, monkeypatch):
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SourceError) as info:
        sources.download("kaggle://datasets/a/b", tmp_path)
    msg = str(info.value)
    assert "~/.kaggle/kaggle.json" in msg and "KAGGLE_USERNAME" in msg and "KAGGLE_KEY" in msg


def test_credentials_detected_from_each_place(tmp_path):
    assert not sources.kaggle_credentials_present({}, tmp_path)
    assert sources.kaggle_credentials_present({"KAGGLE_API_TOKEN": "t"}, tmp_path)
    assert sources.kaggle_credentials_present({"KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k"}, tmp_path)
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "kaggle.json").write_text(json.dumps({"username": "u", "key": "k"}))
    assert sources.kaggle_credentials_present({"KAGGLE_CONFIG_DIR": str(conf)}, tmp_path)
    (tmp_path / ".kaggle").mkdir()
    (tmp_path / ".kaggle" / "kaggle.json").write_text("{}")
    assert sources.kaggle_credentials_present({}, tmp_path)


def test_make_image_helper_is_decodable(tmp_path):
    from PIL import Image

    p = make_image(tmp_path / "x.jpg", (1, 2, 3), fmt="JPEG")
    assert Image.open(p).size == (16, 16)


def test_https_archive_checked_against_sha256_before_extraction(tmp_path):
    src = make_class_folders(tmp_path / "src", per_class=2)
    archive = tmp_path / "pets.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in src.rglob("*.png"):
            z.write(f, f.relative_to(src).as_posix())
    url = archive.as_uri()  # urllib reads file:// like https://, without a network
    good = tmp_path / "good"
    good.mkdir()
    sources.download_https(url, good, sha256=sources.sha256_of(archive))
    assert len(list(good.rglob("*.png"))) == 4
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(SourceError, match="nothing was extracted"):
        sources.download_https(url, bad, sha256="0" * 64)
    assert list(bad.iterdir()) == []


def test_competition_zip_of_zips_splits_by_file_name(tmp_path):
    """dogs-vs-cats in miniature: dogs-vs-cats.zip holds train.zip (cat.0.jpg ...) and an
    unlabelled test1.zip; the preset's subdir picks train/."""
    from transferline import dataset

    pics = tmp_path / "pics"
    colors = {"cat": (200, 40, 40), "dog": (40, 40, 200)}
    for label, color in colors.items():
        for i in range(6):
            make_image(pics / f"{label}.{i}.jpg", color, fmt="JPEG", seed=i + len(label) * 100)
    for i in range(3):
        make_image(pics / f"{i + 1}.jpg", (90, 90, 90), fmt="JPEG", seed=1000 + i)

    def inner(prefix: str, names: list[str]) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for n in names:
                z.write(pics / n, f"{prefix}/{n}")
        return buf.getvalue()

    class Competition(FakeKaggle):
        def competition_download_files(self, competition, path, quiet):
            self.calls.append(("competition", competition))
            with zipfile.ZipFile(Path(path) / f"{competition}.zip", "w") as z:
                z.writestr("train.zip", inner("train", [p.name for p in pics.glob("*.*.jpg")]))
                z.writestr("test1.zip", inner("test1", ["1.jpg", "2.jpg", "3.jpg"]))
                z.writestr("sampleSubmission.csv", "id,label\n")

    raw = tmp_path / "raw"
    raw.mkdir()
    sources.download("cats_vs_dogs", raw, client_factory=lambda: Competition(tmp_path))
    assert sorted(p.name for p in raw.iterdir()) == ["sampleSubmission.csv", "test1", "train"]
    result = dataset.build_split(
        raw / sources.preset_subdir("cats_vs_dogs"),
        dataset.SplitSpec(val=1 / 6, test=1 / 6),
        rel_to=raw,
        workers=1,
    )
    assert result.layout == "filename" and result.classes == ["cat", "dog"]
    assert result.rejected == []
    assert result.counts == {
        "train": {"cat": 4, "dog": 4},
        "val": {"cat": 1, "dog": 1},
        "test": {"cat": 1, "dog": 1},
    }
    assert all(p.startswith("train/") for rows in result.manifests.values() for p, _ in rows)


@pytest.mark.parametrize(
    ("dataset", "name"),
    [
        ("chest_ct", "chest_ct"),
        (
            "kaggle://datasets/mohamedhanyyy/chest-ctscan-images",
            "mohamedhanyyy/chest-ctscan-images",
        ),
        ("kaggle://competitions/dogs-vs-cats/", "dogs-vs-cats"),
        ("https://example.com/files/flowers.tar.gz?dl=1", "flowers"),
        ("file:///data/pets.zip", "pets"),
        ("/data/pets/", "pets"),
    ],
)
def test_dataset_name_is_short_and_readable(dataset, name):
    assert sources.dataset_name(dataset) == name

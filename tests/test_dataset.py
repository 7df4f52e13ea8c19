import csv
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from transferline import dataset, layouts
from transferline.errors import DataError
from transferline.images import SPLITS
from transferline.layouts import Candidate

from conftest import (
    COLORS,
    REPO,
    add_broken_files,
    make_class_folders,
    make_image,
    seed_of,
    snapshot,
    split,
)


def test_class_folders_with_broken_and_system_files(class_folders):
    expected = add_broken_files(class_folders / "cat")
    before = snapshot(class_folders)
    result = split(class_folders)
    reasons = {Path(p).name: r for p, r in result.rejected}
    assert set(reasons) == set(expected)  # system files ignored, not rejected
    for name, part in expected.items():
        assert part in reasons[name]
    assert result.classes == ["cat", "dog"]
    assert sum(len(v) for v in result.manifests.values()) == 20
    assert snapshot(class_folders) == before  # nothing modified or deleted


def test_modes_and_formats_accepted(tmp_path):
    root = tmp_path / "d"
    for i, mode in enumerate(["RGB", "L", "P", "RGBA", "CMYK"]):
        fmt = "JPEG" if mode == "CMYK" else "PNG"
        ext = "jpg" if fmt == "JPEG" else "png"
        for c in ("cat", "dog"):
            for j in range(2):
                make_image(
                    root / c / f"{mode}{j}.{ext}",
                    COLORS[c],
                    fmt=fmt,
                    mode=mode,
                    seed=i * 10 + j + (c == "dog") * 100,
                )
    result = split(root, val=0.25, test=0.25)
    assert result.rejected == []


def test_petimages_wrapper_folder(tmp_path):
    root = tmp_path / "raw"
    make_class_folders(root / "kagglecatsanddogs" / "PetImages", per_class=5)
    result = split(root, val=0.2, test=0.2)
    assert result.layout == "class_folders"
    assert result.classes == ["cat", "dog"]
    assert all(p.startswith("kagglecatsanddogs/PetImages/") for p, _ in result.manifests["train"])


def test_filename_prefix_layout_like_the_competition(tmp_path):
    root = tmp_path / "train"
    for c in ("cat", "dog"):
        for i in range(5):
            make_image(root / f"{c}.{i}.jpg", COLORS[c], fmt="JPEG", seed=i + (c == "dog") * 50)
    make_image(root / "1234.jpg", (0, 0, 0), fmt="JPEG")
    result = split(root)
    assert result.layout == "filename"
    assert result.classes == ["cat", "dog"]
    assert [r for _, r in result.rejected] == [
        "no label: the file name has no class prefix like cat.1.jpg"
    ]


@pytest.mark.parametrize(
    "name,label",
    [
        ("cat.0.jpg", "cat"),
        ("dog_12.png", "dog"),
        ("Cat 3.jpeg", "cat"),
        # Oxford-IIIT Pet: the breed is all of the name before the number; the first word
        # alone made english_setter and english_cocker_spaniel (and two american_*) one class.
        ("english_setter_3.jpg", "english_setter"),
        ("english_cocker_spaniel_10.jpg", "english_cocker_spaniel"),
        ("Abyssinian_1.jpg", "abyssinian"),
        ("covid19_12.png", "covid19"),
        ("cat_fluffy.jpg", "cat"),  # no number: the first word
        ("dog.123.cropped.jpg", "dog"),
        ("1234.jpg", None),
    ],
)
def test_label_from_a_file_name(name, label):
    assert layouts.label_from_filename(name) == label


def test_presplit_chest_ct_labels_reconciled(tmp_path):
    root = tmp_path / "Data"
    long = {"adeno": "adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib", "normal": "normal"}
    colors = {"adeno": (200, 0, 0), "normal": (0, 0, 200)}
    seed = 0
    for split_dir, names in [
        ("train", long),
        ("valid", long),
        ("test", {"adeno": "adenocarcinoma", "normal": "normal"}),
    ]:
        n = 6 if split_dir == "train" else 2
        for key, folder in names.items():
            for i in range(n):
                seed += 1
                make_image(root / split_dir / folder / f"{i}.png", colors[key], seed=seed)
    result = split(root)
    assert result.layout == "presplit"
    assert result.classes == ["adenocarcinoma", "normal"]
    assert {s: sum(c.values()) for s, c in result.counts.items()} == {
        "train": 12,
        "val": 4,
        "test": 4,
    }  # given splits kept as given
    assert all(p.startswith("test/") for p, _ in result.manifests["test"])


def test_presplit_label_that_cannot_be_reconciled(tmp_path):
    root = tmp_path / "Data"
    for split_dir, classes in [("train", ("cat", "dog")), ("test", ("cat", "owl"))]:
        for c in classes:
            make_image(root / split_dir / c / "a.png", COLORS[c], seed=seed_of(split_dir, c))
    with pytest.raises(DataError) as info:
        split(root)
    assert "train: ['cat', 'dog']" in str(info.value) and "test: ['cat', 'owl']" in str(info.value)
    assert "test has no dog; train has no owl. Where names" in str(info.value)
    assert "with data.label_map in params.yaml (several names may map to one)" in str(info.value)


def test_a_given_split_with_one_class_folder_is_not_unwrapped_and_lost(tmp_path):
    # valid/cat/ alone looked like a wrapper folder around valid/: its images were dropped
    # without a word and val carved from train instead. Now it is that split's one class.
    root = tmp_path / "Data"
    for split_dir, names in [("train", ("cat", "dog")), ("valid", ("cat",)),
                             ("test", ("cat", "dog"))]:  # fmt: skip
        for name in names:
            for i in range(6 if split_dir == "train" else 2):
                seed = seed_of(split_dir, name, i)
                make_image(root / split_dir / name / f"{i}.png", COLORS[name], seed=seed)
    with pytest.raises(DataError, match=r"val: \['cat'\]\): val has no dog\."):
        split(root)
    # Wrappers inside a split folder are still unwrapped (valid/images/{cat,dog}/).
    (root / "valid" / "images").mkdir()
    (root / "valid" / "cat").rename(root / "valid" / "images" / "cat")
    for i in range(2):
        seed = seed_of("v", "dog", i)
        make_image(root / "valid" / "images" / "dog" / f"{i}.png", COLORS["dog"], seed=seed)
    (root / "valid" / "readme.txt").write_text("a README beside the wrapper")
    result = split(root)
    assert result.counts["val"] == {"cat": 2, "dog": 2}
    assert all(p.startswith("valid/images/") for p, _ in result.manifests["val"])
    assert result.rejected == [("valid/readme.txt", "no label: not inside a class folder")]


def make_files(root: Path, names: list[str]) -> None:
    for name in names:
        color = COLORS["dog" if "dog" in name else "cat"]
        make_image(root / name, color, seed=seed_of(root.name, name))


def test_files_beside_class_folders_are_reported_not_passed_over(tmp_path, caplog):
    pets = tmp_path / "pets"
    make_files(pets, [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(10)] + ["loose.png"])
    result = split(pets)
    assert result.rejected == [("loose.png", "no label: not inside a class folder")]
    assert result.classes == ["cat", "dog"]

    # A given test/ of unlabelled images (a competition's): rejected, said, test carved.
    given = tmp_path / "given"
    names = [f"train/{c}/{i}.png" for c in ("cat", "dog") for i in range(10)]
    make_files(given, [*names, "train/stray.png", "test/1.png", "test/2.png"])
    with caplog.at_level("WARNING", logger="transferline"):
        result = split(given)
    assert result.rejected == [
        (p, "no label: not inside a class folder")
        for p in ("test/1.png", "test/2.png", "train/stray.png")
    ]
    assert "the given test folder holds 2 files but no class folders" in caplog.text
    assert result.counts["test"] == {"cat": 2, "dog": 2}  # carved from train
    assert not any(p.startswith("test/") for p, _ in result.manifests["test"])


def test_dev_is_the_val_split_and_folders_beside_the_splits_are_reported(tmp_path):
    root = tmp_path / "d"
    names = [f"{s}/{c}/{i}.png" for s in ("train", "dev", "test") for c in ("cat", "dog")
             for i in range(4)]  # fmt: skip
    make_files(root, [*names, "extra/cat/1.png", "notes.png"])
    result = split(root)
    assert result.layout == "presplit"
    assert result.counts["val"] == {"cat": 4, "dog": 4}  # dev/, kept as given
    assert all(p.startswith("dev/") for p, _ in result.manifests["val"])
    why = "no label: not in a split folder (dev, test, train)"
    assert result.rejected == [("extra/cat/1.png", why), ("notes.png", why)]


def test_a_wrapper_folder_with_a_readme_beside_it_is_still_a_wrapper(tmp_path):
    # Kaggle's microsoft-catsvsdogs-dataset: PetImages/{Cat,Dog}/ beside readme[1].txt and
    # a .docx. They made PetImages the one class ("only one class was found").
    root = tmp_path / "download"
    make_files(root, [f"PetImages/{c}/{i}.jpg" for c in ("Cat", "dog") for i in range(6)])
    (root / "readme[1].txt").write_text("Microsoft Research")
    (root / "MSR-LA - 3467.docx").write_bytes(b"PK\x03\x04")
    result = split(root)
    assert result.layout == "class_folders" and result.classes == ["Cat", "dog"]
    why = "no label: outside PetImages/, the folder the images were found in"
    assert result.rejected == [("MSR-LA - 3467.docx", why), ("readme[1].txt", why)]
    # An image file beside it would be unlabelled data: then it is no wrapper, but the one
    # class folder holding class folders names the data.subdir to set.
    make_files(root, ["loose.jpg"])
    with pytest.raises(DataError) as info:
        split(root)
    msg = str(info.value)
    assert "the only class folder, PetImages/, holds the folders Cat, dog: it looks like" in msg
    assert (
        "beside it (MSR-LA - 3467.docx, loose.jpg, readme[1].txt). Set data.subdir: "
        "PetImages." in msg
    )


def test_a_competitions_split_folders_are_not_taken_for_classes_or_given_splits(tmp_path):
    labelled_by_name = [f"train/{c}.{i}.jpg" for c in ("cat", "dog") for i in range(10)]
    # dogs-vs-cats: train/ (labels in file names) and test1/ (none). They were two classes,
    # train and test1, without a word.
    comp = tmp_path / "comp"
    make_files(comp, [*labelled_by_name, *(f"test1/{i}.jpg" for i in range(8))])
    with pytest.raises(DataError) as info:
        split(comp)
    msg = str(info.value)
    assert "train/ holds 20 files but no class folders" in msg
    assert "20 of its file names start with a class" in msg and "data.subdir: train" in msg
    assert split(comp, layout="class_folders").classes == ["test1", "train"]  # said explicitly
    assert split(comp / "train").classes == ["cat", "dog"]  # what data.subdir: train reads
    # A split-named folder among class folders (no second split beside it): refused too.
    other = tmp_path / "other"
    make_files(other, [*labelled_by_name, *(f"submissions/{i}.jpg" for i in range(8))])
    with pytest.raises(DataError) as info:
        split(other)
    assert "the class folder train looks like the data set's splits" in str(info.value)
    assert "data.subdir: train" in str(info.value)


def test_a_data_sets_parts_or_versions_are_not_taken_for_classes(tmp_path):
    # Stanford Dogs: images/Images/<breed>/ beside annotations/Annotation/<breed>/ (XML files
    # without an extension). It was "one class ('images')"; with a mask folder beside it, it
    # would have been an images-vs-masks classifier.
    dogs = tmp_path / "dogs"
    breeds = ("n02085620-Chihuahua", "n02086240-Shih-Tzu")
    make_files(dogs, [f"images/Images/{b}/{b[:9]}_{i}.jpg" for b in breeds for i in range(6)])
    for b in breeds:
        (dogs / "annotations" / "Annotation" / b).mkdir(parents=True)
        (dogs / "annotations" / "Annotation" / b / f"{b[:9]}_0").write_text("<annotation/>")
    with pytest.raises(DataError) as info:
        split(dogs)
    msg = str(info.value)
    assert "the class folders annotations, images look like the parts of the data set" in msg
    assert "data.subdir: images)" in msg
    assert split(dogs / "images").classes == list(breeds)  # what data.subdir: images reads
    with pytest.raises(DataError, match=r"only one class \('images'"):  # said explicitly
        split(dogs, layout="class_folders")
    # PlantVillage: color/, grayscale/, segmented/, each with the same disease folders. It
    # was a 3-class color-vs-grayscale-vs-segmented classifier, without a word.
    plants = tmp_path / "plants"
    diseases = ("Corn_(maize)___healthy", "Pepper,_bell___healthy", "Tomato___healthy")
    make_files(
        plants,
        [f"pv/{v}/{d}/{i}.jpg" for v in ("color", "grayscale") for d in diseases for i in range(5)],
    )
    with pytest.raises(DataError) as info:
        split(plants)
    msg = str(info.value)
    assert "each of the folders color, grayscale holds the same 3 folders" in msg
    assert "data.subdir: pv/color)" in msg
    assert split(plants / "pv" / "color").classes == sorted(diseases)
    assert split(plants, layout="class_folders").classes == ["color", "grayscale"]
    # Class folders that share only split-named folders are classes (the labels are right),
    # as are classes with subfolders of their own.
    ok = tmp_path / "ok"
    make_files(
        ok,
        [f"{c}/{s}/{i}.jpg" for c in ("cat", "dog") for s in ("train", "test") for i in range(5)],
    )
    make_files(
        ok, [f"{c}/{c}_{s}/{i}.jpg" for c in ("cat", "dog") for s in ("a", "b") for i in range(3)]
    )
    assert split(ok).classes == ["cat", "dog"]
    # Flowers Recognition: flowers/ held daisy/, rose/ and flowers/, a copy of both.
    flowers = tmp_path / "flowers"
    make_files(flowers, [f"{c}/{i}.jpg" for c in ("daisy", "rose") for i in range(5)])
    make_files(flowers, [f"flowers/{c}/{i}.jpg" for c in ("daisy", "rose") for i in range(5)])
    with pytest.raises(DataError) as info:
        split(flowers)
    msg = str(info.value)
    assert "the class folder flowers/ holds folders named like the classes beside it" in msg
    assert "data.subdir: flowers)" in msg
    # Blood cells: two versions of the data set side by side, one of them pre-split deep
    # inside. They were a dataset-master-vs-dataset2-master classifier, without a word.
    blood = tmp_path / "blood"
    cells = ("EOSINOPHIL", "LYMPHOCYTE")
    inner = "dataset2-master/dataset2-master/images"
    make_files(
        blood,
        [f"{inner}/{s}/{c}/{i}.jpg" for s in ("TRAIN", "TEST") for c in cells for i in range(5)],
    )
    make_files(blood, [f"dataset-master/dataset-master/JPEGImages/{i}.jpg" for i in range(5)])
    with pytest.raises(DataError) as info:
        split(blood)
    msg = str(info.value)
    assert f"the class folder dataset2-master/ holds a data set of its own ({inner}/TRAIN/" in msg
    assert f"(e.g. data.subdir: {inner})" in msg
    assert split(blood / inner).classes == list(cells)
    # New Plant Diseases: the labelled data's folder beside an unlabelled test/ folder
    npd = tmp_path / "npd"
    make_files(
        npd, [f"Data(Augmented)/train/{c}/{i}.jpg" for c in ("cat", "dog") for i in range(5)]
    )
    make_files(npd, [f"test/test/{i}.jpg" for i in range(3)])
    with pytest.raises(DataError, match=r"e\.g\. data\.subdir: Data\(Augmented\)\)"):
        split(npd)
    assert split(npd / "Data(Augmented)").classes == ["cat", "dog"]


@pytest.mark.parametrize(
    "name,split_name",
    [("train", "train"), ("Training", "train"), ("training_set", "train"), ("dev", "val"),
     ("validation-data", "val"), ("Test_Images", "test"), ("test1", "test"),
     ("seg_train", "train"), ("seg_pred", None), ("cats", None),
     ("trainer", None), ("testcat", None)],
)  # fmt: skip
def test_split_folder_names(name, split_name):
    assert layouts.split_of(name) == split_name


def test_training_set_and_test_set_folders_are_given_splits(tmp_path):
    # Kaggle's tongpython/cat-and-dog: training_set/training_set/cats/, test_set/test_set/...
    root = tmp_path / "d"
    make_files(root, [f"{s}/{s}/{c}/{i}.jpg" for s in ("training_set", "test_set")
                      for c in ("cats", "dogs") for i in range(5)])  # fmt: skip
    result = split(root)
    assert result.layout == "presplit" and result.classes == ["cats", "dogs"]
    assert result.counts["test"] == {"cats": 5, "dogs": 5}
    # Intel image classification: seg_train/seg_train/<class>/, seg_test/..., and an
    # unlabelled seg_pred/seg_pred/ that is listed as left out.
    intel = tmp_path / "intel"
    names = [f"{s}/{s}/{c}/{i}.jpg" for s in ("seg_train", "seg_test") for c in ("cat", "dog")
             for i in range(5)]  # fmt: skip
    make_files(intel, [*names, "seg_pred/seg_pred/1.jpg"])
    result = split(intel)
    assert result.layout == "presplit" and result.counts["test"] == {"cat": 5, "dog": 5}
    assert result.rejected == [
        ("seg_pred/seg_pred/1.jpg", "no label: not in a split folder (seg_test, seg_train)")
    ]


def test_presplit_names_that_differ_in_case_only_are_one_class(tmp_path):
    root = tmp_path / "Data"
    for split_dir, names in [("train", ("Cat", "dog")), ("valid", ("Cat", "dog")),
                             ("test", ("cat", "DOG"))]:  # fmt: skip
        for name in names:
            for i in range(4 if split_dir == "train" else 2):
                seed = seed_of(split_dir, name, i)
                make_image(root / split_dir / name / f"{i}.png", COLORS[name.lower()], seed=seed)
    result = split(root)
    assert result.classes == ["Cat", "dog"]  # as train spells them
    assert result.counts["test"] == {"Cat": 2, "dog": 2}
    assert {lb for _, lb in result.manifests["test"]} == {"Cat", "dog"}

    # Where one split has both spellings they are two classes (EMNIST's A and a): not joined.
    letters = tmp_path / "letters"
    for split_dir, names in [("train", "Aab"), ("test", "Ab"), ("valid", "Aab")]:
        for name in names:
            for i in range(2):
                color = {"A": (200, 40, 40), "a": (40, 40, 200), "b": (40, 200, 40)}[name]
                seed = seed_of("l", split_dir, name, i)
                make_image(letters / split_dir / name / f"{i}.png", color, seed=seed)
    with pytest.raises(DataError, match=r"test: \['A', 'b'\]; train: \['A', 'a', 'b'\]"):
        split(letters)


def test_presplit_without_val_carves_it_from_train(tmp_path):
    root = tmp_path / "Data"
    make_class_folders(root / "train", per_class=10)
    make_class_folders(root / "test", per_class=3)
    for f in (root / "test").rglob("*.png"):  # make test bytes differ from train bytes
        make_image(f, (1, 1, 1), seed=seed_of("test", f.name))
    result = split(root, val=0.2)
    assert result.counts["test"] == {"cat": 3, "dog": 3}
    assert result.counts["val"] == {"cat": 2, "dog": 2}


def test_exact_duplicates_never_cross_splits_and_are_counted(class_folders):
    cats = sorted((class_folders / "cat").glob("*.png"))
    for i, src in enumerate(cats[:4]):
        shutil.copy(src, class_folders / "cat" / f"copy{i}.png")
    shutil.copy(cats[5], class_folders / "dog" / "looks_like_a_cat.png")
    result = split(class_folders)
    assert result.duplicates == 5
    conflict = [p for p, r in result.rejected if "different labels" in r]
    assert sorted(Path(p).name for p in conflict) == sorted([cats[5].name, "looks_like_a_cat.png"])
    paths = [p for rows in result.manifests.values() for p, _ in rows]
    assert len(paths) == len(set(paths)) == 20 - 1  # one cat lost to the label conflict


def test_split_independent_of_listing_order():
    cands = [Candidate(f"{c}/{i}.png", c) for c in ("a", "b") for i in range(20)]
    shuffled = cands[:]
    random.Random(3).shuffle(shuffled)
    one = dataset.split_candidates(cands, 0.2, 0.2, seed=7, max_per_class=None)
    two = dataset.split_candidates(shuffled, 0.2, 0.2, seed=7, max_per_class=None)
    assert {k: sorted(v, key=lambda c: c.path) for k, v in one.items()} == {
        k: sorted(v, key=lambda c: c.path) for k, v in two.items()
    }
    three = dataset.split_candidates(cands, 0.2, 0.2, seed=8, max_per_class=None)
    assert three != one  # the seed matters


def test_stratified_counts_and_max_per_class():
    cands = [Candidate(f"a/{i}.png", "a") for i in range(50)] + [
        Candidate(f"b/{i}.png", "b") for i in range(30)
    ]
    out = dataset.split_candidates(cands, 0.1, 0.2, seed=0, max_per_class=None)
    count = {s: {lbl: sum(c.label == lbl for c in v) for lbl in "ab"} for s, v in out.items()}
    assert count == {
        "train": {"a": 35, "b": 21},
        "val": {"a": 5, "b": 3},
        "test": {"a": 10, "b": 6},
    }
    capped = dataset.split_candidates(cands, 0.1, 0.2, seed=0, max_per_class=10)
    assert sum(len(v) for v in capped.values()) == 20


def test_too_few_images_names_the_class():
    cands = [Candidate(f"a/{i}.png", "a") for i in range(30)] + [
        Candidate("b/0.png", "b"),
        Candidate("b/1.png", "b"),
    ]
    with pytest.raises(DataError) as info:
        dataset.split_candidates(cands, 0.1, 0.1, seed=0, max_per_class=None)
    assert "class 'b' has 2 usable images" in str(info.value)


def test_single_class_and_empty_are_errors(tmp_path):
    with pytest.raises(DataError, match="only one class"):
        dataset.split_candidates([Candidate("a/1.png", "a")], 0.1, 0.1, 0, None)
    with pytest.raises(DataError, match="no usable images"):
        dataset.split_candidates([], 0.1, 0.1, 0, None)


def test_when_too_few_images_are_left_the_error_says_why_the_others_were_refused(tmp_path):
    # The stage stops before writing rejected.csv, so the error itself says what it would hold.
    root = tmp_path / "d"
    make_files(root, [f"cat/{i}.png" for i in range(10)])
    for i in range(8):  # e.g. DICOM files, as medical sets ship
        (root / "dog" / f"{i}.dcm").parent.mkdir(parents=True, exist_ok=True)
        (root / "dog" / f"{i}.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes(64))
    (root / "dog" / "8.png").write_bytes(b"")
    with pytest.raises(DataError) as info:
        split(root)
    msg = str(info.value)
    assert msg.startswith("only one class ('cat', 10 images) was found")
    assert (
        "Of the 19 files found, 9 were refused: 8 DICOM (e.g. dog/0.dcm: DICOM (a medical " in msg
    )
    assert "convert it to PNG first (e.g. with pydicom, applying the scan's window))" in msg
    assert "; 1 empty file (e.g. dog/8.png: empty file (0 bytes))." in msg
    assert "rejected.csv" not in msg


def test_a_lone_class_folder_is_named_not_reported_as_no_images(tmp_path):
    raw = tmp_path / "raw"
    for i in range(3):
        make_image(raw / "cat" / f"{i}.png", (10 * i, 0, 0))
    with pytest.raises(DataError) as info:
        dataset.find_candidates(raw)
    msg = str(info.value)
    assert f"{raw.as_posix()}/cat/ holds 3 files but no class folders" in msg
    assert "cat/ was taken for a wrapper folder" in msg and "needs at least two" in msg
    # Unlabelled files at the top: no wrapper to blame, the same first and last sentence.
    flat = tmp_path / "flat"
    make_image(flat / "0.png", (0, 0, 0))
    with pytest.raises(DataError) as info:
        dataset.find_candidates(flat)
    msg = str(info.value)
    assert "holds 1 file but" in msg and "wrapper" not in msg and "cat.1.jpg, dog.1.jpg" in msg


def test_write_split_outputs(tmp_path, class_folders):
    add_broken_files(class_folders / "dog")
    result = split(class_folders)
    out = tmp_path / "splits"
    out.mkdir()
    metrics = dataset.write_split(result, out)
    assert json.loads((out / "classes.json").read_text()) == ["cat", "dog"]
    with (out / "train.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and set(rows[0]) == {"path", "label"}
    with (out / "rejected.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4 == metrics["rejected"]
    # Headline figures only: the per-class counts are a plain CSV beside the manifests.
    assert set(metrics) == {"train_images", "val_images", "test_images", "rejected", "duplicates"}
    assert metrics["test_images"] == 4 and metrics["train_images"] == len(rows)
    with (out / "counts.csv").open() as f:
        counts = list(csv.DictReader(f))
    assert [(r["class"], r["test"]) for r in counts] == [("cat", "2"), ("dog", "2")]
    assert sum(int(r["train"]) for r in counts) == len(rows)
    assert json.loads((out / "summary.json").read_text()) == {
        "layout": result.layout,
        "exif_turned": 0,
    }


def test_label_map_merges_and_reconciles(tmp_path):
    root = tmp_path / "d"
    make_class_folders(root, per_class=4, classes=("cat", "dog"))
    for i in range(4):
        make_image(root / "Cat" / f"x{i}.png", COLORS["cat"], seed=seed_of("Cat", i))
    result = split(root, val=0.25, test=0.25, label_map={"Cat": "cat"})
    assert result.classes == ["cat", "dog"]
    assert result.counts["train"] == {"cat": 4, "dog": 2}  # 8 cats after the merge, 4 dogs
    pre = tmp_path / "pre"
    make_class_folders(pre / "train", per_class=6, classes=("cat", "dog"))
    for c, name in (("cat", "cat"), ("dog", "doggo")):
        for i in range(2):
            make_image(pre / "test" / name / f"{i}.png", COLORS[c], seed=seed_of("t", c, i))
    with pytest.raises(DataError, match="doggo") as info:
        split(pre)
    assert (
        "with data.label_map in params.yaml, e.g. {doggo: dog}, or with dvc exp run -S "
        "'++data.label_map={doggo: dog}' (several" in str(info.value)
    )
    assert split(pre, label_map={"doggo": "dog"}).classes == ["cat", "dog"]


def test_labels_from_a_csv_as_kaggle_competitions_ship_them(tmp_path, caplog):
    # dog-breed-identification: labels.csv (id,breed) names train/<id>.jpg by id alone.
    dl = tmp_path / "download"
    ids = {f"{c}{i:03d}": c for c in ("cat", "dog") for i in range(10)}
    make_files(dl / "train", [f"{i}.jpg" for i in ids] + ["unlisted.jpg"])
    make_files(dl / "test", ["t1.jpg"])
    rows = [f"{i},{c}_breed" for i, c in ids.items()] + ["gone001,cat_breed", "x,"]
    (dl / "labels.csv").write_text("id,breed\n" + "\n".join(rows) + "\n", encoding="utf-8-sig")
    with caplog.at_level("WARNING", logger="transferline"):
        result = split(dl / "train", rel_to=dl, labels=dataset.LabelsCsv(dl / "labels.csv"))
    assert result.layout == "csv" and result.classes == ["cat_breed", "dog_breed"]
    assert sum(sum(c.values()) for c in result.counts.values()) == 20
    assert all(p.startswith("train/") for s in result.manifests.values() for p, _ in s)
    assert result.rejected == [("train/unlisted.jpg", "no label: not in labels.csv")]
    assert "1 rows of labels.csv name no file under" in caplog.text and "'gone001'" in caplog.text

    # aerial-cactus style: file names with extension, the class in a named column, extra
    # columns before them; the download's other files (test/, the CSV itself) left out.
    table = "\n".join(["source,id_code,score,diagnosis"]
                      + [f"kaggle,{i}.jpg,0.5,{c}" for i, c in ids.items()])  # fmt: skip
    (dl / "train.csv").write_text(table + "\n")
    labels = dataset.LabelsCsv(dl / "train.csv", "id_code", "diagnosis")
    result = split(dl, labels=labels, label_map={"cat": "feline"})
    assert result.classes == ["dog", "feline"]
    assert {p for p, _ in result.rejected} == {"labels.csv", "test/t1.jpg", "train/unlisted.jpg"}

    # Paths relative to the download's top work as well.
    (dl / "paths.csv").write_text(
        "file,label\n" + "".join(f"train/{i}.jpg,{c}\n" for i, c in ids.items())
    )
    assert split(dl, labels=dataset.LabelsCsv(dl / "paths.csv")).classes == ["cat", "dog"]

    # Excel in much of Europe writes semicolons; a TSV has tabs (the header row tells).
    for name, sep in (("excel.csv", ";"), ("labels.tsv", "\t")):
        (dl / name).write_text(f"file{sep}label\n" + "".join(
            f"train/{i}.jpg{sep}{c}\n" for i, c in ids.items()))  # fmt: skip
        assert split(dl, labels=dataset.LabelsCsv(dl / name)).classes == ["cat", "dog"]


def test_a_labels_csv_that_does_not_fit_is_a_clear_error(tmp_path):
    dl = tmp_path / "download"
    make_files(dl / "train", [f"{c}{i}.jpg" for c in ("cat", "dog") for i in range(6)])
    (dl / "train.csv").write_text(
        "id,label\n" + "".join(f"{c}{i},{c}\n" for c in ("cat", "dog") for i in range(6))
    )

    def error(labels, root=dl):
        with pytest.raises(DataError) as info:
            split(root, rel_to=dl, labels=labels)
        return str(info.value)

    assert "data.labels.file: labels.csv is not in the download" in error(
        dataset.LabelsCsv(dl / "labels.csv")
    ) and "CSV files there: train.csv" in error(dataset.LabelsCsv(dl / "labels.csv"))
    msg = error(dataset.LabelsCsv(dl / "train.csv", label_column="lable"))
    assert "has no column 'lable'. Did you mean 'label'? Its columns: id, label." in msg
    (dl / "other.csv").write_text("id,label\nsomething_else,cat\n")
    msg = error(dataset.LabelsCsv(dl / "other.csv"))
    assert "none of the 1 rows of other.csv names a file under" in msg
    assert "Set data.subdir to the images' folder" in msg
    # HAM10000's metadata: lesion_id first, then the image's id; the error names the column.
    (dl / "meta.csv").write_text(
        "lesion_id,image_id,dx\n"
        + "".join(f"HAM{i},{c}{i},{c}\n" for c in ("cat", "dog") for i in range(6))
    )
    msg = error(dataset.LabelsCsv(dl / "meta.csv"))
    assert "(e.g. 'HAM0' in column 'lesion_id'). Set data.labels.image_column: image_id (12 " in msg
    (dl / "one.csv").write_text("id\ncat1\n")
    assert "at least two columns (the image and its class), separated by commas, semicolons" in (
        error(dataset.LabelsCsv(dl / "one.csv"))
    )
    # Excel's default CSV in Western Europe: Windows-1252, not UTF-8.
    (dl / "excel.csv").write_bytes("id,label\ncat1,cat\ncat2,chat noir é\n".encode("cp1252"))
    msg = error(dataset.LabelsCsv(dl / "excel.csv"))
    assert "excel.csv is not UTF-8 text (byte 0xe9 on line 3): save it as UTF-8" in msg
    assert "iconv -f cp1252 -t utf-8 excel.csv > labels_utf8.csv" in msg
    # Two files with one id (train/cat1.jpg, extra/cat1.png): which one is meant is unknown.
    make_files(dl / "extra", ["cat1.png"])
    msg = error(dataset.LabelsCsv(dl / "train.csv"))
    assert "names 'cat1', and 2 different files match it" in msg and "Set data.subdir" in msg
    # A copy of the folder (same names, same bytes): every copy labelled, one kept.
    shutil.rmtree(dl / "extra")
    shutil.copytree(dl / "train", dl / "Train_copy")
    result = split(dl, labels=dataset.LabelsCsv(dl / "train.csv"))
    assert result.duplicates == 12 and sum(sum(c.values()) for c in result.counts.values()) == 12
    shutil.rmtree(dl / "Train_copy")
    # One image given two classes: rejected with both, the rest used.
    (dl / "twice.csv").write_text((dl / "train.csv").read_text() + "cat0,dog\n")
    result = split(dl / "train", rel_to=dl, labels=dataset.LabelsCsv(dl / "twice.csv"))
    assert result.rejected == [("train/cat0.jpg", "two labels in twice.csv: cat, dog")]


def test_a_groups_images_all_go_to_one_split(tmp_path):
    # HAM10000-like: several images per lesion; lesion_id first, image_id, then the class.
    dl = tmp_path / "download"
    rows = []  # (lesion, image id, class)
    for c in ("nv", "mel"):
        for g in range(12):
            for k in range(1 + g % 3):  # 1 to 3 images per lesion
                rows.append((f"L_{c}{g}", f"ISIC_{c}{g:02d}{k}", c))
    for _, name, c in rows:
        color = COLORS["cat" if c == "nv" else "dog"]
        make_image(dl / "part_1" / f"{name}.jpg", color, seed=seed_of(name))
    lesion_of = {f"part_1/{name}.jpg": lesion for lesion, name, _ in rows}

    def table(name: str, group) -> dataset.LabelsCsv:
        lines = [f"{group(lesion, c)},{image},{c}" for lesion, image, c in rows]
        (dl / name).write_text("lesion_id,image_id,dx\n" + "\n".join(lines) + "\n")
        return dataset.LabelsCsv(dl / name, "image_id", "dx", group_column="lesion_id")

    labels = table("meta.csv", lambda lesion, c: lesion)
    result = split(dl, labels=labels, val=0.25, test=0.25)
    groups = [{lesion_of[p] for p, _ in result.manifests[s]} for s in ("train", "val", "test")]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert all(set(n) == {"mel", "nv"} for n in result.counts.values())  # stratified
    assert sum(sum(n.values()) for n in result.counts.values()) == len(rows)
    assert split(dl, labels=labels, val=0.25, test=0.25).manifests == result.manifests
    # Without groups the same images split by image: here lesions land in two splits.
    plain = split(dl, labels=dataset.LabelsCsv(dl / "meta.csv", "image_id", "dx"))
    seen = [{lesion_of[p] for p, _ in plain.manifests[s]} for s in ("train", "val", "test")]
    assert seen[0] & (seen[1] | seen[2])
    # Too few groups of a class to reach every split: an error naming the class and the fix.
    few = table("few.csv", lambda lesion, c: "one" if c == "mel" else lesion)
    with pytest.raises(DataError, match=r"class 'mel' has images in 1 groups, and with each"):
        split(dl, labels=few, val=0.25, test=0.25)


def test_groups_from_a_pattern_in_the_path_with_a_given_test_split(tmp_path, caplog):
    # Chest X-ray pneumonia: train/ and test/ given, a patient's images named person12_*.
    root = tmp_path / "chest_xray"
    names = []
    for c in ("NORMAL", "PNEUMONIA"):
        for person in range(12):
            names += [f"train/{c}/person{person}{c[0]}_{k}.jpeg" for k in range(1 + person % 3)]
        names += [f"test/{c}/person{90 + i}{c[0]}_0.jpeg" for i in range(3)]
    names.append("test/NORMAL/person0N_9.jpeg")  # the data set's own split leaks one patient
    make_files(root, names)
    with caplog.at_level("WARNING", logger="transferline"):
        result = split(root, val=0.25, group_pattern=r"person\d+[NP]")
    person = {s: {Path(p).name.split("_")[0] for p, _ in result.manifests[s]} for s in SPLITS}
    assert not person["train"] & person["val"]  # val carved from train by whole patients
    assert len(result.manifests["test"]) == 7  # the given test/ kept as it is
    assert "1 groups (e.g. 'person0N') have images in the given test folder and in another" in (
        caplog.text
    )
    assert all(set(n) == {"NORMAL", "PNEUMONIA"} for n in result.counts.values())
    with pytest.raises(DataError, match=r"split.group_pattern 'patient\\d\+' is found in none"):
        split(root, group_pattern=r"patient\d+")
    caplog.clear()
    with caplog.at_level("WARNING", logger="transferline"):
        split(root, val=0.25, group_pattern=r"person\d+N")
    assert "'person\\d+N' is not found in 27 of 55 image paths" in caplog.text


def test_the_split_stage_reads_data_labels(tmp_path):
    raw = tmp_path / "data" / "raw"
    ids = {f"{c}{i:02d}": c for c in ("husky", "pug") for i in range(10)}
    make_files(raw / "train", [f"{i}.jpg" for i in ids])
    owner = {i: f"{i[:-1]}{int(i[-1]) // 2}" for i in ids}  # two dogs each: they share a split
    table = "".join(f"{i},{c},{owner[i]}\n" for i, c in ids.items())
    (raw / "labels.csv").write_text("id,breed,owner\n" + table)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    labels = {"file": "labels.csv", "group_column": "owner"}
    params["data"].update(dataset="digits", subdir="train", labels=labels)
    params["split"].update(val=0.25, test=0.25)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    out = subprocess.run(
        [sys.executable, str(REPO / "stages" / "split.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    split_json = json.loads((tmp_path / "metrics" / "split.json").read_text())
    assert split_json["rejected"] == 0
    assert sum(split_json[f"{s}_images"] for s in ("train", "val", "test")) == 20
    summary = json.loads((tmp_path / "data" / "splits" / "summary.json").read_text())
    assert summary["layout"] == "csv"
    counts = (tmp_path / "data" / "splits" / "counts.csv").read_text().splitlines()
    assert counts[0] == "class,train,val,test" and len(counts) == 3
    rows = (tmp_path / "data" / "splits" / "train.csv").read_text().splitlines()
    assert rows[0] == "path,label" and all(r.startswith("train/") for r in rows[1:])
    owners = {
        s: {owner[Path(r.split(",")[0]).stem] for r in lines.splitlines()[1:]}
        for s in ("train", "val", "test")
        for lines in [(tmp_path / "data" / "splits" / f"{s}.csv").read_text()]
    }
    assert not (owners["train"] & owners["val"] or owners["train"] & owners["test"])
    assert not owners["val"] & owners["test"]


def test_one_hot_label_columns_as_plant_pathology_ships_them(tmp_path):
    dl = tmp_path / "download"
    ids = [f"Train_{i}" for i in range(12)]
    make_files(dl / "images", [f"{i}.jpg" for i in ids])
    rows = ["image_id,healthy,multiple_diseases,rust"]
    rows += [
        f"{i},{int(n % 3 == 0)},{int(n % 3 == 1)},{int(n % 3 == 2)}" for n, i in enumerate(ids)
    ]
    rows[1] = "Train_0,1,0,1"  # two set: no single class
    (dl / "train.csv").write_text("\n".join(rows) + "\n")
    cols = ["healthy", "multiple_diseases", "rust"]
    result = split(dl / "images", rel_to=dl, labels=dataset.LabelsCsv(dl / "train.csv", None, cols))
    assert result.classes == cols
    assert result.rejected == [
        ("images/Train_0.jpg", "2 of the columns healthy, multiple_diseases, rust set in "
         "train.csv, not one")
    ]  # fmt: skip
    assert sum(sum(c.values()) for c in result.counts.values()) == 11


def test_splitting_never_imports_tensorflow(tmp_path):
    """The split stage checks and splits every image without TensorFlow's seconds of import."""
    root = make_class_folders(tmp_path / "raw", per_class=5)
    (tmp_path / "out").mkdir()
    code = (
        "import sys\nfrom pathlib import Path\nfrom transferline import dataset\n"
        f"r = dataset.build_split(Path({str(root)!r}), dataset.SplitSpec(val=0.2, test=0.2, "
        "seed=1))\n"
        f"m = dataset.write_split(r, Path({str(tmp_path / 'out')!r}))\n"
        "n = sum(m[f'{s}_images'] for s in ('train', 'val', 'test'))\n"
        "print(n, 'tensorflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["10", "False"], out.stderr


def test_data_exclude_leaves_files_out_and_warns_of_a_pattern_that_matches_none(tmp_path, caplog):
    root = make_class_folders(tmp_path / "pets", per_class=10)
    result = split(root, exclude=["cat/cat00[12].png", "*/dog009.png", "*/no_such.png"])
    left_out = {p: why for p, why in result.rejected if why.startswith("left out")}
    assert left_out == {
        "cat/cat001.png": "left out by data.exclude (cat/cat00[12].png)",
        "cat/cat002.png": "left out by data.exclude (cat/cat00[12].png)",
        "dog/dog009.png": "left out by data.exclude (*/dog009.png)",
    }
    kept = [p for rows in result.manifests.values() for p, _ in rows]
    assert len(kept) == 17 and not set(left_out) & set(kept)
    assert "'*/no_such.png' matches no file" in caplog.text


def test_data_exclude_file_leaves_out_an_audit_csv_as_it_is(tmp_path, caplog):
    root = make_class_folders(tmp_path / "pets", per_class=10)
    issues = tmp_path / "label_issues.csv"
    issues.write_text(
        "path,split,given,suggested,score\n"
        "cat/cat003.png,train,cat,dog,0.01\n"
        "dog/dog004.png,test,dog,cat,0.02\n"
        "dog/gone.png,val,dog,cat,0.03\n"
    )
    listed = dataset.read_exclude_file(issues)
    result = split(root, exclude_list=listed)
    left_out = {p: why for p, why in result.rejected if why.startswith("left out")}
    assert left_out == {
        "cat/cat003.png": f"left out by data.exclude_file ({issues})",
        "dog/dog004.png": f"left out by data.exclude_file ({issues})",
    }
    kept = [p for rows in result.manifests.values() for p, _ in rows]
    assert len(kept) == 18 and not set(left_out) & set(kept)
    assert "1 of the 3 files" in caplog.text and "dog/gone.png" in caplog.text


def test_data_exclude_file_takes_the_second_image_of_each_near_duplicate_pair(tmp_path):
    pairs = tmp_path / "near_duplicates.csv"
    pairs.write_text(
        "path_a,split_a,path_b,split_b,similarity\ncat/cat001.png,train,cat/cat009.png,test,1.0\n"
    )
    assert dataset.read_exclude_file(pairs).paths == {"cat/cat009.png"}


def test_data_exclude_file_without_a_path_column_is_one_paragraph(tmp_path):
    other = tmp_path / "list.csv"
    other.write_text("file,why\ncat/cat001.png,blurry\n")
    with pytest.raises(DataError, match=r"no `path` column \(it has \['file', 'why'\]\)"):
        dataset.read_exclude_file(other)

"""The trunk cache: where the frozen base meets its trainable top, fine-tuning on cached
activations giving what fine-tuning on the images gives (augmentation off, under mixed
precision too), and offline augmentation's cached views."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from transferline import backbones, finetune, heads, models, trunk
from transferline.errors import StageError
from transferline.files import DataDirs
from transferline.images import Training, make_image_dataset
from transferline.models import base_of, build_feature_extractor
from transferline.params import FinetuneParams, ModelParams
from transferline.runtime import seed_everything

from conftest import make_class_folders

TUNE = FinetuneParams(
    epochs=2, unfreeze_layers=3, learning_rate=1e-3, batch_size=8,
    augment={"flip": False, "rotation": 0.0, "zoom": 0.0},
)  # fmt: skip


def model_and_cut(backbone: str, unfreeze: int):
    ext = build_feature_extractor(backbones.get(backbone), "none", 32, "avg", seed=0)
    head = heads.build_dense_head(backbones.get(backbone).features, 2, 0, 0.0)
    net = finetune.assemble(ext, head)
    names = models.unfreeze_top(base_of(net), unfreeze)
    return ext, net, head, trunk.cut(base_of(net), set(names))


def test_a_chain_is_cut_below_its_first_trainable_layer():
    _, _, _, cut = model_and_cut("vgg16", 3)
    assert cut.names == ["block4_pool"]  # block 5's three convolutions train
    assert [layer.name for layer in cut.top.layers if layer.trainable and layer.weights] == [
        "block5_conv1", "block5_conv2", "block5_conv3",
    ]  # fmt: skip


def test_a_residual_base_is_cut_where_the_skip_connection_crosses():
    _, net, _, cut = model_and_cut("resnet50", 3)  # conv5_block3's three convolutions
    assert cut.names == ["conv5_block2_out"]  # read by conv5_block3_1_conv and by the add
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    base = base_of(net)
    pre = net.get_layer("preprocess")(x)
    whole = np.asarray(base(pre, training=False))
    parts = np.asarray(cut.top(cut.trunk(pre, training=False), training=False))
    np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-5)


def test_nothing_to_cache_when_the_first_layer_trains_or_none_does():
    ext = build_feature_extractor(backbones.get("vgg16"), "none", 32, "avg", seed=0)
    base = base_of(ext)
    assert trunk.cut(base, set()) is None
    every = models.unfreeze_top(base, 100)
    assert trunk.cut(base, set(every)) is None


def train_both(tmp_path, backbone: str, unfreeze: int):
    """Fine-tune the same model twice from the same start, on the images and on the cache."""
    root = make_class_folders(tmp_path / "pets", per_class=12)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    y = np.array([0 if "/cat/" in p else 1 for p in paths])
    train, val = (paths[::2], y[::2]), (paths[1::2], y[1::2])
    results = []
    for cached in (False, True):
        seed_everything(0)
        ext, net, head, cut = model_and_cut(backbone, unfreeze)
        training = Training(shuffle_seed=0)
        if cached:
            model = trunk.image_trunk(ext, cut)
            folder = tmp_path / f"cache_{backbone}"
            acts = {}
            for name, (p, _) in {"train": train, "val": val}.items():
                (folder / name).mkdir(parents=True)
                files = trunk.write_activations(
                    model, make_image_dataset(p, None, 32, 5), len(p), folder / name, "float32"
                )
                acts[name] = [np.load(f, mmap_mode="r") for f in files]
            train_ds = trunk.cached_dataset(acts["train"], train[1], 8, shuffle_seed=0)
            val_ds = trunk.cached_dataset(acts["val"], val[1], 8)
            fitted = trunk.cached_net(cut, head)
        else:
            train_ds = make_image_dataset(*train, 32, 8, training=training)
            val_ds = make_image_dataset(*val, 32, 8)
            fitted = net
        result = finetune.finetune(fitted, train_ds, val_ds, TUNE)
        weights = [np.array(w) for w in base_of(net).weights + head.weights]
        results.append((result, weights))
    return results


@pytest.mark.parametrize(("backbone", "unfreeze"), [("vgg16", 3), ("resnet50", 3)])
def test_cached_and_uncached_fine_tuning_agree(tmp_path, backbone, unfreeze):
    (plain, plain_weights), (cached, cached_weights) = train_both(tmp_path, backbone, unfreeze)
    assert cached.unfrozen == plain.unfrozen and len(plain.unfrozen) == unfreeze
    for a, b in zip(plain.history, cached.history, strict=True):
        for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    assert plain.val_before == pytest.approx(cached.val_before, rel=1e-5)
    moved = 0
    for a, b in zip(plain_weights, cached_weights, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    for w in plain_weights:
        moved += int(not np.allclose(w, 0))
    assert moved  # the weights are real, not all zero


OFF = {"flip": False, "rotation": 0.0, "zoom": 0.0}
TINY = ModelParams(backbone="vgg16", weights="none", image_size=32)


@pytest.fixture
def pets(tmp_path):
    """Two classes of 10 images, split, features extracted and a head trained on them."""
    from transferline import dataset, features
    from transferline.params import ExtractParams, HeadParams

    from conftest import split

    raw = make_class_folders(tmp_path / "raw" / "pets", per_class=10).parent
    data = DataDirs(raw, tmp_path / "splits", tmp_path / "features", tmp_path / "trunk")
    data.splits.mkdir()
    data.features.mkdir()
    dataset.write_split(split(raw), data.splits)
    features.extract_dataset(data, TINY, ExtractParams(batch_size=8), seed=0)
    (tmp_path / "head").mkdir()
    heads.train_from_features(data.features, tmp_path / "head", HeadParams(), seed=0)
    return data


def build(data: DataDirs, **finetune_params):
    data.trunk.mkdir(exist_ok=True)
    f = FinetuneParams(**{"unfreeze_layers": 3, "augment": OFF, **finetune_params})
    return trunk.build_cache(data, TINY, f, 8, 0, data.trunk)


def test_the_cache_holds_each_split_at_the_boundary_and_says_how_big(pets):
    meta = build(pets, cache_dtype="float16")
    assert meta["cached"] and meta["boundary"] == ["block4_pool"]
    assert meta["unfrozen"] == ["block5_conv1", "block5_conv2", "block5_conv3"]
    train = np.load(pets.trunk / "train" / "act_0.npy", mmap_mode="r")
    assert train.dtype == np.float16 and train.shape[1:] == tuple(meta["shapes"][0])
    n = len(np.load(pets.features / "train_labels.npy")) + len(
        np.load(pets.features / "val_labels.npy")
    )
    assert meta["bytes"] == n * int(np.prod(meta["shapes"][0])) * 2


def test_a_cache_over_its_cap_names_the_size_and_what_shrinks_it(pets):
    with pytest.raises(StageError) as info:
        build(pets, cache_max_gb=1e-6)
    message = str(info.value)
    assert "would take 0.00" in message and "finetune.cache_max_gb = 1e-06" in message
    assert "finetune.cache_dtype: float16" in message and "unfreeze_layers" in message
    assert not list(pets.trunk.iterdir())  # nothing written
    with pytest.raises(StageError, match=r"fewer views \(finetune\.augment_views\)"):
        build(pets, cache_max_gb=1e-6, **VIEWS)


def test_when_the_cache_does_not_apply_it_says_why(pets):
    assert build(pets, cache_trunk="off")["reason"] == "finetune.cache_trunk is off"
    assert not build(pets, unfreeze_layers=100)["cached"]  # every layer trains
    with pytest.raises(StageError, match="nothing to cache"):
        build(pets, cache_trunk="on", unfreeze_layers=100)
    augmented = FinetuneParams(unfreeze_layers=3)  # the default augmentation
    meta = trunk.build_cache(pets, TINY, augmented, 8, 0, pets.trunk)
    assert meta == {"cached": False, "reason": trunk.decision(augmented)}
    assert "augmentation is on" in meta["reason"]


def test_on_with_augmentation_is_refused_when_params_load():
    with pytest.raises(ValueError, match="cannot be augmented anew each epoch") as info:
        FinetuneParams(cache_trunk="on")
    assert "finetune.augment_views: K" in str(info.value)  # the way to cache it anyway


@pytest.mark.parametrize(
    ("settings", "why"),
    [({"cache_trunk": "auto"}, "cache_trunk is auto"), ({"augment": OFF}, "augmentation is off")],
)
def test_views_without_a_cache_of_augmented_images_are_refused(settings, why):
    with pytest.raises(ValueError, match=f"augment_views = 2 caches augmented views.*{why}"):
        FinetuneParams(**{"cache_trunk": "on", "augment_views": 2, **settings})


VIEWS = {"cache_trunk": "on", "augment_views": 3, "augment": {"flip": True, "zoom": 0.2}}


def test_offline_augmentation_caches_k_views_of_the_training_images(pets):
    assert build(pets)["views"] == 0
    plain_train = np.load(pets.trunk / "train" / "act_0.npy")
    plain_val = np.load(pets.trunk / "val" / "act_0.npy")
    shutil.rmtree(pets.trunk)
    meta = build(pets, **VIEWS)
    train = np.load(pets.trunk / "train" / "act_0.npy")
    val = np.load(pets.trunk / "val" / "act_0.npy")
    assert meta["views"] == 3 and train.shape == (3, *plain_train.shape)
    assert meta["bytes"] == (3 * len(plain_train) + len(plain_val)) * plain_train[0].nbytes
    for a, b in ((0, 1), (1, 2), (0, 2)):  # three different augmentations, not one copied
        assert not np.allclose(train[a], train[b])
        assert not np.allclose(train[a], plain_train)
    np.testing.assert_allclose(val, plain_val, rtol=1e-5, atol=1e-6)  # validation: unaugmented


def epochs_of(ds, epochs: int) -> list[list[tuple[int, int]]]:
    """(view, image) of every element, per epoch, from arrays holding view * 1000 + image."""
    out = []
    for _ in range(epochs):
        rows = []
        for x, y in ds:
            codes = np.asarray(x)[:, 0].astype(int)
            assert (codes % 1000 == np.asarray(y)).all()  # the label goes with its image
            rows += [(c // 1000, c % 1000) for c in codes]
        out.append(rows)
    return out


def test_each_epoch_trains_on_one_view_of_every_image_drawn_anew():
    k, n = 4, 30
    acts = (np.arange(k)[:, None] * 1000 + np.arange(n)[None, :]).astype("float32")[..., None]
    labels = np.arange(n)
    first = epochs_of(trunk.cached_dataset([acts], labels, 8, shuffle_seed=5, views=k), 3)
    for rows in first:
        assert sorted(i for _, i in rows) == list(range(n))  # every image once
        assert {v for v, _ in rows} == set(range(k))  # views drawn from all four
    assert first[0] != first[1] != first[2]  # another draw (and order) every epoch
    again = epochs_of(trunk.cached_dataset([acts], labels, 8, shuffle_seed=5, views=k), 3)
    assert again == first  # seeded: the same draws in another run


def test_fine_tuning_on_views_says_so_and_refuses_other_views(pets, tmp_path, caplog):
    build(pets, **VIEWS)
    f = FinetuneParams(epochs=2, unfreeze_layers=3, batch_size=4, **VIEWS)
    with caplog.at_level("INFO", logger="transferline.trunk"):
        metrics, history, _ = finetune.run_finetune(pets, tmp_path / "head", TINY, f, seed=0)
    assert metrics["trunk_cached"] is True and metrics["augment_views"] == 3
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    assert "offline augmentation: 3 augmented views" in caplog.text
    with pytest.raises(StageError, match=r"3 augmented views.*2 views"):
        finetune.run_finetune(
            pets, tmp_path / "head", TINY, f.model_copy(update={"augment_views": 2}), seed=0
        )


def test_fine_tuning_reads_the_cache_and_refuses_one_cut_elsewhere(pets, tmp_path):
    build(pets)
    f = FinetuneParams(epochs=2, unfreeze_layers=3, batch_size=4, augment=OFF)
    metrics, history, model = finetune.run_finetune(pets, tmp_path / "head", TINY, f, seed=0)
    assert metrics["trunk_cached"] is True and len(history) == 2
    assert trunk.cache_for_training(pets.trunk, across_machines=True) is None  # TF_CONFIG
    assert metrics["train_images_per_second"] > 0
    assert model.name == "finetuned" and model.input_shape == (None, 32, 32, 3)  # whole model
    moved = f.model_copy(update={"unfreeze_layers": 2})
    with pytest.raises(StageError, match=r"older than the params\. Run `dvc repro`"):
        finetune.run_finetune(pets, tmp_path / "head", TINY, moved, seed=0)


def test_training_throughput_is_the_median_after_the_first_epoch():
    assert finetune.images_per_second(100, [10.0, 2.0, 4.0, 2.5]) == 40.0
    assert finetune.images_per_second(100, [4.0]) == 25.0
    assert finetune.images_per_second(100, []) == 0.0


def test_a_stage_killed_while_the_cache_is_written_leaves_no_cache(pets, monkeypatch):
    from transferline.files import atomic_dir

    real = trunk.write_activations

    def killed_after_train(model, batches, n, out, dtype, views=0, augment=None):
        files = real(model, batches, n, out, dtype, views, augment)
        if out.name == "val":
            raise KeyboardInterrupt  # Ctrl-C or SIGTERM while val's activations are written
        return files

    monkeypatch.setattr(trunk, "write_activations", killed_after_train)
    f = FinetuneParams(unfreeze_layers=3, augment=OFF)
    with pytest.raises(KeyboardInterrupt), atomic_dir(pets.trunk) as tmp:  # as the stage does
        trunk.build_cache(pets, TINY, f, 8, 0, tmp)
    assert not pets.trunk.exists()
    assert trunk.cache_for_training(pets.trunk) is None


@pytest.mark.parametrize(
    ("mode", "policy"), [("bfloat16", "mixed_bfloat16"), ("on", "mixed_float16")]
)
def test_the_cache_under_mixed_precision_trains_as_the_images_do(pets, tmp_path, mode, policy):
    import keras

    model = TINY.model_copy(update={"mixed_precision": mode})
    f = FinetuneParams(epochs=2, unfreeze_layers=3, batch_size=4, augment=OFF)
    runs = {}
    try:
        pets.trunk.mkdir()
        meta = trunk.build_cache(pets, model, f, 8, 0, pets.trunk)
        for data in (pets, DataDirs(pets.raw, pets.splits, pets.features)):  # cached, images
            seed_everything(0)
            metrics, history, _ = finetune.run_finetune(data, tmp_path / "head", model, f, seed=0)
            runs[metrics["trunk_cached"]] = (metrics, history)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert meta["precision"] == policy
    assert np.load(pets.trunk / "train" / "act_0.npy", mmap_mode="r").dtype == np.float32
    (cached, cached_history), (plain, plain_history) = runs[True], runs[False]
    assert cached["precision"] == plain["precision"] == policy
    for a, b in zip(plain_history, cached_history, strict=True):
        for key in ("loss", "val_loss"):  # the same computation, rounded alike
            assert b[key] == pytest.approx(a[key], rel=1e-2), key

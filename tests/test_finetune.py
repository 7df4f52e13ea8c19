import keras
import numpy as np
import pytest

from transferline import backbones, finetune, heads, models, replicas
from transferline.errors import StageError
from transferline.files import DataDirs
from transferline.images import make_image_dataset
from transferline.models import base_of, build_feature_extractor
from transferline.params import ExtractParams, FinetuneParams, LogregParams, ModelParams

from conftest import make_class_folders


def images(n: int = 12, size: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.uniform(0, 255, (n, size, size, 3)).astype("float32")
    x[y == 1, ..., 0] = 255.0  # class 1 is red-heavy: learnable
    return x, y


def test_unfreeze_counts_weighted_layers_and_keeps_batchnorm_frozen():
    ext = build_feature_extractor(backbones.get("mobilenet_v2"), "none", 32, "avg", seed=0)
    base = base_of(ext)
    names = models.unfreeze_top(base, 3)
    trainable = [layer for layer in base.layers if layer.trainable and layer.weights]
    assert [layer.name for layer in trainable] == names and len(names) == 3
    bn = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bn and not any(layer.trainable for layer in bn)
    assert models.unfreeze_top(base, 0) == []
    assert not base.trainable_weights


def test_batchnorm_statistics_unchanged_by_a_finetune_epoch():
    ext = build_feature_extractor(backbones.get("mobilenet_v2"), "none", 32, "avg", seed=0)
    model = finetune.assemble(ext, heads.build_dense_head(1280, 2, 0, 0.0))
    base = base_of(model)
    models.unfreeze_top(base, 6)
    finetune.compile_model(model, 1e-3)
    bn = [lyr for lyr in base.layers if isinstance(lyr, keras.layers.BatchNormalization)]
    stats = [np.array(v) for lyr in bn for v in (lyr.moving_mean, lyr.moving_variance)]
    trained = [np.array(w) for w in base.trainable_weights]
    x, y = images()
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    after = [np.array(v) for lyr in bn for v in (lyr.moving_mean, lyr.moving_variance)]
    for a, b in zip(stats, after, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(
        not np.array_equal(a, np.array(b))
        for a, b in zip(trained, base.trainable_weights, strict=True)
    )


def test_combined_model_starts_at_the_logreg_head(tmp_path):
    root = make_class_folders(tmp_path / "pets", per_class=8)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    y = np.array([0 if "/cat/" in p else 1 for p in paths])
    ext = build_feature_extractor(backbones.get("vgg16"), "none", 32, "avg", seed=3)
    x_img = np.concatenate(list(make_image_dataset(paths, None, 32, 8)))
    feats = ext.predict(x_img, verbose=0)
    clf = heads.train_logreg((feats, y), LogregParams(C=1.0, max_iter=2000), seed=0)
    heads.save_logreg(tmp_path, clf, ["cat", "dog"], {})
    model = finetune.assemble(ext, heads.keras_head(tmp_path))
    np.testing.assert_allclose(model.predict(x_img, verbose=0), clf.predict_proba(feats), atol=1e-4)
    assert finetune.max_feature_gap(ext, x_img, feats.astype(np.float16)) < 1e-2


tracking_keys = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")


def test_fine_tuning_never_ends_worse_than_it_started():
    ext = build_feature_extractor(backbones.get("vgg16"), "none", 32, "avg", seed=0)
    x, y = images(16)
    head = heads.build_dense_head(512, 2, 0, 0.0)
    model = finetune.assemble(ext, head)
    start = [np.array(w) for w in model.weights]
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    # A learning rate this large wrecks the model: the starting weights must come back.
    seen = []  # what a live logger gets as each epoch ends
    f = FinetuneParams(epochs=2, learning_rate=50.0, unfreeze_layers=2)
    result = finetune.finetune(
        model, ds, ds, f, on_epoch=lambda epoch, logs: seen.append({"epoch": epoch, **logs})
    )
    assert result.best_epoch == -1
    assert [{k: r[k] for k in tracking_keys} for r in seen] == [
        {k: r[k] for k in tracking_keys} for r in result.history
    ]
    for a, b in zip(start, model.weights, strict=True):
        np.testing.assert_array_equal(a, np.array(b))
    assert len(result.history) == 2 and "val_loss" in result.history[0]


def test_unfreeze_from_a_layer_name_and_its_error():
    ext = build_feature_extractor(backbones.get("vgg16"), "none", 32, "avg", seed=0)
    base = base_of(ext)
    names = models.unfreeze_top(base, 0, from_layer="block5_conv1")
    assert names == ["block5_conv1", "block5_conv2", "block5_conv3"]
    with pytest.raises(StageError) as info:
        models.unfreeze_top(base, 0, from_layer="block5_conv0")
    assert "block5_conv1" in str(info.value) and "finetune.unfreeze_from" in str(info.value)


def test_learning_rate_schedules():
    assert finetune.learning_rate_schedule(1e-3, "constant", 0, 100) == 1e-3
    warm = finetune.learning_rate_schedule(1e-3, "constant", 10, 100)
    lr = [float(warm(step)) for step in (0, 5, 10, 50, 100, 500)]
    np.testing.assert_allclose(lr, [0.0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3], rtol=1e-5, atol=1e-9)
    cos = finetune.learning_rate_schedule(1e-3, "cosine", 10, 110)
    lr = [float(cos(step)) for step in (0, 10, 60, 110)]
    np.testing.assert_allclose(lr, [0.0, 1e-3, 5e-4, 0.0], rtol=1e-5, atol=1e-9)
    cos0 = finetune.learning_rate_schedule(1e-3, "cosine", 0, 100)
    assert float(cos0(0)) == pytest.approx(1e-3) and float(cos0(100)) == pytest.approx(0.0)


def tiny_model():
    ext = build_feature_extractor(backbones.get("vgg16"), "none", 32, "avg", seed=0)
    return finetune.assemble(ext, heads.build_dense_head(512, 2, 0, 0.0))


def test_time_limit_stops_cleanly_after_the_first_batch():
    import tensorflow as tf

    x, y = images(16)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    f = FinetuneParams(
        epochs=5,
        learning_rate=1e-5,
        unfreeze_layers=1,
        max_minutes=1e-9,
        schedule="cosine",
        warmup_epochs=0.5,
        optimizer="adamw",
    )
    result = finetune.finetune(tiny_model(), ds, ds, f)
    assert result.stopped_by_time
    assert len(result.history) == 1 and "val_loss" in result.history[0]  # validated, then stop


def test_time_limit_callback_with_a_fake_clock():
    now = [0.0]
    limit = finetune.TimeLimit(1.0, clock=lambda: now[0])
    limit.set_model(tiny_model())
    limit.on_train_begin()
    now[0] = 59.0
    limit.on_train_batch_end(0)
    assert not limit.stopped and not getattr(limit.model, "stop_training", False)
    now[0] = 60.0
    limit.on_train_batch_end(1)
    assert limit.stopped and limit.model.stop_training


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_optimizers_from_params(name):
    opt = finetune.make_optimizer(name, 1e-4)
    assert type(opt).__name__.lower() == name
    assert float(opt.learning_rate) == pytest.approx(1e-4)


def test_early_stopping_ends_when_val_loss_stops_improving():
    import tensorflow as tf

    x, y = images(8)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    # A huge learning rate: no epoch beats the starting val loss, so patience 2 stops after 2
    # epochs (Keras' EarlyStopping would go on: the loss keeps falling from its huge level).
    f = FinetuneParams(epochs=6, learning_rate=50.0, unfreeze_layers=1, patience=2)
    result = finetune.finetune(tiny_model(), ds, ds, f)
    assert len(result.history) == 2 and result.best_epoch == -1


@pytest.mark.parametrize(
    ("weighted", "optimizer", "schedule", "lr"),
    [
        (False, "sgd", "constant", 1e-3),
        (False, "adamw", "cosine", 1e-4),
        (True, "adam", "constant", 1e-4),
    ],
)
def test_training_loop_for_several_machines_matches_fit(weighted, optimizer, schedule, lr):
    """finetune_across_machines (the MultiWorkerMirroredStrategy path) is the same training
    as Keras' fit in `finetune`: same per-epoch losses and the same final weights."""
    import tensorflow as tf

    x, y = images(20)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)  # uneven last batch
    cw = {0: 0.5, 1: 2.0} if weighted else None
    runs = []
    for loop in (finetune.finetune, finetune.finetune_across_machines):
        keras.utils.set_random_seed(0)
        ext = build_feature_extractor(backbones.get("vgg16"), "none", 32, "avg", seed=0)
        model = finetune.assemble(ext, heads.build_dense_head(512, 2, 0, 0.0))
        extra = (
            {"strategy": tf.distribute.get_strategy()}
            if loop is finetune.finetune_across_machines
            else {}
        )
        start = [np.array(w) for w in model.weights]
        f = FinetuneParams(
            epochs=2, learning_rate=lr, unfreeze_layers=4, optimizer=optimizer, schedule=schedule
        )
        result = loop(model, ds, ds, **extra, f=f, plan=finetune.TrainPlan(class_weight=cw))
        moved = [np.array(w) - s for w, s in zip(model.weights, start, strict=True)]
        runs.append((result, np.concatenate([m.ravel() for m in moved])))
    (fit, fit_w), (own, own_w) = runs
    assert fit.best_epoch >= 0  # it trained and kept a trained epoch, so weights moved
    assert own.best_epoch == fit.best_epoch and own.unfrozen == fit.unfrozen
    assert own.val_before["loss"] == pytest.approx(fit.val_before["loss"], rel=1e-5)
    for a, b in zip(fit.history, own.history, strict=True):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
        assert b["val_accuracy"] == pytest.approx(a["val_accuracy"])
        if not weighted:  # fit reports the weighted loss; this loop the plain one
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    # the weights moved the same way (a wrongly scaled step would show here)
    assert np.abs(fit_w).max() > 0
    assert np.abs(own_w - fit_w).max() <= 1e-3 * np.abs(fit_w).max()


def test_time_limit_refused_across_machines_before_any_work(tmp_path, monkeypatch):
    import json

    from transferline.params import FinetuneParams

    cluster = {"cluster": {"worker": ["h1:1", "h2:1"]}, "task": {"type": "worker", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(cluster))
    f = FinetuneParams(max_minutes=5)
    with pytest.raises(StageError, match=r"finetune.max_minutes.*several machines"):
        finetune.run_finetune(
            DataDirs(tmp_path / "raw", tmp_path / "splits", tmp_path / "features"),
            tmp_path / "init",
            ModelParams(backbone="vgg16", weights="none", image_size=32, mixed_precision="off"),
            f,
            seed=0,
        )


def test_training_loop_for_several_machines_under_mixed_precision():
    """mixed_float16 (the GPU default): the loop scales the loss and still trains."""
    import tensorflow as tf

    x, y = images(20)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        ext = build_feature_extractor(backbones.get("vgg16"), "none", 32, "avg", seed=0)
        model = finetune.assemble(ext, heads.build_dense_head(512, 2, 0, 0.0))
        f = FinetuneParams(epochs=2, learning_rate=1e-4, unfreeze_layers=4, optimizer="adamw")
        result = finetune.finetune_across_machines(model, ds, ds, tf.distribute.get_strategy(), f)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    losses = [h["val_loss"] for h in result.history]
    assert all(np.isfinite(losses)) and result.best_epoch >= 0
    assert min(losses) < result.val_before["loss"]


def test_epoch_plan_keeps_every_replica_fed():
    plan = replicas.EpochPlan
    assert replicas.epoch_plan(100, 32, 1) == plan(4, False, 100)  # one device: all train
    assert replicas.epoch_plan(100, 32, 2) == plan(3, True, 96)  # 4 wait, others each epoch
    assert replicas.epoch_plan(96, 32, 4) == plan(3, True, 96)
    assert replicas.epoch_plan(3, 3, 2) == plan(1, True, 3)  # 2 + 1 images: no replica empty
    with pytest.raises(StageError, match=r"finetune.batch_size 1 is smaller than the 2 replicas"):
        replicas.epoch_plan(100, 1, 2)
    with pytest.raises(StageError, match=r"larger than the training split \(20 images\)"):
        replicas.epoch_plan(20, 32, 2)


def test_bfloat16_extract_then_finetune(tmp_path):
    """model.mixed_precision: bfloat16 (CPUs with AMX): float32 features on disk, within
    bfloat16's rounding of float32's, and finetune takes them for its base's own although its
    unfolded base rounds differently from extract's folded one."""
    from transferline import dataset, feature_files, features
    from transferline.params import FinetuneParams, HeadParams

    from conftest import split

    raw = make_class_folders(tmp_path / "raw" / "pets", per_class=10).parent
    splits = tmp_path / "splits"
    splits.mkdir()
    dataset.write_split(split(raw), splits)
    model = ModelParams(backbone="efficientnet_b0", weights="none", image_size=32)
    feats = {}
    try:
        for mode in ("off", "bfloat16"):
            (out := tmp_path / f"features_{mode}").mkdir()
            m = features.extract_dataset(
                DataDirs(raw, splits, out),
                model.model_copy(update={"mixed_precision": mode}),
                ExtractParams(batch_size=4),
                seed=0,
            )
            feats[mode] = feature_files.load_split(out, "val")[0]
        assert m["precision"] == "mixed_bfloat16" and m["mixed_precision"] is True
        (tmp_path / "head").mkdir()
        heads.train_from_features(out, tmp_path / "head", HeadParams(), seed=0)
        metrics, history, _ = finetune.run_finetune(
            DataDirs(raw, splits, out),
            tmp_path / "head",
            model.model_copy(update={"mixed_precision": "bfloat16"}),
            FinetuneParams(epochs=1, batch_size=4, unfreeze_layers=2),
            seed=0,
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert feats["bfloat16"].dtype == np.float32
    gap = np.abs(feats["bfloat16"] - feats["off"]).max() / np.abs(feats["off"]).max()
    assert 0 < gap < 0.05, gap  # rounded, not computed in float32, and close to it
    assert metrics["precision"] == "mixed_bfloat16" and len(history) == 1
    # 0.026 measured: over float32's limit of 1e-2, so the limit is bfloat16's own
    assert 0 < metrics["feature_gap"] < finetune.FEATURE_GAP_LIMIT["mixed_bfloat16"]


def test_fine_tuning_logs_each_epoch_to_mlflow_as_it_ends(tmp_path, monkeypatch):
    """The UI shows a long fine-tuning's curves while it runs: after epoch k the store holds
    steps 0..k (checked from inside the loop, not by timing)."""
    import mlflow
    import tensorflow as tf

    from transferline import tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tracking.open_run("ft", tracking.RunInputs.here("p"), {"seed": 0}, "ft")
    client = mlflow.MlflowClient(tracking.tracking_uri(tmp_path))
    logger = run.epoch_logger("finetune.history.")
    in_store = []

    def on_epoch(epoch, logs):
        logger(epoch, logs)
        history = client.get_metric_history(run.run_id, "finetune.history.val_accuracy")
        in_store.append([m.step for m in history])

    x, y = images(8)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    f = FinetuneParams(epochs=3, learning_rate=1e-5, unfreeze_layers=1)
    finetune.finetune(tiny_model(), ds, ds, f, on_epoch=on_epoch)
    assert in_store == [[0], [0, 1], [0, 1, 2]]

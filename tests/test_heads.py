import numpy as np
import pytest

from transferline import heads
from transferline.params import DenseParams, HeadParams, LogregParams


def blobs(n_classes: int, n: int = 60, dim: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (n_classes, dim))
    y = np.arange(n) % n_classes
    x = centers[y] + rng.normal(0, 1, (n, dim)) + 50.0  # offset: the scaler matters
    return x.astype(np.float32), y


@pytest.mark.parametrize("n_classes", [2, 4])
def test_logreg_folds_into_an_equal_softmax_layer(n_classes):
    x, y = blobs(n_classes)
    clf = heads.train_logreg((x, y), LogregParams(C=1.0, max_iter=2000), seed=0)
    model = heads.softmax_head(*heads.logreg_as_softmax(clf, n_classes))
    np.testing.assert_allclose(model.predict(x, verbose=0), clf.predict_proba(x), atol=1e-4)


def fit_dense(x, y):
    """Train on the first 120 rows, validate on the rest; returns model, history, val accuracy."""
    import keras

    keras.utils.set_random_seed(0)
    dense = DenseParams(units=16, dropout=0.1, learning_rate=0.01, epochs=30, batch_size=16)
    model, history = heads.train_dense((x[:120], y[:120]), (x[120:], y[120:]), 3, dense)
    return model, history, (model.predict(x[120:], verbose=0).argmax(1) == y[120:]).mean()


def test_dense_head_learns_and_roundtrips(tmp_path):
    x, y = blobs(3, n=150)
    model, history, accuracy = fit_dense(x, y)
    assert history and {"loss", "val_loss", "accuracy", "val_accuracy"} <= set(history[0])
    assert accuracy > 0.9
    heads.save_dense(tmp_path, model, ["a", "b", "c"], {})
    np.testing.assert_allclose(
        heads.predict_proba(tmp_path, x[120:]), model.predict(x[120:], verbose=0), atol=1e-6
    )


def test_dense_head_survives_a_channel_constant_in_training():
    x, y = blobs(3, n=150)
    x[:120, 0] = 0.0  # a dead ReLU on the training set ...
    x[120:, 0] = 5.0  # ... that fires on new data must not explode (chance: 0.33)
    _, _, accuracy = fit_dense(x, y)
    assert accuracy >= 0.8


def test_saved_logreg_predicts_like_the_fold(tmp_path):
    x, y = blobs(3)
    clf = heads.train_logreg(
        (x, y), LogregParams(C=0.5, max_iter=2000, class_weight="balanced"), seed=0
    )
    heads.save_logreg(tmp_path, clf, ["a", "b", "c"], {"val_accuracy": 1.0})
    assert heads.head_meta(tmp_path)["type"] == "logreg"
    np.testing.assert_allclose(
        heads.predict_proba(tmp_path, x),
        heads.keras_head(tmp_path).predict(x, verbose=0),
        atol=1e-4,
    )


def test_linear_dense_head_is_standardise_then_softmax():
    x, _ = blobs(3)
    model = heads.build_dense_head(12, 3, units=0, dropout=0.0, mean=x.mean(0), variance=x.var(0))
    assert [type(layer).__name__ for layer in model.layers] == [
        "InputLayer",
        "Normalization",
        "Dense",
    ]
    norm = model.get_layer("feature_norm")(x)
    np.testing.assert_allclose(np.asarray(norm).mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(np.asarray(norm).std(0), 1, atol=1e-2)


def test_c_search_keeps_the_lowest_validation_loss():
    from sklearn.metrics import log_loss

    x, y = blobs(3, n=150, seed=1)
    x += np.random.default_rng(1).normal(0, 4, x.shape).astype(np.float32)  # noisy: C matters
    grid = [1e-4, 0.01, 1.0, 100.0]
    logreg = LogregParams(C_grid=grid, max_iter=2000)
    clf, best, losses = heads.search_logreg((x[:90], y[:90]), (x[90:], y[90:]), logreg, seed=0)
    assert set(losses) == set(grid) and best == min(losses, key=losses.get)
    assert len(set(losses.values())) == len(grid)  # the grid really changes the model
    again = heads.train_logreg((x[:90], y[:90]), logreg, seed=0, C=best)
    assert log_loss(y[90:], clf.predict_proba(x[90:])) == pytest.approx(
        log_loss(y[90:], again.predict_proba(x[90:]))
    )


def test_train_from_features_records_the_chosen_c(tmp_path):
    x, y = blobs(2, n=80)
    feats = tmp_path / "features"
    feats.mkdir()
    for split, rows in {"train": slice(0, 60), "val": slice(60, 80)}.items():
        np.save(feats / f"{split}_features.npy", x[rows])
        np.save(feats / f"{split}_labels.npy", y[rows])
    (feats / "meta.json").write_text('{"classes": ["a", "b"], "backbone": "vgg16"}')
    out = tmp_path / "head"
    out.mkdir()
    head = HeadParams(logreg=LogregParams(C_grid=[0.001, 1.0]))
    metrics, _ = heads.train_from_features(feats, out, head, seed=0)
    assert metrics["C"] in (0.001, 1.0)
    assert heads.head_meta(out)["C"] == metrics["C"]


def test_balanced_class_weights():
    w = heads.class_weights(np.array([0, 0, 0, 1]), 2)
    assert w == {0: pytest.approx(4 / 6), 1: pytest.approx(2.0)}


def test_dense_head_learns_features_far_smaller_than_kerass_epsilon():
    """A randomly initialised base gives features ~1e-12 in scale; Keras' Normalization divides
    by max(std, 1e-7), which left the dense head at chance. It now scores like logreg."""
    x, y = blobs(3, n=150)
    tiny = (x * 1e-12).astype(np.float32)
    _, _, accuracy = fit_dense(tiny, y)
    clf = heads.train_logreg((tiny[:120], y[:120]), LogregParams(max_iter=2000), seed=0)
    logreg_accuracy = (clf.predict(tiny[120:]) == y[120:]).mean()
    assert logreg_accuracy > 0.9 and accuracy >= logreg_accuracy - 0.05
    assert 1e-13 < heads.feature_scale(tiny.var(0)) < 1e-11  # the features' own scale
    assert heads.feature_scale(x.var(0)) == 1.0  # ordinary features: no extra layer

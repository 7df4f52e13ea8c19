"""Classifier heads trained on cached bottleneck features.

logreg: scikit-learn StandardScaler + LogisticRegression, saved as joblib plus plain arrays of
the equivalent softmax layer (scaler folded in), so fine-tuning can start from exactly the same
function. dense: a small Keras head with early stopping on validation loss.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import joblib
import numpy as np

from transferline.files import atomic_path, read_json, write_json

if TYPE_CHECKING:
    import keras
    from sklearn.pipeline import Pipeline

    from transferline.params import DenseParams, HeadParams, LogregParams

log = logging.getLogger(__name__)

META = "head.json"
LOGREG_JOBLIB = "head.joblib"
LOGREG_ARRAYS = "head.npz"
DENSE_MODEL = "head.keras"

# Called as each training epoch ends with (epoch, that epoch's figures): live curves.
EpochHook = Callable[[int, Mapping[str, float]], None]


# A split's cached features and their labels.
Split = tuple[np.ndarray, np.ndarray]


def train_logreg(train: Split, logreg: LogregParams, seed: int, C: float | None = None) -> Pipeline:
    """StandardScaler + LogisticRegression fitted on `train`.

    Args:
        train: features and labels.
        logreg: the `head.logreg` section (C, max_iter, class_weight).
        seed: the solver's random state.
        C: this C instead of `logreg.C` (the C search's candidates).
    """
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415
    from sklearn.pipeline import make_pipeline  # noqa: PLC0415
    from sklearn.preprocessing import StandardScaler  # noqa: PLC0415

    solver = LogisticRegression(
        C=logreg.C if C is None else C,
        max_iter=logreg.max_iter,
        class_weight=logreg.class_weight,
        random_state=seed,
    )
    clf = make_pipeline(StandardScaler(), solver)
    clf.fit(train[0].astype(np.float32), train[1])
    return clf


def search_logreg(
    train: Split, val: Split, logreg: LogregParams, seed: int
) -> tuple[Pipeline, float, dict[float, float]]:
    """Fit one head per C of `logreg.C_grid`; keep the lowest validation log-loss (ties: the
    smaller C, the stronger regularisation). Returns the head, its C and the loss of every C.

    Args:
        train, val: features and labels.
        logreg: the `head.logreg` section.
        seed: the solver's random state.
    """
    from sklearn.metrics import log_loss  # noqa: PLC0415

    if not logreg.C_grid:
        raise ValueError("search_logreg needs at least one C")
    (x_val, y_val), labels = val, sorted(set(train[1].tolist()) | set(val[1].tolist()))
    losses: dict[float, float] = {}
    best: tuple[float, float, Pipeline] | None = None
    for c in sorted(set(logreg.C_grid)):
        clf = train_logreg(train, logreg, seed, C=c)
        loss = float(log_loss(y_val, clf.predict_proba(x_val.astype(np.float32)), labels=labels))
        losses[c] = loss
        log.info("logreg C=%g: val log-loss %.4f", c, loss)
        if best is None or loss < best[0]:
            best = (loss, c, clf)
    _, best_c, best_clf = best  # type: ignore[misc]  (the grid is non-empty)
    return best_clf, best_c, losses


def logreg_as_softmax(clf: Pipeline, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Kernel (features, classes) and bias of a softmax layer equal to the fitted pipeline.

    With z = (x - mean) / scale and logits W z + b: kernel = (W / scale).T and
    bias = b - W @ (mean / scale). A binary model's single logit becomes [0, logit], which
    softmax turns into [1 - p, p].
    """
    scaler, lr = clf[0], clf[-1]
    coef, intercept = lr.coef_.astype(np.float64), lr.intercept_.astype(np.float64)
    scale = np.where(scaler.scale_ == 0, 1.0, scaler.scale_)
    w = coef / scale
    b = intercept - w @ scaler.mean_
    if coef.shape[0] == 1 and n_classes == 2:
        w = np.vstack([np.zeros_like(w), w])
        b = np.concatenate([[0.0], b])
    return w.T.astype(np.float32), b.astype(np.float32)


def build_dense_head(
    dim: int,
    n_classes: int,
    units: int,
    dropout: float,
    mean: np.ndarray | None = None,
    variance: np.ndarray | None = None,
) -> keras.Model:
    """features -> class probabilities; units == 0 gives a linear (softmax) head.

    With `mean`/`variance` (of the training features) the head standardises its input first,
    like the logreg head's scaler: bottleneck features differ widely in scale between channels.

    Args:
        dim: the feature dimension.
        n_classes: the number of classes.
        units, dropout: the hidden layer (0 units: none) and its dropout.
        mean, variance: the training features' per-channel statistics.

    Returns:
        The Keras head (not compiled).
    """
    import keras  # noqa: PLC0415

    x = inputs = keras.Input((dim,), name="features")
    if mean is not None and variance is not None:
        scale = feature_scale(variance)
        if scale != 1.0:
            # Normalization divides by max(std, 1e-7): features ~1e-12 in scale (a randomly
            # initialised base's) would all come out ~0. Scaled first, they keep their spread.
            x = keras.layers.Rescaling(1.0 / scale, name="feature_scale")(x)
            mean, variance = mean / scale, variance / scale**2
        x = keras.layers.Normalization(mean=mean, variance=variance, name="feature_norm")(x)
    if units:
        x = keras.layers.Dense(units, activation="relu", name="head_hidden")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    out = keras.layers.Dense(n_classes, activation="softmax", name="head_output", dtype="float32")(
        x
    )
    return keras.Model(inputs, out, name="head")


SMALLEST_STD = 1e-5  # a channel's std below this is near Keras' epsilon (1e-7): scale first


def feature_scale(variance: np.ndarray) -> float:
    """1.0 for features whose channels' standard deviations are all well above Keras'
    epsilon, else their geometric mean (over channels that vary), to divide the features by."""
    std = np.sqrt(variance[variance > 0].astype(np.float64))
    if std.size == 0 or std.min() >= SMALLEST_STD:
        return 1.0
    return float(np.exp(np.log(std).mean()))


def softmax_head(kernel: np.ndarray, bias: np.ndarray) -> keras.Model:
    """A Keras head holding the folded logreg weights."""
    import keras  # noqa: PLC0415

    inputs = keras.Input((kernel.shape[0],), name="features")
    dense = keras.layers.Dense(
        kernel.shape[1], activation="softmax", name="head_output", dtype="float32"
    )
    model = keras.Model(inputs, dense(inputs), name="head")
    dense.set_weights([kernel, bias])
    return model


def class_weights(y: np.ndarray, n_classes: int) -> dict[int, float]:
    counts = np.bincount(y, minlength=n_classes).astype(float)
    return {i: float(len(y) / (n_classes * c)) if c else 0.0 for i, c in enumerate(counts)}


def epoch_callbacks(on_epoch: EpochHook | None) -> list[keras.callbacks.Callback]:
    """`on_epoch` as a Keras callback for `fit` (none without one). Put it last: callbacks
    before it may set the epoch's validation figures."""
    import keras  # noqa: PLC0415

    if on_epoch is None:
        return []
    return [keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: on_epoch(epoch, logs))]


def train_dense(
    train: Split,
    val: Split,
    n_classes: int,
    dense: DenseParams,
    on_epoch: EpochHook | None = None,
) -> tuple[keras.Model, list[dict[str, float]]]:
    """Train the dense head with early stopping on validation loss.

    Args:
        train, val: features and labels.
        n_classes: the number of classes.
        dense: the `head.dense` section.
        on_epoch: called with (epoch, that epoch's figures) as each epoch ends.

    Returns:
        The best-by-val-loss model and the per-epoch history.
    """
    import keras  # noqa: PLC0415

    x_train, y_train = train[0].astype(np.float32), train[1]
    variance = x_train.var(axis=0)
    # Like StandardScaler: a channel constant on the training set (a dead ReLU) keeps scale 1,
    # instead of being divided by epsilon and exploding on the first non-zero value.
    variance = np.where(variance > 0, variance, 1.0)
    model = build_dense_head(
        x_train.shape[1],
        n_classes,
        dense.units,
        dense.dropout,
        mean=x_train.mean(axis=0),
        variance=variance,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(dense.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=dense.patience, restore_best_weights=True
    )
    balanced = dense.class_weight == "balanced"
    hist = model.fit(
        x_train,
        y_train,
        validation_data=(val[0].astype(np.float32), val[1]),
        epochs=dense.epochs,
        batch_size=dense.batch_size,
        shuffle=True,
        class_weight=class_weights(y_train, n_classes) if balanced else None,
        callbacks=[stop, *epoch_callbacks(on_epoch)],
        verbose=0,
    )
    history = [
        {"epoch": i, **{k: float(v[i]) for k, v in hist.history.items()}}
        for i in range(len(hist.history["loss"]))
    ]
    log.info("dense head: %d epochs, best epoch %d", len(history), stop.best_epoch)
    return model, history


# ---------------------------------------------------------------- save / load


def save_logreg(folder: Path, clf: Pipeline, classes: list[str], meta: dict[str, Any]) -> None:
    """The logreg head into `folder`: the scikit-learn model, its softmax-layer arrays and
    head.json.

    Args:
        folder: models/head (or its temporary twin).
        clf: the fitted pipeline.
        classes: the class names.
        meta: figures for head.json.
    """
    kernel, bias = logreg_as_softmax(clf, len(classes))
    joblib.dump(clf, folder / LOGREG_JOBLIB)
    np.savez(
        folder / LOGREG_ARRAYS,
        kernel=kernel,
        bias=bias,
        mean=clf[0].mean_,
        scale=clf[0].scale_,
        coef=clf[-1].coef_,
        intercept=clf[-1].intercept_,
    )
    write_json(folder / META, {"type": "logreg", "classes": classes, **meta})


def save_dense(folder: Path, model: keras.Model, classes: list[str], meta: dict[str, Any]) -> None:
    """The dense head into `folder`: head.keras and head.json.

    Args:
        folder: models/head (or its temporary twin).
        model: the trained head.
        classes: the class names.
        meta: figures for head.json.
    """
    with atomic_path(folder / DENSE_MODEL, suffix=".keras") as tmp:
        model.save(tmp)
    write_json(folder / META, {"type": "dense", "classes": classes, **meta})


def head_meta(folder: Path) -> dict[str, Any]:
    return read_json(Path(folder) / META)


def predict_proba(folder: Path, features: np.ndarray) -> np.ndarray:
    """Class probabilities of a saved head on features."""
    folder = Path(folder)
    kind = head_meta(folder)["type"]
    x = features.astype(np.float32)
    if kind == "logreg":
        return joblib.load(folder / LOGREG_JOBLIB).predict_proba(x)
    return keras_head(folder).predict(x, batch_size=1024, verbose=0)


def keras_head(folder: Path) -> keras.Model:
    """The saved head as a Keras model over features (logreg rebuilt from its arrays)."""
    import keras  # noqa: PLC0415

    folder = Path(folder)
    if head_meta(folder)["type"] == "logreg":
        arrays = np.load(folder / LOGREG_ARRAYS)
        return softmax_head(arrays["kernel"], arrays["bias"])
    return keras.saving.load_model(folder / DENSE_MODEL)


def copy_head(src: Path, dest: Path) -> None:
    """Copy a saved head folder's files into `dest` (the fine-tune hand-over)."""
    for f in sorted(Path(src).iterdir()):
        shutil.copy2(f, dest / f.name)


def train_from_features(
    features_dir: Path,
    out_dir: Path,
    head: HeadParams,
    seed: int,
    on_epoch: EpochHook | None = None,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Train the configured head on cached features and save it to `out_dir`.

    Args:
        features_dir: extract's output (`{split}_features.npy`, labels, meta.json).
        out_dir: where the head is saved.
        head: the `head` section.
        seed: the logreg solver's random state.
        on_epoch: called with (epoch, figures) as each of the dense head's epochs ends.

    Returns:
        The stage metrics (train/validation accuracy and loss, epochs, and the chosen C for
        logreg) and the per-epoch history.
    """
    from transferline.feature_files import load_split, read_meta  # noqa: PLC0415

    meta = read_meta(features_dir)
    classes: list[str] = meta["classes"]
    train, val = load_split(features_dir, "train"), load_split(features_dir, "val")
    saved = {"feature_dim": int(train[0].shape[1]), "backbone": meta["backbone"]}
    if head.type == "logreg":
        clf, chosen = _fit_logreg(train, val, head.logreg, seed)
        final = _scores(train, val, clf.predict_proba, len(classes))
        history = [{"epoch": 0, **final}]
        save_logreg(out_dir, clf, classes, {**saved, **final, **chosen})
    else:
        model, history = train_dense(train, val, len(classes), head.dense, on_epoch)
        final = _scores(train, val, lambda x: model.predict(x, verbose=0), len(classes))
        chosen = {}
        save_dense(out_dir, model, classes, {**saved, **final})
    metrics = {**{k: round(v, 6) for k, v in final.items()}, "epochs": len(history), **chosen}
    return metrics, history


def _fit_logreg(
    train: Split, val: Split, logreg: LogregParams, seed: int
) -> tuple[Pipeline, dict[str, float]]:
    """The logreg head, searched over `C_grid` when it has values; and the C it used."""
    if logreg.C_grid:
        clf, best_c, _ = search_logreg(train, val, logreg, seed)
        return clf, {"C": best_c}
    return train_logreg(train, logreg, seed), {"C": logreg.C}


def _scores(
    train: Split, val: Split, predict: Callable[[np.ndarray], np.ndarray], n_classes: int
) -> dict[str, float]:
    """Accuracy and log-loss of a head's probabilities on the training and validation splits."""
    from sklearn.metrics import accuracy_score, log_loss  # noqa: PLC0415

    labels = list(range(n_classes))
    scores = {}
    for prefix, (x, y) in (("", train), ("val_", val)):
        probs = predict(x.astype(np.float32))
        scores[f"{prefix}accuracy"] = float(accuracy_score(y, probs.argmax(1)))
        scores[f"{prefix}loss"] = float(log_loss(y, probs, labels=labels))
    return scores

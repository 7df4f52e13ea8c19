"""Fine-tuning: base + the trained head, top layers unfrozen, BatchNorm kept in inference mode.

The model starts from the head train_head produced (not a random one), so the first gradient
steps do not wreck the pre-trained features; the base is always called with training=False.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import numpy as np

from transferline.errors import StageError
from transferline.heads import EpochHook, epoch_callbacks
from transferline.models import augmenter, base_of, raw_image_input, unfreeze_top
from transferline.replicas import (
    EpochPlan,
    ReplicatedValidation,
    epoch_plan,
    loss_accuracy,
    loss_hits_count,
    replicated_evaluation,
)

if TYPE_CHECKING:
    from transferline.files import DataDirs
    from transferline.params import FinetuneParams, ModelParams

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    history: list[dict[str, float]]
    best_epoch: int
    val_before: dict[str, float]
    unfrozen: list[str] = field(default_factory=list)
    stopped_by_time: bool = False
    train_seconds: list[float] = field(default_factory=list)  # per epoch, validation apart


def assemble(extractor: keras.Model, head: keras.Model) -> keras.Model:
    """Image -> probabilities: the feature extractor's preprocessing and base, then the head."""
    image, x = raw_image_input(extractor)
    x = base_of(extractor)(x, training=False)
    return keras.Model(image, head(x), name="finetuned")


class KeepBest(keras.callbacks.Callback):
    """Restore the weights with the lowest val_loss at the end, the starting point included.

    If no epoch beats the model as it was before fine-tuning, fine-tuning must not make it worse:
    the starting weights come back and `best_epoch` is -1. With `patience`, training stops after
    that many epochs without beating the best so far (the starting point included), which
    Keras' EarlyStopping cannot do: it only compares epochs with each other.
    """

    def __init__(self, start_loss: float, patience: int | None = None):
        super().__init__()
        self.best_loss, self.best_epoch, self._weights = start_loss, -1, None
        self.patience, self.wait = patience, 0

    def on_train_begin(self, logs=None):
        self._weights = self.model.get_weights()

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("val_loss")
        if loss is not None and loss < self.best_loss:
            self.best_loss, self.best_epoch, self._weights = loss, epoch, self.model.get_weights()
            self.wait = 0
            return
        self.wait += 1
        if self.patience and self.wait >= self.patience:
            log.info("no better val_loss for %d epochs: stopping early", self.wait)
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self._weights is not None:
            self.model.set_weights(self._weights)


class TrainClock(keras.callbacks.Callback):
    """Each epoch's training time, from its start to its last batch: validation apart."""

    def __init__(self, clock=time.perf_counter):
        super().__init__()
        self.clock = clock
        self.seconds: list[float] = []
        self._start = self._end = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = self._end = self.clock()

    def on_train_batch_end(self, batch, logs=None):
        self._end = self.clock()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(self._end - self._start)


class TimeLimit(keras.callbacks.Callback):
    """Stop training cleanly once `minutes` have passed (checked after every batch).

    Keras still validates the interrupted epoch, so KeepBest sees it and restores the best
    weights so far; nothing is lost but the remaining epochs.
    """

    def __init__(self, minutes: float, clock=time.monotonic):
        super().__init__()
        self.seconds, self.clock, self.stopped = minutes * 60.0, clock, False

    def on_train_begin(self, logs=None):
        self.start = self.clock()

    def on_train_batch_end(self, batch, logs=None):
        if not self.stopped and self.clock() - self.start >= self.seconds:
            self.stopped = True
            self.model.stop_training = True
            log.warning("finetune.max_minutes (%.3g) reached: stopping", self.seconds / 60)


def learning_rate_schedule(
    learning_rate: float, schedule: str, warmup_steps: int, total_steps: int
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """Constant or cosine-decayed learning rate, after an optional linear warm-up from 0.

    Warm-up lets Adam's moment estimates settle before full-size steps reach the unfrozen
    layers; cosine decay ends at 0 so the last epochs only polish.

    Args:
        learning_rate: the peak rate.
        schedule: `constant` or `cosine`.
        warmup_steps, total_steps: the warm-up's and the run's length in steps.

    Returns:
        A float or a Keras LearningRateSchedule.
    """
    if schedule == "constant" and warmup_steps == 0:
        return learning_rate
    decay_steps = max(1, total_steps - warmup_steps)
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warmup_steps else learning_rate,
        decay_steps,
        alpha=1.0 if schedule == "constant" else 0.0,
        warmup_target=learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


def make_optimizer(name: str, learning_rate) -> keras.optimizers.Optimizer:
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate)
    return keras.optimizers.Adam(learning_rate)


def compile_model(model: keras.Model, learning_rate, optimizer: str = "adam") -> None:
    model.compile(
        optimizer=make_optimizer(optimizer, learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=False,
    )


@dataclass(frozen=True)
class TrainPlan:
    """What the training data decide for a run: steps per epoch (None: the dataset's length)
    and the class weights (None: all 1)."""

    steps_per_epoch: int | None = None
    class_weight: dict[int, float] | None = None


def unfreeze_and_schedule(
    model: keras.Model, train_ds, f: FinetuneParams, plan: TrainPlan
) -> tuple[list[str], object]:
    """Unfreeze the top of the base and build the learning-rate schedule over the whole run:
    the start both training loops (`finetune`, `finetune_across_machines`) share.

    Returns the unfrozen layers' names and the learning rate (a number or a schedule).

    Args:
        model: base + head.
        train_ds: the training batches (their count, without a plan).
        f: the `finetune` section.
        plan: steps per epoch.
    """
    unfrozen = unfreeze_top(base_of(model), f.unfreeze_layers, f.unfreeze_from)
    log.info("unfrozen %d layers: %s", len(unfrozen), ", ".join(unfrozen) or "(head only)")
    steps = plan.steps_per_epoch or int(train_ds.cardinality())
    lr = learning_rate_schedule(
        f.learning_rate, f.schedule, round(f.warmup_epochs * steps), max(1, f.epochs * steps)
    )
    return unfrozen, lr


def warn_if_start_kept(best_epoch: int, start_loss: float) -> None:
    if best_epoch < 0:
        log.warning(
            "no fine-tuning epoch beat the starting val_loss %.4f; keeping the starting weights",
            start_loss,
        )


def _starting_point(model: keras.Model, val_ds) -> tuple[dict, object, list]:
    """The validation figures before training, the validation data for `fit` and the
    callbacks that validate in its place under several replicas."""
    import tensorflow as tf  # noqa: PLC0415

    callbacks: list[keras.callbacks.Callback] = []
    strategy = tf.distribute.get_strategy()  # the one in scope, if any
    if strategy.num_replicas_in_sync > 1:  # fit's own validation could give one no image
        evaluate = replicated_evaluation(model, val_ds, strategy)
        before, val_ds = evaluate(), None
        callbacks.append(ReplicatedValidation(evaluate))  # before KeepBest: sets val_loss
    else:
        before = model.evaluate(val_ds, verbose=0, return_dict=True)
    log_start(before)
    return before, val_ds, callbacks


def log_start(before: dict) -> None:
    log.info(
        "before fine-tuning: val_loss %.4f val_accuracy %.4f", before["loss"], before["accuracy"]
    )


def finetune(
    model: keras.Model,
    train_ds,
    val_ds,
    f: FinetuneParams,
    plan: TrainPlan | None = None,
    on_epoch: EpochHook | None = None,
) -> FinetuneResult:
    """Unfreeze, recompile, check the starting point, train, keep the best epoch by val loss.

    Args:
        model: base + head (`assemble`), built in the strategy's scope if any.
        train_ds, val_ds: batches of (images, labels).
        f: the `finetune` section (epochs, learning rate, unfreezing, optimizer, schedule,
            max_minutes, patience).
        plan: steps per epoch and class weights.
        on_epoch: called with (epoch, that epoch's figures) as each epoch ends.

    Returns:
        The history, the best epoch (-1: the starting weights were kept), the validation
        figures before training and the unfrozen layers.
    """
    plan = plan or TrainPlan()
    unfrozen, lr = unfreeze_and_schedule(model, train_ds, f, plan)
    compile_model(model, lr, f.optimizer)  # recompile after changing `trainable`
    before, val_ds, callbacks = _starting_point(model, val_ds)
    keep, clock = KeepBest(before["loss"], f.patience), TrainClock()
    callbacks += [clock, keep]
    limit = TimeLimit(f.max_minutes) if f.max_minutes else None
    if limit:
        callbacks.append(limit)
    callbacks += epoch_callbacks(on_epoch)  # last: the epoch's validation figures are set
    hist = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=f.epochs,
        callbacks=callbacks,
        class_weight=plan.class_weight,
        shuffle=False,  # the dataset shuffles itself (seeded); Keras would ignore it and warn
        verbose=2,
    )
    history = [
        {"epoch": i, **{k: float(v[i]) for k, v in hist.history.items()}}
        for i in range(len(hist.history["loss"]))
    ]
    warn_if_start_kept(keep.best_epoch, before["loss"])
    return FinetuneResult(
        history,
        keep.best_epoch,
        {k: float(v) for k, v in before.items()},
        unfrozen,
        stopped_by_time=bool(limit and limit.stopped),
        train_seconds=clock.seconds,
    )


def finetune_across_machines(
    model: keras.Model,
    train_ds,
    val_ds,
    strategy,
    f: FinetuneParams,
    plan: TrainPlan | None = None,
    on_epoch: EpochHook | None = None,
) -> FinetuneResult:
    """`finetune` as a plain tf.distribute training loop, for MultiWorkerMirroredStrategy.

    Keras 3's fit/evaluate fail under that strategy (keras-team/keras#20585), so every machine
    of the TF_CONFIG cluster runs this loop in lockstep: each takes its slice of every global
    batch, gradients are all-reduced, and every machine ends with the same weights. Same loss,
    optimizer, schedule, class weights, starting-point check and best-epoch rule as `finetune`
    (`f.max_minutes` is not applied: `run_finetune` refuses it on a cluster). Build `model` in
    `strategy.scope()` and call this inside it. Takes and returns what `finetune` does.

    Args:
        model, train_ds, val_ds, f, plan, on_epoch: as `finetune` takes them.
        strategy: the MultiWorkerMirroredStrategy the model was built in.
    """
    import tensorflow as tf  # noqa: PLC0415

    plan = plan or TrainPlan()
    unfrozen, lr = unfreeze_and_schedule(model, train_ds, f, plan)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train = strategy.experimental_distribute_dataset(train_ds.with_options(options))
    evaluate = replicated_evaluation(model, val_ds.with_options(options), strategy)
    train_step = _distributed_train_step(model, make_optimizer(f.optimizer, lr), strategy, plan)
    before = evaluate()
    log_start(before)
    best_loss, best_epoch, best_weights, wait = before["loss"], -1, model.get_weights(), 0
    history = []
    for epoch in range(f.epochs):
        started = time.monotonic()
        trained, val = loss_accuracy(train, train_step), evaluate()
        history.append(
            {
                "epoch": epoch,
                "accuracy": trained["accuracy"],
                "loss": trained["loss"],
                "val_accuracy": val["accuracy"],
                "val_loss": val["loss"],
            }
        )
        if on_epoch is not None:
            on_epoch(epoch, {k: v for k, v in history[-1].items() if k != "epoch"})
        _log_epoch(epoch, f.epochs, time.monotonic() - started, history[-1])
        if val["loss"] < best_loss:
            best_loss, best_epoch, best_weights, wait = val["loss"], epoch, model.get_weights(), 0
            continue
        wait += 1
        if f.patience and wait >= f.patience:
            log.info("no better val_loss for %d epochs: stopping early", wait)
            break
    model.set_weights(best_weights)
    warn_if_start_kept(best_epoch, before["loss"])
    return FinetuneResult(history, best_epoch, before, unfrozen)


def _distributed_train_step(model: keras.Model, opt, strategy, plan: TrainPlan):
    """One global batch's step for `finetune_across_machines`: the loss fit would compute
    (class-weighted mean over the global batch, scaled under float16), gradients all-reduced,
    and the batch's summed loss, hits and images."""
    import tensorflow as tf  # noqa: PLC0415

    if keras.mixed_precision.global_policy().name == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    weights = model.trainable_variables
    opt.build(weights)
    n_classes = int(model.output_shape[-1])
    cw = tf.constant(
        [float((plan.class_weight or {}).get(i, 1.0)) for i in range(n_classes)], tf.float32
    )

    @tf.function
    def train_step(batch):
        def step(x, y):
            with tf.GradientTape() as tape:
                per, stats = loss_hits_count(y, model(x, training=True))
                # mean over this global batch, as fit's loss (a short last batch included)
                total = tf.distribute.get_replica_context().all_reduce("SUM", stats[2])
                weighted = tf.reduce_sum(per * tf.gather(cw, y))
                scaled = opt.scale_loss(weighted / total)  # x1 unless float16
            grads = tape.gradient(scaled, weights)
            opt.apply(grads, weights)
            return stats

        return strategy.reduce("SUM", strategy.run(step, args=batch), axis=None)

    return train_step


def _log_epoch(epoch: int, epochs: int, seconds: float, row: dict[str, float]) -> None:
    log.info(
        "epoch %d/%d - %.0fs - loss %.4f accuracy %.4f val_loss %.4f val_accuracy %.4f",
        epoch + 1,
        epochs,
        seconds,
        row["loss"],
        row["accuracy"],
        row["val_loss"],
        row["val_accuracy"],
    )


# How far the rebuilt base's features may be from the cached ones (relative to the largest)
# before finetune calls them stale. Extract folds BatchNormalization, finetune does not: the
# same numbers up to rounding, coarse under bfloat16; a changed base is off by far more.
FEATURE_GAP_LIMIT: dict[str, float] = {"mixed_bfloat16": 0.1}


def max_feature_gap(extractor: keras.Model, images: np.ndarray, cached: np.ndarray) -> float:
    """Largest relative difference between the rebuilt base's features and the cached ones."""
    # a direct call, not predict: predict does not run under MultiWorkerMirroredStrategy
    fresh = np.asarray(extractor(images, training=False), dtype=np.float32)
    scale = float(np.abs(cached).max()) or 1.0
    return float(np.abs(fresh - cached.astype(np.float32)).max() / scale)


def run_finetune(
    data: DataDirs,
    init_dir: Path,
    model: ModelParams,
    f: FinetuneParams,
    seed: int,
    devices: list[str] | None = None,
    on_epoch: EpochHook | None = None,
) -> tuple[dict[str, float], list[dict[str, float]], keras.Model]:
    """Rebuild base + trained head, check it still yields the cached features, fine-tune it.

    Args:
        data: the raw images, the split manifests and the cached features.
        init_dir: the head train_head handed over (`models/finetune_init`).
        model, f: the `model` and `finetune` sections.
        seed: seeds the shuffling and the augmentation.
        devices: the devices to split batches across (default: every GPU); with a TF_CONFIG
            naming several machines, a MultiWorkerMirroredStrategy (each machine runs this).
        on_epoch: called with (epoch, that epoch's figures) as each epoch ends.

    Returns:
        The stage metrics, the per-epoch history and the model with its best weights.
    """
    from transferline import backbones, heads, images, models, runtime, trunk  # noqa: PLC0415
    from transferline.feature_files import read_meta  # noqa: PLC0415

    # With a TF_CONFIG naming several machines, each of them runs this function in lockstep
    # (MultiWorkerMirroredStrategy, created before any other TensorFlow work).
    workers = runtime.cluster_task()
    if workers and f.max_minutes:
        raise StageError(
            "finetune.max_minutes cannot be used when fine-tuning on several machines "
            "(TF_CONFIG is set): each machine's clock would stop it at a different step and "
            "the others would wait for it forever. Set finetune.max_minutes to null."
        )
    strategy = runtime.distribution(devices, multi_worker=True)
    policy = runtime.set_precision(model.mixed_precision)
    classes = read_meta(data.features)["classes"]
    train, val = (images.split_arrays(data.raw, data.splits, s, classes) for s in ("train", "val"))
    epoch = epoch_plan(len(train[0]), f.batch_size, strategy.num_replicas_in_sync)
    with strategy.scope():
        extractor = models.build_feature_extractor(
            backbones.get(model.backbone), model.weights, model.size, model.pooling, seed
        )
    gap = _feature_gap(extractor, val, data.features, model, policy)
    cache = trunk.cache_for_training(data.trunk, across_machines=bool(workers))
    sets = (train, val, len(classes), model.size)
    train_ds, val_ds, plan = _datasets(*sets, f, seed, epoch, cache)
    with strategy.scope(), runtime.memory_for_batches("finetune.batch_size", f.batch_size):
        head = heads.keras_head(init_dir)
        net = assemble(extractor, head)
        if workers:  # Keras' fit does not run under MultiWorkerMirroredStrategy
            result = finetune_across_machines(net, train_ds, val_ds, strategy, f, plan, on_epoch)
        else:
            fitted = trunk.net_on_cache(net, head, cache[0], f) if cache else net  # its layers
            result = finetune(fitted, train_ds, val_ds, f, plan, on_epoch)
    metrics = _stage_metrics(result, gap, policy)
    metrics["trunk_cached"] = cache is not None
    metrics["augment_views"] = cache[0].get("views", 0) if cache else 0  # offline augmentation
    metrics["train_images_per_second"] = images_per_second(epoch.images, result.train_seconds)
    metrics |= {
        "replicas": int(strategy.num_replicas_in_sync),
        "workers": workers[2] if workers else 1,
        # fewer than the training split when several replicas leave out the short last batch
        "train_images_per_epoch": epoch.images,
    }
    return metrics, result.history, net


def _feature_gap(
    extractor: keras.Model, val: tuple, features: Path, model: ModelParams, policy: str
) -> float:
    """The rebuilt base's largest relative gap to the cached features (in `features`) on a
    few of the `val` images (`images.split_arrays`' paths, labels and turns); a StageError
    when it is too large to be rounding (the weights changed)."""
    from transferline import images  # noqa: PLC0415

    val_paths, _, val_turns = val
    k = min(16, len(val_paths))
    batches = images.make_image_dataset(
        val_paths[:k], None, model.size, k, orientations=val_turns[:k]
    )
    probe = np.concatenate(list(batches))
    gap = max_feature_gap(extractor, probe, np.load(features / "val_features.npy")[:k])
    if gap > FEATURE_GAP_LIMIT.get(policy, 1e-2):
        raise StageError(
            f"the rebuilt {model.backbone} base does not reproduce the cached features in "
            f"{features} (relative gap {gap:.3g} under {policy}): the weights changed "
            f"since extract ran (e.g. a different Keras cache or weights file). Run `dvc repro "
            f"-f extract`."
        )
    return gap


def images_per_second(images: int, seconds: list[float]) -> float:
    """Training throughput: the median over the epochs after the first (which compiles),
    or the first's when there is one; 0.0 when none ran."""
    later = seconds[1:] or seconds
    return round(images / float(np.median(later)), 1) if later and np.median(later) > 0 else 0.0


def _datasets(
    train: tuple,
    val: tuple,
    n_classes: int,
    size: int,
    f: FinetuneParams,
    seed: int,
    epoch: EpochPlan,
    cache: tuple[dict, dict] | None = None,
) -> tuple[object, object, TrainPlan]:
    """The training batches of `train` (`images.split_arrays`' paths, labels and turns;
    shuffled, augmented, as `epoch` plans them), the batches of `val` and the TrainPlan;
    with a trunk `cache`, batches of its activations in the same order instead."""
    from transferline import heads, images, trunk  # noqa: PLC0415

    train_paths, y_train, train_turns = train
    weights = heads.class_weights(y_train, n_classes) if f.class_weight else None
    if cache is not None:
        acts, y_val, views = cache[1], np.asarray(val[1]), cache[0].get("views", 0)
        train_ds = trunk.cached_dataset(
            acts["train"], np.asarray(y_train), f.batch_size, seed, epoch.drop_remainder, views
        )
        val_ds = trunk.cached_dataset(acts["val"], y_val, f.batch_size)
        return train_ds, val_ds, TrainPlan(epoch.steps, weights)
    train_ds = images.make_image_dataset(
        train_paths,
        y_train,
        size,
        f.batch_size,
        orientations=train_turns,
        training=images.Training(
            shuffle_seed=seed,
            augment=augmenter(f.augment, seed),
            drop_remainder=epoch.drop_remainder,
        ),
    )
    val_paths, y_val, val_turns = val
    val_ds = images.make_image_dataset(val_paths, y_val, size, f.batch_size, orientations=val_turns)
    return train_ds, val_ds, TrainPlan(epoch.steps, weights)


def _stage_metrics(result: FinetuneResult, gap: float, policy: str) -> dict:
    """The finetune stage's figures: validation before and at the best epoch, and how it ran."""
    best = (
        result.history[result.best_epoch]
        if result.best_epoch >= 0
        else {"val_accuracy": result.val_before["accuracy"], "val_loss": result.val_before["loss"]}
    )
    return {
        "val_accuracy_before": round(result.val_before["accuracy"], 6),
        "val_loss_before": round(result.val_before["loss"], 6),
        "val_accuracy": round(best["val_accuracy"], 6),
        "val_loss": round(best["val_loss"], 6),
        "best_epoch": result.best_epoch,
        "epochs": len(result.history),
        "stopped_by_time": result.stopped_by_time,
        "unfrozen_layers": len(result.unfrozen),
        "feature_gap": float(f"{gap:.3g}"),
        "mixed_precision": policy != "float32",
        "precision": policy,
    }

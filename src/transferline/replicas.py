"""Training and validating across several replicas (devices or machines) so that no replica
ever gets an empty batch: padded validation batches whose padding is left out of the sums,
and epochs of full training batches only."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np

from transferline.errors import StageError

log = logging.getLogger(__name__)


def loss_hits_count(y, probs, counted=None):
    """Each image's cross-entropy, and the batch's [summed cross-entropy, correct predictions,
    images]: the sums behind loss and accuracy. `counted` (1 or 0 per image) leaves images out.
    """
    import tensorflow as tf  # noqa: PLC0415

    per = keras.losses.sparse_categorical_crossentropy(y, tf.cast(probs, tf.float32))
    hits = tf.cast(tf.equal(tf.argmax(probs, -1), tf.cast(y, tf.int64)), tf.float32)
    w = tf.ones_like(per) if counted is None else tf.cast(counted, tf.float32)
    return per, tf.stack([tf.reduce_sum(per * w), tf.reduce_sum(hits * w), tf.reduce_sum(w)])


def replicated_evaluation(model: keras.Model, val_ds, strategy) -> Callable[[], dict]:
    """A function giving val loss and accuracy with every batch split across the replicas of
    `strategy`, equal to `model.evaluate` on one device.

    Keras' evaluate (and a plain split) divides a short last batch across the replicas as it
    comes, so some can get no image, and a model run on an empty batch is not safe
    (TensorFlow's oneDNN convolution returns its input for one:
    features.padded_for_replicas). Here every batch is padded so that each replica gets
    images, and the padding is left out of the sums.
    """
    import tensorflow as tf  # noqa: PLC0415

    from transferline.features import padded_for_replicas  # noqa: PLC0415

    padded = padded_for_replicas(val_ds, strategy.num_replicas_in_sync)
    data = strategy.experimental_distribute_dataset(padded)

    def sums(x, y, real):
        return loss_hits_count(y, model(x, training=False), real)[1]

    @tf.function
    def step(batch):
        return strategy.reduce("SUM", strategy.run(sums, args=batch), axis=None)

    return lambda: loss_accuracy(data, step)


def loss_accuracy(data, step) -> dict[str, float]:
    """Loss and accuracy over `data` from `step`'s per-batch `loss_hits_count` sums."""
    total = np.zeros(3)
    for batch in data:
        total += step(batch).numpy()
    return {"loss": float(total[0] / total[2]), "accuracy": float(total[1] / total[2])}


class ReplicatedValidation(keras.callbacks.Callback):
    """val_loss and val_accuracy from `replicated_evaluation`, for `fit` under several
    replicas in place of its own validation. Put it before callbacks that read val_loss: it
    adds the figures to the epoch's logs."""

    def __init__(self, evaluate: Callable[[], dict]):
        super().__init__()
        self.evaluate = evaluate

    def on_epoch_end(self, epoch, logs=None):
        val = self.evaluate()
        log.info(
            "epoch %d: val_loss %.4f val_accuracy %.4f", epoch + 1, val["loss"], val["accuracy"]
        )
        if logs is not None:
            logs.update({f"val_{k}": v for k, v in val.items()})


@dataclass(frozen=True)
class EpochPlan:
    steps: int  # training steps per epoch
    drop_remainder: bool  # the short last batch is left out
    images: int  # training images one epoch sees


def epoch_plan(n_images: int, batch_size: int, replicas: int) -> EpochPlan:
    """Training steps per epoch, and whether the short last batch is left out.

    With several replicas a short last batch is split across them in order, so one can get
    no image at all. TensorFlow's CPU gradient of a depthwise convolution (MobileNet,
    EfficientNet, ...) for an empty batch is uninitialised memory, not zeros, and it goes
    into the shared update: the weights turn to garbage or NaN, at random; on a CPU with
    AVX-512 and AMX its oneDNN convolution fails on one (tests/test_distribution.py).
    Padding as validation does (`replicated_evaluation`) would train on some images twice.
    So with several replicas only full batches train; the set is reshuffled every epoch, so a
    different few images wait each time.
    """
    if replicas == 1:
        return EpochPlan(math.ceil(n_images / batch_size), False, n_images)
    if batch_size < replicas:
        raise StageError(
            f"finetune.batch_size {batch_size} is smaller than the {replicas} replicas "
            f"(devices) training together, so some would get no images. Set "
            f"finetune.batch_size to {replicas} or more (a multiple of {replicas} splits evenly)."
        )
    if n_images < batch_size:
        raise StageError(
            f"finetune.batch_size {batch_size} is larger than the training split "
            f"({n_images} images). With {replicas} replicas only full batches train, so not "
            f"one step would run. Set finetune.batch_size to {n_images} or less."
        )
    dropped = n_images % batch_size
    if dropped:
        log.info(
            "%d replicas: each epoch trains on %d full batches of %d and leaves out the "
            "short last one (%d images, different ones each epoch)",
            replicas,
            n_images // batch_size,
            batch_size,
            dropped,
        )
    steps = n_images // batch_size
    return EpochPlan(steps, True, steps * batch_size)

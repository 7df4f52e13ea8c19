"""MirroredStrategy with two logical CPU devices: extraction and fine-tuning as on a 2-GPU box.

Logical devices must be configured before TensorFlow starts, so this runs in a fresh process.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from transferline.errors import StageError

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    import keras
    import numpy as np
    from transferline import backbones, features, finetune, heads, models

    models.seed_everything(0)
    strategy = models.distribution(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (13, 32, 32, 3)).astype("float32")  # 13: uneven last batch
    y = (np.arange(13) % 2).astype("int64")
    x[y == 1, ..., 0] = 255.0
    with strategy.scope():
        ext = models.build_feature_extractor(
            backbones.get("mobilenet_v2"), "none", 32, "avg", seed=0
        )
    expected = ext.predict(x, verbose=0)
    fwd = features.compiled_forward(ext, strategy)
    out = Path(sys.argv[1]) / "f.npy"
    features.extract_to_npy(
        ext, tf.data.Dataset.from_tensor_slices(x).batch(4), 13, out, forward=fwd
    )
    got = np.load(out)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    with strategy.scope():
        model = finetune.assemble(ext, heads.build_dense_head(1280, 2, 0, 0.0))
        base = models.base_of(model)
        bn = [l for l in base.layers if isinstance(l, keras.layers.BatchNormalization)]
        stats = [np.array(v) for l in bn for v in (l.moving_mean, l.moving_variance)]
        result = finetune.finetune(
            model, ds, ds, epochs=1, learning_rate=1e-3, unfreeze_layers=4
        )
    after = [np.array(v) for l in bn for v in (l.moving_mean, l.moving_variance)]
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "feature_gap": float(np.abs(got - expected).max()),
        "shape": list(got.shape),
        "bn_unchanged": all(np.array_equal(a, b) for a, b in zip(stats, after)),
        "epochs": len(result.history),
        "val_loss": result.history[0]["val_loss"],
        "unfrozen": len(result.unfrozen),
    }))
    """
)


def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-4000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["replicas"] == 2
    assert res["shape"] == [13, 1280]
    assert res["feature_gap"] < 1e-4  # same features, same order, as on one device
    assert res["bn_unchanged"] and res["epochs"] == 1 and res["unfrozen"] == 4
    assert res["val_loss"] == res["val_loss"]  # not NaN


TWO = {"cluster": {"worker": ["h1:1", "h2:1"]}, "task": {"type": "worker", "index": 1}}


def test_tf_config_parsing(monkeypatch):
    from transferline import models

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert models.cluster_task() is None
    one = {"cluster": {"worker": ["h1:1"]}, "task": {"type": "worker", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(one))
    assert models.cluster_task() is None  # a one-machine cluster trains alone
    monkeypatch.setenv("TF_CONFIG", json.dumps(TWO))
    assert models.cluster_task() == ("worker", 1, 2)
    for bad in (
        "{not json",
        json.dumps({"task": {"type": "worker", "index": 0}}),
        json.dumps({**TWO, "task": {"type": "worker", "index": 5}}),
    ):
        monkeypatch.setenv("TF_CONFIG", bad)
        with pytest.raises(StageError, match="TF_CONFIG is not a usable cluster"):
            models.cluster_task()


def test_several_machines_are_refused_not_silently_ignored(monkeypatch):
    """Keras 3's fit does not run under MultiWorkerMirroredStrategy (keras-team/keras#20585):
    with TF_CONFIG naming two machines each would train alone, so the stage says so."""
    from transferline import models

    monkeypatch.setenv("TF_CONFIG", json.dumps(TWO))
    with pytest.raises(StageError, match=r"names 2 machines.*keras#20585.*Unset TF_CONFIG"):
        models.distribution()


UPSTREAM = textwrap.dedent(
    """
    import tensorflow as tf
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import keras, numpy as np
    x = np.random.default_rng(0).uniform(0, 1, (64, 8)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, (x.sum(1) > 4).astype("int64"))).batch(16)
    with strategy.scope():
        m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, activation="softmax")])
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    m.fit(ds, epochs=1, verbose=0)
    """
)


@pytest.mark.xfail(
    strict=True, raises=AssertionError, reason="keras-team/keras#20585 (fit under MWMS)"
)
def test_upstream_keras_fit_under_multi_worker_strategy(tmp_path):
    """Why TF_CONFIG is refused. When this starts passing (Keras fixed it), multi-machine
    fine-tuning can be offered: remove the refusal in models.distribution and this mark."""
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    workers = [f"127.0.0.1:{p}" for p in ports]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", UPSTREAM],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                "TF_CPP_MIN_LOG_LEVEL": "3",
                "PATH": "/usr/bin:/bin",
                "TF_CONFIG": json.dumps(
                    {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
                ),
            },
        )
        for i in range(2)
    ]
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]  # drains the pipes
    finally:
        for p in procs:
            p.kill()
    codes, err = [p.returncode for p in procs], errs[0]
    if codes != [0, 0] and "PerReplica" not in err:  # a different failure: report it
        raise RuntimeError(err[-2000:])
    assert codes == [0, 0], err[-2000:]

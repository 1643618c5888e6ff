"""shardckpt.integrations.keras with the real Keras 3 on the torch backend (CPU): ModelCheckpoint beside Keras'
own ModelCheckpoint in the same fit() keeps the same epochs with the same weights and optimizer variables;
BackupAndRestore resumes an interrupted fit() at the right epoch, ending equal to an uninterrupted one."""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("KERAS_BACKEND is not torch in this process", allow_module_level=True)

import shardckpt  # noqa: E402
from shardckpt.integrations.keras import BackupAndRestore, ModelCheckpoint, load_checkpoint  # noqa: E402

EPOCHS = 6


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], dtype="float32")).astype("float32")
    xv = rng.normal(size=(16, 4)).astype("float32")
    return x, y, xv, (xv @ np.array([[1.0], [-2.0], [0.5], [3.0]], dtype="float32")) + 2.0 * xv[:, :1] ** 2


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])
    m.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    return m


def _fit(model, callbacks, epochs=EPOCHS, **kw):
    x, y, xv, yv = _data()
    return model.fit(x, y, validation_data=(xv, yv), epochs=epochs, batch_size=16, shuffle=False, verbose=0,
                     callbacks=callbacks, **kw)


def _values(variables) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_model_checkpoint_matches_keras_own(tmp_path):
    """save_best_only on val_loss (mode min): the same epochs kept as Keras' own ModelCheckpoint in the same
    fit(), each with Keras' weights and optimizer variables; a constant filepath ends holding the best."""
    k, s = tmp_path / "keras", tmp_path / "shard"
    model = _model()
    hist = _fit(model, [
        keras.callbacks.ModelCheckpoint(str(k / "ep{epoch:02d}.keras"), monitor="val_loss", mode="min",
                                        save_best_only=True),
        ModelCheckpoint(str(s / "ep{epoch:02d}"), monitor="val_loss", mode="min", save_best_only=True),
        keras.callbacks.ModelCheckpoint(str(k / "best.weights.h5"), save_best_only=True, save_weights_only=True),
        ModelCheckpoint(str(s / "best"), save_best_only=True, save_weights_only=True),
        ModelCheckpoint(str(s / "b{batch}"), save_freq=3),  # every 3 batches (4 per epoch)
        keras.callbacks.ModelCheckpoint(str(k / "b{batch}.weights.h5"), save_freq=3, save_weights_only=True)])
    kept = sorted(f.removesuffix(".keras") for f in os.listdir(k) if f.startswith("ep"))
    assert kept == sorted(f for f in os.listdir(s) if f.startswith("ep"))
    val = hist.history["val_loss"]
    assert 1 < len(kept) < EPOCHS  # the metric did not improve at every epoch: a real selection
    assert kept == [f"ep{e + 1:02d}" for e in range(EPOCHS) if val[e] < min(val[:e], default=np.inf)]
    for name in kept:
        theirs = keras.models.load_model(k / f"{name}.keras")
        ours = _model(seed=1)
        info = load_checkpoint(ours, s / name)
        assert info["epoch"] == int(name[2:]) and info["logs"]["val_loss"] == pytest.approx(val[int(name[2:]) - 1])
        assert _equal(_values(ours.weights), _values(theirs.weights))
        assert _equal(_values(ours.optimizer.variables), _values(theirs.optimizer.variables))
    best_k, best_s = _model(seed=2), _model(seed=3)
    best_k.load_weights(k / "best.weights.h5")
    load_checkpoint(best_s, s / "best")
    assert _equal(_values(best_s.weights), _values(best_k.weights))
    assert shardckpt.read_manifest(s / "best").user_metadata["keras"]["optimizer"] is None  # weights only
    batches = sorted(f.removesuffix(".weights.h5") for f in os.listdir(k) if f.startswith("b") and "best" not in f)
    assert batches == sorted(f for f in os.listdir(s) if f.startswith("b") and f != "best") and batches


class _Crash(keras.callbacks.Callback):
    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.at:
            raise RuntimeError("preempted")


def test_backup_and_restore_resumes_at_the_right_epoch(tmp_path):
    ref = _model()
    _fit(ref, [])
    backup = tmp_path / "backup"
    m = _model()
    with pytest.raises(RuntimeError, match="preempted"):
        _fit(m, [BackupAndRestore(str(backup)), _Crash(3)])  # the backup of epoch 3 is committed first
    assert shardckpt.read_manifest(backup / "latest").user_metadata["keras"]["epoch"] == 3
    resumed = _model(seed=7)
    seen = []
    epochs = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: seen.append(e))
    hist = _fit(resumed, [BackupAndRestore(str(backup)), epochs])
    assert seen == [3, 4, 5] and hist.epoch == [3, 4, 5]  # fit resumed at epoch 4 (index 3)
    assert _equal(_values(resumed.weights), _values(ref.weights))
    assert _equal(_values(resumed.optimizer.variables), _values(ref.optimizer.variables))
    assert not backup.exists()  # delete_checkpoint=True: retired once fit() completed

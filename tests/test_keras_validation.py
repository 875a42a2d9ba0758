# PENDING (issue 14, phase 2): these tests target the API planned for items 1-3, 6, 8-11, 13
# (sort="natural", polyak.OrderWarning, pst.load(framework=),
# WeightAveraging(evaluate_with_average=), .applied(), polyak.keras.set_weights) on top of
# issue 10's redesign, which was not merged when this branch ended. They fail on today's
# code by design; pytest does not collect this folder (no test_*.py names). Rename to
# tests/test_*.py when the code lands.
"""WeightAveraging during training on the JAX backend: validation with the average swapped in
(and the training weights back, bit for bit), ``applied()``, and a snapshot-folder average put
back into a model. References: float64 numpy averages of the weights a recorder callback saw,
and a second, identical run without the option.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
keras = pytest.importorskip("keras")

import polyak.keras as pk  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept")


def data() -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).normal(size=(96, 4)).astype("float32")
    return x, (x.sum(1) > 0).astype("float32")


def model() -> keras.Model:
    keras.utils.set_random_seed(0)
    m = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
         keras.layers.BatchNormalization(), keras.layers.Dense(1, activation="sigmoid")]
    )  # fmt: skip
    m.compile("adam", "binary_crossentropy")
    return m


class Recorder(keras.callbacks.Callback):
    """The weights the model has when validation starts, and at each epoch's end."""

    def __init__(self) -> None:
        super().__init__()
        self.at_validation: list[list[np.ndarray]] = []
        self.at_epoch_end: list[list[np.ndarray]] = []

    def on_test_begin(self, logs=None) -> None:
        self.at_validation.append(self.model.get_weights())

    def on_epoch_end(self, epoch, logs=None) -> None:
        self.at_epoch_end.append(self.model.get_weights())


def fit(callbacks: list, epochs: int = 3) -> tuple[keras.Model, keras.callbacks.History]:
    x, y = data()
    m = model()
    history = m.fit(x, y, epochs=epochs, batch_size=16, validation_data=(x, y),
                    callbacks=callbacks, verbose=0)  # fmt: skip
    return m, history


def test_validation_uses_the_average_and_training_resumes_bit_exact() -> None:
    cb = pk.WeightAveraging("equal", evaluate_with_average=True, swap_on_end=False)
    rec = Recorder()
    trained, history = fit([cb, rec])
    plain, _ = fit([])
    # Training was not disturbed: same final weights as a run without the option, bit for bit.
    for a, b in zip(trained.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Each validation saw the float64 mean of the epoch-end weights so far (this epoch's too).
    for epoch, seen in enumerate(rec.at_validation):
        for i, leaf in enumerate(seen):
            mean = np.mean([w[i].astype(np.float64) for w in rec.at_epoch_end[: epoch + 1]], 0)
            np.testing.assert_allclose(leaf, mean, rtol=1e-6, atol=1e-7)
    # The logged val_loss is the average's loss.
    x, y = data()
    check = model()
    check.set_weights(rec.at_validation[-1])
    assert history.history["val_loss"][-1] == pytest.approx(check.evaluate(x, y, verbose=0))


def test_applied_swaps_in_and_back_even_on_error() -> None:
    cb = pk.WeightAveraging("linear", swap_on_end=False)
    m, _ = fit([cb], epochs=2)
    before = m.get_weights()
    with cb.applied():
        for a, b in zip(m.get_weights(), cb.average):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(m.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(RuntimeError, match="boom"), cb.applied():
        raise RuntimeError("boom")
    for a, b in zip(m.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_snapshot_folder_average_goes_back_into_the_model(tmp_path) -> None:
    from safetensors.numpy import load_file

    cb = pk.WeightAveraging("equal", snapshot_dir=tmp_path / "snaps", swap_on_end=False)
    m, _ = fit([cb], epochs=3)
    avg = cb.snapshots.average("linear")
    assert list(avg) != [v.path for v in m.weights]  # a dict by name, not in model order
    pk.set_weights(m, avg)
    files = sorted((tmp_path / "snaps").glob("*.safetensors"))
    snaps = [load_file(str(f)) for f in files]
    assert len(snaps) == 3
    names = [v.path.split("/", 1)[1] for v in m.weights]
    for name, leaf in zip(names, m.get_weights()):
        expected = sum(w * s[name].astype(np.float64) for w, s in zip([1, 2, 3], snaps)) / 6
        np.testing.assert_allclose(leaf, expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(pk.PolyakError, match="missing"):
        pk.set_weights(m, {k: v for k, v in list(avg.items())[1:]})

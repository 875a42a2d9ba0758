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

import polyak  # noqa: E402
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
    cb = pk.WeightAveraging("equal", swap_for_validation=True, swap_on_end=False)
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
    with pytest.raises(polyak.StructureError, match="missing"):
        pk.set_weights(m, {k: v for k, v in list(avg.items())[1:]})


def test_without_the_option_validation_sees_the_training_weights() -> None:
    cb = pk.WeightAveraging("equal", swap_on_end=False)
    rec = Recorder()
    fit([cb, rec], epochs=2)
    for seen, own in zip(rec.at_validation, rec.at_epoch_end):
        for a, b in zip(seen, own):
            np.testing.assert_array_equal(a, b)
    # evaluate() outside fit() is the user's own: not swapped either, even with the option.
    cb2 = pk.WeightAveraging("equal", swap_for_validation=True, swap_on_end=False)
    rec2 = Recorder()
    m, _ = fit([cb2], epochs=2)
    x, y = data()
    m.evaluate(x, y, callbacks=[cb2, rec2], verbose=0)
    for a, b in zip(rec2.at_validation[0], m.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_applied_needs_a_snapshot_and_set_weights_checks_shapes() -> None:
    cb = pk.WeightAveraging("equal")
    with pytest.raises(polyak.PolyakError, match="fit"):
        with cb.applied():
            pass
    m = model()
    names = [v.path.split("/", 1)[1] for v in m.weights]
    weights = dict(zip(names, m.get_weights()))
    weights[names[0]] = np.zeros((1, 1), np.float32)
    with pytest.raises(polyak.ShapeError, match=names[0]):
        pk.set_weights(m, weights)
    with pytest.raises(polyak.PolyakError, match="model.set_weights"):
        pk.set_weights(m, m.get_weights())


def test_keras_extra_installs_the_backend_the_docs_use() -> None:
    """``pip install ".[keras]"`` is enough for the docs' Keras examples: every backend the
    docs set with KERAS_BACKEND is a requirement of the extra."""
    import re
    from pathlib import Path

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parent.parent
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    keras_reqs = {Requirement(r).name for r in extra["optional-dependencies"]["keras"]}
    texts = [p.read_text() for p in (root / "docs").rglob("*.md") if "_build" not in p.parts]
    texts += [p.read_text() for p in (root / "docs").rglob("*.py") if "_build" not in p.parts]
    backends = {b for t in texts for b in re.findall(r"KERAS_BACKEND\W+(\w+)", t)}
    assert backends, "the docs set no KERAS_BACKEND"
    package = {"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}
    assert {package[b] for b in backends} <= keras_reqs | {"keras"}, (backends, keras_reqs)

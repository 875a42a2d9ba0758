"""polyak.keras.greedy_soup on real, trained Keras models (in memory and saved to files)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")  # tensorflow, Keras' default, may be absent
keras = pytest.importorskip("keras")

import polyak  # noqa: E402
import polyak.keras  # noqa: E402
from polyak._errors import PolyakError, ShapeError  # noqa: E402


def _mlp(hidden: int = 16) -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="categorical_crossentropy")
    return model


@pytest.fixture(scope="module")
def fine_tuned():
    from sklearn.datasets import make_blobs

    x, y = make_blobs(n_samples=900, centers=3, n_features=2, cluster_std=2.0, random_state=2)
    x = x.astype(np.float32)
    onehot = keras.utils.to_categorical(y, 3)
    keras.utils.set_random_seed(0)
    base = _mlp()
    base.fit(x[:300], onehot[:300], epochs=30, batch_size=32, verbose=0)
    models = []
    for seed, lr in enumerate([0.05, 0.1, 0.2]):  # fine-tuned on different subsets
        keras.utils.set_random_seed(seed + 1)
        m = keras.models.clone_model(base)
        m.set_weights(base.get_weights())
        m.compile(optimizer=keras.optimizers.SGD(lr), loss="categorical_crossentropy")
        subset = np.random.default_rng(seed).permutation(300)[:200]
        m.fit(x[subset], onehot[subset], epochs=5, batch_size=16, verbose=0)
        models.append(m)
    # A diverged run: its weights blown up far from the basin the others share.
    bad = keras.models.clone_model(base)
    bad.set_weights([w * 0 + np.float32(40.0) * np.sign(w + 1e-3) for w in base.get_weights()])
    models.insert(1, bad)

    x_val, y_val = x[300:], y[300:]

    def accuracy(model) -> float:
        probs = model.predict(x_val, verbose=0, batch_size=600)
        return float(np.mean(np.argmax(probs, axis=1) == y_val))

    return models, accuracy


def test_keras_greedy_soup_leaves_out_the_diverged_model(fine_tuned):
    models, accuracy = fine_tuned
    individual = [accuracy(m) for m in models]
    before = [m.get_weights() for m in models]

    result = polyak.keras.greedy_soup(models, accuracy)

    assert 1 not in result.members
    assert len(result.members) >= 2  # a real soup, not just the best model
    assert result.individual_scores == individual
    assert result.scores[-1] >= max(individual)
    assert isinstance(result.params, keras.Model) and result.params is not models[0]
    assert accuracy(result.params) == result.scores[-1]
    ref = [np.mean([before[i][k] for i in result.members], axis=0) for k in range(4)]
    for got, want in zip(result.params.get_weights(), ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for m, w in zip(models, before, strict=True):  # the candidates are left as they were
        for a, b in zip(m.get_weights(), w, strict=True):
            np.testing.assert_array_equal(a, b)
    uniform = keras.models.clone_model(models[0])
    uniform.set_weights(polyak.keras.average_weights(models))
    assert accuracy(uniform) < result.scores[-1]


def test_keras_greedy_soup_from_files_matches_in_memory(fine_tuned, tmp_path):
    models, accuracy = fine_tuned
    in_memory = polyak.keras.greedy_soup(models, accuracy)
    paths = []
    for i, m in enumerate(models):
        paths.append(tmp_path / f"cand{i}.keras")
        m.save(paths[-1])
    from_files = polyak.keras.greedy_soup(paths, accuracy)
    assert from_files.members == in_memory.members
    assert from_files.scores == in_memory.scores
    for a, b in zip(from_files.params.get_weights(), in_memory.params.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)

    weight_paths = []
    for i, m in enumerate(models):
        weight_paths.append(str(tmp_path / f"cand{i}.weights.h5"))
        m.save_weights(weight_paths[-1])
    with_model = polyak.keras.greedy_soup(weight_paths, accuracy, model=_mlp())
    assert with_model.members == in_memory.members


def test_keras_greedy_soup_bad_input(fine_tuned, tmp_path):
    models, accuracy = fine_tuned
    with pytest.raises(PolyakError, match="mixes models and file paths"):
        polyak.keras.greedy_soup([models[0], tmp_path / "a.keras"], accuracy)
    with pytest.raises(ShapeError, match=r"models_or_paths\[1\]"):
        polyak.keras.greedy_soup([models[0], _mlp(hidden=8)], accuracy)
    with pytest.raises(polyak.keras.ModelFileError, match="weights only"):
        path = tmp_path / "w.weights.h5"
        models[0].save_weights(str(path))
        polyak.keras.greedy_soup([path, path], accuracy)


def test_keras_greedy_soup_accumulate_dtype(fine_tuned):
    models, accuracy = fine_tuned
    result = polyak.keras.greedy_soup(models, accuracy, accumulate_dtype="float64")
    members = [models[i].get_weights() for i in result.members]
    want = polyak.average(members, accumulate_dtype="float64")
    for got, ref in zip(result.params.get_weights(), want, strict=True):
        np.testing.assert_array_equal(got, ref)
    with pytest.raises(polyak.DtypeError, match="accumulate_dtype"):
        polyak.keras.greedy_soup(models, accuracy, accumulate_dtype="int8")

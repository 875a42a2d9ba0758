"""polyak.keras on real Keras 3 models, trained briefly on the JAX backend (CPU).

References are independent of the adapter: ``polyak.average`` on ``get_weights()`` (the
adapter must match it bit for bit), float64 numpy averages, numpy batch statistics, and the
official ``safetensors`` reader for the callback's snapshots.
"""

import gc
import importlib.util
import os
import pathlib
import warnings
import weakref

import numpy as np
import pytest

# Before Keras is imported (a CI matrix may choose another backend by setting it first).
os.environ.setdefault("KERAS_BACKEND", "jax")
keras = pytest.importorskip("keras")

import polyak  # noqa: E402
import polyak.keras as pk  # noqa: E402
from polyak import schedules  # noqa: E402

# Keras' own np.array(variable) calls trip numpy 2's copy-keyword deprecation; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept")

EXAMPLE = pathlib.Path(__file__).parent.parent / "docs" / "examples" / "keras_blobs.py"
SCHEDULES = [None, "linear", schedules.exponential(2.0), [0.5, 0.0, 2.0]]


def make_model(units=8, batchnorm=True, compile=True, head_name=None):
    layers = [keras.Input((4,)), keras.layers.Dense(units, activation="relu")]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.Dense(3, activation="softmax", name=head_name))
    model = keras.Sequential(layers)
    if compile:
        model.compile(
            optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
            loss="categorical_crossentropy",
            metrics=["accuracy"],
        )
    return model


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32") * 2 + 1
    y = keras.utils.to_categorical(rng.integers(0, 3, size=64), 3)
    return x, y


@pytest.fixture(scope="module")
def trained(data):
    """Three models of one architecture, from different seeds, trained two epochs."""
    models = []
    for seed in range(3):
        keras.utils.set_random_seed(seed)
        model = make_model()
        model.fit(*data, epochs=2, batch_size=16, verbose=0)
        models.append(model)
    return models


def weights_of(models):
    return [[np.array(w) for w in m.get_weights()] for m in models]


def float64_average(weight_lists, w):
    w = np.asarray(w, dtype=np.float64) / np.sum(w)
    return [
        np.tensordot(w, np.stack([ws[j] for ws in weight_lists]).astype(np.float64), axes=1)
        for j in range(len(weight_lists[0]))
    ]


def assert_lists_equal(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(a, e)


# --- average_weights / average_models -----------------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_average_weights_equals_core_average(trained, schedule):
    before = weights_of(trained)
    result = pk.average_weights(trained, schedule)
    # kernel, bias, gamma, beta, moving mean and variance (non-trainable), kernel, bias.
    assert len(result) == 8
    assert_lists_equal(result, polyak.average(before, schedule))
    reference = float64_average(before, polyak.weights(schedule, 3))
    for r, ref in zip(result, reference):
        np.testing.assert_allclose(r, ref, rtol=1e-5, atol=1e-6)
    # The inputs are untouched.
    for model, ws in zip(trained, before):
        assert_lists_equal(weights_of([model])[0], ws)


def test_average_weights_averages_batchnorm_statistics(trained):
    means = [keras.ops.convert_to_numpy(m.layers[1].moving_mean) for m in trained]
    assert not np.allclose(means[0], means[1])  # training moved them apart
    averaged = pk.average_weights(trained)
    np.testing.assert_allclose(averaged[4], np.mean(means, axis=0), rtol=1e-6)


def test_average_models_is_a_compiled_clone(trained, data):
    averaged = pk.average_models(trained, "linear")
    assert all(averaged is not m for m in trained)
    assert_lists_equal(weights_of([averaged])[0], pk.average_weights(trained, "linear"))
    assert averaged.compiled
    assert averaged.get_compile_config() == trained[0].get_compile_config()
    assert int(averaged.optimizer.iterations) == 0  # a fresh optimizer
    # Its predictions are those of the averaged weights put into the first model's layers.
    x = data[0][:5]
    expected = _forward_numpy(pk.average_weights(trained, "linear"), x)
    np.testing.assert_allclose(averaged.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-6)
    loss, accuracy = averaged.evaluate(*data, verbose=0)
    assert np.isfinite(loss) and 0.0 <= accuracy <= 1.0


def _forward_numpy(w, x):
    """Dense-relu, BatchNorm (inference), Dense-softmax in float64, from get_weights()."""
    k1, b1, gamma, beta, mean, var, k2, b2 = (np.asarray(a, np.float64) for a in w)
    h = np.maximum(x @ k1 + b1, 0.0)
    h = (h - mean) / np.sqrt(var + 1e-3) * gamma + beta
    z = h @ k2 + b2
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_average_models_of_uncompiled_models_is_uncompiled(data):
    models = [make_model(compile=False) for _ in range(2)]
    averaged = pk.average_models(models)
    assert not averaged.compiled
    assert_lists_equal(weights_of([averaged])[0], polyak.average(weights_of(models)))


def test_one_model_averages_to_itself(trained):
    assert_lists_equal(pk.average_weights(trained[:1], "exponential"), weights_of(trained[:1])[0])


# --- architecture mismatches ----------------------------------------------------------------


def test_different_layer_count_names_model_and_layer(trained):
    other = make_model(batchnorm=False)
    with pytest.raises(polyak.StructureError, match=r"models\[2\] layer 1 .*Dense.*models\[0\]"):
        pk.average_weights([trained[0], trained[1], other])


def test_different_shape_names_model_layer_and_variable(trained):
    wide = make_model(units=9)
    with pytest.raises(polyak.ShapeError) as info:
        pk.average_models([trained[0], wide])
    message = str(info.value)
    assert "models[1] layer 0" in message and "/kernel'" in message
    assert "(4, 9)" in message and "(4, 8)" in message


def test_different_layer_name_is_a_mismatch(trained):
    renamed = make_model(head_name="head")
    with pytest.raises(polyak.StructureError, match=r"models\[1\] layer 2 'head'"):
        pk.average_weights([trained[0], renamed])


def test_fewer_layers_in_the_first_model(trained):
    small = make_model(batchnorm=False)
    with pytest.raises(polyak.StructureError, match=r"models\[1\] layer 1 'batch_normalization"):
        pk.average_weights([small, trained[0]])


def test_bad_model_lists():
    with pytest.raises(polyak.EmptyInputError):
        pk.average_weights([])
    with pytest.raises(polyak.PolyakError, match=r"models\[1\] is a ndarray"):
        pk.average_weights([make_model(), np.zeros(3)])
    with pytest.raises(polyak.PolyakError, match="must be a list"):
        pk.average_models(make_model())
    unbuilt = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(polyak.PolyakError, match=r"models\[0\].*no weights"):
        pk.average_weights([unbuilt, unbuilt])


# --- average_files ----------------------------------------------------------------------------


@pytest.fixture
def live_loads(monkeypatch):
    """Patch keras.saving.load_model to record how many loaded models are alive at each load."""
    real = keras.saving.load_model
    record = {"loads": 0, "alive_at_load": []}
    refs = []

    def load_model(*args, **kwargs):
        gc.collect()
        record["alive_at_load"].append(sum(r() is not None for r in refs))
        model = real(*args, **kwargs)
        record["loads"] += 1
        refs.append(weakref.ref(model))
        return model

    monkeypatch.setattr(keras.saving, "load_model", load_model)
    return record


def save_all(models, folder, suffix):
    paths = []
    for i, model in enumerate(models):
        path = str(folder / f"snapshot_{i}{suffix}")
        if suffix == ".weights.h5":
            model.save_weights(path)
        else:
            model.save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_average_files_equals_core_average_loading_one_at_a_time(
    trained, tmp_path, live_loads, schedule
):
    paths = save_all(trained, tmp_path, ".keras")
    result = pk.average_files(paths, schedule)
    w = polyak.weights(schedule, 3)
    read = int(np.count_nonzero(w[:-1])) + 1  # weight-0 files are skipped, the newest never
    assert live_loads["loads"] == read
    # No earlier model was alive when the next file was read: one model in memory at a time.
    assert live_loads["alive_at_load"] == [0] * read
    assert_lists_equal(weights_of([result])[0], polyak.average(weights_of(trained), schedule))
    assert result.compiled and int(result.optimizer.iterations) == 0


def test_average_files_order_warning_points_at_the_callers_line(trained, tmp_path):
    paths = []
    for i, model in zip((10, 9), trained):
        paths.append(str(tmp_path / f"epoch_{i}.keras"))
        model.save(paths[-1])
    with pytest.warns(polyak.OrderWarning, match="'epoch_10.keras' is given before") as rec:
        pk.average_files(paths)
    order = [w for w in rec if w.category is polyak.OrderWarning]  # keras warns too
    assert [w.filename for w in order] == [__file__]  # not a line inside polyak.keras


def test_average_files_h5(trained, tmp_path):
    paths = save_all(trained, tmp_path, ".h5")
    result = pk.average_files(paths, "linear")
    assert_lists_equal(weights_of([result])[0], polyak.average(weights_of(trained), "linear"))


def test_average_files_weights_only_into_a_model(trained, tmp_path, live_loads):
    paths = save_all(trained, tmp_path, ".weights.h5")
    template = make_model()
    before = weights_of([template])[0]
    result = pk.average_files(paths, "exponential", model=template)
    assert live_loads["loads"] == 0  # weights are loaded into one clone of the template
    assert result is not template
    assert result.get_compile_config() == template.get_compile_config()
    assert_lists_equal(weights_of([template])[0], before)
    expected = polyak.average(weights_of(trained), "exponential")
    assert_lists_equal(weights_of([result])[0], expected)


def test_weight_zero_files_are_not_read(trained, tmp_path):
    paths = save_all(trained, tmp_path, ".keras")
    (tmp_path / "broken.keras").write_bytes(b"not a zip file")
    paths = [str(tmp_path / "broken.keras")] + paths
    result = pk.average_files(paths, schedules.tail(2))
    expected = polyak.average(weights_of(trained[1:]))
    assert_lists_equal(weights_of([result])[0], expected)


def test_accumulate_dtype_reaches_every_averaging_api(trained, tmp_path, live_loads):
    before = weights_of(trained)
    wide = polyak.average(before, "linear", accumulate_dtype="float64")
    narrow = polyak.average(before, "linear")
    # float64 accumulation rounds differently somewhere, so ignoring it would show.
    assert any(not np.array_equal(a, b) for a, b in zip(wide, narrow))
    got = pk.average_weights(trained, "linear", accumulate_dtype="float64")
    assert_lists_equal(got, wide)
    model = pk.average_models(trained, "linear", accumulate_dtype="float64")
    assert_lists_equal(weights_of([model])[0], wide)
    paths = save_all(trained, tmp_path, ".keras")
    model = pk.average_files(paths, "linear", accumulate_dtype="float64")
    assert_lists_equal(weights_of([model])[0], wide)
    loads = live_loads["loads"]
    with pytest.raises(polyak.DtypeError, match="accumulate_dtype"):
        pk.average_files(paths, "linear", accumulate_dtype="int32")
    assert live_loads["loads"] == loads  # refused before any file is read
    with pytest.raises(polyak.DtypeError, match="accumulate_dtype"):
        pk.average_weights(trained, accumulate_dtype="foo")


def test_average_files_errors(trained, tmp_path):
    paths = save_all(trained[:2], tmp_path, ".keras")
    with pytest.raises(polyak.EmptyInputError):
        pk.average_files([])
    with pytest.raises(pk.ModelFileError, match=r"paths\[1\] .*missing\.keras.* does not exist"):
        pk.average_files([paths[0], str(tmp_path / "missing.keras")])
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(pk.ModelFileError, match=r"paths\[2\] .*not a \.keras, \.h5"):
        pk.average_files(paths + [str(tmp_path / "model.pt")])
    trained[0].save_weights(tmp_path / "w.weights.h5")
    with pytest.raises(pk.ModelFileError, match=r"paths\[0\] .*weights only: pass model="):
        pk.average_files([str(tmp_path / "w.weights.h5")])
    (tmp_path / "broken.keras").write_bytes(b"not a zip file")
    with pytest.raises(pk.ModelFileError, match=r"paths\[1\] .*broken\.keras.*could not load"):
        pk.average_files([paths[0], str(tmp_path / "broken.keras")])
    wide = make_model(units=9, compile=False)
    wide.save(tmp_path / "wide.keras")
    with pytest.raises(polyak.ShapeError, match=r"paths\[2\] .*wide\.keras.* layer 0"):
        pk.average_files(paths + [str(tmp_path / "wide.keras")])
    with (
        pytest.raises(pk.ModelFileError, match=r"paths\[1\] .*wide\.keras.*could not load"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")  # Keras also warns about the file's missing optimizer
        pk.average_files([paths[0], str(tmp_path / "wide.keras")], model=trained[0])


# --- update_batchnorm --------------------------------------------------------------------------


def _bn_inputs(model, x):
    """What the BatchNormalization layer sees: Dense + relu in float64, from the weights."""
    kernel, bias = (np.asarray(a, np.float64) for a in model.layers[0].get_weights())
    return np.maximum(x.astype(np.float64) @ kernel + bias, 0.0)


@pytest.mark.parametrize("batch_size", [64, 16, 20])
def test_update_batchnorm_sets_data_statistics(trained, data, batch_size):
    model = pk.average_models(trained)
    bn = model.layers[1]
    bn.moving_mean.assign(np.full(8, 5.0, "float32"))
    bn.moving_variance.assign(np.full(8, 7.0, "float32"))
    x = data[0]
    assert pk.update_batchnorm(model, x, batch_size=batch_size) == 1
    h = _bn_inputs(model, x)
    batches = [h[i : i + batch_size] for i in range(0, len(h), batch_size)]
    sizes = np.array([len(b) for b in batches], np.float64)
    expected_var = sum(s * b.var(axis=0) for s, b in zip(sizes, batches)) / sizes.sum()
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(bn.moving_mean), h.mean(axis=0), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(bn.moving_variance), expected_var, rtol=1e-4, atol=1e-5
    )
    assert bn.momentum == 0.99  # restored
    # The other weights are untouched.
    for a, b in zip(model.layers[0].get_weights(), pk.average_weights(trained)[:2]):
        np.testing.assert_array_equal(a, b)


def test_update_batchnorm_without_batchnorm_changes_nothing(data):
    model = make_model(batchnorm=False)
    before = weights_of([model])[0]
    assert pk.update_batchnorm(model, data[0]) == 0
    assert_lists_equal(weights_of([model])[0], before)


def test_update_batchnorm_restores_momentum_on_error(trained):
    model = pk.average_models(trained)
    with pytest.raises(ValueError):  # Keras' own error: 5 features for an input of 4
        pk.update_batchnorm(model, np.zeros((10, 5), "float32"))
    assert model.layers[1].momentum == 0.99


def test_update_batchnorm_bad_input(trained):
    model = trained[0]
    with pytest.raises(polyak.PolyakError, match="batch_size=0"):
        pk.update_batchnorm(model, np.zeros((4, 4)), batch_size=0)
    with pytest.raises(polyak.EmptyInputError):
        pk.update_batchnorm(model, np.zeros((0, 4)))
    with pytest.raises(polyak.PolyakError, match="different numbers of samples"):
        pk.update_batchnorm(model, [np.zeros((4, 4)), np.zeros((3, 4))])
    with pytest.raises(polyak.PolyakError, match="not a keras.Model"):
        pk.update_batchnorm("model", np.zeros((4, 4)))


# --- the tutorial example -----------------------------------------------------------------------


def test_blobs_example_runs_shortened(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("keras_blobs", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "plot.png"
    rows = example.main(["--epochs", "12", "--out", str(out)])
    assert [row["n"] for row in rows] == list(range(1, 11))
    for row in rows:
        for name in ("single", "equal", "linear", "exponential"):
            assert 0.0 <= row[name] <= 1.0
    # An average of one model is that model.
    assert rows[0]["equal"] == rows[0]["linear"] == rows[0]["exponential"] == rows[0]["single"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["n", "single", "equal", "linear", "exponential"]
    assert len(printed) == 12  # header, 10 rows, where the plot went


# --- WeightAveraging ----------------------------------------------------------------------------


def snapshot_names(model):
    return [v.path.removeprefix(model.name + "/") for v in model.weights]


def read_snapshots(folder, model):
    """The callback's snapshot files, oldest first, read with the official safetensors reader."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    paths = sorted(pathlib.Path(folder).glob("*.safetensors"))
    names = snapshot_names(model)
    snapshots = [[load_file(p)[name] for name in names] for p in paths]
    metadata = []
    for p in paths:
        with safe_open(p, "np") as f:
            metadata.append(f.metadata())
    return snapshots, metadata


def fit_with(callback, data, epochs, seed=0):
    """Train a fresh model with ``callback``; also return its weights just before the swap."""
    keras.utils.set_random_seed(seed)
    model = make_model()
    raw = {}
    grab = keras.callbacks.LambdaCallback(
        on_train_end=lambda logs: raw.setdefault("weights", weights_of([model])[0])
    )
    model.fit(*data, epochs=epochs, batch_size=16, verbose=0, callbacks=[grab, callback])
    return model, raw["weights"]


@pytest.mark.parametrize("schedule", ["equal", "linear", schedules.ema(0.6)], ids=repr)
def test_callback_average_equals_average_of_its_snapshots(data, tmp_path, schedule):
    callback = pk.WeightAveraging(schedule, start_epoch=2, snapshot_dir=tmp_path)
    model, trained = fit_with(callback, data, epochs=5)
    snapshots, metadata = read_snapshots(tmp_path, model)
    assert len(snapshots) == callback.count == 3
    assert [m["epoch"] for m in metadata] == ["2", "3", "4"]
    # The newest snapshot is the weights training ended with.
    assert_lists_equal(snapshots[-1], trained)
    swapped = weights_of([model])[0]
    # Online folding and the batch average agree up to float32 rounding.
    expected = polyak.average(snapshots, schedule)
    for got, want in zip(swapped, expected):
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
    assert not all(np.array_equal(a, b) for a, b in zip(swapped, trained))
    assert_lists_equal(callback.average, swapped)


def test_callback_accumulate_dtype(data, tmp_path):
    callback = pk.WeightAveraging(
        "linear", snapshot_dir=tmp_path, accumulate_dtype="float64", swap_on_end=False
    )
    model, _ = fit_with(callback, data, epochs=4)
    snapshots, _ = read_snapshots(tmp_path, model)
    wide = polyak.average(snapshots, "linear", accumulate_dtype="float64")
    # The float32 online fold and a float64 one round differently somewhere: the callback
    # must have used float64, and equal a float64 batch average to float64 rounding.
    for got, want in zip(callback.average, wide):
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=0)
    narrow = pk.WeightAveraging("linear", snapshot_dir=tmp_path / "n", swap_on_end=False)
    fit_with(narrow, data, epochs=4)
    with pytest.raises(polyak.DtypeError, match="accumulate_dtype"):
        pk.WeightAveraging("equal", accumulate_dtype="int32")


def test_callback_every_batch(data, tmp_path):
    callback = pk.WeightAveraging(
        schedules.ema(0.5), start_epoch=1, every="batch", snapshot_dir=tmp_path
    )
    model, trained = fit_with(callback, data, epochs=2)
    snapshots, metadata = read_snapshots(tmp_path, model)
    assert callback.count == len(snapshots) == 4  # 64 samples in batches of 16, epoch 1 only
    assert [(m["epoch"], m["batch"]) for m in metadata] == [("1", str(b)) for b in range(4)]
    # Mid-epoch snapshots are the weights after each step, not stale ones.
    assert not any(np.array_equal(snapshots[0][0], s[0]) for s in snapshots[1:])
    assert_lists_equal(snapshots[-1], trained)
    expected = polyak.average(snapshots, schedules.ema(0.5))
    for got, want in zip(weights_of([model])[0], expected):
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)


def test_callback_every_epoch_leaves_batch_hooks_asynchronous():
    # Keras dispatches batch-end hooks in a background thread (on thread-safe backends)
    # unless a callback overrides on_train_batch_end without being async_safe. Per epoch the
    # callback's batch hook does nothing and must not make every training step wait; per
    # batch it reads the weights, so it must run in step with training.
    model = make_model()
    per_epoch = keras.callbacks.CallbackList([pk.WeightAveraging("equal")], model=model)
    per_batch = keras.callbacks.CallbackList(
        [pk.WeightAveraging("equal", every="batch")], model=model
    )
    assert per_epoch._async_train
    assert not per_batch._async_train


def test_callback_schedule_without_online_form_uses_snapshots(data, tmp_path):
    callback = pk.WeightAveraging(schedules.tail(2), snapshot_dir=tmp_path, keep=2)
    assert callback.averager is None
    model, _ = fit_with(callback, data, epochs=4)
    snapshots, _ = read_snapshots(tmp_path, model)
    assert len(snapshots) == 2 and callback.count == 4
    assert_lists_equal(weights_of([model])[0], polyak.average(snapshots))


def test_callback_without_swap_leaves_the_model(data):
    callback = pk.WeightAveraging("equal", start_epoch=1, swap_on_end=False)
    model, trained = fit_with(callback, data, epochs=3)
    assert_lists_equal(weights_of([model])[0], trained)
    assert callback.count == 2
    assert not all(np.array_equal(a, b) for a, b in zip(callback.average, trained))


def test_callback_that_took_no_snapshot(data):
    callback = pk.WeightAveraging("equal", start_epoch=10)
    model, trained = fit_with(callback, data, epochs=2)
    assert_lists_equal(weights_of([model])[0], trained)
    with pytest.raises(polyak.EmptyInputError, match="start_epoch=10"):
        _ = callback.average


def test_callback_bad_arguments(tmp_path):
    with pytest.raises(polyak.NoOnlineFormError, match="snapshot_dir"):
        pk.WeightAveraging(schedules.tail(3))
    with pytest.raises(polyak.PolyakError, match="every='step'"):
        pk.WeightAveraging("equal", every="step")
    with pytest.raises(polyak.PolyakError, match="start_epoch=-1"):
        pk.WeightAveraging("equal", start_epoch=-1)
    with pytest.raises(polyak.PolyakError, match="keep=3 needs a snapshot_dir"):
        pk.WeightAveraging("equal", keep=3)
    with pytest.raises(polyak.ScheduleError):
        pk.WeightAveraging("no-such-schedule")
    polyak.SnapshotDir(tmp_path).save({"w": np.zeros(2)}, 0)
    with pytest.raises(polyak.PolyakError, match="already holds 1 snapshots"):
        pk.WeightAveraging("equal", snapshot_dir=tmp_path)


def test_callback_is_a_keras_callback():
    assert issubclass(pk.WeightAveraging, keras.callbacks.Callback)
    assert pk.WeightAveraging.__module__ == "polyak.keras"
    assert "WeightAveraging" in pk.__all__


def test_importing_polyak_does_not_import_keras_but_the_adapter_does():
    # As safetensors.torch imports torch: polyak.keras is the Keras adapter, loaded eagerly
    # once the user asks for it; the core stays framework-free.
    import subprocess
    import sys

    code = (
        "import sys, polyak; print('keras' in sys.modules); "
        "import polyak.keras; print('keras' in sys.modules)"
    )
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).parent.parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]

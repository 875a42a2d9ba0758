"""Average Keras 3 models, saved model files and the weights seen during ``fit()``.

The ``[keras]`` extra. Works with any Keras 3 backend (JAX, TensorFlow, PyTorch): weights are
read with ``get_weights()``, averaged by :func:`polyak.average` in numpy and written back with
``set_weights()``, so the arithmetic is the core's, bit for bit.

Keras itself is imported on first use, not at ``import polyak.keras``: importing Keras picks
and initialises a backend, which a user may still be configuring (``KERAS_BACKEND``).

Models are matched layer by layer, in order, the way ``set_weights`` matches them. Layer names
may differ by Keras' automatic numbering (``dense`` and ``dense_3`` are both "dense"), so that
two models built by the same function average without renaming; layer types, base names,
variable names and shapes must agree, and a mismatch names the layer and the model.
"""

from __future__ import annotations

import gc
import os
import re
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import optree

from polyak import _kernel
from polyak._average import average as _average
from polyak._average import weights as _weights
from polyak._errors import DtypeError, EmptyInputError, PolyakError, ShapeError, StructureError

if TYPE_CHECKING:
    import keras

    from polyak.soup import SoupResult

__all__ = [
    "ModelFileError",
    "average_weights",
    "average_models",
    "average_files",
    "update_batchnorm",
    "WeightAveraging",  # noqa: F822 (made on first access, by __getattr__ below)
    "greedy_soup",
]

PathLike = str | os.PathLike


class ModelFileError(PolyakError):
    """A model file that is missing, of an unknown kind, or that Keras cannot load."""


def _keras() -> ModuleType:
    import keras  # noqa: PLC0415 (imported on first use, see the module docstring)

    return keras


# --- architecture checks ---------------------------------------------------------------


class _Layer(NamedTuple):
    name: str
    kind: str
    variables: tuple[tuple[str, tuple[int, ...], str, str], ...]  # name, shape, dtype, path


class _Layout(NamedTuple):
    """A model's architecture as plain data, so it outlives the model it describes."""

    layers: tuple[_Layer, ...]
    count: int  # number of variables get_weights() returns


def _base_name(name: str) -> str:
    # Keras numbers repeated default names: "dense", "dense_1", "dense_2" are one name.
    return re.sub(r"_\d+$", "", name)


def _variable(v: Any) -> tuple[str, tuple[int, ...], str, str]:
    # The path ("block/dense_2/kernel") is only shown: it holds auto-numbered layer names.
    return (v.name, tuple(int(d) for d in v.shape), str(v.dtype), v.path)


def _layout(model: Any, label: str) -> _Layout:
    keras = _keras()
    if not isinstance(model, keras.Model):
        raise PolyakError(f"{label} is a {type(model).__name__}, not a keras.Model")
    if not model.weights:
        raise PolyakError(
            f"{label} ({model.name!r}) has no weights: build it first (call it on a batch, "
            "or model.build(input_shape))"
        )
    layers = tuple(
        _Layer(layer.name, type(layer).__name__, tuple(_variable(v) for v in layer.weights))
        for layer in model.layers
    )
    # len(model.weights) also counts variables a subclassed model holds outside its layers.
    return _Layout(layers, len(model.weights))


def _describe(layer: _Layer, position: int) -> str:
    return f"layer {position} {layer.name!r} ({layer.kind})"


def _check_layout(layout: _Layout, label: str, ref: _Layout, ref_label: str) -> None:
    """Raise a :class:`PolyakError` naming the first layer where ``layout`` leaves ``ref``."""
    for position, (mine, theirs) in enumerate(zip(layout.layers, ref.layers)):
        here = f"{label} {_describe(mine, position)}"
        there = f"{ref_label} {_describe(theirs, position)}"
        if mine.kind != theirs.kind or _base_name(mine.name) != _base_name(theirs.name):
            raise StructureError(f"{here} does not match {there}")
        names = [v[0] for v in mine.variables]
        ref_names = [v[0] for v in theirs.variables]
        if names != ref_names:
            missing = sorted(set(ref_names) - set(names))
            unexpected = sorted(set(names) - set(ref_names))
            detail = (
                f"missing {missing}, unexpected {unexpected}"
                if missing or unexpected
                else (f"variables in order {names}, expected {ref_names}")
            )
            raise StructureError(f"{here} has other variables than {there}: {detail}")
        for (_, shape, dtype, path), (_, ref_shape, ref_dtype, _) in zip(
            mine.variables, theirs.variables
        ):
            if shape != ref_shape:
                raise ShapeError(
                    f"{here} variable {path!r} has shape {shape}, {there} has {ref_shape}"
                )
            if dtype != ref_dtype:
                raise DtypeError(
                    f"{here} variable {path!r} has dtype {dtype}, {there} has {ref_dtype}"
                )
    if len(layout.layers) != len(ref.layers):
        longer, extra = (
            (label, layout.layers)
            if len(layout.layers) > len(ref.layers)
            else (ref_label, ref.layers)
        )
        first = min(len(layout.layers), len(ref.layers))
        raise StructureError(
            f"{label} has {len(layout.layers)} layers but {ref_label} has {len(ref.layers)}: "
            f"{longer} has the extra {_describe(extra[first], first)}"
        )
    if layout.count != ref.count:
        raise StructureError(
            f"{label} has {layout.count} weight arrays but {ref_label} has {ref.count}"
        )


def _check_all(models: Sequence[Any], name: str) -> _Layout:
    ref = _layout(models[0], f"{name}[0]")
    for i, model in enumerate(models[1:], 1):
        _check_layout(_layout(model, f"{name}[{i}]"), f"{name}[{i}]", ref, f"{name}[0]")
    return ref


def _nonempty(items: Any, name: str) -> list[Any]:
    if isinstance(items, (str, os.PathLike)) or not isinstance(items, Iterable):
        raise PolyakError(f"{name} must be a list, got a single {type(items).__name__}")
    items = list(items)
    if not items:
        raise EmptyInputError(f"{name} is empty: nothing to average")
    return items


def _empty_copy(model: Any, label: str) -> Any:
    """A clone of ``model``'s architecture, compiled like ``model`` when it is compiled."""
    keras = _keras()
    clone = keras.models.clone_model(model)
    if len(clone.weights) != len(model.weights):
        raise PolyakError(
            f"keras.models.clone_model({label}) made a model with {len(clone.weights)} weight "
            f"arrays instead of {len(model.weights)}: give the model an Input (or implement "
            "get_config/from_config for a subclassed model) so it can be cloned built"
        )
    if model.compiled:
        # A fresh optimizer: the snapshots' optimizer states do not belong to their average.
        clone.compile_from_config(model.get_compile_config())
    return clone


# --- averaging models in memory ----------------------------------------------------------


def average_weights(models: Sequence[keras.Model], schedule: Any = None) -> list[np.ndarray]:
    """Average the weights of models of one architecture, as numpy arrays.

    All variables are averaged, the non-trainable ones (BatchNormalization moving statistics)
    included, with :func:`polyak.average` (float weights accumulate in float32 or float64 and
    are rounded once; integer variables are taken from the newest model).

    Args:
        models: Keras models of the same architecture, oldest first.
        schedule: Anything :func:`polyak.schedules.resolve` takes (``None`` or ``"equal"``
            for the plain mean, ``"linear"``, ``polyak.schedules.exponential(2.0)``, a list of
            weights...).

    Returns:
        The averaged weights, in ``model.get_weights()`` order, ready for ``set_weights``.

    Raises:
        EmptyInputError: ``models`` is empty.
        StructureError: the models' layers or variables differ (the message names the layer
            and the model index); ``ShapeError`` / ``DtypeError`` for a variable's shape or
            dtype.
        ScheduleError, WeightsError: a bad schedule.

    Example:
        >>> weights = polyak.keras.average_weights([model_a, model_b])  # doctest: +SKIP
        >>> model_a.set_weights(weights)  # doctest: +SKIP
    """
    models = _nonempty(models, "models")
    _check_all(models, "models")
    return list(_average([model.get_weights() for model in models], schedule))


def average_models(models: Sequence[keras.Model], schedule: Any = None) -> keras.Model:
    """A new model holding the average of ``models``' weights.

    The new model is ``keras.models.clone_model(models[0])``, compiled with the first model's
    compile config (a fresh optimizer) when the first model is compiled. The inputs are left
    unchanged.

    Args:
        models: Keras models of the same architecture, oldest first.
        schedule: As for :func:`average_weights`.

    Returns:
        The averaged model.

    Raises:
        As :func:`average_weights`; ``PolyakError`` if the first model cannot be cloned built.

    Example:
        >>> soup = polyak.keras.average_models(members[-5:], "linear")  # doctest: +SKIP
        >>> soup.evaluate(x_test, y_test)  # doctest: +SKIP
    """
    models = _nonempty(models, "models")
    averaged = average_weights(models, schedule)
    clone = _empty_copy(models[0], "models[0]")
    clone.set_weights(averaged)
    return clone


# --- averaging model files, one at a time -------------------------------------------------


class _RunningSum:
    """``sum_i w_i * x_i`` over weight lists fed one at a time, with the core's kernel.

    Per element this is :func:`polyak.average`'s computation in the same order (the weights
    split into coefficients and one divisor by the kernel, weight-0 snapshots skipped, the
    first one assigned, the rest added, one division at the end), hence equal bit for bit.
    Variables may come one at a time from an iterator, so that no full numpy copy of a model
    is ever held besides the sums.
    """

    def __init__(self, divisor: float) -> None:
        self.divisor = divisor
        self.started = False  # a nonzero-weight snapshot has been assigned
        self.dtypes: list[np.dtype] = []
        self.sums: list[np.ndarray | None] = []
        self.newest: list[np.ndarray | None] = []  # int/bool variables: the newest is kept
        self.scratch: dict[np.dtype, np.ndarray] = {}  # one per dtype, largest variable's size

    def add(self, leaves: Iterable[np.ndarray], w: float) -> None:
        for j, x in enumerate(leaves):
            x = np.asarray(x)
            if j == len(self.sums):
                self._allocate(x)
            acc = self.sums[j]
            if acc is None:
                self.newest[j] = np.array(x, copy=True)
            elif w != 0:
                scratch = self.scratch[acc.dtype][: acc.size].reshape(acc.shape)
                _kernel.accumulate(acc, x, w, scratch, first=not self.started)
        self.started = self.started or w != 0

    def _allocate(self, x: np.ndarray) -> None:
        self.dtypes.append(x.dtype)
        self.newest.append(None)
        if _kernel.dtype_kind(x.dtype) not in ("float", "complex"):
            self.sums.append(None)
            return
        acc = np.empty(x.shape, _kernel.accumulator_dtype(x.dtype))
        self.sums.append(acc)
        if self.scratch.get(acc.dtype, np.empty(0)).size < acc.size:
            self.scratch[acc.dtype] = np.empty(acc.size, acc.dtype)

    def result(self) -> list[np.ndarray]:
        self.scratch.clear()
        out = []
        for acc, newest, dtype in zip(self.sums, self.newest, self.dtypes):
            if acc is None:
                out.append(newest)
                continue
            # float32/float64 variables are divided in place, as polyak.average does.
            final = acc if acc.dtype == dtype else np.empty(acc.shape, dtype)
            _kernel.finalize(acc, final, self.divisor)
            out.append(final)
        return out


def _check_files(paths: list[str], with_model: bool) -> None:
    for i, path in enumerate(paths):
        if not os.path.isfile(path):
            raise ModelFileError(f"paths[{i}] {path!r} does not exist or is not a file")
        if path.endswith(".weights.h5"):
            if not with_model:
                raise ModelFileError(
                    f"paths[{i}] {path!r} holds weights only: pass model=, a model of the "
                    "same architecture, to load it into"
                )
        elif not path.endswith((".keras", ".h5")):
            raise ModelFileError(f"paths[{i}] {path!r} is not a .keras, .h5 or .weights.h5 file")


def _load(path: str, holder: Any, label: str, *, compile: bool) -> Any:
    keras = _keras()
    try:
        if holder is not None:
            holder.load_weights(path)
            return holder
        return keras.saving.load_model(path, compile=compile)
    except Exception as error:  # Keras raises many kinds; add the file to whichever it is.
        raise ModelFileError(
            f"{label}: Keras could not load it: {type(error).__name__}: {error}"
        ) from error


def average_files(
    paths: Sequence[PathLike], schedule: Any = None, *, model: keras.Model | None = None
) -> keras.Model:
    """Average saved Keras models, loading one file at a time.

    Memory holds the running weighted sum and one model, never all the snapshots: each file is
    loaded, added to the sum and released before the next one is read. Files the schedule
    gives weight 0 (``tail``, ``swa``) are not read, except the newest. The arithmetic is the
    core kernel's, so the result equals :func:`polyak.average` of the files' weights bit for
    bit (integer variables come from the newest file, its default ``int_policy="last"``).

    Args:
        paths: ``.keras`` or ``.h5`` model files, or ``.weights.h5`` weight files, oldest
            first.
        schedule: As for :func:`average_weights` (weights for ``len(paths)`` snapshots).
        model: A built model of the files' architecture. Needed for ``.weights.h5`` files;
            when given, every file is loaded into a clone of it with ``load_weights`` (cheaper
            than rebuilding each model). ``model`` itself is left unchanged.

    Returns:
        A model holding the averaged weights: the clone of ``model``, or else the model of the
        newest file, compiled from that file's compile config with a fresh optimizer.

    Raises:
        EmptyInputError: ``paths`` is empty.
        ModelFileError: a file is missing, of another kind, or cannot be loaded (the message
            names ``paths[i]``), or a ``.weights.h5`` file is given without ``model``.
        StructureError, ShapeError, DtypeError: a file's architecture differs from the first
            one's (the message names the layer and ``paths[i]``).

    Example:
        >>> paths = sorted(glob.glob("checkpoints/epoch_*.keras"))  # doctest: +SKIP
        >>> model = polyak.keras.average_files(paths[-10:], "exponential")  # doctest: +SKIP
    """
    paths = [os.fspath(p) for p in _nonempty(paths, "paths")]
    _check_files(paths, model is not None)
    coefficients, divisor = _kernel.split_weights(_weights(schedule, len(paths)))
    total = _RunningSum(divisor)
    ref = None if model is None else _layout(model, "model")
    holder = None if model is None else _empty_copy(model, "model")
    ref_label = "model"
    current = None
    last = len(paths) - 1
    for i, path in enumerate(paths):
        if coefficients[i] == 0 and i != last:
            continue  # as in polyak.average, a weight-0 snapshot is never read
        label = f"paths[{i}] {path!r}"
        if holder is None and current is not None:
            # Release the previous model before reading the next: Keras models hold
            # reference cycles, so dropping the name alone would not free them yet.
            del current
            gc.collect()
        current = _load(path, holder, label, compile=i == last)
        layout = _layout(current, label)
        if ref is None:
            ref, ref_label = layout, label
        else:
            _check_layout(layout, label, ref, ref_label)
        # One variable at a time: no numpy copy of the whole model.
        total.add((v.numpy() for v in current.weights), float(coefficients[i]))
    current.set_weights(total.result())
    if current.compiled:
        # Loading restored the newest snapshot's optimizer state; it does not belong to the
        # average.
        current.compile_from_config(current.get_compile_config())
    return current


# --- BatchNormalization statistics ---------------------------------------------------------


def _batchnorm_layers(model: Any) -> list[Any]:
    keras = _keras()
    # _flatten_layers is Keras' own recursive walk (it reaches layers nested inside custom
    # layers, which model.layers does not list); there is no public equivalent.
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]


def update_batchnorm(model: keras.Model, x: Any, batch_size: int = 32) -> int:
    """Recompute BatchNormalization moving statistics for the weights the model holds now.

    An average of weights is not matched by the average of the snapshots' moving statistics,
    so, as torch's ``torch.optim.swa_utils.update_bn`` does, this runs the data forward in
    training mode and sets every BatchNormalization layer's ``moving_mean`` and
    ``moving_variance`` to the batch statistics averaged over all batches, weighted by batch
    size: ``moving_mean`` becomes the mean of the layer's inputs over ``x``, and
    ``moving_variance`` the size-weighted mean of the per-batch (biased) variances. Each
    layer's ``momentum`` is restored afterwards, also on error.

    .. note::
        Like ``update_bn``, the passes run the whole model with ``training=True``: Dropout
        layers drop while the statistics are gathered. BatchNormalization layers with
        ``trainable=False`` are frozen in Keras (they always run in inference mode) and are
        left unchanged.

    Args:
        model: A built Keras model.
        x: Inputs: an array, or a list/dict of arrays for a multi-input model, with samples
            along the first axis (no targets).
        batch_size: Samples per forward pass, > 0.

    Returns:
        The number of BatchNormalization layers updated (0 when the model has none, which
        changes nothing).

    Raises:
        PolyakError: ``model`` is not a Keras model, ``batch_size`` is not a positive
            integer, or the input arrays have different lengths.
        EmptyInputError: ``x`` has no samples.

    Example:
        >>> swa_model = polyak.keras.average_models(snapshots)  # doctest: +SKIP
        >>> polyak.keras.update_batchnorm(swa_model, x_train)  # doctest: +SKIP
    """
    keras = _keras()
    if not isinstance(model, keras.Model):
        raise PolyakError(f"model is a {type(model).__name__}, not a keras.Model")
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or (batch_size <= 0)
    ):
        raise PolyakError(f"batch_size must be a positive integer, got batch_size={batch_size!r}")
    arrays, spec = optree.tree_flatten(x)
    arrays = [np.asarray(a) for a in arrays]
    if not arrays or arrays[0].ndim == 0:
        raise PolyakError("x must be an array (or a list/dict of arrays) of samples")
    size = len(arrays[0])
    if any(a.ndim == 0 or len(a) != size for a in arrays):
        lengths = [len(a) if a.ndim else None for a in arrays]
        raise PolyakError(f"the arrays in x have different numbers of samples: {lengths}")
    if size == 0:
        raise EmptyInputError("x has no samples: nothing to compute the statistics from")
    layers = _batchnorm_layers(model)
    momenta = [layer.momentum for layer in layers]
    try:
        seen = 0
        for start in range(0, size if layers else 0, batch_size):
            batch = [a[start : start + batch_size] for a in arrays]
            # moving = momentum * moving + (1 - momentum) * batch_stat; this momentum makes
            # the result the size-weighted mean of all batch statistics so far (0 first).
            momentum = seen / (seen + len(batch[0]))
            for layer in layers:
                layer.momentum = momentum
            model(optree.tree_unflatten(spec, batch), training=True)
            seen += len(batch[0])
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return len(layers)


# --- greedy soups ----------------------------------------------------------------------------


def greedy_soup(
    models_or_paths: Sequence[keras.Model | PathLike],
    evaluate: Callable[[keras.Model], float],
    *,
    higher_is_better: bool = True,
    model: keras.Model | None = None,
) -> SoupResult:
    """Greedy model soup of Keras models or saved model files (Wortsman et al., 2022).

    :func:`polyak.soup.greedy` for Keras: each candidate is scored alone, then, best first,
    each joins the soup if the uniform average of the soup with it scores at least as well.
    ``evaluate`` receives a model holding the weights to score (one model, reused: its
    weights are replaced before each call), e.g. ``lambda m: m.evaluate(x_val, y_val)[1]``.
    Files are loaded one at a time; memory holds the running sum of the soup, the model
    being scored and one loaded candidate.

    Args:
        models_or_paths: Keras models of one architecture, or ``.keras``/``.h5`` model files
            (``.weights.h5`` weight files with ``model=``); not a mix of both.
        evaluate: The held-out metric of a model, ``evaluate(model) -> float``.
        higher_is_better: ``False`` for a loss.
        model: For files, a built model of their architecture: each file is loaded into a
            clone of it with ``load_weights`` (needed for ``.weights.h5`` files).

    Returns:
        A :class:`polyak.soup.SoupResult` whose ``params`` is a new model holding the soup
        (a clone of the first model, or of ``model``, or the first file's model), compiled
        like it when it is compiled; ``members`` index ``models_or_paths``.

    Raises:
        EmptyInputError: nothing given.
        ModelFileError: a file is missing, of another kind, or cannot be loaded.
        StructureError, ShapeError, DtypeError: an architecture differs from the first one
            (the message names the layer and the candidate).
        PolyakError: a mix of models and paths, or ``evaluate`` did not return a number.

    Example:
        >>> result = polyak.keras.greedy_soup(  # doctest: +SKIP
        ...     fine_tuned_models, lambda m: m.evaluate(x_val, y_val, verbose=0)[1]
        ... )
        >>> result.members, result.scores[-1]  # doctest: +SKIP
        >>> result.params.save("soup.keras")  # doctest: +SKIP
    """
    from polyak import soup as _soup

    items = _nonempty(models_or_paths, "models_or_paths")
    is_path = [isinstance(item, (str, os.PathLike)) for item in items]
    if any(is_path) and not all(is_path):
        raise PolyakError(
            "models_or_paths mixes models and file paths; give only models or only paths"
        )
    if all(is_path):
        paths = [os.fspath(p) for p in items]
        _check_files(paths, model is not None)
        loader = None if model is None else _empty_copy(model, "model")
        ref = None if model is None else _layout(model, "model")
        ref_label = "model"
        holder = None if model is None else _empty_copy(model, "model")

        def load_weights(i: int) -> list[np.ndarray]:
            nonlocal ref, ref_label, holder
            label = f"models_or_paths[{i}] {paths[i]!r}"
            current = _load(paths[i], loader, label, compile=holder is None)
            layout = _layout(current, label)
            if ref is None:
                ref, ref_label = layout, label
            else:
                _check_layout(layout, label, ref, ref_label)
            weights = current.get_weights()
            if holder is None:
                holder = current  # the first file's model, compiled, scores the soup
            elif current is not loader:
                # Keras models hold reference cycles: free this one before the next load.
                del current
                gc.collect()
            return weights

    else:
        _check_all(items, "models_or_paths")
        holder = _empty_copy(items[0], "models_or_paths[0]")

        def load_weights(i: int) -> list[np.ndarray]:
            return items[i].get_weights()

    def load(i: int) -> tuple[list[np.ndarray], Any]:
        weights = load_weights(i)
        return weights, _soup._layout(weights, f"models_or_paths[{i}]")

    def score(weights: list[np.ndarray]) -> float:
        holder.set_weights(weights)
        return evaluate(holder)

    result = _soup._greedy(
        len(items),
        load,
        score,
        higher_is_better=higher_is_better,
        int_policy="first",
        accumulate_dtype=None,
        name="models_or_paths",
    )
    holder.set_weights(result.params)
    return result._replace(params=holder)


# --- averaging during fit() -------------------------------------------------------------------


def _weight_names(model: Any) -> list[str]:
    """Snapshot tensor names in get_weights() order: variable paths without the model name."""
    prefix = model.name + "/"
    names = [v.path[len(prefix) :] if v.path.startswith(prefix) else v.path for v in model.weights]
    if len(set(names)) < len(names):  # two variables with one path: keep them apart by index
        names = [f"{i:04d}:{name}" for i, name in enumerate(names)]
    return names


_WEIGHT_AVERAGING_DOC = """A Keras callback that keeps a weight average during ``fit()``.

    After each epoch (``every="epoch"``) or each training batch (``every="batch"``) from
    ``start_epoch`` on, the model's weights (all of them, BatchNormalization moving statistics
    included) are folded into a :class:`polyak.Averager` with ``schedule``. At the end of
    training the average replaces the model's weights (``swap_on_end``); it is also available
    as :attr:`average`. With ``snapshot_dir``, every snapshot is also saved as a safetensors
    file through :class:`polyak.SnapshotDir`, so that any other schedule can be chosen
    afterwards (``callback.snapshots.average("linear")``), including those with no online
    form such as ``tail(k)``: for those the average at the end is taken over the saved
    snapshots (the newest ``keep``), and ``snapshot_dir`` is required.

    .. note::
        After swapping in averaged weights, recompute BatchNormalization statistics with
        :func:`update_batchnorm` if the model has any: the average of moving statistics does
        not describe the averaged network. Snapshot steps count the snapshots this callback
        took (0, 1, ...) across ``fit()`` calls; each file's metadata also records the
        ``epoch`` (and ``batch``) it was taken at.

    Args:
        schedule: The weighting, anything :func:`polyak.schedules.resolve` takes:
            ``"equal"`` (SWA), ``polyak.schedules.ema(0.999)`` (EMA), ``"linear"``...
        start_epoch: First epoch (0-based, as Keras numbers them) whose weights are averaged.
        every: ``"epoch"`` or ``"batch"``: when a snapshot is taken.
        swap_on_end: Put the average into the model when ``fit()`` ends.
        snapshot_dir: A directory for the snapshots; it must not already hold snapshots.
        keep: Keep only the newest ``keep`` snapshot files (needs ``snapshot_dir``).

    Raises:
        NoOnlineFormError: the schedule has no online form and no ``snapshot_dir`` is given.
        ScheduleError: the schedule cannot be resolved.
        PolyakError: a bad ``start_epoch``, ``every`` or ``keep``, or a ``snapshot_dir``
            that already holds snapshots.

    Example:
        >>> swa = polyak.keras.WeightAveraging("equal", start_epoch=75)  # doctest: +SKIP
        >>> model.fit(x, y, epochs=100, callbacks=[swa])  # doctest: +SKIP
        >>> polyak.keras.update_batchnorm(model, x)  # doctest: +SKIP
    """


def _check_averaging_args(start_epoch: Any, every: Any, snapshot_dir: Any, keep: Any) -> None:
    if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
        raise PolyakError(f"start_epoch must be an int >= 0, got start_epoch={start_epoch!r}")
    if every not in ("epoch", "batch"):
        raise PolyakError(f"every must be 'epoch' or 'batch', got every={every!r}")
    if keep is not None and snapshot_dir is None:
        raise PolyakError(f"keep={keep!r} needs a snapshot_dir to keep snapshots in")


def _make_weight_averaging() -> type:
    # Built on first use, since subclassing keras.callbacks.Callback imports Keras.
    import polyak

    keras = _keras()

    class WeightAveraging(keras.callbacks.Callback):
        __doc__ = _WEIGHT_AVERAGING_DOC

        def __init__(
            self,
            schedule: Any = "equal",
            *,
            start_epoch: int = 0,
            every: str = "epoch",
            swap_on_end: bool = True,
            snapshot_dir: PathLike | None = None,
            keep: int | None = None,
        ) -> None:
            super().__init__()
            _check_averaging_args(start_epoch, every, snapshot_dir, keep)
            self.schedule = polyak.schedules.resolve(schedule)
            self.start_epoch = start_epoch
            self.every = every
            self.swap_on_end = bool(swap_on_end)
            self.snapshots = None
            if snapshot_dir is not None:
                self.snapshots = polyak.SnapshotDir(snapshot_dir, keep=keep)
                if len(self.snapshots):
                    raise PolyakError(
                        f"snapshot_dir {os.fspath(snapshot_dir)!r} already holds "
                        f"{len(self.snapshots)} snapshots: use an empty directory, so that "
                        "the average is of this run only"
                    )
            if self.schedule.online:
                self.averager = polyak.Averager(self.schedule)
            elif self.snapshots is None:
                raise polyak.NoOnlineFormError(
                    f"schedule {self.schedule!r} has no online form: pass snapshot_dir= to "
                    "save the snapshots and average them when training ends"
                )
            else:
                self.averager = None
            # Keras runs batch-end hooks of async-safe callbacks in a background thread and
            # otherwise blocks the training loop on them; overriding on_train_batch_end makes
            # Keras assume the latter. Per epoch, that hook does nothing, so say so; per
            # batch, it reads the weights and must run in step with training.
            self.async_safe = every == "epoch"
            self.count = 0  # snapshots taken
            self._names: list[str] | None = None
            self._epoch = 0

        def _take(self, epoch: int, batch: int | None = None) -> None:
            model = self.model  # (with JAX, reading .model syncs the weights mid-epoch)
            if self._names is None:
                self._names = _weight_names(model)
            params = dict(zip(self._names, model.get_weights()))
            if self.averager is not None:
                self.averager.update(params)
            if self.snapshots is not None:
                metadata = {"epoch": str(epoch)}
                if batch is not None:
                    metadata["batch"] = str(batch)
                self.snapshots.save(params, self.count, metadata=metadata)
            self.count += 1

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._epoch = epoch

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.every == "batch" and self._epoch >= self.start_epoch:
                self._take(self._epoch, batch)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if self.every == "epoch" and epoch >= self.start_epoch:
                self._take(epoch)

        def on_train_end(self, logs: Any = None) -> None:
            if self.swap_on_end and self.count:
                self.model.set_weights(self.average)

        @property
        def average(self) -> list[np.ndarray]:
            """The average so far, in ``model.get_weights()`` order.

            Raises:
                EmptyInputError: no snapshot has been taken yet.
            """
            if not self.count:
                raise EmptyInputError(
                    f"no snapshot taken yet (start_epoch={self.start_epoch}, every={self.every!r})"
                )
            if self.averager is not None:
                value = self.averager.value
            else:
                value = self.snapshots.average(self.schedule)
            return [np.asarray(value[name]) for name in self._names]

    WeightAveraging.__module__ = __name__
    return WeightAveraging


def __getattr__(name: str) -> Any:
    if name == "WeightAveraging":
        cls = globals()["WeightAveraging"] = _make_weight_averaging()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Greedy soups of Keras models or saved model files, through :func:`polyak.soup.greedy`."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import keras
import numpy as np

from polyak import soup
from polyak._errors import PolyakError
from polyak._types import PathLike
from polyak.keras import _files
from polyak.keras._layout import check_all, check_layout, empty_copy, layout, nonempty
from polyak.utils import order_inputs

__all__ = ["greedy_soup"]


def _file_loader(
    paths: list[str], model: keras.Model | None
) -> tuple[Callable[[int], list[np.ndarray]], Callable[[], Any]]:
    """``load(i)`` for model files, and a function giving the model that scores the soup.

    The files are checked against ``model`` or, without it, against the first file read;
    without ``model`` the first file's model (compiled) becomes the scoring model.
    """
    loader = None if model is None else empty_copy(model, "model")
    state: dict[str, Any] = {
        "ref": None if model is None else layout(model, "model"),
        "ref_label": "model",
        "holder": None if model is None else empty_copy(model, "model"),
    }

    def load(i: int) -> list[np.ndarray]:
        label = f"models_or_paths[{i}] {paths[i]!r}"
        current = _files.load(paths[i], loader, label, compile=state["holder"] is None)
        mine = layout(current, label)
        if state["ref"] is None:
            state["ref"], state["ref_label"] = mine, label
        else:
            check_layout(mine, label, state["ref"], state["ref_label"])
        weights = current.get_weights()
        if state["holder"] is None:
            state["holder"] = current  # the first file's model, compiled, scores the soup
        elif current is not loader:
            del current  # free this model before the next load
            _files.release()
        return weights

    return load, lambda: state["holder"]


def greedy_soup(
    models_or_paths: Sequence[keras.Model | PathLike],
    evaluate: Callable[[keras.Model], float],
    *,
    higher_is_better: bool = True,
    model: keras.Model | None = None,
    accumulate_dtype: Any = None,
    sort: Literal["natural"] | None = None,
) -> soup.SoupResult:
    """Greedy model soup of Keras models or saved model files (Wortsman et al., 2022).

    :func:`polyak.soup.greedy` for Keras: each candidate is scored alone, then, best first,
    each joins the soup if the uniform average of the soup with it scores at least as well.
    ``evaluate`` receives a model holding the weights to score (one model, reused: its
    weights are replaced before each call), e.g. ``lambda m: m.evaluate(x_val, y_val)[1]``.
    Files are loaded one at a time; memory holds the running sum of the soup, the model
    being scored and one loaded candidate. Integer variables come from the soup's first
    member, the best single model, as in :func:`polyak.soup.greedy`.

    Args:
        models_or_paths: Keras models of one architecture, or ``.keras``/``.h5`` model files
            (``.weights.h5`` weight files with ``model=``); not a mix of both.
        evaluate: The held-out metric of a model, ``evaluate(model) -> float``.
        higher_is_better: ``False`` for a loss.
        model: For files, a built model of their architecture: each file is loaded into a
            clone of it with ``load_weights`` (needed for ``.weights.h5`` files).
        accumulate_dtype: Raise the accumulation precision (``"float64"``), as in
            :func:`polyak.average`.
        sort: For files: ``None`` keeps the order given (with a :class:`polyak.OrderWarning`
            when numbered names are out of natural order; the order decides ties and
            ``members``' indices); ``"natural"`` orders them by their numbers first.

    Returns:
        A :class:`polyak.soup.SoupResult` whose ``params`` is a new model holding the soup
        (a clone of the first model, or of ``model``, or the first file's model), compiled
        like it when it is compiled; ``members`` index ``models_or_paths`` (naturally sorted
        with ``sort="natural"``).

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
    items = nonempty(models_or_paths, "models_or_paths")
    is_path = [isinstance(item, (str, os.PathLike)) for item in items]
    if any(is_path) and not all(is_path):
        raise PolyakError(
            "models_or_paths mixes models and file paths; give only models or only paths"
        )
    if all(is_path):
        paths = [os.fspath(p) for p in order_inputs(items, sort)]
        _files.check_files(paths, model is not None)
        load, holder = _file_loader(paths, model)
    else:
        check_all(items, "models_or_paths")
        scorer = empty_copy(items[0], "models_or_paths[0]")
        load, holder = (lambda i: items[i].get_weights()), (lambda: scorer)

    def score(weights: list[np.ndarray]) -> float:
        holder().set_weights(weights)
        return evaluate(holder())

    # The soup's snapshots are the indices: load(i) reads models_or_paths[i].
    result = soup.greedy(
        range(len(items)),
        score,
        load=load,
        higher_is_better=higher_is_better,
        accumulate_dtype=accumulate_dtype,
        name="models_or_paths",
    )
    holder().set_weights(result.params)
    return result._replace(params=holder())

"""BatchNormalization statistics recomputed for averaged weights (torch's ``update_bn``)."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import optree

from polyak._errors import EmptyInputError, PolyakError

__all__ = ["update_batchnorm"]


def _batchnorm_layers(model: Any) -> list[Any]:
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

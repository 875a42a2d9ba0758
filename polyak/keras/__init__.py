"""Average Keras 3 models, saved model files and the weights seen during ``fit()``.

The ``[keras]`` extra. Works with any Keras 3 backend (JAX, TensorFlow, PyTorch): weights are
read with ``get_weights()``, averaged by :func:`polyak.average` in numpy and written back with
``set_weights()``, so the arithmetic is the core's, bit for bit.

``import polyak.keras`` imports Keras, as ``import safetensors.torch`` imports torch; Keras
picks its backend then, so set ``KERAS_BACKEND`` before this import. ``import polyak`` alone
imports no framework.

Models are matched layer by layer, in order, the way ``set_weights`` matches them. Layer names
may differ by Keras' automatic numbering (``dense`` and ``dense_3`` are both "dense"), so that
two models built by the same function average without renaming; layer types, base names,
variable names and shapes must agree, and a mismatch names the layer and the model.
"""

from polyak.keras._average import average_files, average_models, average_weights
from polyak.keras._batchnorm import update_batchnorm
from polyak.keras._callback import WeightAveraging
from polyak.keras._files import ModelFileError
from polyak.keras._names import set_weights
from polyak.keras._soup import greedy_soup

__all__ = [
    "ModelFileError",
    "average_weights",
    "average_models",
    "average_files",
    "update_batchnorm",
    "WeightAveraging",
    "set_weights",
    "greedy_soup",
]

# Documented and shown as polyak.keras's own, where users import them from.
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name

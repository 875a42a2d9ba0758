"""polyak: average model weights (Polyak-Ruppert, EMA, SWA, checkpoint averaging, soups)."""

from polyak._errors import PolyakError

__version__ = "0.1.0"

__all__ = ["PolyakError", "__version__"]

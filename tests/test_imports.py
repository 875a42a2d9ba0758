"""`import polyak` stays light: no framework is imported until an adapter asks for it."""

import subprocess
import sys


def test_import_polyak_imports_no_framework():
    code = (
        "import sys, numpy as np, polyak\n"
        "polyak.average([{'a': np.ones(2)}, {'a': np.zeros(2)}], 'linear')\n"
        "heavy = [m for m in ('torch', 'jax', 'keras', 'tensorflow', 'safetensors', 'tqdm')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names_are_documented():
    import inspect

    import polyak

    for name in polyak.__all__:
        obj = getattr(polyak, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert (
                obj.__doc__
                and "Example" in (obj.__doc__ or "")
                or issubclass(obj, Exception)
                or name == "Schedule"
            ), name

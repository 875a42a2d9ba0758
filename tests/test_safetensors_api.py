"""The safetensors adapter's public surface: light imports, documented names, runnable examples."""

from __future__ import annotations

import doctest
import inspect
import subprocess
import sys

import pytest

import polyak.safetensors as pst
from polyak import _stream, cli
from polyak.safetensors import _io, _merge, _reader


def test_adapter_and_cli_import_no_framework():
    code = (
        "import sys, polyak.safetensors, polyak.cli, polyak._stream\n"
        "heavy = [m for m in ('torch', 'jax', 'keras', 'tensorflow', 'safetensors', 'tqdm')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", pst.__all__)
def test_public_names_are_documented(name):
    obj = getattr(pst, name)
    doc = inspect.getdoc(obj) or ""
    assert doc, name
    if inspect.isfunction(obj):
        assert "Example" in doc and "Raises" in doc or name == "read_metadata", name


@pytest.mark.parametrize("module", [_io, _merge, _reader, _stream, cli, pst])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0

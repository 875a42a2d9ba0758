"""The safetensors adapter's public surface: light imports, documented names, runnable examples."""

from __future__ import annotations

import doctest
import inspect
import subprocess
import sys

import pytest

import polyak.safetensors as pst
from polyak import _stream, cli, utils
from polyak.safetensors import (
    _io,
    _job,
    _merge,
    _options,
    _parse,
    _reader,
    _results,
    _writer,
)


def test_adapter_and_cli_import_no_framework():
    code = (
        "import sys, polyak.safetensors, polyak.cli, polyak._stream\n"
        "heavy = [m for m in ('torch', 'jax', 'keras', 'tensorflow', 'safetensors', 'tqdm')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


PUBLIC = [(pst, name) for name in pst.__all__] + [(cli, name) for name in cli.__all__]


@pytest.mark.parametrize("module, name", PUBLIC, ids=lambda x: getattr(x, "__name__", x))
def test_public_names_are_documented(module, name):
    obj = getattr(module, name)
    doc = inspect.getdoc(obj) or ""
    assert doc, name
    if inspect.isfunction(obj):
        sections = ["Args:", "Raises:", "Example"]
        if inspect.signature(obj).return_annotation not in (None, "None"):
            sections.append("Returns:")
        missing = [s for s in sections if s not in doc]
        assert not missing, (name, missing)


@pytest.mark.parametrize(
    "module",
    [_io, _job, _merge, _options, _parse, _reader, _results, _writer, _stream, cli, utils, pst],
)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0

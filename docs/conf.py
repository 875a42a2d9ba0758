"""Sphinx configuration of the polyak documentation.

Build with warnings as errors (what CI does, through tests/test_docs.py):

    python3 -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(DOCS))  # this checkout's polyak, installed or not
sys.path.insert(0, os.path.join(DOCS, "_ext"))

# Autodoc imports polyak.keras, and Keras defaults to TensorFlow, which may be absent.
os.environ.setdefault("KERAS_BACKEND", "jax")

import polyak  # noqa: E402

project = "polyak"
author = "polyak maintainers"
copyright = "polyak maintainers"
release = polyak.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    # MathJax's own files, copied into _static: formulas render with no network, from the
    # built site alone (the default loads MathJax from a CDN).
    "sphinx-mathjax-offline",
    "schedule_plots",
    "api_coverage",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "generated", "examples", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# Quotes and ellipses only: the default also turns "--" into an en dash, which mangles the
# command-line options quoted in prose and tables (`--mib-32` rendered as "-mib-32").
smartquotes_action = "qe"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"show-inheritance": True}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Attributes sections as fields of their class: NamedTuple fields are already documented by
# autodoc, and a second description of each would be a duplicate-object warning.
napoleon_use_ivar = True
# The keywords a TypedDict of settings declares (polyak.safetensors.MergeSettings).
napoleon_custom_sections = [("Keys", "params_style")]

html_theme = "furo"
html_title = f"polyak {release}"

# The modules whose public names must all be documented (see _ext/api_coverage.py).
api_coverage_modules = [
    "polyak",
    "polyak.online",
    "polyak.schedules",
    "polyak.safetensors",
    "polyak.checkpoints",
    "polyak.keras",
    "polyak.lightning",
    "polyak.transformers",
    "polyak.posthoc",
    "polyak.soup",
    "polyak.utils",
    "polyak.torch",
]

"""Every docs example runs after the README's first command alone (``pip install .``).

The test environment has more installed than ``pip install .`` brings (pytest, hypothesis,
scikit-learn, matplotlib, Sphinx...). So the docs pages and the README run again here, in a
subprocess where every package that only an extra of ``pyproject.toml`` installs is hidden:
importing one raises ``ModuleNotFoundError``, as it would for a user. The ``polyak`` commands
the pages run hide them too (through a ``sitecustomize`` on their ``PYTHONPATH``). PyTorch,
JAX and Keras (and the trainers polyak has callbacks for: Lightning, Hugging Face Transformers
with the accelerate it needs) stay importable: a block that imports one is for that
framework's users, and test_docs skips such a block where the framework is missing.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
FRAMEWORKS = ("torch", "jax", "keras", "lightning", "transformers", "accelerate")

HIDE = '''
import importlib.metadata, importlib.util, json, os, re, sys

HIDDEN = set(json.loads(os.environ["POLYAK_DOCS_HIDDEN"]))
HIDDEN_DISTS = set(json.loads(os.environ["POLYAK_DOCS_HIDDEN_DISTS"]))


def hidden_dist(name):
    return re.sub(r"[-_.]+", "-", name).lower() in HIDDEN_DISTS


class Hidden:
    """A meta-path finder that makes the packages `pip install .` does not install unimportable.

    Not a None in sys.modules: some libraries test `"sphinx" in sys.modules` to decide whether
    Sphinx is running (scipy's docstring scraper does, under Lightning's torchmetrics).
    """

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def install():
    for name in list(sys.modules):
        if name.split(".")[0] in HIDDEN:
            del sys.modules[name]
    sys.meta_path.insert(0, Hidden())
    real_find_spec = importlib.util.find_spec

    def find_spec(name, package=None):
        # as for a package that is not there: None, not an exception
        if name.split(".")[0] in HIDDEN:
            return None
        return real_find_spec(name, package)

    importlib.util.find_spec = find_spec
    # Libraries ask the installed metadata too (Lightning's RequirementCache does, for
    # matplotlib): the hidden distributions are not installed for them either.
    for attr in ("version", "distribution", "metadata", "requires"):
        real = getattr(importlib.metadata, attr)

        def missing(name, _real=real):
            if hidden_dist(name):
                raise importlib.metadata.PackageNotFoundError(name)
            return _real(name)

        setattr(importlib.metadata, attr, missing)
'''

RUNNER = """
import json, os, sys, tempfile
from pathlib import Path

root, tests, hide_dir = sys.argv[1:4]
sys.path[:0] = [root, tests, hide_dir]
import test_docs  # imports pytest, which is hidden from the examples below
import hide

hide.install()
# The `polyak` commands of the pages run in child processes: they hide the same packages.
os.environ["PYTHONPATH"] = os.pathsep.join([hide_dir, os.environ.get("PYTHONPATH", "")])
done = {"ran": [], "skipped": []}
pages = [(p, True) for p in test_docs.pages()] + [(Path(root) / "README.md", False)]
for page, shell in pages:
    try:
        test_docs.run_page(page, Path(tempfile.mkdtemp()), shell=shell)
        done["ran"].append(page.name)
    except test_docs.pytest.skip.Exception as why:
        done["skipped"].append(f"{page.name}: {why}")
print("RESULT " + json.dumps(done))
"""


def names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def installed_closure(dists: set[str]) -> set[str]:
    """The distributions ``dists`` install, their requirements included (extras left out)."""
    seen: set[str] = set()
    todo = list(dists)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def hidden_modules() -> tuple[set[str], set[str]]:
    """(distributions, top-level modules) that only an extra installs."""
    project = PYPROJECT["project"]
    extras = set().union(*(names(reqs) for reqs in project["optional-dependencies"].values()))
    kept = installed_closure(names(project["dependencies"]) | set(FRAMEWORKS))
    hidden = extras - kept - {"polyak"}
    modules = {
        module
        for module, dists in md.packages_distributions().items()
        if {canonicalize_name(d) for d in dists} <= hidden and not module.startswith("_")
    }
    return hidden, modules


def test_hidden_set_is_what_pip_install_dot_leaves_out() -> None:
    dists, modules = hidden_modules()
    # The test-only packages are hidden; the core ones (safetensors among them) are not.
    assert {"pytest", "hypothesis", "scikit-learn", "sphinx"} <= dists
    assert {"pytest", "hypothesis", "sklearn", "sphinx"} <= modules
    assert not {"numpy", "safetensors", "ml_dtypes", "optree", "torch", "jax"} & modules


def test_getting_started_lists_the_core_dependencies() -> None:
    text = (ROOT / "docs" / "getting-started.md").read_text()
    sentence = " ".join(text.split("Its dependencies are ", 1)[1].split(";", 1)[0].split())
    bare = re.sub(r"\s*\([^)]*\)", "", sentence).replace(" and ", ", ")
    listed = {canonicalize_name(w.strip()) for w in bare.split(",")}
    assert listed == names(PYPROJECT["project"]["dependencies"]), sentence


@pytest.mark.slow
def test_docs_examples_run_with_the_core_dependencies_only(tmp_path: Path) -> None:
    dists, modules = hidden_modules()
    hide_dir = tmp_path / "hide"
    hide_dir.mkdir()
    (hide_dir / "hide.py").write_text(textwrap.dedent(HIDE))
    (hide_dir / "sitecustomize.py").write_text("import hide\nhide.install()\n")
    runner = tmp_path / "runner.py"
    runner.write_text(textwrap.dedent(RUNNER))
    env = {
        **os.environ,
        "POLYAK_DOCS_HIDDEN": json.dumps(sorted(modules)),
        "POLYAK_DOCS_HIDDEN_DISTS": json.dumps(sorted(dists)),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(runner), str(ROOT), str(ROOT / "tests"), str(hide_dir)],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    result = json.loads(proc.stdout.rsplit("RESULT ", 1)[1])
    assert "merging.md" in result["ran"] and "README.md" in result["ran"], result
    assert not result["skipped"], result["skipped"]

"""The documentation cannot rot: its examples run, and the site builds with warnings as errors.

Every ``python`` code block of a docs page runs, in order, in one namespace per page and in
a fresh working directory; every ``bash`` block whose commands all start with ``polyak `` runs
too (the command line as installed, through ``python -m polyak``), after the page's earlier
blocks, so the files they write are there. Other shell blocks (``pip install``, the Sphinx
command) are shown, not run. A python block written
as a doctest (``>>>`` prompts) runs as one, so its shown outputs are checked as well. The
README's python blocks run the same way. A fragment meant to be read, not run, is written
as a ``{code-block} python`` directive, which this test leaves alone.
"""

from __future__ import annotations

import doctest
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```\s*$", re.S | re.M)
# Pages whose non-doctest python blocks are fragments of a longer program (``train_step``,
# files of a fine-tuning run): they are compiled, not run, until they are rewritten as
# runnable blocks or as ``{code-block} python`` directives. Their doctest blocks still run.
# soups.md shows how a torch model and Keras models plug in (names such as `model` and
# `val_loader` are the reader's): those blocks are compiled, and docs/examples/greedy_soup.py
# runs the same calls end to end.
FRAGMENT_PAGES = {"soups.md"}
# Keras picks its backend on first import and defaults to TensorFlow, which may be absent.
os.environ.setdefault("KERAS_BACKEND", "jax")


def pages() -> list[Path]:
    skip = {"_build", "generated", "_ext", "examples"}
    return sorted(p for p in DOCS.rglob("*.md") if not skip & set(p.relative_to(DOCS).parts))


def blocks(path: Path) -> list[tuple[str, str, int]]:
    """(language, code, line) of each fenced code block."""
    text = path.read_text()
    return [
        (m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)
    ]


def commands(code: str) -> list[str]:
    """The shell commands of a block, continuation lines joined, comments dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", code)
    return [
        ln.split(" #")[0].strip()
        for ln in joined.splitlines()
        if ln.strip() and not ln.strip().startswith("#")
    ]


def runnable_shell(code: str) -> bool:
    cmds = commands(code)
    return bool(cmds) and all(c.startswith("polyak ") for c in cmds)


def needs(code: str) -> list[str]:
    """Optional frameworks a block imports (the test skips when one is missing)."""
    frameworks = r"(torch|jax|keras|lightning|transformers)"
    mods = re.findall(r"^\s*(?:import|from)\s+" + frameworks + r"\b", code, re.M)
    return sorted(set(mods))


def run_doctest(code: str, namespace: dict, where: str) -> None:
    """Run a ``>>>`` block as a doctest: its printed outputs are checked too."""
    test = doctest.DocTestParser().get_doctest(code, namespace, where, where, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    runner.run(test, out=report.append, clear_globs=False)
    assert runner.failures == 0, f"{where}: doctest failed\n" + "".join(report)


def run_page(path: Path, workdir: Path, *, shell: bool = True) -> int:
    """Run a page's examples in ``workdir``; return how many blocks ran."""
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    ran = 0
    os.chdir(workdir)
    for lang, code, line in blocks(path):
        where = f"{path.relative_to(ROOT)}:{line}"
        if lang == "python":
            for mod in needs(code):
                if importlib.util.find_spec(mod) is None:
                    pytest.skip(f"{where} needs {mod}")
            if code.lstrip().startswith(">>>"):
                run_doctest(code, namespace, where)
            elif path.name in FRAGMENT_PAGES:
                compile(code, where, "exec")
            else:
                exec(compile(code, where, "exec"), namespace)  # noqa: S102 - our own docs
            ran += 1
        elif lang == "bash" and shell and runnable_shell(code):
            script = 'set -euo pipefail\npolyak() { "$PYTHON" -m polyak "$@"; }\n' + code
            env = {
                **os.environ,
                "PYTHON": sys.executable,
                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            }
            proc = subprocess.run(
                ["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True
            )
            assert proc.returncode == 0, f"{where}: shell block failed\n{proc.stdout}{proc.stderr}"
            ran += 1
    return ran


@pytest.fixture
def in_tmp(tmp_path: Path):
    cwd = os.getcwd()
    yield tmp_path
    os.chdir(cwd)


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_docs_page_examples_run(page: Path, in_tmp: Path) -> None:
    run_page(page, in_tmp)


def test_every_page_with_code_is_collected() -> None:
    # The pages this suite promises to execute: a page moved out of the scan would go silent.
    names = {str(p.relative_to(DOCS)) for p in pages()}
    for expected in [
        "getting-started.md",
        "concepts.md",
        "schedules.md",
        "guides/training-loops.md",
        "guides/merging.md",
        "guides/snapshots.md",
    ]:
        assert expected in names
        assert any(lang == "python" for lang, _, _ in blocks(DOCS / expected)), expected


def test_cli_guide_runs_its_shell_blocks() -> None:
    shells = [c for lang, c, _ in blocks(DOCS / "guides" / "merging.md") if lang == "bash"]
    assert shells and all(runnable_shell(c) for c in shells)


def test_readme_python_blocks_run(in_tmp: Path) -> None:
    readme = ROOT / "README.md"
    assert run_page(readme, in_tmp, shell=False) >= 1


def test_block_extraction() -> None:
    text_blocks = FENCE.findall("```python\nx = 1\n```\ntext\n```bash\npolyak a \\\n  b\n```\n")
    assert text_blocks == [("python", "x = 1\n"), ("bash", "polyak a \\\n  b\n")]
    assert commands("polyak a \\\n  b  # why\n# note\n") == ["polyak a b"]
    assert runnable_shell("polyak weights linear\n")
    assert not runnable_shell("pip install .\npolyak demo\n")


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("sphinx", "myst_parser", "furo")),
    reason="the docs extra (sphinx, myst-parser, furo) is not installed",
)
def test_sphinx_html_build_has_no_warnings(tmp_path: Path) -> None:
    # The documented command, with -W: any warning (a broken reference, a docstring that
    # does not parse, an undocumented public name) fails the build.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-b",
            "html",
            "-q",
            str(DOCS),
            str(tmp_path / "html"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        },
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    html = tmp_path / "html"
    assert (html / "index.html").exists()
    assert (html / "api" / "schedules.html").exists()
    plots = list((html / "_images").glob("schedule_*.png"))
    assert len(plots) >= 10, plots
    api = (html / "api" / "polyak.html").read_text()
    assert 'id="polyak.average"' in api
    # The one-line-per-name tables are rendered, not shown as source.
    for page in (html / "api").glob("*.html"):
        text = page.read_text()
        assert ":py:obj:" not in text and ".. autosummary" not in text, page.name

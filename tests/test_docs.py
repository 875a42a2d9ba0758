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
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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


SPHINX_MISSING = [
    m
    for m in ("sphinx", "myst_parser", "furo", "sphinx-mathjax-offline")
    if importlib.util.find_spec(m) is None
]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once for this module by the documented command, with -W."""
    if SPHINX_MISSING:
        pytest.skip(f"the docs extra is not installed (missing: {SPHINX_MISSING})")
    html = tmp_path_factory.mktemp("site") / "html"
    # Any warning (a broken reference, a docstring that does not parse, an undocumented
    # public name) fails the build.
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q",
         str(DOCS), str(html)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        },
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return html


def html_pages(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("*.html") if "_static" not in p.parts)


@pytest.mark.slow
def test_sphinx_html_build_has_no_warnings(site: Path) -> None:
    html = site
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


SCRIPT_SRC = re.compile(r"<script[^>]*\bsrc=\"([^\"]+)\"")
MATH_ELEMENT = re.compile(r'class="math notranslate nohighlight"')


@pytest.mark.slow
def test_site_loads_no_script_from_the_network(site: Path) -> None:
    # Formulas render without a network: the math renderer is a file of the site itself.
    with_math = 0
    for page in html_pages(site):
        text = page.read_text()
        for src in SCRIPT_SRC.findall(text):
            assert "//" not in src and ":" not in src, f"{page.name} loads {src}"
            assert (page.parent / src.split("?")[0]).is_file(), f"{page.name}: {src} missing"
        if MATH_ELEMENT.search(text):
            with_math += 1
            assert any("mathjax" in s.lower() for s in SCRIPT_SRC.findall(text)), page.name
    assert with_math >= 3, "the formulas of concepts/schedules pages were not found"


def browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.slow
@pytest.mark.skipif(browser() is None, reason="no headless Chromium (apt-get install chromium)")
def test_formulas_render_in_a_browser_without_network(site: Path, tmp_path: Path) -> None:
    # Headless Chromium with every host name unresolvable: each formula of the page must
    # become a MathJax element, none of them an error box.
    for name in ("schedules.html", "concepts.html"):
        page = site / name
        expected = len(MATH_ELEMENT.findall(page.read_text()))
        assert expected >= 5, name
        proc = subprocess.run(
            [browser(), "--headless", "--no-sandbox", "--disable-gpu",
             f"--user-data-dir={tmp_path / 'profile'}",
             "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=20000",
             "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        dom = proc.stdout
        assert proc.returncode == 0 and "</html>" in dom, proc.stderr[-2000:]
        rendered = dom.count("<mjx-container")
        assert rendered == expected, f"{name}: {rendered} of {expected} formulas rendered"
        assert "<mjx-merror" not in dom, f"{name}: a formula failed to render"


@pytest.mark.slow
def test_command_line_options_keep_their_double_dash(site: Path) -> None:
    # "--mib-32" in prose or a table must not become an en dash ("\u2013mib-32").
    text = (site / "benchmarks.html").read_text()
    assert "--mib-32" in text
    assert "\u2013mib" not in text and "&#8211;mib" not in text


def test_readme_command_lines_run_without_a_warning(in_tmp: Path) -> None:
    # The README's `polyak` commands, on checkpoints named as they name them: each runs, and
    # none warns (an unsorted glob, or a schedule that gives the oldest input the most weight).
    import polyak.safetensors as pst

    rng = np.random.default_rng(0)
    (in_tmp / "ckpt").mkdir()
    for e in (8, 9, 10):
        pst.save({"w": rng.standard_normal((4, 4)).astype(np.float32)},
                 in_tmp / "ckpt" / f"epoch_{e}.safetensors")  # fmt: skip
    for step in (100, 200, 1000):
        tree = {f"layer{i}.w": rng.standard_normal((32, 32)).astype(np.float32) for i in range(4)}
        pst.save(tree, in_tmp / "run" / f"step_{step}", max_shard_size=9000)
    # Trainer checkpoint folders (weights and a config) and Lightning .ckpt files (the state
    # dict under "state_dict"), as the README's other merge lines name them.
    for step in (100, 200, 300):
        folder = in_tmp / "run" / f"checkpoint-{step}"
        folder.mkdir()
        pst.save({"w": rng.standard_normal((4, 4)).astype(np.float32)},
                 folder / "model.safetensors")  # fmt: skip
        (folder / "config.json").write_text('{"model_type": "demo"}')
    torch = pytest.importorskip("torch")
    (in_tmp / "lightning").mkdir()
    for epoch in (3, 9, 10):
        torch.save({"state_dict": {"w": torch.full((4,), float(epoch))}, "epoch": epoch},
                   in_tmp / "lightning" / f"epoch={epoch}.ckpt")  # fmt: skip
    shells = [
        c for lang, c, _ in blocks(ROOT / "README.md") if lang == "bash" and runnable_shell(c)
    ]
    assert shells, "the README shows no `polyak` command block"
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": path}
    for code in shells:
        script = 'set -euo pipefail\npolyak() { "$PYTHON" -m polyak "$@"; }\n' + code
        proc = subprocess.run(["bash", "-c", script], cwd=in_tmp, env=env,
                              capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "warning" not in proc.stderr.lower(), proc.stderr
    assert (in_tmp / "averaged").is_dir() and (in_tmp / "averaged.safetensors").is_file()

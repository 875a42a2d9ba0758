"""Run the post-hoc EMA and greedy soup examples of the docs, and check what they claim."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def _run(name: str, argv: list[str]) -> dict:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def _is_png(path: Path) -> bool:
    return path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_posthoc_example(tmp_path):
    out = tmp_path / "posthoc.png"
    res = _run("posthoc_ema", ["--output", str(out)])
    assert _is_png(out)
    assert res["relative_error"] < 1e-2
    # The sweep has an interior optimum: neither the shortest nor the longest EMA is best.
    assert res["best"] not in (min(res["val"]), max(res["val"]))
    assert res["coef"].shape[1] == len(res["val"])


def test_greedy_soup_example(tmp_path):
    out = tmp_path / "soup.png"
    res = _run("greedy_soup", ["--output", str(out)])
    assert _is_png(out)
    result = res["result"]
    diverged = min(range(len(result.individual_scores)), key=result.individual_scores.__getitem__)
    assert diverged not in result.members
    assert result.scores[-1] >= res["best_single"]
    assert res["uniform"] < res["best_single"]


@pytest.mark.parametrize("page", ["posthoc.md", "soups.md"])
def test_guide_page_doctests(page):
    import doctest

    path = EXAMPLES.parent / page
    result = doctest.testfile(str(path), module_relative=False, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0

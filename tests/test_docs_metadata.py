"""What the repository says about itself agrees: the license, and the benchmark numbers."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import run as bench  # noqa: E402

# SHA-256 of the Apache License 2.0 as the ASF publishes it (LICENSE-2.0.txt; Debian ships the
# same bytes as /usr/share/common-licenses/Apache-2.0): the file is the whole, unaltered text.
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def test_license_file_is_the_license_pyproject_names() -> None:
    license_id = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    text = (ROOT / "LICENSE").read_text()
    header = " ".join(text.split()[:4])
    assert (license_id, header) == ("Apache-2.0", "Apache License Version 2.0,")
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert hashlib.sha256((ROOT / "LICENSE").read_bytes()).hexdigest() == APACHE_2_SHA256


def results() -> dict:
    return json.loads((ROOT / "benchmarks" / "results.json").read_text())


def test_results_md_is_the_rendering_of_results_json() -> None:
    # The page the docs include and the README cites is what benchmarks/run.py wrote.
    assert bench.markdown(results()) == (ROOT / "benchmarks" / "RESULTS.md").read_text()


def test_readme_speed_claim_is_read_off_the_benchmark_results() -> None:
    readme = (ROOT / "README.md").read_text()
    found = bench.README_CLAIM.search(readme)
    assert found, "README.md lost its <!-- speed: --> markers"
    assert found.group(2) == bench.readme_claim(results())
    # Independently of run.py: the README's range is the RESULTS.md summary's widest range.
    summary = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    ranges = [(float(a), float(b)) for a, b in re.findall(r"was ([\d.]+)x to ([\d.]+)x", summary)]
    lo, hi = map(float, re.match(r"([\d.]+)x to ([\d.]+)x", found.group(2)).groups())
    assert ranges and (lo, hi) == (min(a for a, _ in ranges), max(b for _, b in ranges))
    rss = re.search(r"peak RSS stayed at or below (\d+) MiB", summary).group(1)
    assert f"at most {rss} MiB" in found.group(2)
    # No other speed-up figure of its own anywhere in the README.
    assert re.findall(r"\d+(?:\.\d+)?x", readme.replace(found.group(2), "")) == []


def test_update_readme_rewrites_only_the_marked_claim(tmp_path: Path) -> None:
    page = tmp_path / "README.md"
    page.write_text("a\n<!-- speed: x -->2-40x faster<!-- /speed -->.\nb 2-40x\n")
    bench.update_readme("1.8x to 41.3x as fast", page)
    expected = "a\n<!-- speed: x -->1.8x to 41.3x as fast<!-- /speed -->.\nb 2-40x\n"
    assert page.read_text() == expected

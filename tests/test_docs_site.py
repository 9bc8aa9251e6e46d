"""The documentation site builds in strict mode: any Sphinx warning (a broken link, a
reference that does not resolve, a malformed docstring) fails the test."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_site_builds_without_a_warning(tmp_path: Path) -> None:
    pytest.importorskip("sphinx")
    out = tmp_path / "html"
    strict = ["-W", "--keep-going", "-E", "-q", "-b", "html"]
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", *strict, str(ROOT / "docs"), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    api = (out / "api.html").read_text()
    for name in ("SeqReptile", "TaskBatchSampler", "PCGrad", "TaskGradientProbe", "RecAdam"):
        assert name in api, name
    # the plots are shown on the pages that discuss them
    assert (out / "_images" / "synthetic.png").exists()
    assert "curves.png" in (out / "results.html").read_text()


def test_readme_links_are_absolute_and_point_at_files_of_this_repository() -> None:
    """PyPI shows the README without the repository around it: relative links would break."""
    base = "https://github.com/torch-seqreptile/torch_seqreptile/blob/main/"
    links = re.findall(r"\]\(([^)]+)\)", (ROOT / "README.md").read_text())
    assert links and all(link.startswith(("https://", "http://")) for link in links), links
    for link in links:
        if link.startswith(base):
            assert (ROOT / link[len(base) :].split("#")[0]).exists(), link

"""Runs the documentation: every ``python`` block of README.md and docs/*.md, and the ``>>>``
examples in the package's docstrings, as tests (Sybil).

Sybil was chosen over pytest-markdown-docs and pytest-examples because one tool covers both
Markdown pages and docstrings, blocks of a page share one namespace in page order (a page
reads like a script), skips are visible comments in the page itself
(``<!-- skip: next "reason" -->``), and it is maintained and tested against current pytest.
The names blocks use without defining them come from ``tests/doc_fixtures.py``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser
from sybil.parsers.rest import DocTestParser

from tests.doc_fixtures import namespace

_START = os.getcwd()


def _setup(page: dict[str, Any]) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    page["_environ"] = dict(os.environ)  # the fixtures set torchrun's variables
    page.update(namespace())


def _teardown(page: dict[str, Any]) -> None:
    os.chdir(_START)
    os.environ.clear()
    os.environ.update(page["_environ"])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


pages = Sybil(
    parsers=[PythonCodeBlockParser(), SkipParser()],
    patterns=["README.md", "docs/*.md"],
    setup=_setup,
    teardown=_teardown,
    name="docs",
)
docstrings = Sybil(
    parsers=[DocTestParser()],
    patterns=["torch_seqreptile/*.py", "torch_seqreptile/**/*.py"],
    name="api",
)

pytest_collect_file = (pages + docstrings).pytest()

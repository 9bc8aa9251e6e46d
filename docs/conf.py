"""Sphinx configuration of the documentation site: the pages in docs/ (Markdown, via MyST)
and the API reference built from the docstrings (autodoc + napoleon).

Build: ``.venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html``
(``tests/test_docs_site.py`` runs exactly this; any warning fails it).
"""

from __future__ import annotations

import torch_seqreptile

project = "torch_seqreptile"
author = "The torch_seqreptile authors"
copyright = "2026, The torch_seqreptile authors"
release = torch_seqreptile.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "results/*.md"]
myst_heading_anchors = 4
myst_enable_extensions = ["dollarmath"]
suppress_warnings = ["myst.header"]  # pages may start below an h1 in a listing
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
html_theme = "furo"
html_title = f"torch_seqreptile {release}"

# Every reference must resolve (a missing one fails the build), except to other projects'
# objects: their inventories would need the network (intersphinx), so they are named here.
nitpicky = True
nitpick_ignore_regex = [
    (
        r"py:.*",
        r"(torch|torchdata|numpy|np|collections|contextlib|typing|transformers|lightning)(\..*)?",
    ),
    (r"py:.*", r"(Tensor|Optimizer|nn\.Module|Module|Generator|Trainer)"),
    (r"py:.*", r"(Array|TaskLoss|Layers|WeightOptimizer)"),  # our type aliases
    (r"py:.*", r"torch_seqreptile(\.\w+)*\._\w+(\..*)?"),  # private modules (bases shown)
]

"""Sphinx configuration: API pages from the code, guides in Markdown (MyST), examples run as doctests."""

from __future__ import annotations

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# Document the source tree even without an install (the docs session installs the package too).
sys.path[:0] = [ROOT, os.path.join(ROOT, "adapters")]

from lmcache import __version__  # noqa: E402

project = "lmcache-mempool"
author = "lmcache-mempool developers"
copyright = "2026, lmcache-mempool developers"
release = version = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"lmcache-mempool {version}"

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True

# Every example in the docs runs: `make doctest` / `nox -s docs`.
doctest_global_setup = """
import numpy as np
"""

"""Sphinx configuration of the ktls documentation (built by ``scripts/test`` with warnings as errors)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # the local extension that draws the benchmark charts
sys.path.insert(0, str(HERE.parent / "src"))

import ktls  # noqa: E402

project = "ktls"
author = "The ktls developers"
copyright = "2026, The ktls developers"
version = release = ktls.__version__

extensions = ["sphinx.ext.autodoc", "myst_parser", "charts"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
html_theme = "alabaster"
html_static_path: list[str] = []
myst_heading_anchors = 3
suppress_warnings = ["myst.header"]

"""Sphinx configuration of the gradhpo documentation.

Build (warnings are errors)::

    sphinx-build -W --keep-going -b html docs docs/_build/html
    sphinx-build -W -b doctest docs docs/_build/doctest

No network access is needed, neither to build (no intersphinx) nor to read
the result: the ``sphinx-mathjax-offline`` package copies MathJax into
``_static/mathjax/`` of the build and points the pages at that copy, so the
math is typeset from ``file://`` or an offline mirror too (checked in a
headless browser with the network blocked by ``tests/test_docs_browser.py``).
Three pages are filled in at build time by ``docs/_ext/gradhpo_docs.py``: the
API reference (from ``gradhpo.__all__``), the benchmark tables (from
``benchmarks/results/*.json``) and the changelog (from ``CHANGELOG.md``).
"""

import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(DOCS, "_ext"))

import gradhpo  # noqa: E402

project = "gradhpo"
author = "the gradhpo authors"
copyright = "the gradhpo authors"
release = gradhpo.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    # After sphinx.ext.mathjax: sets ``mathjax_path`` to the bundled MathJax
    # (no CDN) and copies it into the build once the build has succeeded.
    "sphinx-mathjax-offline",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
    "gradhpo_docs",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
root_doc = "index"
language = "en"

# -- autodoc / autosummary / napoleon ---------------------------------------
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_inherit_docstrings = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
nitpicky = False

# -- doctest ------------------------------------------------------------------
# Every ``>>>`` block (tutorials and docstrings pulled in by autodoc) is run.
doctest_test_doctest_blocks = "default"
doctest_global_setup = """
import jax
jax.config.update("jax_enable_x64", False)
"""

# -- HTML ---------------------------------------------------------------------
html_theme = "sphinx_rtd_theme"
html_title = f"gradhpo {release}"
html_static_path = []
html_theme_options = {"navigation_depth": 3}
pygments_style = "sphinx"

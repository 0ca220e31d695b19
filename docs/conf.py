"""Sphinx configuration: the documentation site, built from the Markdown pages in this folder.

`make docs` builds it into docs/_build/html; tests/core/test_docs.py builds it with warnings as
errors, so a broken link, a missing page or a bad cross-reference fails the tests.
"""

project = "napari-brain-uad"
author = "napari-brain-uad developers"
copyright = "napari-brain-uad developers"

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
# _build holds the output; the PNGs are the pages' figures, not pages.
exclude_patterns = ["_build"]

# Headings get anchors down to level 3, so pages link to each other's sections by name
# (models.md#bundled-models-and-measured-results) and a renamed section breaks the build.
myst_heading_anchors = 3
# $…$ and ``` ```{math} ``` are not used; dollar signs in shell commands stay text.
myst_enable_extensions = []

html_theme = "alabaster"
html_title = "napari-brain-uad"
html_theme_options = {"description": "Unsupervised anomaly detection in brain MRI, in napari", "fixed_sidebar": False}
# Offline reading: no search index served from elsewhere, no external fonts or scripts.
html_show_sourcelink = False

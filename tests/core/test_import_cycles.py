"""No two of the package's modules import each other at import time (scripts/import_cycles.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "import_cycles.py"


def test_no_module_level_import_cycles():
    spec = importlib.util.spec_from_file_location("import_cycles", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    edges = script.graph(include_nested=False)
    assert "napari_brain_uad.nifti" in edges and "napari_brain_uad.models.registry" in edges  # it read the package
    assert script.cycles(edges) == [], [script.describe(cycle, edges) for cycle in script.cycles(edges)]

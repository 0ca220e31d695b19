"""The package as napari and users meet it: manifest, Qt-free core."""

from __future__ import annotations

import subprocess
import sys

CORE_MODULES = [
    "napari_brain_uad.io",
    "napari_brain_uad.preprocess",
    "napari_brain_uad.sample_data",
    "napari_brain_uad.scoring",
    "napari_brain_uad.postprocess",
    "napari_brain_uad.metrics",
    "napari_brain_uad.checkpoint",
    "napari_brain_uad.models",
    "napari_brain_uad.reconstruct",
    "napari_brain_uad.noise",
    "napari_brain_uad.analysis",
    "napari_brain_uad.cli",
]


def test_manifest_is_valid():
    result = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "napari-brain-uad"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_core_imports_neither_qt_nor_napari():
    code = (
        "import sys, importlib\n"
        f"for name in {CORE_MODULES!r}: importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'magicgui'})\n"
        "print(bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_plugin_never_imports_the_training_module():
    """The plugin reads what training writes; it must work where the training module is absent."""
    code = (
        "import sys, importlib\n"
        "import napari_brain_uad._widget, napari_brain_uad._reader, napari_brain_uad._writer, napari_brain_uad._samples\n"
        f"for name in {CORE_MODULES!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'brain_uad_training'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"

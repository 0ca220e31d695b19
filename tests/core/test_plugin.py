"""The package as napari and users meet it: manifest, Qt-free core, no training import."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import napari_brain_uad


def plugin_modules(*, private: bool) -> list[str]:
    """Every module of the package and its subpackages, found on disk, so a new module is checked
    without anyone listing it; ``private=False`` leaves out those whose own name starts with
    ``_`` (the napari-facing ones: widgets, reader, writer, sample commands)."""
    names = [module.name for module in pkgutil.walk_packages(napari_brain_uad.__path__, "napari_brain_uad.")]
    return sorted(name for name in names if private or not name.rsplit(".", 1)[-1].startswith("_"))


def test_module_discovery_finds_the_core_and_its_subpackages():
    core = plugin_modules(private=False)
    assert {"napari_brain_uad.model_registry", "napari_brain_uad.bias_field", "napari_brain_uad.downloads",
            "napari_brain_uad.models.cddpm", "napari_brain_uad.cli"} <= set(core)
    assert "napari_brain_uad._widget" not in core and "napari_brain_uad._widget" in plugin_modules(private=True)


def test_manifest_is_valid():
    result = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "napari-brain-uad"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_core_imports_neither_qt_nor_napari():
    code = (
        "import sys, importlib\n"
        f"for name in {plugin_modules(private=False)!r}: importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'magicgui'})\n"
        "print(bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_plugin_never_imports_the_training_module():
    """The plugin reads what training writes; it must work where the training module is absent."""
    code = (
        "import sys, importlib\n"
        f"for name in {plugin_modules(private=True)!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'brain_uad_training'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"

"""sample_data/: the sample registry's one source, found by a source checkout, an editable
install and a built package alike; its README's tables agree with it."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPOSITORY
from napari_brain_uad.sample_registry import registry, registry_source

TOP_LEVEL_REGISTRY = REPOSITORY / "sample_data" / "samples.json"
PACKAGED_REGISTRY = "napari_brain_uad/registries/samples.json"

def _probe(site_dirs: list[Path], plain_dirs: list[Path]) -> dict:
    """Import the package in a fresh interpreter from the given folders only (``site_dirs`` with
    their .pth files, as an installed environment has them) and report its registry.

    ``python -S``: no site-packages' .pth (the development environment's own editable install,
    say) decides which napari_brain_uad is imported."""
    code = (
        "import json, site, sys\n"
        f"for folder in {[str(d) for d in site_dirs]!r}: site.addsitedir(folder)\n"
        f"sys.path += {[str(d) for d in plain_dirs]!r}\n"
        "from napari_brain_uad import sample_registry\n"
        "print(json.dumps({'module': sample_registry.__file__, 'source': str(sample_registry.registry_source()),\n"
        "                  'registry': sample_registry.registry()}))\n"
    )
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env={}, check=True)
    return json.loads(result.stdout)


def _dependency_dirs() -> list[Path]:
    """Where numpy (the registry module's one dependency outside the standard library) is."""
    import numpy

    return [Path(numpy.__file__).parents[1]]


def _copy_of_the_checkout(destination: Path) -> Path:
    """The repository's files as a fresh clone would have them (plus new, not ignored ones), so a
    build neither reads stale build/ output nor leaves any in the checkout."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPOSITORY, capture_output=True, check=False,
    )
    if listed.returncode != 0:
        pytest.skip(f"{REPOSITORY} is not a git checkout (git ls-files failed), so it cannot be copied as one")
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = REPOSITORY / name
        if source.is_file():  # a file deleted but not yet committed is still listed
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def _needs_build_tools(*modules: str) -> None:
    missing = [name for name in ("setuptools", *modules) if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"building needs {', '.join(missing)} in this environment (pip install {' '.join(missing)})")


def test_the_package_reads_the_registry_kept_in_sample_data():
    assert registry_source() == TOP_LEVEL_REGISTRY
    assert registry() == json.loads(TOP_LEVEL_REGISTRY.read_text())
    # one source: no copy of it anywhere else in the repository's code
    copies = [path for folder in ("src", "training") for path in (REPOSITORY / folder).rglob("samples.json")]
    assert copies == []


def test_git_keeps_the_sample_data_folder():
    ignored = subprocess.run(
        ["git", "check-ignore", "sample_data/samples.json", "sample_data/README.md"],
        cwd=REPOSITORY, capture_output=True, text=True, check=False,
    )
    if ignored.returncode == 128:
        pytest.skip(f"{REPOSITORY} is not a git checkout")
    assert ignored.stdout == ""  # check-ignore names the paths it would ignore


def test_a_built_wheel_carries_the_registry(tmp_path):
    _needs_build_tools()
    checkout = _copy_of_the_checkout(tmp_path / "checkout")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(checkout)],
        capture_output=True, check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("napari_brain_uad-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(PACKAGED_REGISTRY) == TOP_LEVEL_REGISTRY.read_bytes()
        archive.extractall(tmp_path / "installed")  # a pure-Python wheel, unpacked: what pip installs

    found = _probe([], [tmp_path / "installed", *_dependency_dirs()])
    assert Path(found["module"]).is_relative_to(tmp_path / "installed")
    assert Path(found["source"]) == tmp_path / "installed" / PACKAGED_REGISTRY
    assert found["registry"] == registry()


def test_a_wheel_built_from_the_source_distribution_carries_the_registry(tmp_path):
    """What a release does (``python -m build``): the sdist must carry sample_data/ (MANIFEST.in)."""
    _needs_build_tools("build")
    checkout = _copy_of_the_checkout(tmp_path / "checkout")
    # --skip-dependency-check: pyproject's build requirements name `wheel`, which setuptools no
    # longer needs (it builds wheels itself since 70.1) and which an environment may lack.
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--skip-dependency-check", "--outdir", str(tmp_path / "dist"),
         str(checkout)],
        capture_output=True, check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("napari_brain_uad-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(PACKAGED_REGISTRY) == TOP_LEVEL_REGISTRY.read_bytes()


def test_a_source_checkout_reads_the_top_level_file(tmp_path):
    """A checkout on the path (what ``pip install -e .`` makes: setuptools' editable install of a
    src layout puts ``src`` on the path) reads sample_data/ where it is, so an edit of the
    registry needs no reinstall. Never ``pip install`` here: pip would uninstall the running
    environment's napari-brain-uad, even with ``--prefix``."""
    checkout = _copy_of_the_checkout(tmp_path / "checkout")
    found = _probe([], [checkout / "src", *_dependency_dirs()])
    assert Path(found["source"]) == checkout / "sample_data" / "samples.json"
    assert found["registry"] == registry()
    edited = json.loads((checkout / "sample_data" / "samples.json").read_text())
    edited["samples"]["edited"] = edited["samples"]["brats-glioma"]
    (checkout / "sample_data" / "samples.json").write_text(json.dumps(edited))
    assert "edited" in _probe([], [checkout / "src", *_dependency_dirs()])["registry"]["samples"]


def test_the_readme_tables_are_the_registry_s():
    spec = importlib.util.spec_from_file_location("build_sample_registry", REPOSITORY / "scripts" / "build_sample_registry.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    readme = script.README.read_text()
    written = readme[readme.index(script.TABLES_START) + len(script.TABLES_START):readme.index(script.TABLES_END)]
    assert written.strip() == script.readme_tables(registry()), (
        "sample_data/README.md's tables differ from samples.json: run python scripts/build_sample_registry.py --tables"
    )

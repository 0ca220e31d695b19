"""Build hook: the sample registry is kept once, in ``sample_data/samples.json`` at the top of the
repository, and copied into the built package as ``napari_brain_uad/registries/samples.json``.

Everything else about the build is in pyproject.toml. A source checkout or an editable install
reads the top-level file itself (``napari_brain_uad.sample_registry.registry``): setuptools'
editable mode does not run this copy, and no second copy is ever written into ``src/``.
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_py import build_py

SAMPLE_REGISTRY = os.path.join("sample_data", "samples.json")
PACKAGED_SAMPLE_REGISTRY = ("napari_brain_uad", "registries", "samples.json")


class BuildPyWithSampleRegistry(build_py):
    def _registry_target(self) -> str:
        return os.path.join(self.build_lib, *PACKAGED_SAMPLE_REGISTRY)

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        target = self._registry_target()
        self.mkpath(os.path.dirname(target))
        self.copy_file(SAMPLE_REGISTRY, target)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:  # setuptools then lists get_output_mapping's keys, ours among them
            return outputs
        return [*outputs, self._registry_target()]

    def get_output_mapping(self) -> dict[str, str]:
        # Lets setuptools' strict editable mode link the built path to the top-level file.
        return {**super().get_output_mapping(), self._registry_target(): SAMPLE_REGISTRY}


setup(cmdclass={"build_py": BuildPyWithSampleRegistry})

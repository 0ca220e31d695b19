"""The sample registry (``registry.json``), shipped as ``napari_brain_uad._sample_registry``.

The code that reads it is ``napari_brain_uad.sample_data``; ``build_registry.py`` rebuilds it.
"""

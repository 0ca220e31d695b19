"""The two registries users pick files from by name, side by side; data only.

- ``samples.json``: the sample scans (read by ``napari_brain_uad.sample_registry``; rebuilt by
  ``scripts/build_sample_registry.py``);
- ``models.json``: the models (read by ``napari_brain_uad.model_registry``); a ``file`` entry
  names a checkpoint shipped in ``bundled_models/``, a ``url`` entry one to download.
"""

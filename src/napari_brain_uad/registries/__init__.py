"""The two registries users pick files from by name, side by side; data only.

- ``samples.json``: the sample scans (read by ``napari_brain_uad.sample_registry``). Only a built
  package has it here: its one source is ``sample_data/samples.json`` at the top of the
  repository (rebuilt by ``scripts/build_sample_registry.py``), which ``setup.py`` copies in
  when building and a source checkout reads where it is;
- ``models.json``: the models (read by ``napari_brain_uad.model_registry``); a ``file`` entry
  names a checkpoint shipped in ``bundled_models/``, a ``url`` entry one to download;
  ``default`` is the model used when nothing else decides, and ``default_by_contrast`` the model
  for a scan of a given contrast (``T1``, ``T1c``, ``T2``, ``FLAIR``) when the user names none.
"""

"""The models shipped inside the package; data only: the checkpoints are safetensors files.
The registry naming them (``registries/models.json``) is read by
``napari_brain_uad.model_registry``."""

"""The models shipped inside the package, and the registry of models users can pick by name
(see ``napari_brain_uad.model_registry``). Data only: the checkpoints are safetensors files."""

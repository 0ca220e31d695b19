"""The training module (import name ``brain_uad_training``): models fitted on healthy scans.

The folder ``training/`` sits at the top level beside the plugin, as the product asks, but is
installed as ``brain_uad_training`` so it never shadows another package called ``training``, and
so the plugin, which never imports it, runs where it is absent.

The data flow of training, one file per step:

- ``config.py``: the run's settings (config file and flags);
- ``data.py``: healthy scans to model space (the core's ``preprocess``), subject split, slices
  sampled with replacement;
- ``augment.py``: MONAI blur, bias field, gamma and our ghosting;
- ``pretrain_encoder.py``: cDDPM's optional masked pre-training of its context encoder,
  before the loop;
- ``fit.py``: the loop, validation, best/last checkpoints, resume;
- ``distributed.py``: torchrun / DistributedDataParallel, and a clean stop on Ctrl-C;
- ``cli.py``: the ``brain-uad-train`` command;
- ``calibrate.py``: the ``brain-uad-calibrate`` command: a trained checkpoint's thresholds and
  card, through the same analysis and evaluation users run.

The plugin never imports this package; it reads what training writes through
``napari_brain_uad.models.load_model``.
"""

from .config import ConfigError, TrainingConfig
from .data import TrainingDataError
from .fit import TrainingResult, fit

__all__ = ["ConfigError", "TrainingConfig", "TrainingDataError", "TrainingResult", "fit"]

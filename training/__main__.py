"""``python -m brain_uad_training`` (and ``torchrun -m brain_uad_training``) = ``brain-uad-train``."""

import sys

from .cli import main

sys.exit(main())

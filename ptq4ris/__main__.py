"""``python -m ptq4ris``: the same command line as the ``ptq4ris`` script (and what ``torchrun -m ptq4ris`` runs)."""

import sys

from .cli import main

sys.exit(main())

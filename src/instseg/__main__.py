"""``python -m instseg`` (and ``torchrun -m instseg``): the ``instseg`` command line."""

import sys

from instseg.cli import main

sys.exit(main())

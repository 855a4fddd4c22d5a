"""``python -m samedge ...``: the command line (for launchers such as ``torchrun -m``)."""

import sys

from samedge.experiment.cli import main

sys.exit(main())

"""``python -m xent`` runs the ``xent`` command line."""

import sys

from xent.cli import main

sys.exit(main())

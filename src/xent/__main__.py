"""``python -m xent`` runs the ``xent`` command line."""

import sys

from xent.tools.cli import main

sys.exit(main())

"""``python -m workbench`` runs the command line (:mod:`workbench.faces.cli`)."""

import sys

from workbench.faces.cli import main

sys.exit(main())

"""``python -m clearmaps`` runs the ``clearmaps`` command."""

import sys

from .cli import main

sys.exit(main())

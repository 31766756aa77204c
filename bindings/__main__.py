"""``python -m clearmaps`` runs the ``clearmaps`` command."""

import sys

from .entry import main

sys.exit(main())

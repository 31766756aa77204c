"""The ``clearmaps`` console script and ``python -m clearmaps``.

The command's modules (NumPy and Pillow with them) are imported inside :func:`main`, so that Ctrl-C in the
first second ends as Ctrl-C later does, in one line with exit status 130, never in a traceback from an
import. Nothing but :mod:`sys` is imported before.
"""

import sys


def main(argv=None) -> int:
    """Run the ``clearmaps`` command (:func:`clearmaps.cli.main`); returns the exit status."""
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        print("clearmaps: interrupted; nothing was written.", file=sys.stderr)
        return 130
    return run(argv)

"""``python -m fxeq``: the same command line as the ``fxeq`` script (see :mod:`fxeq.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

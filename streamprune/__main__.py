"""``python -m streamprune``: the same as the ``streamprune`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

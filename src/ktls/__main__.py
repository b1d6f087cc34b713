"""``python -m ktls``: the command line (see :mod:`ktls.cli`)."""

import sys

from .cli import main

sys.exit(main())

"""``python -m meshid``: the command line."""

import sys

from meshid.cli import main

sys.exit(main())

import sys

from meshid.cli import main

sys.exit(main())

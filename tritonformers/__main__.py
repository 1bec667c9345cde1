"""``python -m tritonformers``: the same command line as the ``tritonformers`` script."""

import sys

from .cli import main

sys.exit(main())

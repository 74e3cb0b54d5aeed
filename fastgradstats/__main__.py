"""``python -m fastgradstats demo`` -- same as the ``fastgradstats`` command."""

import sys

from .cli import main

sys.exit(main())

"""``python -m so8t.compare``: the same as ``so8t-compare``."""

import sys

from so8t.compare.cli import main

sys.exit(main())

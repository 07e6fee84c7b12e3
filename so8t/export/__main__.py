import sys

from so8t.export.cli import main

sys.exit(main())
